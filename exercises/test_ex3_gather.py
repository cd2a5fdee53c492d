"""Grader of exercise 3: gather_experts() against mept.gather_experts and the test suite's oracle, the
per-input double loop (test_mept.py: test_gather_matches_per_example_loop), in values and gradients.

check_gather(fn) raises AssertionError with a sentence naming the first mistake it sees.
"""

import ast
import inspect
import textwrap

import pytest
import torch

import mept
from ex3_gather import gather_experts

B, K, E, P, D = 5, 2, 4, 3, 6  # pairwise distinct, so that a swapped axis cannot keep the shape


def double_loop(pool, expert_idx, gate):
    """The oracle: mixed[b] = sum_k gate[b, k] * pool[expert_idx[b, k]], one input and one k at a time."""
    b, k = expert_idx.shape
    return torch.stack([sum(gate[i, j] * pool[expert_idx[i, j]] for j in range(k)) for i in range(b)])  # (B, P, D)


def python_loops(fn):
    """The for, while and comprehension nodes in fn's own source (none found when it has no source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):
        return []
    kinds = (ast.For, ast.While, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    return [node for node in ast.walk(tree) if isinstance(node, kinds)]


def check_gather(fn):
    torch.manual_seed(0)
    pool = torch.randn(E, P, D, dtype=torch.float64, requires_grad=True)  # (E, P, D)
    for b, k in [(B, 1), (B, K), (1, 1), (1, K)]:
        expert_idx = torch.stack([torch.randperm(E)[:k] for _ in range(b)])  # (b, k): distinct experts per input
        gate = torch.rand(b, k, dtype=torch.float64, requires_grad=True)  # (b, k)
        mixed = fn(pool, expert_idx, gate)
        if b == 1:
            assert mixed.shape == (1, P, D), (
                f"at batch size 1 your mixed prompt is {tuple(mixed.shape)}, not {(1, P, D)}: a bare .squeeze() "
                "drops the batch axis too (the official MEPT code's bug); squeeze or index only the axis you mean")
        assert mixed.shape == (b, P, D), f"the mixed prompt should be (B, P, D) = {(b, P, D)}, got {tuple(mixed.shape)}"
        if b > 1:  # input 0's result must not move when its batch mates choose other experts
            others = torch.cat([expert_idx[:1], (expert_idx[1:] + 1) % E])  # (b, k)
            assert torch.allclose(fn(pool, others, gate)[0], mixed[0]), (
                f"a gather that mixes batch mates' experts: at K = {k}, input 0's mixture changed when only the "
                "other inputs changed their experts. This is the official MEPT code's top-1 bug (each input got "
                "its gate times the SUM of the experts chosen by the whole batch). Input b may use only "
                "expert_idx[b] and gate[b]: check which axes your product sums over.")
        oracle = double_loop(pool, expert_idx, gate)
        torch.testing.assert_close(mixed, oracle, msg=f"at B = {b}, K = {k} the mixture differs from the double loop")
        torch.testing.assert_close(mixed, mept.gather_experts(pool, expert_idx, gate),
                                   msg="the mixture differs from mept.gather_experts")
        upstream = torch.randn(b, P, D, dtype=torch.float64)
        for name, mine, expected in zip(("pool", "gate"), torch.autograd.grad((mixed * upstream).sum(), (pool, gate)),
                                        torch.autograd.grad((oracle * upstream).sum(), (pool, gate))):
            torch.testing.assert_close(mine, expected, msg=f"the gradient w.r.t. {name} differs from the double loop's")

    # the test suite's edge cases: examples that share an expert, a bfloat16 pool with float32 gates
    same = fn(pool.detach(), torch.tensor([[2], [2], [0]]), torch.ones(3, 1, dtype=torch.float64))  # (3, P, D)
    torch.testing.assert_close(same, pool.detach()[[2, 2, 0]],
                               msg="inputs that pick the same expert must each get it whole")
    half, gate = pool.detach().bfloat16(), torch.rand(B, K)
    expert_idx = torch.stack([torch.randperm(E)[:K] for _ in range(B)])  # (B, K)
    try:
        mixed = fn(half, expert_idx, gate)
    except NotImplementedError:
        raise
    except RuntimeError as error:
        raise AssertionError(f"a bfloat16 pool with float32 gates failed ({str(error).splitlines()[0]}): cast the "
                             "gate to the pool's dtype first, gate.to(expert_pool.dtype)") from None
    assert mixed.dtype == torch.bfloat16, (
        f"a bfloat16 pool with float32 gates gave a {mixed.dtype} mixture: the mixed prompt takes the pool's dtype, "
        "so cast the gate first, gate.to(expert_pool.dtype)")

    loops = python_loops(fn)
    assert not loops, (
        f"a Python loop over the batch or over k ({type(loops[0]).__name__} on line {loops[0].lineno} of your "
        "function): the values are right, now do it at once. Index the pool with the whole (B, K) expert_idx, "
        "weight by the gate and sum over k in one product.")


def test_your_gather_mixes_each_inputs_own_experts_without_a_loop():
    try:
        check_gather(gather_experts)
    except NotImplementedError:
        pytest.skip("exercise 3 not solved yet: fill in gather_experts() in exercises/ex3_gather.py")
