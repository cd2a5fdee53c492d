"""
MEPT: Mixture of Expert Prompt Tuning as a Manifold Mapper (Zeng et al., EMNLP 2025, arXiv 2509.00996), top to bottom.

A pretrained transformer stays frozen; P prompt *slots* sit in its input. At the entrance of every chosen block a
linear *router* reads the hidden states of the real tokens, picks the top-K of E prompt *experts* (each P x D), mixes
them (plus an always-on shared expert) into the slots. Different inputs take different experts at different depths: a
*pathway*. Only the experts, the routers and a task head the backbone holds (BERT's classifier) train.

Supported backbones (each in test_mept.py; any other model runs through the same code or is refused in one sentence):
    seq2seq        T5 (v1.0, v1.1, mT5, Flan-T5): the encoder's blocks; the decoder is untouched
    encoders       BERT, RoBERTa, DeBERTa-v2, MiniLM, DistilBERT: the slots go right after [CLS]
    decoder-only   GPT-2, Llama, Qwen2, Mistral, Gemma, Phi (attention flagged causal): slots first

Shapes:    B batch   T tokens (padding included; the mask marks the real ones)   L blocks
           E n_experts   K top_k   P prompt_len   D d_model, the width of the hidden states
"""

import functools
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# Step 0: the configuration; the paper's baselines as its presets (which blocks route, how many experts, a shared one)
PRESETS = {
    "prompt_tuning": dict(layers=[0], n_experts=1, top_k=1, shared_expert=False),  # Lester et al. 2021
    "smop": dict(layers=[0], n_experts=4, top_k=1, shared_expert=False),  # Choi et al. 2023
    "deep_prompt": dict(layers=None, n_experts=1, top_k=1, shared_expert=False),  # VPT-deep, P-tuning v2
    "mept": dict(layers=None, n_experts=4, top_k=1, shared_expert=True),  # this paper
}


