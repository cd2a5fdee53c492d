"""
MEPT: Mixture of Expert Prompt Tuning as a Manifold Mapper (Zeng et al., EMNLP 2025,
arXiv 2509.00996), in one file you can read top to bottom.

A pretrained transformer stays frozen. P prompt *slots* sit in its input sequence. At the
entrance of every chosen block l there is a pool of E prompt *experts* (each P x D) and a
linear *router*: it reads the block's hidden states of the real tokens, picks the top-K
experts for this input, mixes them (plus an always-on shared expert) and writes the mixture
into the P slots. Different inputs take different experts at different depths: a pathway.
Only experts, routers and (where the backbone needs one) a task head are trained.

Shape legend (used everywhere below):
    B batch   T tokens per input (padding included; the mask marks the real ones)   L blocks
    E n_experts   K top_k   P prompt_len   D d_model   D_l width entering block l (= D but in
    ELECTRA-small, OPT-350m)
Glossary:  ours             PEFT                   official MEPT code
           prompt_len       num_virtual_tokens     num_virtual_tokens
           n_experts        -                      n_routes
           top_k            -                      topk
           d_model          token_dim              d_model
           layers           num_layers (count)     layers
"""

import functools
import inspect
import json
import math
import os
import time
import weakref
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])  # 4.x and 5.x call blocks differently (see _check_call)

# -----------------------------------------------------------------------------
# Step 0: configuration, one dataclass


@dataclass
class MEPTConfig:
    n_experts: int = 4  # E: experts in each layer's pool (paper default 4)
    prompt_len: int = 10  # P: prompt slots in the sequence (paper default 10)
    top_k: int = 1  # K: experts mixed per input and layer (paper default 1)
    layers: Optional[list] = None  # blocks that route; None = every block; must contain 0
    router_noise: float = 1.0  # sigma of the multiplicative router noise, training only (SMoP)
    shared_expert: bool = True  # an always-on, zero-initialised expert added to the mixture
    balance_coef: float = 0.0  # weight of the optional load-balancing loss (beyond the paper)
    init: str = "vocab"  # "vocab": sampled embedding rows (Lester et al.); "random": N(0, 1)

    def __post_init__(self):
        for name in ("n_experts", "prompt_len", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}.")
        for name in ("router_noise", "balance_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {self.n_experts}.")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in 1..n_experts, got {self.top_k} with n_experts={self.n_experts}.")
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be at least 1, got {self.prompt_len}.")
        if self.router_noise < 0:
            raise ValueError(f"router_noise must be >= 0 (0 turns it off), got {self.router_noise}.")
        if self.balance_coef < 0:
            raise ValueError(f"balance_coef must be >= 0 (0 turns it off), got {self.balance_coef}.")
        if self.init not in ("vocab", "random"):
            raise ValueError(f"init must be 'vocab' or 'random', got {self.init!r}.")
        if self.layers is not None:
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in self.layers):
                raise ValueError(f"layers must be block indices 0, 1, 2, ..., got {list(self.layers)}.")
            self.layers = sorted(set(int(l) for l in self.layers))
            if 0 not in self.layers:
                # block 0's prompt is the one inserted into the input: without it there are no slots
                raise ValueError(f"layers must include block 0, where the prompt slots are inserted; got {self.layers}.")

    @classmethod
    def preset(cls, name, **overrides):
        """The paper's baselines are special cases of MEPT (method.md, 'presets')."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "prompt_tuning": dict(layers=[0], n_experts=1, top_k=1, shared_expert=False),  # Lester et al. 2021
    "smop": dict(layers=[0], n_experts=4, top_k=1, shared_expert=False),  # Choi et al. 2023
    "deep_prompt": dict(layers=None, n_experts=1, top_k=1, shared_expert=False),  # VPT-deep / P-tuning v2
    "mept": dict(layers=None, n_experts=4, top_k=1, shared_expert=True),  # this paper
}

# -----------------------------------------------------------------------------
# Step 1: the router reads the real tokens and scores the experts


class Routing(NamedTuple):
    expert_idx: torch.Tensor  # (B, K) long: the chosen experts
    probs: torch.Tensor  # (B, E): the router's softmax over all experts


def masked_mean(hidden, mask):
    """Mean over the real tokens only: padding never moves the router (official bug 2)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)


class Router(nn.Module):
    def __init__(self, d_model, n_experts, top_k, noise):
        super().__init__()
        self.proj = nn.Linear(d_model, n_experts, bias=False)  # W_l: (E, D)
        nn.init.orthogonal_(self.proj.weight)  # orthogonal rows: experts start equally reachable
        self.top_k, self.noise = top_k, noise

    def forward(self, hidden, mask):
        # parameter-free LayerNorm, so routers at every depth see inputs on one scale
        normed = F.layer_norm(hidden.float(), hidden.shape[-1:])  # (B, T, D)
        summary = masked_mean(normed, mask)  # (B, D)
        logits = self.proj(summary.to(self.proj.weight.dtype))  # (B, E)
        if self.training and self.noise > 0:
            # multiplicative noise (SMoP): logits * (1 + sigma * eps); scale from the detached logits
            logits = logits + self.noise * torch.randn_like(logits) * logits.detach()  # (B, E)
        probs = logits.float().softmax(-1)  # (B, E)
        # the gate is the chosen expert's softmax probability, NOT renormalised over the K:
        # with K = 1 a renormalised gate would be exactly 1 and the router would get no gradient
        gate, expert_idx = probs.topk(self.top_k, dim=-1)  # (B, K), (B, K)
        return gate, Routing(expert_idx, probs)


# -----------------------------------------------------------------------------
# Step 2: the batched top-k gather


