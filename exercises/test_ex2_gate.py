"""Grader of exercise 2: top_k_gate() against mept.top_k_gate, at K = 1, K = 2 and K = E.

check_gate(fn) raises AssertionError with a sentence naming the first mistake it sees.
"""

import pytest
import torch

import mept
from ex2_gate import top_k_gate

B, E = 5, 4  # distinct, so that a softmax over the batch axis cannot pass for one over the experts


def check_gate(fn):
    torch.manual_seed(0)
    logits = torch.randn(B, E, dtype=torch.float64) * 2  # (B, E)
    for k in (1, 2, E):
        gate, expert_idx, probs = fn(logits, k)
        assert (gate.shape, expert_idx.shape, probs.shape) == ((B, k), (B, k), (B, E)), (
            f"at K = {k} the shapes should be gate {(B, k)}, expert_idx {(B, k)}, probs {(B, E)}; got "
            f"{tuple(gate.shape)}, {tuple(expert_idx.shape)}, {tuple(probs.shape)}")
        assert expert_idx.dtype == torch.long, f"expert_idx should hold long indices, got {expert_idx.dtype}"
        assert torch.allclose(probs.sum(-1), torch.ones(B, dtype=probs.dtype)), (
            f"softmax over the wrong axis: each input's probs should sum to 1 over its E experts, got row sums "
            f"{probs.sum(-1).tolist()}; use softmax(dim=-1)")
        expected_gate, expected_idx, expected_probs = mept.top_k_gate(logits, k)
        torch.testing.assert_close(probs, expected_probs, msg="probs should be softmax(logits) over the experts")
        assert torch.equal(expert_idx, expected_idx), (
            f"at K = {k} expert_idx should hold each input's {k} most probable experts, most probable first "
            f"(train.py reads expert_idx[:, 0] as the top choice); got {expert_idx.tolist()}, "
            f"expected {expected_idx.tolist()}")
        if k < E and torch.allclose(gate.sum(-1), torch.ones(B, dtype=gate.dtype)):
            raise AssertionError(
                f"renormalised gate: at K = {k} your gates sum to 1 per input. At K = 1 such a gate is the constant "
                "1, so the task loss sends the router no gradient and it never learns. Keep the chosen experts' "
                "softmax probabilities as they are, probs.topk(k), without dividing by their sum.")
        assert torch.allclose(gate, probs.gather(1, expert_idx)), (
            "the gate should be the chosen experts' softmax probabilities, probs.gather(1, expert_idx); got "
            f"{gate[0].tolist()} for input 0, expected {expected_gate[0].tolist()}")

    # the K = 1 gradient: the router learns only through the gate
    leaf, weights = logits.clone().requires_grad_(), torch.randn(B, 1, dtype=torch.float64)
    gate = fn(leaf, 1)[0]
    assert gate.requires_grad, "no gradient reaches the logits through the gate: do not detach probs or the gate"
    (grad,) = torch.autograd.grad((gate * weights).sum(), leaf)
    (expected,) = torch.autograd.grad((mept.top_k_gate(leaf, 1)[0] * weights).sum(), leaf)
    torch.testing.assert_close(grad, expected, msg="at K = 1 the gradient w.r.t. the logits differs from mept's")


def test_your_gate_is_the_unnormalised_top_k_of_the_softmax():
    try:
        check_gate(top_k_gate)
    except NotImplementedError:
        pytest.skip("exercise 2 not solved yet: fill in top_k_gate() in exercises/ex2_gate.py")
