"""Grader of exercise 6: pathway_table() on a small table worked by hand, and on random tables against
the per-class load that walkthrough.ipynb draws (section 6), whose argmax the table is.

check_pathways(fn) raises AssertionError with a sentence naming the first mistake it sees.
"""

import pytest
import torch
import torch.nn.functional as F

from ex6_pathways import pathway_table

# 7 inputs, 4 routed blocks, 4 experts, 3 classes, class 2 with no input. Row n: path[n], then labels[n].
PATH = torch.tensor([[1, 0, 3, 2],   # class 0
                     [0, 2, 1, 3],   # class 1
                     [1, 2, 3, 2],   # class 0
                     [2, 2, 1, 0],   # class 1
                     [0, 3, 1, 3],   # class 1
                     [1, 2, 0, 2],   # class 0
                     [2, 3, 1, 3]])  # class 1; (N, L) = (7, 4)
LABELS = torch.tensor([0, 1, 0, 1, 1, 0, 1])  # (N,)
# by hand, class 0 (3 inputs): block 0 all take 1; block 1 takes 2 twice, 0 once; block 2 takes 3 twice; block 3 all 2
# class 1 (4 inputs): block 0 ties 0 and 2, two each (the smaller wins); block 1 ties 2 and 3; block 2 all 1; block 3
# takes 3 three times. Class 2 has no input: -1, share 0.
TOP = torch.tensor([[1, 2, 3, 2], [0, 2, 1, 3], [-1, -1, -1, -1]])  # (C, L)
SHARE = torch.tensor([[1, 2 / 3, 2 / 3, 1], [1 / 2, 1 / 2, 1, 3 / 4], [0, 0, 0, 0]])  # (C, L)


def notebook_load(path, labels, n_experts, c):
    """walkthrough.ipynb, section 6: the share of class c's inputs that take each expert at each block."""
    return F.one_hot(path[labels == c], n_experts).float().mean(0)  # (L, E)


def check_pathways(fn):
    top, share = fn(PATH, LABELS, 4, 3)
    assert top.shape == share.shape == (3, 4), (
        f"top_expert and share should be (n_classes, L) = (3, 4), got {tuple(top.shape)} and {tuple(share.shape)}: "
        "one row per class, one column per block")
    assert top.dtype == torch.long and share.dtype == torch.float32, (
        f"top_expert should be long and share float32, got {top.dtype} and {share.dtype}")
    assert not share.isnan().any(), (
        "a class with no input gave nan (0 / 0): give it top_expert -1 and share 0, as the docstring says")
    if torch.allclose(share[:2], SHARE[:2] * torch.tensor([[3 / 7], [4 / 7]])):
        raise AssertionError("share over all inputs: the share is among the class's own inputs (a count over the "
                             "class's size), not over all N inputs")
    if torch.equal(top[1, :2], torch.tensor([2, 3])):
        raise AssertionError("on a tie, take the smaller expert index (class 1 ties 0 and 2 at block 0); "
                             "Tensor.max(dim) and argmax do")
    assert torch.equal(top[2], TOP[2]) and torch.equal(share[2], SHARE[2]), (
        f"a class with no input should get top_expert -1 and share 0 at every block, got {top[2].tolist()} and "
        f"{share[2].tolist()}")
    assert torch.equal(top, TOP), f"top_expert should be {TOP.tolist()} (worked by hand above), got {top.tolist()}"
    torch.testing.assert_close(share, SHARE, msg=f"share should be {SHARE.tolist()} (worked by hand above)")

    # random tables against the notebook's per-class load, CB-sized: 56 inputs, 3 classes, 6 blocks
    generator = torch.Generator().manual_seed(0)
    path, labels = torch.randint(0, 4, (56, 6), generator=generator), torch.randint(0, 3, (56,), generator=generator)
    top, share = fn(path, labels, 4, 3)  # (3, 6), (3, 6)
    for c in range(3):
        expected_share, expected_top = notebook_load(path, labels, 4, c).max(-1)  # (L,), (L,)
        assert torch.equal(top[c], expected_top), (
            f"class {c}: top_expert differs from the argmax of the notebook's load (on a tie, the smaller expert wins)")
        torch.testing.assert_close(share[c], expected_share, msg=f"class {c}: share differs from the notebook's load")


def test_your_pathway_table_names_each_class_top_expert_per_block():
    try:
        check_pathways(pathway_table)
    except NotImplementedError:
        pytest.skip("exercise 6 not solved yet: fill in pathway_table() in exercises/ex6_pathways.py")
