"""The graders, graded: each passes mept.py's own code, fails each named mistake with its sentence, and
skips an exercise nobody has solved yet. This file runs in CI; the students' exercise files do not need to.

Every wrong solution below is one mistake away from right, and the mistake is in its name.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import mept
import solution
import test_ex1_summary as ex1
import test_ex2_gate as ex2
import test_ex3_gather as ex3
import test_ex4_slots as ex4
import test_ex5_balance as ex5
import test_ex6_pathways as ex6

# -----------------------------------------------------------------------------
# Exercise 1: summarize(hidden (B, T, D), mask (B, T)) -> (B, D)


def summary_averaging_padding(hidden, mask):  # the official code's mean over every token
    return F.layer_norm(hidden.float(), hidden.shape[-1:]).mean(1)


def summary_dividing_by_t(hidden, mask):  # padding masked out of the sum, but counted in the divisor
    return (F.layer_norm(hidden.float(), hidden.shape[-1:]) * mask.unsqueeze(-1)).sum(1) / hidden.shape[1]


def summary_without_clamp(hidden, mask):  # 0 / 0 for an input without real tokens
    return (F.layer_norm(hidden.float(), hidden.shape[-1:]) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


def summary_without_norm(hidden, mask):
    return (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def summary_norm_after_mean(hidden, mask):
    mean = (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
    return F.layer_norm(mean, mean.shape[-1:])


def summary_in_the_input_dtype(hidden, mask):  # no .float(): a bfloat16 hidden gives a bfloat16 summary
    normed = F.layer_norm(hidden, hidden.shape[-1:])  # (B, T, D)
    return (normed * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


# -----------------------------------------------------------------------------
# Exercise 2: top_k_gate(logits (B, E), K) -> gate (B, K), expert_idx (B, K), probs (B, E)


def gate_renormalised(logits, top_k):
    probs = logits.softmax(-1)  # (B, E)
    gate, expert_idx = probs.topk(top_k, dim=-1)  # (B, K), (B, K)
    return gate / gate.sum(-1, keepdim=True), expert_idx, probs


def gate_softmax_over_the_batch(logits, top_k):
    probs = logits.softmax(0)  # (B, E), but each expert sums to 1 over the inputs
    return (*probs.topk(top_k, dim=-1), probs)


def gate_from_the_logits(logits, top_k):
    return (*logits.topk(top_k, dim=-1), logits.softmax(-1))


def gate_least_probable_first(logits, top_k):
    probs = logits.softmax(-1)  # (B, E)
    gate, expert_idx = probs.topk(top_k, dim=-1)  # (B, K), (B, K)
    return gate.flip(-1), expert_idx.flip(-1), probs


def gate_detached(logits, top_k):
    probs = logits.softmax(-1).detach()  # (B, E)
    return (*probs.topk(top_k, dim=-1), probs)


# -----------------------------------------------------------------------------
# Exercise 3: gather_experts(expert_pool (E, P, D), expert_idx (B, K), gate (B, K)) -> (B, P, D)


def gather_summing_batch_mates(expert_pool, expert_idx, gate):  # n, not b: sums over the batch
    return torch.einsum("bk,nkpd->bpd", gate.to(expert_pool.dtype), expert_pool[expert_idx])


def gather_with_bare_squeeze(expert_pool, expert_idx, gate):
    picked = expert_pool[expert_idx]  # (B, K, P, D)
    return (gate.to(expert_pool.dtype)[..., None, None] * picked).sum(1).squeeze()  # (P, D) at B = 1


def gather_in_the_gates_dtype(expert_pool, expert_idx, gate):
    return (gate[..., None, None] * expert_pool[expert_idx]).sum(1)  # float32 gates lift a bfloat16 pool


def gather_with_a_loop(expert_pool, expert_idx, gate):
    gate = gate.to(expert_pool.dtype)  # (B, K)
    return torch.stack([(g[:, None, None] * expert_pool[i]).sum(0) for g, i in zip(gate, expert_idx)])


# -----------------------------------------------------------------------------
# Exercise 4: insert_slots(offset, seq, slots) and replace_slots(offset, hidden (B, P+T, D), slots (B, P, D))


def insert_at_the_front(offset, seq, slots):
    return torch.cat([slots, seq], dim=1)


def insert_three_dimensional_only(offset, seq, slots):
    return torch.cat([seq[:, :offset, :], slots, seq[:, offset:, :]], dim=1)


def replace_by_concatenating(offset, hidden, slots):
    return mept.insert_slots(offset, hidden, slots)  # (B, 2P+T, D)


def replace_in_place(offset, hidden, slots):
    hidden[:, offset:offset + slots.shape[1]] = slots
    return hidden


def replace_by_adding(offset, hidden, slots):
    out = hidden.clone()  # (B, P+T, D)
    out[:, offset:offset + slots.shape[1]] += slots
    return out


def replace_ignoring_the_offset(offset, hidden, slots):
    out = hidden.clone()  # (B, P+T, D)
    out[:, :slots.shape[1]] = slots
    return out


# -----------------------------------------------------------------------------
# Exercise 5: load_balancing_loss(routing, E) -> scalar


def balance_ignoring_the_choices(routing, n_experts):  # the probs stand in for the load
    return n_experts * (routing.probs.mean(0) ** 2).sum()


def balance_without_e(routing, n_experts):
    return mept.load_balancing_loss(routing, n_experts) / n_experts


def balance_first_choice_only(routing, n_experts):
    return mept.load_balancing_loss(mept.Routing(routing.expert_idx[:, :1], routing.probs), n_experts)


def balance_dividing_by_b(routing, n_experts):
    share = F.one_hot(routing.expert_idx, n_experts).float().sum((0, 1)) / routing.expert_idx.shape[0]  # (E,)
    return n_experts * (share * routing.probs.mean(0)).sum()


def balance_one_hot_without_width(routing, n_experts):
    share = F.one_hot(routing.expert_idx.flatten()).float().mean(0)  # as wide as the largest expert chosen
    return n_experts * (share * routing.probs.mean(0)).sum()


# -----------------------------------------------------------------------------
# Exercise 6: pathway_table(path (N, L), labels (N,), E, C) -> top_expert (C, L), share (C, L)


def pathway_table_from_the_notebook(path, labels, n_experts, n_classes):  # the reference: no mept.py function
    empty = (torch.zeros(path.shape[1]), torch.full((path.shape[1],), -1))  # (L,), (L,)
    rows = [ex6.notebook_load(path, labels, n_experts, c).max(-1) if (labels == c).any() else empty
            for c in range(n_classes)]
    return torch.stack([top for _, top in rows]), torch.stack([share for share, _ in rows])  # (C, L), (C, L)


def table_share_over_all_inputs(path, labels, n_experts, n_classes):
    counts = torch.stack([F.one_hot(path[labels == c], n_experts).sum(0) for c in range(n_classes)])  # (C, L, E)
    share, top = (counts.float() / len(labels)).max(-1)  # (C, L), (C, L)
    return top, share


def table_ties_to_the_larger_expert(path, labels, n_experts, n_classes):
    top, share = pathway_table_from_the_notebook(n_experts - 1 - path, labels, n_experts, n_classes)
    return torch.where(top >= 0, n_experts - 1 - top, top), share


def table_transposed(path, labels, n_experts, n_classes):
    top, share = pathway_table_from_the_notebook(path, labels, n_experts, n_classes)
    return top.T, share.T  # (L, C)


def table_nan_for_an_empty_class(path, labels, n_experts, n_classes):
    rows = [ex6.notebook_load(path, labels, n_experts, c).max(-1) for c in range(n_classes)]  # 0 / 0 when empty
    return torch.stack([top for _, top in rows]), torch.stack([share for share, _ in rows])


# -----------------------------------------------------------------------------
# The proofs

GRADERS = [  # (grader module, the student's function it imports, its grading test, mept's answer)
    (ex1, "summarize", ex1.test_your_summary_is_a_layer_normed_mean_of_the_real_tokens, mept.summarize),
    (ex2, "top_k_gate", ex2.test_your_gate_is_the_unnormalised_top_k_of_the_softmax, mept.top_k_gate),
    (ex3, "gather_experts", ex3.test_your_gather_mixes_each_inputs_own_experts_without_a_loop, mept.gather_experts),
    (ex4, "insert_slots", ex4.test_your_insert_puts_the_slots_at_the_offset, mept.insert_slots),
    (ex4, "replace_slots", ex4.test_your_replace_rewrites_the_slots_and_keeps_the_length, ex4.hook_rewrite),
    (ex5, "load_balancing_loss", ex5.test_your_balance_loss_is_switchs_e_times_load_times_probability,
     mept.load_balancing_loss),
    (ex6, "pathway_table", ex6.test_your_pathway_table_names_each_class_top_expert_per_block,
     pathway_table_from_the_notebook),
]

MISTAKES = [  # (the grader's check, a wrong solution, the words its message must hold)
    (ex1.check_summary, summary_averaging_padding, "padding counted in the mean: changing the hidden states"),
    (ex1.check_summary, summary_dividing_by_t, "padding counted in the mean: three more padding tokens"),
    (ex1.check_summary, summary_without_clamp, "no real token should get a zero summary"),
    (ex1.check_summary, summary_without_norm, "no LayerNorm"),
    (ex1.check_summary, summary_norm_after_mean, "LayerNorm after the mean"),
    (ex1.check_summary, summary_in_the_input_dtype, "should give a float32 summary"),
    (ex2.check_gate, gate_renormalised, "renormalised gate: at K = 1"),
    (ex2.check_gate, gate_softmax_over_the_batch, "softmax over the wrong axis"),
    (ex2.check_gate, gate_from_the_logits, "the gate should be the chosen experts' softmax probabilities"),
    (ex2.check_gate, gate_least_probable_first, "most probable first"),
    (ex2.check_gate, gate_detached, "no gradient reaches the logits"),
    (ex3.check_gather, gather_summing_batch_mates, "mixes batch mates' experts: at K = 1"),
    (ex3.check_gather, gather_with_bare_squeeze, "a bare .squeeze()"),
    (ex3.check_gather, gather_in_the_gates_dtype, "takes the pool's dtype"),
    (ex3.check_gather, gather_with_a_loop, "a Python loop over the batch or over k"),
    (ex4.check_insert, insert_at_the_front, "slots at the wrong place"),
    (ex4.check_insert, insert_three_dimensional_only, "failed on the 2-D attention mask"),
    (ex4.check_replace, replace_by_concatenating, "slots concatenated instead of replaced"),
    (ex4.check_replace, replace_in_place, "changed the hidden it was given, in place"),
    (ex4.check_replace, replace_by_adding, "added to the old ones"),
    (ex4.check_replace, replace_ignoring_the_offset, "yours replaced positions 0 .. 2"),
    (ex5.check_balance, balance_ignoring_the_choices, "a balance loss that ignores the choices"),
    (ex5.check_balance, balance_without_e, "missing the factor E"),
    (ex5.check_balance, balance_first_choice_only, "counts only each input's first choice"),
    (ex5.check_balance, balance_dividing_by_b, "f_e sums to 2, not 1"),
    (ex5.check_balance, balance_one_hot_without_width, "experts 2 and 3 were never chosen"),
    (ex6.check_pathways, table_share_over_all_inputs, "share over all inputs"),
    (ex6.check_pathways, table_ties_to_the_larger_expert, "on a tie, take the smaller expert"),
    (ex6.check_pathways, table_transposed, "one row per class, one column per block"),
    (ex6.check_pathways, table_nan_for_an_empty_class, "a class with no input gave nan"),
]


@pytest.mark.parametrize("grader, name, grading_test, reference", GRADERS, ids=[g[1] for g in GRADERS])
def test_each_grader_passes_mepts_own_code(grader, name, grading_test, reference, monkeypatch):
    """The student's function replaced by mept.py's (or, where mept.py has none, the oracle's): the grading
    test itself must pass, neither fail nor skip."""
    monkeypatch.setattr(grader, name, reference)
    try:
        grading_test()
    except pytest.skip.Exception:
        pytest.fail(f"the grader of {name} skipped mept.py's own answer")


@pytest.mark.parametrize("check, wrong, message", MISTAKES, ids=[m[1].__name__ for m in MISTAKES])
def test_each_grader_names_the_mistake_it_sees(check, wrong, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(wrong)


@pytest.mark.parametrize("grader, name, grading_test, reference", GRADERS, ids=[g[1] for g in GRADERS])
def test_an_unsolved_exercise_skips_instead_of_failing(grader, name, grading_test, reference, monkeypatch):
    def stub(*args):
        raise NotImplementedError(f"{name} not written yet")
    monkeypatch.setattr(grader, name, stub)
    with pytest.raises(pytest.skip.Exception, match="not solved yet"):
        grading_test()


@pytest.mark.parametrize("n", sorted(solution.ANSWERS))
def test_each_solution_prints_the_lines_that_answer_it(n):
    """solution.py finds the answers by name, so a renamed function fails here, not in a student's terminal."""
    filename, names, _ = solution.ANSWERS[n]
    text = solution.answer(n)
    for name in names:
        assert f"def {name.split('.')[-1]}(" in text, f"exercise {n}: the answer should show {name} from {filename}"