def gather_experts(expert_pool, expert_idx, gate):
    """mixed[b] = sum_k gate[b, k] * expert_pool[expert_idx[b, k]], for all b and k at once.

    expert_pool (E, P, D), expert_idx (B, K) long, gate (B, K) float -> mixed_prompt (B, P, D).

    Flat-index arithmetic: in memory the pool is E*P rows of length D, and slot p of expert e is
    row e*P + p. The P rows of expert e, e*P + 0 ... e*P + P-1, are one contiguous run, so they are
    also row e of the same memory viewed as (E, P*D). ONE index_select with the flattened (B*K,)
    expert ids (entry b*K + k) therefore fetches every example's every expert, P slots at a time;
    ONE batched matrix product, the gates as a (B, 1, K) row times the fetched (B, K, P*D), weights
    them and sums over k. The same code serves K = 1 and K > 1; no Python loop runs over B or K.

    Worked by hand: E=3, P=2, so the flat rows are [e0p0, e0p1, e1p0, e1p1, e2p0, e2p1].
      expert_idx = [[2, 0]], gate = [[0.7, 0.2]]                   (B=1, K=2)
      rows e*P+p = expert_idx[..., None] * P + [0, 1] -> [[[4, 5], [0, 1]]]   (1, 2, P): runs from 2*P and 0*P
      picked     = (E, P*D) view rows [2, 0] = [[e2p0 e2p1], [e0p0 e0p1]]   (1, 2, P*D)
      mixed[0]   = [[0.7, 0.2]] @ picked = 0.7 * [e2p0 e2p1] + 0.2 * [e0p0 e0p1]   (1, 1, P*D) -> (1, P, D)
    Oracle: test_gather_matches_per_example_loop compares this with a double loop.

    Why whole runs and a bmm (experiments/bench_gather_variants.py times the other ways side by side):
    fetching the B*K*P single rows e*P + p costs one copy, and in the backward one scatter-add, per
    row, where B*K runs move the same bytes in P times fewer steps (single rows took 1.05-1.1x the
    time); an einsum "bk,bkn->bn" parses its equation and reshapes on every call before reaching the
    same bmm (single rows with an einsum, this function's previous form, took 1.4x the time forward).

    When it is fast: the work is B*K*P*D copies plus one weighted sum, whatever E is; a dense mixture
    (scatter the gates into (B, E), then w @ pool) does B*E*P*D multiply-adds, and a per-example loop
    launches B*K tiny ops. On a GPU the gather is one kernel instead of B*K launches, and it never
    touches the E-K experts an example did not pick. Dense matmul is competitive while E is small,
    above all on a CPU: its small pool stays in cache and it writes only the (B, P*D) output, while
    the gather writes and rereads a (B, K, P*D) copy (2 MB at B=32, K=2, P=10, D=768), and glibc's
    malloc hands buffers that size back to the OS when freed, so the next call page-faults them in
    again (at E=8 that makes the gather's time swing 2x from run to run). At E=64 dense does 64x the
    multiply-adds and the gather wins clearly. The README quotes all of it.
    """
    n_experts, prompt_len, d_model = expert_pool.shape  # E, P, D
    batch, top_k = expert_idx.shape  # B, K
    expert_rows = expert_pool.reshape(n_experts, prompt_len * d_model)  # (E, P*D): row e = flat rows e*P ... e*P+P-1
    picked = expert_rows.index_select(0, expert_idx.reshape(-1))  # (B*K, P*D): entry b*K + k is expert idx[b, k]
    picked = picked.view(batch, top_k, prompt_len * d_model)  # (B, K, P*D)
    weights = gate.unsqueeze(1)  # (B, 1, K): one row of gates per example
    if weights.dtype != picked.dtype:  # the router's fp32 gates meet a half-precision pool. (Checked first:
        weights = weights.to(picked.dtype)  # an unconditional .to() cost 7% of the E=8 forward on a CPU.)
    mixed = torch.bmm(weights, picked)  # (B, 1, K) @ (B, K, P*D) -> (B, 1, P*D): the weighted sum over k
    return mixed.view(batch, prompt_len, d_model)  # (B, P, D)


# -----------------------------------------------------------------------------
# Step 3: one layer's expert pool: route, gather, add the shared expert


class ExpertPrompts(nn.Module):
    def __init__(self, config, d_model, init_rows):
        super().__init__()
        E, P = config.n_experts, config.prompt_len
        self.expert_pool = nn.Parameter(init_rows.reshape(E, P, d_model).clone())  # (E, P, D)
        self.router = Router(d_model, E, config.top_k, config.router_noise)
        # zero init: at step 0 the shared expert changes nothing, it learns what all inputs share
        self.shared = nn.Parameter(torch.zeros(1, P, d_model)) if config.shared_expert else None  # (1, P, D)

    def forward(self, hidden, mask):
        gate, routing = self.router(hidden, mask)  # (B, K), Routing
        mixed_prompt = gather_experts(self.expert_pool, routing.expert_idx, gate)  # (B, P, D)
        if self.shared is not None:
            mixed_prompt = mixed_prompt + self.shared  # (B, P, D)
        return mixed_prompt, routing


def load_balancing_loss(routing, n_experts):
    """Switch-Transformer balance term E * sum_e f_e * P_e; 1 for a uniform load, E when collapsed.

    f_e: share of the B*K assignments sent to expert e (not differentiable);
    P_e: mean router probability of e over the batch (carries the gradient).
    """
    counts = torch.zeros(n_experts, device=routing.probs.device)  # (E,)
    counts.scatter_add_(0, routing.expert_idx.reshape(-1), torch.ones(routing.expert_idx.numel(), device=counts.device))
    share = counts / routing.expert_idx.numel()  # (E,) f_e
    mean_prob = routing.probs.float().mean(0)  # (E,) P_e
    return n_experts * (share * mean_prob).sum()


# -----------------------------------------------------------------------------
# Step 4: reading any Hugging Face backbone from the model itself: its blocks, causal or not, its positions