@dataclass
class MEPTConfig:
    n_experts: int = 4  # E: experts in each block's pool (paper: 4)
    prompt_len: int = 10  # P: prompt slots in the sequence (paper: 10)
    top_k: int = 1  # K: experts mixed per input and block (paper: 1)
    layers: Optional[list] = None  # blocks that route; None = every block; must hold 0, the input
    router_noise: float = 0.1  # sigma of the router noise, training only (0 = off; the paper: 1.0); Step 1:
    noise_form: str = "additive"  # "additive": logits + sigma * eps; "paper": logits * (1 + sigma * eps)
    shared_expert: bool = True  # an always-on expert added to the mixture, zero at the start
    balance_coef: float = 0.0  # weight of the Switch load-balancing loss (beyond the paper; 0 = off)
    init: str = "vocab"  # "vocab": sampled embedding rows (Lester et al.); "random": N(0, 1)
    router_center: bool = True  # the router reads the summary minus its running mean over training inputs
    same_start: bool = True  # a block's E experts start from the same rows (sparse upcycling); False: each its own

    def __post_init__(self):
        # sentence-long errors here, so that a bad setting fails now and not deep inside a forward
        counts, weights = (self.n_experts, self.prompt_len, self.top_k), (self.router_noise, self.balance_coef)
        if any(type(v) is not int or v < 1 for v in counts) or self.top_k > self.n_experts:  # a bool is no count
            raise ValueError(f"n_experts, prompt_len, top_k must be whole numbers >= 1, top_k <= n_experts: {counts}.")
        if any(type(v) not in (int, float) or not math.isfinite(v) or v < 0 for v in weights):
            raise ValueError(f"router_noise and balance_coef must be finite numbers >= 0 (0 = off), got {weights}.")
        for name, allowed in (("init", ("vocab", "random")), ("noise_form", ("additive", "paper")),
                              *((flag, (True, False)) for flag in ("same_start", "shared_expert", "router_center"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.layers is not None and (0 not in self.layers or any(type(i) is not int or i < 0 for i in self.layers)):
            raise ValueError(f"layers must be block indices with 0 (it inserts the slots), got {list(self.layers)}.")
        self.layers = None if self.layers is None else sorted(set(self.layers))

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Step 1: the router reads the real tokens and scores the experts
class Routing(NamedTuple):
    expert_idx: torch.Tensor  # (B, K) long: the chosen experts
    probs: torch.Tensor  # (B, E): the router's softmax over all experts


def summarize(hidden, mask):  # hidden (B, T, D), mask (B, T) with 1 = real token -> s (B, D)
    """s = the mean over the real tokens only (padding never moves the router; the official code's did), after a
    parameter-free LayerNorm, so that routers at every depth read inputs on one scale. Always float32."""
    normed = F.layer_norm(hidden.float(), hidden.shape[-1:])  # (B, T, D)
    return (normed * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)


def top_k_gate(logits, top_k):  # logits (B, E) -> gate (B, K), expert_idx (B, K), probs (B, E)
    """The gate is the chosen expert's softmax probability, NOT renormalised over the K: with K = 1 a
    renormalised gate would be the constant 1, and the router would get no gradient from the task."""
    probs = logits.softmax(-1)  # (B, E)
    return (*probs.topk(top_k, dim=-1), probs)


def mean_over_processes(x):  # x itself, or under torchrun its mean over the processes (equal batches each)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x.div_(torch.distributed.get_world_size()))
    return x


class Router(nn.Module):
    def __init__(self, d_model, config):
        super().__init__()
        self.proj = nn.Linear(d_model, config.n_experts, bias=False)  # W_l: (E, D), no bias
        nn.init.orthogonal_(self.proj.weight)  # orthogonal rows: every expert starts equally reachable
        self.top_k, self.noise, self.noise_form = config.top_k, config.router_noise, config.noise_form
        self.register_buffer("center", torch.zeros(d_model) if config.router_center else None)  # (D,): the running
        self.register_buffer("seen", torch.zeros(()) if config.router_center else None)  # mean and its batch count

    def forward(self, hidden, mask):  # hidden (B, T, D), mask (B, T) -> gate (B, K), Routing
        summary = summarize(hidden, mask)  # (B, D)
        if self.center is not None:  # why: a frozen model's summaries share a large part (SmolLM2: 3-6x what varies)
            # and W_l times it is a bias, the same for every input, that sends most to one expert and grows at each step
            # that helps it: collapse. Centered, z_e - z_j averages 0 over training inputs: no expert wins them all
            if self.training:  # the mean of all batches so far, then of about the last 20
                self.seen += 1
                self.center.lerp_(mean_over_processes(summary.detach().mean(0)), (1 / self.seen).clamp(min=0.05))
            summary = summary - self.center  # (B, D)
        logits = self.proj(summary.to(self.proj.weight.dtype)).float()  # (B, E): W_l s
        if self.training and self.noise > 0:  # eps ~ N(0, 1), drawn anew per input; no gradient flows into it
            # additive (Shazeer et al. 2017): a fixed jitter flips the top-1 only near a tie: a sure router is followed
            # (sigma 1 slowed SmolLM2's fit most). The paper's z*(1 + sigma*eps) flips as often however large z grows
            scale = logits.detach() if self.noise_form == "paper" else 1.0  # the official code: sigma^2, same at 1
            logits = logits + self.noise * torch.randn_like(logits) * scale  # (B, E)
        gate, expert_idx, probs = top_k_gate(logits, self.top_k)  # (B, K), (B, K), (B, E)
        return gate, Routing(expert_idx, probs)


# -----------------------------------------------------------------------------
# Step 2: the batched top-k gather
def gather_experts(expert_pool, expert_idx, gate):
    """mixed_prompt[b] = sum_k gate[b, k] * expert_pool[expert_idx[b, k]], for every b and k at once.

    expert_pool (E, P, D), expert_idx (B, K) long, gate (B, K) -> mixed_prompt (B, P, D).
    Slot p of expert e is row e*P + p of the pool's E*P rows, so the P rows of expert e are one contiguous
    run: row e of the pool viewed as (E, P*D). ONE index_select fetches every example's K experts whole, and
    ONE batched matrix product (the gates as a (B, 1, K) row times the fetched (B, K, P*D)) weights them and
    sums over k. The same lines serve K = 1 and K > 1: no Python loop over B or K, no special case.
    Worked by hand: E=3, P=2, so the flat rows are [e0p0, e0p1, e1p0, e1p1, e2p0, e2p1].
      expert_idx = [[2, 0]], gate = [[0.7, 0.2]]                  (B=1, K=2)
      flat rows e*P+p = [[4, 5], [0, 1]], i.e. rows 2 and 0 of the (E, P*D) view
      picked          = [[e2p0 e2p1], [e0p0 e0p1]]                (1, 2, P*D)
      mixed_prompt[0] = 0.7 * [e2p0 e2p1] + 0.2 * [e0p0 e0p1]      (1, P*D), reshaped to (1, P, D)
    Oracle: a double loop (test_mept.py). It copies B*K*P*D numbers, a dense mixture does B*E*P*D multiply-adds.
    """
    n_experts, prompt_len, d_model = expert_pool.shape  # E, P, D
    batch, top_k = expert_idx.shape  # B, K
    expert_rows = expert_pool.reshape(n_experts, prompt_len * d_model)  # (E, P*D): row e = expert e
    picked = expert_rows.index_select(0, expert_idx.reshape(-1))  # (B*K, P*D): entry b*K+k = idx[b, k]
    picked = picked.view(batch, top_k, prompt_len * d_model)  # (B, K, P*D)
    weights = gate.unsqueeze(1).to(picked.dtype)  # (B, 1, K): float32 gates take the pool's dtype
    mixed = torch.bmm(weights, picked)  # (B, 1, K) @ (B, K, P*D) -> (B, 1, P*D): the sum over k
    return mixed.view(batch, prompt_len, d_model)  # (B, P, D)


def insert_slots(offset, seq, slots):
    """seq (B, T, ...) and slots (B, P, ...) -> (B, P+T, ...), the slots at positions offset .. offset+P-1."""
    return torch.cat([seq[:, :offset], slots, seq[:, offset:]], dim=1)


# -----------------------------------------------------------------------------
# Step 3: one block's expert pool (route, gather, add the shared expert) and the balance loss
class ExpertPrompts(nn.Module):
    def __init__(self, config, embed):  # embed: the backbone's token embedding table, (vocabulary, D)
        super().__init__()
        # init: vocabulary rows (Lester et al.; the probe rescales deeper pools), or N(0, 1), off the manifold.
        # same_start: E copies of one (as sparse upcycling starts experts): an early flip of the router swaps nothing
        E, P = config.n_experts, config.prompt_len
        pick = torch.randint(0, embed.num_embeddings, ((1 if config.same_start else E) * P,))  # (P,) or (E*P,)
        rows = embed.weight.detach()[pick.to(embed.weight.device)].float()  # (P or E*P, D)
        rows = rows if config.init == "vocab" else torch.randn_like(rows)
        self.expert_pool = nn.Parameter(rows.view(-1, P, rows.shape[1]).expand(E, P, -1).clone())  # (E, P, D)
        self.router = Router(rows.shape[1], config).to(rows.device)
        # (1, P, D), zero at the start: the shared expert changes nothing until it learns what all inputs share
        self.shared = nn.Parameter(torch.zeros_like(self.expert_pool[:1])) if config.shared_expert else None

    def forward(self, hidden, mask):  # (B, T, D), (B, T) -> (B, P, D), Routing
        gate, routing = self.router(hidden, mask)  # (B, K), Routing
        mixed_prompt = gather_experts(self.expert_pool, routing.expert_idx, gate)  # (B, P, D)
        return mixed_prompt + (0 if self.shared is None else self.shared), routing  # (B, P, D): + the shared one


def load_balancing_loss(routing, n_experts):
    """Switch Transformer's E * sum_e f_e * P_e: 1 for an even load, up to E when collapsed. f_e, the share of the B*K
    choices that went to e, has no gradient; P_e, the mean probability of e, has. Under torchrun f_e is the whole
    batch's, so that with DDP's averaged gradients the term equals one process's."""
    share = mean_over_processes(F.one_hot(routing.expert_idx.flatten(), n_experts).float().mean(0))  # (E,): f_e
    return n_experts * (share * routing.probs.float().mean(0)).sum()  # scalar


# -----------------------------------------------------------------------------
# Step 4: the backbone's blocks and its family, read from the model itself (never from its name)
class UnsupportedBackbone(ValueError):
    """A backbone MEPT cannot serve, refused in one sentence that says what to do."""


SUPPORTED = "use a backbone listed at the top of mept.py"  # how the refusals end
INPUT_ONLY = "use layers=[0] (input-only prompts) with this model"


def find_blocks(backbone):
    """(parent, blocks): the nn.ModuleList of identical modules with the most parameters (T5's encoder.block,
    BERT's encoder.layer, GPT-2's h, Llama's layers); the parent, to check that no sibling list splits a layer."""
    root = backbone.get_encoder() if backbone.config.is_encoder_decoder else backbone
    lists = [(parent, child) for parent in root.modules() for child in parent.children()
             if isinstance(child, nn.ModuleList) and len(child) and len({type(b) for b in child}) == 1]
    if not lists:
        raise UnsupportedBackbone(f"{type(backbone).__name__} keeps no blocks in an nn.ModuleList; {SUPPORTED}.")
    return max(lists, key=lambda pair: sum(p.numel() for p in pair[1].parameters()))


def backbone_family(backbone):
    """'seq2seq' (an encoder-decoder), 'decoder' (its attention is flagged causal) or 'encoder'."""
    causal = [getattr(m, "is_causal", None) is True for m in find_blocks(backbone)[1][0].modules()]
    return "seq2seq" if backbone.config.is_encoder_decoder else "decoder" if any(causal) else "encoder"


def parameters_line(module):  # PEFT's report: 'trainable params: N || all params: M || trainable%: X'
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# -----------------------------------------------------------------------------
# Step 5: MEPT, the frozen backbone with prompt experts at the entrance of its blocks
class MEPT(nn.Module):
    def __init__(self, backbone, config=None):
        super().__init__()
        self.config, self.backbone, name = config or MEPTConfig(), backbone, type(backbone).__name__
        self.family, (parent, self.blocks) = backbone_family(backbone), find_blocks(backbone)
        self.layers = self.config.layers or list(range(len(self.blocks)))
        n_layers = getattr(backbone.config, "num_hidden_layers", len(self.blocks))
        parallel = [c for c in parent.children() if isinstance(c, nn.ModuleList) and len(c) == len(self.blocks)]
        try:
            embed = backbone.get_input_embeddings()
        except NotImplementedError:  # a model without a token table (one that reads characters, say)
            embed = None
        if not isinstance(embed, nn.Embedding):
            raise UnsupportedBackbone(f"{name} has no token embedding table to put prompts beside; {SUPPORTED}.")
        if self.layers[-1] >= len(self.blocks):
            raise ValueError(f"layers {self.layers} go beyond the model's {len(self.blocks)} blocks.")
        if self.config.layers != [0] and (n_layers != len(self.blocks) or len(parallel) > 1):
            # one block run again and again (shared weights), or each layer split over parallel lists
            raise UnsupportedBackbone(f"{name} has no one module per layer to hook ({len(self.blocks)} blocks in "
                                      f"{len(parallel)} parallel lists for {n_layers} layers); {INPUT_ONLY}.")
        self.slot_offset = 1 if self.family == "encoder" else 0  # an encoder's head reads [CLS]: slots after it
        # a learned position table (BERT's, GPT-2's; RoBERTa's from padding_idx + 1) caps the length (rotary: none)
        pos = next((m for m in backbone.modules() if isinstance(m, nn.Embedding) and m is not embed and
                    m.num_embeddings == getattr(backbone.config, "max_position_embeddings", None)), None)
        self.max_positions = pos and pos.num_embeddings - (0 if pos.padding_idx is None else pos.padding_idx + 1)
        self._was_trainable = {n: p.requires_grad for n, p in backbone.named_parameters()}
        self._was_training, self._removed, self._calibrating = backbone.training, False, False
        self._token_mask, self.routing, self.aux_loss = None, {}, torch.zeros(())
        self.prompts = nn.ModuleDict({str(i): ExpertPrompts(self.config, embed) for i in self.layers})
        # block 0 routes in forward(), later blocks in removable forward pre-hooks (partials: a deepcopy rebinds them)
        self._handles = [self.blocks[i].register_forward_pre_hook(functools.partial(self._slot_hook, i),
                                                                  with_kwargs=True) for i in self.layers if i > 0]
        try:
            self._probe()
        except Exception:
            self.remove()  # a refused backbone is left as it was
            raise
        backbone.requires_grad_(False)  # the pretrained manifold stays fixed, but for a task head it holds:
        # what lies outside its base model, unless it projects onto the vocabulary (a language model's head)
        base = {id(p) for p in backbone.base_model.parameters()}
        for p in [] if backbone.get_output_embeddings() is not None else backbone.parameters():
            p.requires_grad_(id(p) not in base)  # as PEFT's modules_to_save: BERT's classifier, Llama's score

    @torch.no_grad()
    def _probe(self):
        """Run the bare stack on 16 random tokens, to refuse in one sentence what would fail deep inside or give quietly
        wrong numbers: a stack that makes of inputs_embeds (what MEPT hands it) other than of ids; an "encoder" whose
        position 0 ignores later tokens (causal, unflagged); a routed block never run through its module call. With
        init="vocab" the hook rescales each deeper pool to its block's median token norm (post-LN encoders: ~10x)."""
        name, embed = type(self.backbone).__name__, self.backbone.get_input_embeddings()
        stack = self.backbone.get_encoder() if self.family == "seq2seq" else self.backbone.base_model
        # ids from 2 up: no pad (0 or 1 in the supported configs), as some models number positions around pads
        ids = torch.randint(2, embed.num_embeddings, (2, 2, 16), generator=torch.Generator().manual_seed(0))
        ids[1, :, 0] = ids[0, :, 0]  # (2, 2, 16): the second pair shares only its first token with the first
        ids = ids.to(embed.weight.device)
        run = lambda **inputs: stack(**inputs, attention_mask=torch.ones_like(ids[0]))[0].float()  # noqa: E731
        self.eval()  # no dropout, no router noise, no running means moved: the probe leaves no trace
        try:
            by_ids, by_embeds = run(input_ids=ids[0]), run(inputs_embeds=embed(ids[0]))  # (2, 16, D) each
            if (by_ids - by_embeds).abs().max() > 1e-3 * by_ids.abs().max():
                raise UnsupportedBackbone(f"{name} treats inputs_embeds unlike input_ids; {SUPPORTED}.")
            if self.family == "encoder" and torch.equal(run(input_ids=ids[1])[:, 0], by_ids[:, 0]):
                raise UnsupportedBackbone(f"{name} reads causally without flagging it; {SUPPORTED}.")
            self._calibrating = self.config.init == "vocab"
            stack(**self._prompted(ids[0], None, {}))  # every routed block, through the hooks
        except UnsupportedBackbone:
            raise
        except Exception as error:  # a crash inside the model: say where, and what to check
            raise UnsupportedBackbone(f"{name} fails on 16 random tokens behind {self.config.prompt_len} slots "
                                      f"({str(error).splitlines()[0]}); mind its positions, or {SUPPORTED}.") from None
        finally:
            self._token_mask, self._calibrating = None, False
            self.train().backbone.train(self._was_training)
        if skipped := [i for i in self.layers if i not in self.routing]:
            raise UnsupportedBackbone(f"block {skipped[0]} of {name} never receives the whole prompted sequence "
                                      f"through its module call, so no hook can route there; {INPUT_ONLY}.")

    # --- the forward pass ------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, **kwargs):
        """The backbone's own call and output on input_ids (B, T), the routed prompts in P slots. Afterwards
        self.routing[l] holds block l's Routing, self.aux_loss the balance term (0 unless balance_coef > 0)."""
        try:
            out = self.backbone(**self._prompted(input_ids, attention_mask, kwargs))
        finally:
            self._token_mask = None  # the hooks act only inside this call
        coef, losses = self.config.balance_coef, [load_balancing_loss(r, self.config.n_experts) for r in
                                                  self.routing.values()] if self.config.balance_coef else []
        self.aux_loss = coef * torch.stack(losses).mean() if losses else torch.zeros(())  # scalar, 0 when off
        return out

    def _prompted(self, input_ids, attention_mask, kwargs):
        """Step 1: embed the tokens, route block 0 on the embeddings, insert its mixture as the P slots, give every
        per-token input an entry per slot: the backbone's keyword arguments. Later blocks route in the hooks."""
        self._check_call(kwargs)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, T)
        (B, T), P = input_ids.shape, self.config.prompt_len
        if self.max_positions and T + P > self.max_positions:  # else an index error deep inside the model
            raise ValueError(f"{T} tokens and {P} prompt slots exceed the {self.max_positions} positions of "
                             f"{type(self.backbone).__name__}; give at most {self.max_positions - P} tokens.")
        labels = kwargs.get("labels") if self.family != "seq2seq" else None  # (T5's labels are its decoder's)
        per_token = labels is not None and labels.shape == input_ids.shape and not labels.is_floating_point()
        # a causal LM's labels are its next tokens: its routers read only the tokens that no loss predicts (-100,
        # and the first, which nothing predicts), as generate() reads the prompt: a choice never sees the answer
        unscored = labels == -100 if per_token and self.family == "decoder" else torch.ones_like(input_ids).bool()
        unscored[:, 0] = True  # (B, T)
        self.routing, self._token_mask = {}, attention_mask * unscored  # (B, T): the tokens the routers read
        insert = functools.partial(insert_slots, self.slot_offset)  # (seq, slots) -> the slots at s .. s+P-1
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, D)
        kwargs["inputs_embeds"] = insert(embeds, self._route(0, embeds))  # (B, P+T, D)
        mask = kwargs["attention_mask"] = insert(attention_mask, attention_mask.new_ones(B, P))  # (B, P+T)
        if self.family == "decoder":  # positions count the slots and the real tokens: left pads move nothing
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
        if kwargs.get("token_type_ids") is not None:  # the slots are segment 0
            kwargs["token_type_ids"] = insert(kwargs["token_type_ids"], kwargs["token_type_ids"].new_zeros(B, P))
        if per_token:
            kwargs["labels"] = insert(labels, labels.new_full((B, P), -100))  # (B, P+T): slots never scored
        return kwargs

    def _route(self, layer, tokens):
        """tokens (B, T, D) entering block `layer` -> the block's mixed prompt (B, P, D), in their dtype."""
        repeats = tokens.shape[0] // self._token_mask.shape[0]  # generate() with beams repeats each input's row
        mask = self._token_mask.repeat_interleave(repeats, dim=0)  # (B, T)
        mixed_prompt, self.routing[layer] = self.prompts[str(layer)](tokens, mask)  # (B, P, D), Routing
        return mixed_prompt.to(tokens.dtype)

    def _slot_hook(self, layer, block, args, kwargs):
        """Step 2, the forward pre-hook of block `layer`: route on its real tokens, write the mixture into the slots."""
        if self._token_mask is None:
            return None  # the backbone was called on its own, not through MEPT: leave it alone
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, P+T, D)
        P, T, s = self.config.prompt_len, self._token_mask.shape[1], self.slot_offset
        if hidden.shape[1] < P + T:
            return None  # a cached generation step: only the new tokens are here, the slots are in the cache
        pool = self.prompts[str(layer)].expert_pool  # (E, P, D)
        if hidden.dim() != 3 or tuple(hidden.shape[1:]) != (P + T, pool.shape[-1]):
            raise UnsupportedBackbone(f"block {layer} of {type(self.backbone).__name__} receives hidden states "
                                      f"{list(hidden.shape)}, not (batch, {P + T}, {pool.shape[-1]}); {INPUT_ONLY}.")
        tokens = torch.cat([hidden[:, :s], hidden[:, s + P:]], dim=1)  # (B, T, D): the slots left out
        if self._calibrating:  # the probe in __init__: start this pool at the scale of its block's tokens
            pool.mul_(tokens.float().norm(dim=-1).median() / pool.norm(dim=-1).median())
        # replace the slots, never concatenate: the length, the masks and T5's position bias stay valid
        hidden = insert_slots(self.slot_offset, tokens, self._route(layer, tokens))  # (B, P+T, D)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def _check_call(self, kwargs):
        """What the hooks cannot serve, refused in one sentence instead of giving wrong numbers."""
        if self._removed:
            raise RuntimeError("this MEPT was removed from its backbone; attach a new one with MEPT(backbone, config).")
        for name in ("inputs_embeds", "encoder_outputs", "position_ids"):  # would bypass or misplace the slots
            if kwargs.get(name) is not None:
                raise ValueError(f"MEPT builds {name} itself from input_ids and attention_mask; pass those only.")
        if kwargs.get("past_key_values") is not None and self.family != "seq2seq":  # T5's cache is its decoder's
            raise ValueError("a forward writes the slots anew, so it cannot extend a key/value cache; use generate().")
        # transformers 4.x replays a checkpointed block, hooks included, in backward(), when they have gone quiet
        if transformers.__version__[:2] == "4." and self.backbone.is_gradient_checkpointing and torch.is_grad_enabled():
            raise ValueError("gradient checkpointing on transformers 4.x replays MEPT's hooks outside its forward, "
                             "giving wrong gradients; call backbone.gradient_checkpointing_disable() or use 5.x.")

    # --- bookkeeping: parameters, counts, saving, loading, removing; and generation ---------------
    trainable_parameters_line = parameters_line  # a method too: 'trainable params: N || all params: M || ...'

    def prompt_param_counts(self):
        """Stored per block: E*P*D (+ P*D shared); activated per input and block: K*P*D (+ P*D shared), against
        a deep prompt of the same stored size (E*P slots); the paper's "-79.25%" has no recoverable definition."""
        pools = sum(p.expert_pool.numel() for p in self.prompts.values())  # E*P*D per block
        shared = sum(p.shared.numel() for p in self.prompts.values() if p.shared is not None)  # P*D per block
        stored, activated = pools + shared, pools * self.config.top_k // self.config.n_experts + shared
        return dict(stored=stored, activated=activated, reduction_vs_deep_prompt=1 - activated / stored)

    def save_pretrained(self, directory):
        """Every trainable parameter (prompts, routers, any head) and the routers' running means, the config inside,
        written under a temporary name and then renamed: a crash never leaves half a checkpoint."""
        os.makedirs(directory, exist_ok=True)
        path, config = os.path.join(directory, "mept_model.safetensors"), json.dumps(asdict(self.config))
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]  # + the routers' running means:
        tensors = {n: t.detach().contiguous().cpu() for n, t in named + [*self.prompts.named_buffers("prompts")]}
        save_file(tensors, path + ".tmp", metadata={"mept_config": config, "family": self.family})
        os.replace(path + ".tmp", path)

    @classmethod
    def from_pretrained(cls, backbone, directory):
        """MEPT on `backbone` with the weights that save_pretrained() wrote; its prompts must fit exactly."""
        path = os.path.join(directory, "mept_model.safetensors")
        with safe_open(path, framework="pt") as f:  # a FileNotFoundError, with the path, if there is none
            metadata = f.metadata()
        config = {"router_center": False, **json.loads(metadata["mept_config"])}  # older files: uncentered routers
        model, tensors = cls(backbone, MEPTConfig(**config)), load_file(path)
        expected, found = ({(n, tuple(p.shape)) for n, p in named if n.startswith("prompts.")}
                           for named in (model.state_dict().items(), tensors.items()))
        if metadata["family"] != model.family or found != expected:  # the slots would sit elsewhere, or not fit
            model.remove()
            raise ValueError(f"checkpoint in {directory} holds the prompts of another backbone ({metadata['family']}; "
                             f"{sorted(found ^ expected)[:2]} differ from this {model.family}'s); load it on its own.")
        model.load_state_dict(tensors, strict=False)  # prompts, routers, and any head inside the backbone
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad or name in tensors)  # trainable when saved
        return model

    def remove(self):
        """Take the hooks out, restore requires_grad and train/eval mode (a head keeps what it learned)."""
        if not self._removed:
            for handle in self._handles:
                handle.remove()
            self.backbone.train(self._was_training)
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(self._was_trainable[name])
            self._removed = True
        return self.backbone

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """The backbone's generate(), the slots written once (by T5's encoder or a decoder's first forward), later steps
        read from the key/value cache. Pad a decoder's batch on the left; give max_new_tokens (max_length counts P)."""
        if kwargs.get("use_cache") is False and self.family == "decoder":
            raise ValueError("MEPT writes a decoder's slots once and decodes from the key/value cache; drop use_cache.")
        try:
            inputs = self._prompted(input_ids, attention_mask, kwargs)
            inputs.pop("position_ids", None)  # generate() numbers each step's positions from the mask itself
            return self.backbone.generate(**inputs)  # T5 runs its encoder once; a decoder returns the new tokens
        finally:
            self._token_mask = None
