"""Grader of exercise 5: load_balancing_loss() against mept.load_balancing_loss and the test suite's
oracle (test_mept.py: test_balance_loss_is_smallest_for_a_uniform_load), in values and gradients.

check_balance(fn) raises AssertionError with a sentence naming the first mistake it sees.
"""

import pytest
import torch

import mept
from ex5_balance import load_balancing_loss

B, K, E = 8, 2, 4  # 8 inputs: a uniform load is two per expert


def random_routing(k, n_experts=E):
    probs = torch.randn(B, n_experts).softmax(-1)  # (B, E)
    return mept.Routing(torch.multinomial(probs, k), probs)  # (B, k), (B, E)


def check_balance(fn):
    torch.manual_seed(0)
    probs = torch.randn(B, E).softmax(-1)  # (B, E)
    unchosen = mept.Routing(torch.randint(0, 2, (B, 1)), probs)  # (B, 1): experts 2 and 3 never chosen
    try:
        loss = fn(unchosen, E)
    except NotImplementedError:
        raise
    except (RuntimeError, IndexError) as error:
        raise AssertionError(f"the loss failed when experts 2 and 3 were never chosen ({str(error).splitlines()[0]}): "
                             "count with one_hot(..., num_classes=n_experts) or bincount(..., minlength=n_experts)")
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point(), (
        f"the loss should be a scalar float tensor (0-dim), got {getattr(loss, 'shape', type(loss))}: sum over experts")

    # the test suite's oracle: exactly 1 for an even load, growing as the load skews
    uniform = mept.Routing(torch.arange(B).remainder(E).unsqueeze(1), torch.full((B, E), 1 / E))
    even = fn(uniform, E).item()
    assert abs(even - 1 / E) > 1e-6, (
        "missing the factor E: an even load costs 1/E; multiply by n_experts, so that it costs 1")
    assert abs(even - 1) < 1e-6, f"an even load (each expert chosen B/E times, each prob 1/E) should cost 1, got {even}"
    collapsed = mept.Routing(torch.zeros(B, 1, dtype=torch.long), probs)  # every input on expert 0
    spread = mept.Routing(torch.arange(B).remainder(E).unsqueeze(1), probs)  # the same probs, an even load
    assert not torch.isclose(fn(collapsed, E), fn(spread, E)), (
        "a balance loss that ignores the choices: it did not change when every input moved to expert 0, with the "
        "same probs. f_e must count the choices, the share of the B*K entries of expert_idx equal to e; only P_e "
        "comes from the probs.")

    # top-2: every choice counts, each as 1/(B*K)
    routing = random_routing(K)
    mine, expected = fn(routing, E), mept.load_balancing_loss(routing, E)
    first_only = mept.load_balancing_loss(mept.Routing(routing.expert_idx[:, :1], routing.probs), E)
    if torch.isclose(mine, first_only) and not torch.isclose(mine, expected):
        raise AssertionError("at K = 2 your f_e counts only each input's first choice: count all B*K entries of "
                             "expert_idx")
    if torch.isclose(mine, K * expected):
        raise AssertionError(f"at K = 2 your f_e sums to {K}, not 1: divide the counts by B*K, the number of "
                             "choices, not by B")
    for routing in (routing, random_routing(1)):
        torch.testing.assert_close(fn(routing, E), mept.load_balancing_loss(routing, E),
                                   msg="the loss differs from mept.load_balancing_loss")

    # the gradient reaches the probs through P_e only: d loss / d probs[b, e] = E * f_e / B
    leaf = routing.probs.clone().requires_grad_()
    mine = fn(mept.Routing(routing.expert_idx, leaf), E)
    assert mine.requires_grad, "no gradient reaches the probs: P_e must carry it (do not detach the probs)"
    (grad,) = torch.autograd.grad(mine, leaf)
    (expected,) = torch.autograd.grad(mept.load_balancing_loss(mept.Routing(routing.expert_idx, leaf), E), leaf)
    torch.testing.assert_close(grad, expected,
                               msg="the gradient w.r.t. the probs differs from mept's (f_e must carry none)")


def test_your_balance_loss_is_switchs_e_times_load_times_probability():
    try:
        check_balance(load_balancing_loss)
    except NotImplementedError:
        pytest.skip("exercise 5 not solved yet: fill in load_balancing_loss() in exercises/ex5_balance.py")