def find_blocks(backbone):
    """The transformer blocks that the prompt slots travel through.

    No test on the model's name: in an encoder-decoder (T5) we look inside `get_encoder()`,
    otherwise in the whole model, for the nn.ModuleList of identical modules that holds the
    most parameters: T5's encoder.block, BERT's encoder.layer, GPT-2's h, Llama's layers.
    """
    root = backbone.get_encoder() if getattr(backbone.config, "is_encoder_decoder", False) else backbone
    candidates = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(b) for b in m}) == 1]
    if not candidates:
        raise ValueError(f"could not find a list of transformer blocks in {type(backbone).__name__}; "
                         "MEPT needs a model whose blocks sit in an nn.ModuleList.")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def token_embeddings(backbone):
    """The backbone's token embedding table; a ValueError if it has none (Canine reads characters)."""
    try:
        embed = backbone.get_input_embeddings()
    except NotImplementedError:
        embed = None
    if getattr(getattr(embed, "weight", None), "dim", lambda: 0)() != 2:
        raise ValueError(f"{type(backbone).__name__} has no token embedding table; MEPT needs a transformer "
                         "that embeds token ids.")
    with torch.no_grad():
        vectors = embed(torch.zeros(1, 1, dtype=torch.long, device=embed.weight.device))
    if not torch.is_tensor(vectors):  # I-BERT's quantised table returns (vectors, scale)
        raise ValueError(f"{type(backbone).__name__}'s token embedding returns a {type(vectors).__name__}, not "
                         "vectors; MEPT needs a plain embedding table to insert its prompts next to.")
    return embed


def parameters_line(module):
    """PEFT's report: 'trainable params: N || all params: M || trainable%: X'."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def position_pad(backbone):
    """The pad id of a RoBERTa-style position table (RoBERTa, XLM-R, Longformer), or None: given
    input_ids these models number real tokens from pad + 1 and give pads the pad position."""
    for name, module in backbone.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return module.padding_idx
    return None


def position_limit(backbone):
    """How many positions (prompt slots included) the backbone's position table can number, or None.
    RoBERTa-style tables start counting after the pad id (roberta-base: 512 of 514); T5's relative
    positions have no table (its n_positions is a leftover); BART's table is max_position_embeddings."""
    config = backbone.config
    limit = getattr(config, "max_position_embeddings", None) or (
        None if getattr(config, "is_encoder_decoder", False) else getattr(config, "n_positions", None))
    if not isinstance(limit, int) or limit <= 0:  # XLNet: -1, unbounded
        return None
    pad = position_pad(backbone)
    return limit if pad is None else limit - (pad + 1)


@torch.no_grad()
def is_causal(backbone):
    """Decoder-only or not, from the model itself, never from its name. Most decoders flag their
    self-attention as causal (Llama, GPT-2, Qwen, Mixtral, ...). The rest (Bloom, MPT) are told by
    behaviour: change every token after the first; in a causal stack the first position's output
    cannot move (its attention to later tokens is exactly zero), in any other stack it moves. "Cannot
    move" allows the dtype's rounding, so a kernel that batches tokens differently still counts."""
    if getattr(backbone.config, "is_encoder_decoder", False):
        return False
    if any(getattr(m, "is_causal", False) is True for m in find_blocks(backbone)[0].modules()):
        return True
    runner, weight = backbone.base_model, token_embeddings(backbone).weight
    ids = torch.randint(0, weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0)).to(weight.device)
    other = ids.clone()
    other[0, 1:] = (ids[0, 1:] + 1) % weight.shape[0]  # (1, 8): only the first token is the same
    was_training = runner.training
    try:
        runner.eval()
        out = [runner(input_ids=x, attention_mask=torch.ones_like(x))[0][0, 0] for x in (ids, other)]  # 2 x (D,)
    finally:
        runner.train(was_training)
    rounding = 16 * torch.finfo(out[0].dtype).eps * out[0].float().abs().max().item()
    return (out[0].float() - out[1].float()).abs().max().item() <= rounding


# -----------------------------------------------------------------------------
# Step 5: MEPT, the frozen backbone with prompt experts at the entrance of its blocks


_ATTACHED = weakref.WeakSet()  # block lists that carry a MEPT's hooks right now


class MEPT(nn.Module):
    def __init__(self, backbone, config=None):
        super().__init__()
        self.blocks = find_blocks(backbone)
        if self.blocks in _ATTACHED:  # two sets of hooks would both write the slots, and remove() could not undo them
            raise ValueError("this backbone already has a MEPT attached; call .remove() on that one first.")
        self.config = config = config or MEPTConfig()
        self.backbone = backbone
        self._was_trainable = {n: p.requires_grad for n, p in backbone.named_parameters()}
        self._was_training = backbone.training

        self.n_blocks = len(self.blocks)
        self.layers = config.layers if config.layers is not None else list(range(self.n_blocks))
        if self.layers[-1] >= self.n_blocks:
            raise ValueError(f"layers {self.layers} go beyond the model's {self.n_blocks} blocks (0..{self.n_blocks - 1}).")
        self.is_encoder_decoder = bool(getattr(backbone.config, "is_encoder_decoder", False))
        embed = token_embeddings(backbone)
        stack = self._probe_stack()
        attention_type = getattr(stack, "attention_type", None)  # BigBird: "block_sparse" until a short input
        try:
            self.is_causal = is_causal(backbone)
        except (RuntimeError, IndexError) as error:  # Nystromformer runs one fixed length only
            raise ValueError(f"{type(backbone).__name__} fails on a probe input of 8 random tokens "
                             f"({str(error).splitlines()[0]}); MEPT needs a backbone that runs on any length.") from None
        # method.md, "Where the slots sit": right after [CLS] in a bidirectional encoder whose head
        # reads position 0; leading the sequence in seq2seq and decoder-only models (leading each row's
        # real tokens, that is: after any left padding, see _place_slots)
        self.slot_offset = 0 if (self.is_encoder_decoder or self.is_causal) else 1
        limit = position_limit(backbone)
        if limit is not None and config.prompt_len + self.slot_offset >= limit:
            raise ValueError(f"prompt_len {config.prompt_len} leaves no room for tokens within the model's "
                             f"{limit} positions; use a shorter prompt.")

        entrances = self._block_entrances(embed)  # {l > 0: (width D_l, typical row norm)} of the hidden states
        self.embed_scale = self._embedding_scale(embed)  # 1, or sqrt(D) where the backbone's forward scales
        if attention_type is not None and getattr(stack, "attention_type", None) != attention_type:
            stack.set_attention_type(attention_type)  # BigBird turned to full attention for the short probes
        vocab_norm = embed.weight.detach().float().norm(dim=-1).median().item()  # a typical embedding row norm
        self.prompts = nn.ModuleDict()
        for layer in self.layers:
            width, norm = entrances.get(layer, (embed.weight.shape[1], None))  # block 0: the embeddings
            rows = self._init_rows(embed.weight, config.n_experts * config.prompt_len, width, norm, vocab_norm)
            self.prompts[str(layer)] = ExpertPrompts(config, width, rows)

        backbone.requires_grad_(False)  # the pretrained manifold stays fixed (after every check that can fail)
        # block 0 is routed in forward(); every later block routes in a removable pre-hook
        # (a bound method, not a closure: a deepcopy of MEPT, e.g. for weight averaging, gets hooks bound to the copy)
        self._handles = [self.blocks[l].register_forward_pre_hook(functools.partial(self._slot_hook, l), with_kwargs=True)
                         for l in self.layers if l > 0]
        _ATTACHED.add(self.blocks)
        self._removed = False
        self._token_mask = None  # (B, T) real-token mask of the forward pass in progress
        # alibi models (Bloom, MPT) take no position_ids; the rest get positions that skip left padding
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters
        self._position_pad = position_pad(backbone)  # RoBERTa: positions count from pad + 1, skipping pads
        self.routing, self.aux_loss = {}, torch.zeros(())

    # --- initialisation ------------------------------------------------------
    def _init_rows(self, vocab, n_rows, width, norm, vocab_norm):
        """(n_rows, width) initial expert rows for a block whose hidden rows have a typical `norm`
        (None for block 0); vocab_norm is the typical row norm of the vocabulary embedding.

        init="random": N(0, 1), far off the manifold. init="vocab" (Lester et al.): sampled rows of the
        vocabulary embedding; for a block l > 0 rescaled to its hidden-state scale: in a post-LN
        encoder (BERT, MiniLM) hidden rows have norm ~10-20 but embedding rows ~1, so deep experts
        would start an order of magnitude too small. Block 0's prompt is inserted as an embedding,
        so it keeps the vocabulary's scale (times embed_scale, like the backbone's own tokens). Where
        the hidden states are wider than the embeddings (ELECTRA-small: 128 vs 256), vocabulary rows
        cannot live there: N(0, 1) rows at that scale.
        """
        if self.config.init == "random":
            return torch.randn(n_rows, width)  # (E*P, D_l)
        if width != vocab.shape[1]:
            return torch.randn(n_rows, width) * (norm / width ** 0.5)  # (E*P, D_l): row norms ~ norm
        pick = torch.randint(0, vocab.shape[0], (n_rows,))  # (E*P,)
        rows = vocab.detach()[pick].float().cpu()  # (E*P, D)
        if norm is None:
            return rows * self.embed_scale  # block 0: as the backbone scales its embeddings
        return rows * (norm / vocab_norm)  # (E*P, D): rows ~ norm

    def _probe_stack(self):
        """What the probes run: the bare stack (BertModel, T5Stack, LlamaModel), no head, no labels."""
        return self.backbone.get_encoder() if self.is_encoder_decoder else self.backbone.base_model

    @staticmethod
    def _probe_ids(embed):
        """The probes' input: 2 rows of 16 random token ids, the same every time."""
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, embed.weight.shape[0], (2, 16), generator=g).to(embed.weight.device)  # (2, 16)

    @torch.no_grad()
    def _block_entrances(self, embed):
        """Per routed block l > 0: (width, typical row norm) of the hidden states at its entrance,
        measured by one probe forward of the bare stack on random tokens. The probe also checks
        that a hook can route there at all: the block must run through its module call, once per
        forward (not ALBERT's shared block), its input must be laid out (batch, sequence, width), and
        it must be what the block before handed on (in XLM the largest list is each layer's
        feed-forward part, whose input is not the residual stream)."""
        seen, shapes, entering, leaving = {}, {}, {}, {}

        def measure(layer):
            def hook(block, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]  # (2, 16, D_l)
                shapes[layer], entering[layer] = tuple(hidden.shape), hidden
                seen[layer] = (hidden.shape[-1], hidden.float().norm(dim=-1).median().item())
            return hook

        handles = [self.blocks[l].register_forward_pre_hook(measure(l), with_kwargs=True) for l in self.layers if l > 0]
        calls = [0] * self.n_blocks  # how often each block runs in one forward

        def count(i):
            def hook(block, args):
                calls[i] += 1
            return hook

        def handed_on(i):
            def hook(block, args, output):
                leaving.setdefault(i, output[0] if isinstance(output, (tuple, list)) else output)
            return hook

        handles += [block.register_forward_pre_hook(count(i)) for i, block in enumerate(self.blocks)]
        handles += [block.register_forward_hook(handed_on(i)) for i, block in enumerate(self.blocks)]
        runner, ids = self._probe_stack(), self._probe_ids(embed)  # (2, 16)
        was_training = runner.training
        try:
            runner.eval()
            runner(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            runner.train(was_training)
            for h in handles:
                h.remove()
        name = type(self.backbone).__name__
        if max(calls) > 1 and self.config.layers != [0]:  # ALBERT: one shared block, run 12 times
            raise ValueError(f"{name} runs its block(s) {max(calls)} times in one forward (shared weights), so a prompt "
                             "per block has no place; use layers=[0] (input-only prompts) with this model.")
        for layer in [l for l in self.layers if l > 0]:
            if layer not in shapes:  # e.g. SqueezeBERT calls layer.forward(...), which skips hooks
                raise ValueError(f"block {layer} of {name} never ran through its module call in a probe forward, so "
                                 "no hook can route there; use layers=[0] (input-only prompts) with this model.")
            if len(shapes[layer]) != 3 or shapes[layer][0] != 2 or shapes[layer][1] < 16:
                # e.g. XLNet (sequence, batch, width), SqueezeBERT (batch, width, sequence), Funnel (pooled)
                raise ValueError(f"hidden states entering block {layer} of {name} have shape {list(shapes[layer])} for "
                                 "2 inputs of 16 tokens; MEPT needs (batch, sequence, width) with the whole sequence, "
                                 "so use layers=[0] (input-only prompts) with this model.")
            before = leaving.get(layer - 1)
            if not (torch.is_tensor(before) and before.shape == entering[layer].shape
                    and torch.allclose(before.float(), entering[layer].float(), rtol=1e-4, atol=1e-6)):
                raise ValueError(f"block {layer} of {name} does not receive what block {layer - 1} hands on (its "
                                 f"{type(self.blocks[layer]).__name__} is part of a layer, not the whole), so a hook "
                                 "there cannot write the slots; use layers=[0] (input-only prompts) with this model.")
        return seen

    @torch.no_grad()
    def _embedding_scale(self, embed):
        """The factor by which the backbone multiplies its token embeddings when given input_ids, but
        not when given inputs_embeds, as MEPT gives it: sqrt(D) in Pegasus, Marian and BlenderbotSmall
        (whose forward scales, not their embedding module), 0.88 in ESM (token dropout), 1 elsewhere.
        Told by behaviour: the bare stack's output from input_ids against inputs_embeds at scale 1,
        sqrt(D), and the scale that block 0's input implies (where it is affine in the embeddings).
        A backbone that matches none, or takes no inputs_embeds (FSMT), is refused."""
        runner, ids = self._probe_stack(), self._probe_ids(embed)  # (2, 16)
        for token in ("pad_token_id", "mask_token_id"):  # no pads (RoBERTa numbers positions skipping them),
            special = getattr(self.backbone.config, token, None)  # no mask tokens (ESM's token dropout zeroes them)
            if isinstance(special, int):
                ids[ids == special] = (special + 1) % embed.weight.shape[0]
        vectors = embed(ids)  # (2, 16, D)
        entering = []  # block 0's first input in each probe (ALBERT runs its one block many times)
        handle = self.blocks[0].register_forward_pre_hook(
            lambda block, args, kwargs: entering.append((args[0] if args else kwargs["hidden_states"]).float()),
            with_kwargs=True)
        was_training, name = runner.training, type(self.backbone).__name__

        def probe(**inputs):  # -> (block 0's input or None, the stack's output (2, 16, D))
            entering.clear()
            try:
                out = runner(**inputs, attention_mask=torch.ones_like(ids))[0].float()
            except TypeError as error:  # e.g. FSMT's encoder insists on input_ids
                raise ValueError(f"{name} takes no inputs_embeds ({error}); MEPT passes its prompts that way, "
                                 "so it cannot prompt this model.") from None
            return (entering[0] if entering else None), out

        try:
            runner.eval()
            own_entry, own = probe(input_ids=ids)

            def matches(out):  # the stack's output from input_ids, up to rounding
                return (out - own).abs().max() <= 1e-3 * own.abs().max()

            one_entry, one = probe(inputs_embeds=vectors)
            if matches(one):
                return 1.0
            root = embed.weight.shape[1] ** 0.5
            if matches(probe(inputs_embeds=vectors * root)[1]):
                return root
            if own_entry is not None and own_entry.shape == one_entry.shape:
                slope = probe(inputs_embeds=2 * vectors)[0] - one_entry  # (2, 16, D): the embeddings' share, if affine
                scale = 1 + ((own_entry - one_entry) * slope).sum().item() / max((slope ** 2).sum().item(), 1e-12)
                if matches(probe(inputs_embeds=vectors * scale)[1]):
                    return scale
        finally:
            runner.train(was_training)
            handle.remove()
        raise ValueError(f"{name} turns input_ids into other hidden states than any scaling of their embeddings; "
                         "MEPT passes embeddings, so it cannot prompt this model faithfully.")

    # --- the forward pass -----------------------------------------------------
    def _place_slots(self, attention_mask):
        """Where this call's slots and tokens sit in the prompted (B, P+T) sequence, row by row.

        Row b's P slots start at s + lead_b, lead_b being the pads before its first real token (0 when
        padded on the right, the usual case): with left padding the slots come after the pads, so no pad
        sits between slots and tokens, and neither positions nor an attention window (Mistral, Gemma 2)
        nor a recurrence (Mamba) sees how much padding a row has. A token keeps its index if it comes
        before the slots (pads, [CLS]) and moves up by P otherwise."""
        B, T = attention_mask.shape
        P, device = self.config.prompt_len, attention_mask.device
        start = attention_mask.long().argmax(1, keepdim=True) + self.slot_offset  # (B, 1): lead_b + s
        self._slot_index = start + torch.arange(P, device=device)  # (B, P): where each slot goes
        t = torch.arange(T, device=device)  # (T,)
        self._token_index = t + P * (t >= start)  # (B, T): where each token goes
        # for _insert's one gather: entry j of a prompted row is entry order[b, j] of [tokens..., slots...]
        order = torch.empty(B, P + T, dtype=torch.long, device=device)  # (B, P+T)
        order.scatter_(1, self._token_index, t.expand(B, T))
        self._insert_order = order.scatter_(1, self._slot_index, T + torch.arange(P, device=device).expand(B, P))

    def _insert(self, seq, slots):
        """seq (B, T, ...) and slots (B, P, ...) -> (B, P+T, ...), the slots where _place_slots put them
        (embeddings, masks, labels, positions)."""
        order = self._insert_order.view(*self._insert_order.shape, *[1] * (seq.dim() - 2))  # (B, P+T, 1...)
        return torch.cat([seq, slots], dim=1).gather(1, order.expand(-1, -1, *seq.shape[2:]))  # (B, P+T, ...)

    def _rows(self, index, rows):
        """A per-row tensor of this call, for `rows` rows: generate() with beams or n samples repeats each row."""
        return index if index.shape[0] == rows else index.repeat_interleave(rows // index.shape[0], dim=0)

    def _route(self, layer, hidden_tokens):
        mask = self._rows(self._token_mask, hidden_tokens.shape[0])  # (B, T)
        mixed_prompt, routing = self.prompts[str(layer)](hidden_tokens, mask)  # (B, P, D_l)
        self.routing[layer] = routing
        return mixed_prompt.to(hidden_tokens.dtype)  # (B, P, D_l) in the backbone's dtype

    def _slot_hook(self, layer, block, args, kwargs):
        """Forward pre-hook of block `layer`: route on the real tokens, write the mixture into the slots."""
        if self._token_mask is None:
            return None  # the backbone was called on its own, not through MEPT: leave it alone
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, P+T, D_l), or longer: see below
        B, width = hidden.shape[0], hidden.shape[-1]
        if hidden.shape[1] < self.config.prompt_len + self._token_mask.shape[1]:
            return None  # a cached generation step holds only new tokens; the slots are in the cache already
        # the T tokens only, by index; a model that pads the sequence inside (Longformer, to a multiple
        # of its attention window) hands us (B, P+T+pad, D_l), and that padding is never read
        token_index = self._rows(self._token_index, B).unsqueeze(-1).expand(-1, -1, width)  # (B, T, D_l)
        mixed_prompt = self._route(layer, hidden.gather(1, token_index))  # (B, P, D_l)
        # replace the slots, never concatenate: length, masks and T5's position bias stay valid
        slot_index = self._rows(self._slot_index, B).unsqueeze(-1).expand(-1, -1, width)  # (B, P, D_l)
        hidden = hidden.scatter(1, slot_index, mixed_prompt)  # (B, P+T(+pad), D_l)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _check_call(self, kwargs):
        """What the hooks cannot serve, refused in one sentence instead of giving wrong numbers."""
        if self._removed:
            raise RuntimeError("this MEPT was removed from its backbone; attach a new one with MEPT(backbone, config).")
        for name in ("inputs_embeds", "encoder_outputs"):  # would skip the slots, or every routed block
            if kwargs.get(name) is not None:
                raise ValueError(f"MEPT builds {name} itself from input_ids (the prompts live there); pass input_ids only.")
        if kwargs.get("past_key_values") is not None and not self.is_encoder_decoder:  # T5's cache is the decoder's
            raise ValueError("MEPT inserts its prompt slots into every forward, so a forward cannot extend a key/value "
                             "cache; use model.generate(...), which writes the slots once and then decodes from the cache.")
        if (self.training and torch.is_grad_enabled() and TRANSFORMERS_MAJOR < 5
                and getattr(self.backbone, "is_gradient_checkpointing", False)):
            # transformers 4.x checkpoints a block's whole module call, hooks included, and replays it during
            # backward, after MEPT.forward has returned: the replay would not route (5.x keeps hooks outside)
            raise ValueError("gradient checkpointing on a transformers 4.x backbone replays MEPT's hooks outside its "
                             "forward and would give wrong gradients; call backbone.gradient_checkpointing_disable() "
                             "or use transformers 5.")

    def _prompted(self, input_ids, attention_mask, kwargs):
        """Steps 1-2 of method.md for block 0, shared by forward() and generate(): embed, route on the
        embeddings, insert the mixture as P slots, and widen the mask. Later blocks route in the hooks,
        which read the real-token mask kept in self._token_mask until the caller clears it."""
        self._check_call(kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # (B, T)
        B, P = input_ids.shape[0], self.config.prompt_len
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, D)
        if self.embed_scale != 1.0:  # Pegasus, Marian: tokens as the backbone's forward would scale them
            embeds = embeds * self.embed_scale
        self.routing = {}
        self._token_mask = attention_mask
        self._place_slots(attention_mask)
        inputs_embeds = self._insert(embeds, self._route(0, embeds))  # (B, P+T, D): block 0 routes on the embeddings
        mask = self._insert(attention_mask, attention_mask.new_ones(B, P))  # (B, P+T): every token may attend to the slots
        return inputs_embeds, mask

    def _per_token_masks(self, kwargs, B):
        """Segment ids and LED's global attention mask: 0 for the slots (segment 0; local attention)."""
        for name in ("token_type_ids", "global_attention_mask"):
            if kwargs.get(name) is not None:
                kwargs[name] = self._insert(kwargs[name], kwargs[name].new_zeros(B, self.config.prompt_len))  # (B, P+T)
        return kwargs

    def _per_token_inputs(self, kwargs, input_ids, attention_mask, mask):
        """Whatever the caller laid out per token gets an entry for each slot too."""
        (B, T), P, s = input_ids.shape, self.config.prompt_len, self.slot_offset
        kwargs = self._per_token_masks(kwargs, B)
        labels = kwargs.get("labels")
        if (labels is not None and not self.is_encoder_decoder and labels.shape == input_ids.shape
                and not labels.is_floating_point()):  # token-level (LM) labels, not multi-label targets
            kwargs["labels"] = self._insert(labels, labels.new_full((B, P), -100))  # (B, P+T): slots are not scored
        positions = kwargs.get("position_ids")
        if positions is not None:  # the slots continue from the first real token's position, the tokens move up by P
            first = positions.gather(1, attention_mask.long().argmax(1, keepdim=True))  # (B, 1): pads may hold anything
            moved = positions + (self._token_index - torch.arange(T, device=positions.device))  # (B, T): + P past the slots
            kwargs["position_ids"] = self._insert(moved, first + s + torch.arange(P, device=positions.device))  # (B, P+T)
        elif self._takes_positions and not bool(mask.all()):  # padded, and we may number the positions ourselves
            counted = mask.long().cumsum(-1)  # (B, P+T): 1, 2, ... over slots and real tokens
            if self.is_causal:
                # a left-padded decoder: given inputs_embeds the backbone would count the pads too, so
                # every row's positions would depend on its padding
                kwargs["position_ids"] = (counted - 1).clamp(min=0)  # (B, P+T)
            elif self._position_pad is not None:
                # RoBERTa numbers input_ids from pad + 1 skipping pads, but inputs_embeds straight through,
                # pads included: number them as it numbers input_ids, the slots counted as tokens
                kwargs["position_ids"] = counted * mask + self._position_pad  # (B, P+T)
        return kwargs

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """The backbone's own call on input_ids (B, T) with the routed prompts in P slots; returns the
        backbone's output (its loss too, when labels are given). Afterwards self.routing holds each
        routed block's Routing, and self.aux_loss the balance term (0 unless balance_coef > 0)."""
        try:
            inputs_embeds, mask = self._prompted(input_ids, attention_mask, kwargs)  # (B, P+T, D), (B, P+T)
            kwargs = self._per_token_inputs(kwargs, input_ids, self._token_mask, mask)
            out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)
        finally:
            self._token_mask = None  # the hooks act only inside this call
        self.aux_loss = inputs_embeds.new_zeros((), dtype=torch.float32)  # scalar: the balance term is off
        if self.config.balance_coef > 0:
            losses = [load_balancing_loss(r, self.config.n_experts) for r in self.routing.values()]
            self.aux_loss = self.config.balance_coef * torch.stack(losses).mean()  # scalar
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """The backbone's own generate(), with the routed prompts: the slots are written once, by the
        encoder (T5) or by a decoder's first forward over the whole input; every later step reads them
        from the key/value cache (the hooks leave alone any call shorter than P+T, i.e. cached steps).
        Routing follows the input only. Pad a decoder's batch on the left, as generation needs."""
        try:
            inputs_embeds, mask = self._prompted(input_ids, attention_mask, kwargs)  # (B, P+T, D), (B, P+T)
            if self.is_encoder_decoder:  # the prompts live in the encoder: run it here, decode from its output
                encoder = self.backbone.get_encoder()
                kwargs = self._per_token_inputs(kwargs, input_ids, self._token_mask, mask)  # widened for the slots
                takes = inspect.signature(encoder.forward).parameters  # per-token inputs of the encoder (LED's global mask)
                extra = {k: kwargs.pop(k) for k in ("token_type_ids", "global_attention_mask")
                         if k in kwargs and k in takes}
                encoder_outputs = encoder(inputs_embeds=inputs_embeds, attention_mask=mask, **extra)
                return self.backbone.generate(encoder_outputs=encoder_outputs, attention_mask=mask, **kwargs)
            # max_length / min_length count the input, which now holds P slots more; wherever they are set
            # (a keyword, a generation_config, the model's own), shift them, unless *_new_tokens decides
            config = kwargs.get("generation_config") or self.backbone.generation_config
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                value = kwargs.get(length, getattr(config, length, None))
                if value and kwargs.get(new_tokens, getattr(config, new_tokens, None)) is None:
                    kwargs[length] = value + self.config.prompt_len
            kwargs = self._per_token_masks(kwargs, input_ids.shape[0])  # GPT-2's segment ids (positions: generate's own)
            return self.backbone.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)  # new tokens only
        finally:
            self._token_mask = None

    # --- bookkeeping: parameters, saving, loading, detaching ---------------------------
    def trainable_parameters_line(self):
        return parameters_line(self)

    def prompt_param_counts(self):
        """method.md 'Counting activated prompts'. Stored per layer: E*P*D (+P*D shared);
        activated per example and layer: K*P*D (+P*D shared). The reduction compares the
        activated count with a deep prompt of the same stored size (all of it always active)."""
        c = self.config
        pools = [p.expert_pool.numel() for p in self.prompts.values()]  # E*P*D_l per layer (D_l: that block's width)
        shared = [p.shared.numel() if p.shared is not None else 0 for p in self.prompts.values()]  # P*D_l
        stored = sum(pools) + sum(shared)
        activated = sum(pool * c.top_k // c.n_experts for pool in pools) + sum(shared)
        return dict(stored=stored, activated=activated, deep_prompt_same_storage=stored,
                    activated_share=activated / stored, reduction_vs_deep_prompt=1 - activated / stored)

    def _layout(self):
        """Where the slots sit: weights of matching shapes from another layout would load but mean nothing."""
        return {"model_type": getattr(self.backbone.config, "model_type", ""), "slot_offset": self.slot_offset,
                "is_encoder_decoder": self.is_encoder_decoder}

    def save_pretrained(self, directory):
        """Only what trains: every parameter with requires_grad (prompts, routers, any head), as
        safetensors, plus the config as JSON. Written to temporary names, then renamed. The config
        also rides inside the safetensors file, so weights and config are replaced in one rename:
        a crash between the two renames cannot pair new weights with an old config."""
        os.makedirs(directory, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters() if p.requires_grad}
        config = json.dumps(asdict(self.config), indent=2)
        names = ("mept_model.safetensors", "mept_config.json")
        try:
            save_file(tensors, os.path.join(directory, names[0] + ".tmp"),
                      metadata={"mept_config": config, "mept_layout": json.dumps(self._layout())})
            with open(os.path.join(directory, names[1] + ".tmp"), "w") as f:
                f.write(config)
            for name in names:
                os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
        finally:
            for name in names:  # a failed save leaves no half-written files behind
                if os.path.exists(os.path.join(directory, name + ".tmp")):
                    os.remove(os.path.join(directory, name + ".tmp"))

    @classmethod
    def from_pretrained(cls, backbone, directory):
        path = os.path.join(directory, "mept_model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} holds no mept_model.safetensors; save one with save_pretrained().")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        config = metadata.get("mept_config")  # saved with the weights (older saves: the JSON only)
        if config is None:
            with open(os.path.join(directory, "mept_config.json")) as f:
                config = f.read()
        model = cls(backbone, MEPTConfig(**json.loads(config)))
        saved_layout = json.loads(metadata.get("mept_layout", "{}"))  # {} from older saves: nothing to compare
        if any(model._layout().get(k, v) != v for k, v in saved_layout.items()):  # e.g. BERT weights onto a Llama
            model.remove()
            raise ValueError(f"checkpoint in {directory} was trained with the layout {saved_layout}, this backbone has "
                             f"{model._layout()}; load it onto the same kind of backbone it was trained on.")
        tensors = load_file(path)
        params = dict(model.named_parameters())  # a saved head of the backbone's own is trainable again below
        trainable = {n for n, p in params.items() if p.requires_grad}  # prompts and routers
        unknown, missing = sorted(set(tensors) - set(params)), sorted(trainable - set(tensors))
        wrong = [f"{n} {list(tensors[n].shape)} vs {list(params[n].shape)}" for n in sorted(set(tensors) & set(params))
                 if tensors[n].shape != params[n].shape]
        for problem, names in (("holds weights this model lacks", unknown), ("lacks weights this model needs", missing),
                               ("holds weights of other shapes", wrong)):
            if names:
                model.remove()
                raise ValueError(f"checkpoint in {directory} {problem}: {names[:3]}; load it onto the same kind "
                                 "of backbone (family, width, depth) it was trained on.")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
                params[name].requires_grad_(True)  # it was trainable when saved (e.g. a head)
        return model

    def remove(self):
        """Take every hook out; restore the backbone's requires_grad flags and train/eval mode (a head
        inside it keeps what it learned). Once: later calls do nothing."""
        if self._removed:
            return self.backbone
        for h in self._handles:
            h.remove()
        self._handles, self._removed = [], True
        _ATTACHED.discard(self.blocks)
        self.backbone.train(self._was_training)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(self._was_trainable[name])
        return self.backbone


# -----------------------------------------------------------------------------
# `python mept.py`: a small demo, then the gather benchmark (medians of interleaved repeats)


def loop_gather(pool, idx, gate):
    """The benchmark's slow baseline: one tiny op per (b, k) (the tests keep their own double loop as oracle)."""
    return torch.stack([sum(gate[b, k] * pool[idx[b, k]] for k in range(idx.shape[1])) for b in range(idx.shape[0])])


def dense_mixture(pool, idx, gate):
    """The benchmark's dense baseline: scatter the gates into (B, E), then w @ pool over all E experts."""
    w = torch.zeros(idx.shape[0], pool.shape[0], dtype=gate.dtype, device=gate.device).scatter(1, idx, gate)  # (B, E)
    return (w @ pool.flatten(1)).view(idx.shape[0], *pool.shape[1:])  # (B, P*D) -> (B, P, D)


def time_gathers(methods, pool, idx, gate, backward, repeats, order):
    """Median microseconds per call of each (name, fn) in methods, forward or forward+backward.

    Interleaved, so a noisy moment hurts every method alike, and in a fresh random order each time
    (drawn from the generator `order`): what ran just before (its freed buffers, the cache it left)
    moves a method's time by up to 1.5x on a CPU, and a fixed or rotating order always gives each
    method the same neighbour."""

    # the gradient a training step sends back to the mixed prompt: dense, like a slice of the
    # hidden states' gradient. (out.sum().backward() would send a broadcast tensor of ones, whose
    # zero strides push torch.bmm's backward onto a slow per-example copy path no training step takes.)
    grad_out = pool.new_empty(idx.shape[0], *pool.shape[1:]).normal_() if backward else None  # (B, P, D)

    def timed(fn):
        start = time.perf_counter()
        out = fn(pool, idx, gate)
        if backward:
            out.backward(grad_out)
        return time.perf_counter() - start

    times = {name: [] for name, _ in methods}
    for _, fn in methods:  # warm up: the first call of an op pays one-off costs
        timed(fn)
    for _ in range(repeats):
        for i in torch.randperm(len(methods), generator=order).tolist():
            name, fn = methods[i]
            times[name].append(timed(fn))
    return {name: sorted(t)[len(t) // 2] * 1e6 for name, t in times.items()}


if __name__ == "__main__":
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3))
    model = MEPT(bert, MEPTConfig(n_experts=4, prompt_len=5, top_k=2)).eval()
    print(model.trainable_parameters_line())
    out = model(torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    print("logits", tuple(out.logits.shape), "| expert_idx per block:",
          {l: r.expert_idx.tolist() for l, r in model.routing.items()})

    torch.set_num_threads(1)
    B, P, D, repeats = 32, 10, 768, 200
    order = torch.Generator().manual_seed(0)
    print(f"\ngather benchmark, 1 CPU thread, B={B} P={P} D={D}, median of {repeats} repeats interleaved in random order")
    print("targets: fwd+bwd >= 5x faster than the loop; at E=8 fwd within 1.25x of dense (dense/gather >= 0.80);"
          " at E=64 fwd+bwd >= 1.5x faster than dense")
    methods = [("gather", gather_experts), ("loop", loop_gather), ("dense", dense_mixture)]
    for E, K in [(8, 2), (64, 1)]:
        pool = torch.randn(E, P, D, requires_grad=True)
        gate = torch.rand(B, K, requires_grad=True)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(B)])  # (B, K), distinct experts per row
        for backward in (False, True):
            med = time_gathers(methods, pool, idx, gate, backward, repeats, order)
            print(f"E={E:2d} K={K} {'fwd+bwd' if backward else 'fwd    '}: gather {med['gather']:7.0f} us | "
                  f"loop {med['loop']:7.0f} us ({med['loop'] / med['gather']:4.1f}x) | "
                  f"dense {med['dense']:7.0f} us ({med['dense'] / med['gather']:4.2f}x)")
