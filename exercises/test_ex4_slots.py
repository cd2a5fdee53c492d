"""Grader of exercise 4: insert_slots() against mept.insert_slots, and replace_slots() against the two
lines of MEPT._slot_hook that rewrite the slots, and against a copy with the slots assigned.

check_insert(fn) and check_replace(fn) raise AssertionError with a sentence naming the first mistake seen.
"""

import pytest
import torch

import mept
from ex4_slots import insert_slots, replace_slots

B, P, T, D = 5, 3, 7, 6  # pairwise distinct, so that slots put on the wrong axis cannot keep the shape


def hook_rewrite(offset, hidden, slots):
    """What MEPT's pre-hook does with a block's input: take the old slots out, insert the new ones."""
    tokens = torch.cat([hidden[:, :offset], hidden[:, offset + P:]], dim=1)  # (B, T, D), as in MEPT._slot_hook
    return mept.insert_slots(offset, tokens, slots)  # (B, P+T, D)


def assigned(offset, hidden, slots):
    """The oracle: a copy of hidden with positions offset .. offset+P-1 overwritten."""
    out = hidden.clone()  # (B, P+T, D)
    out[:, offset:offset + P] = slots
    return out


def check_insert(fn):
    torch.manual_seed(0)
    embeds, mask, slots = torch.randn(B, T, D), torch.randint(0, 2, (B, T)), torch.randn(B, P, D)
    for offset in (0, 1):
        out = fn(offset, embeds, slots)
        assert out.shape == (B, P + T, D), f"insert_slots should give (B, P+T, D) = {(B, P + T, D)}, got {out.shape}"
        if not torch.equal(out, mept.insert_slots(offset, embeds, slots)):
            at = [s for s in range(T + 1) if torch.equal(out, mept.insert_slots(s, embeds, slots))]
            raise AssertionError(
                f"slots at the wrong place: with offset {offset} they belong at positions {offset} .. {offset + P - 1}"
                + (f", yours start at {at[0]}" if at else "") + ". Encoders keep [CLS] at position 0 for the head.")
        try:
            out = fn(offset, mask, torch.ones(B, P, dtype=mask.dtype))  # the attention mask gets a 1 per slot
        except IndexError as error:
            raise AssertionError(f"insert_slots failed on the 2-D attention mask (B, T) ({error}): index only the "
                                 "first two axes, seq[:, :offset], so that one function serves (B, T) and (B, T, D)")
        assert torch.equal(out, mept.insert_slots(offset, mask, torch.ones(B, P, dtype=mask.dtype))), (
            "insert_slots differs from mept.insert_slots on the attention mask (B, T)")


def check_replace(fn):
    torch.manual_seed(0)
    hidden, slots = torch.randn(B, P + T, D), torch.randn(B, P, D)  # (B, P+T, D), (B, P, D)
    for offset in (0, 1):
        before = hidden.clone()
        out = fn(offset, hidden, slots)
        assert out.shape[1] != 2 * P + T, (
            f"slots concatenated instead of replaced: the sequence grew from P+T = {P + T} to {out.shape[1]} "
            "positions. The block's input already holds the P slots the previous block saw: take them out first, "
            "then insert the new ones, so that the length, the attention mask and T5's position bias stay valid.")
        assert torch.equal(hidden, before), (
            "replace_slots changed the hidden it was given, in place: build a new tensor (the previous block's "
            "output may still be needed by autograd)")
        assert out.shape == (B, P + T, D), f"replace_slots should keep (B, P+T, D) = {(B, P + T, D)}, got {out.shape}"
        if torch.allclose(out, assigned(offset, hidden, hidden[:, offset:offset + P] + slots)):
            raise AssertionError("the new slots were added to the old ones: write them in their place, the old "
                                 "slots are the previous block's and must not leak into this one")
        if not torch.equal(out, assigned(offset, hidden, slots)):
            moved = [s for s in range(T + 1) if torch.equal(out, assigned(s, hidden, slots))]
            raise AssertionError(
                f"with offset {offset} the slots are positions {offset} .. {offset + P - 1}; "
                + (f"yours replaced positions {moved[0]} .. {moved[0] + P - 1}" if moved else "your output differs "
                   "elsewhere too (a token lost, moved or changed)") + ". Encoders keep [CLS] at position 0.")
        torch.testing.assert_close(out, hook_rewrite(offset, hidden, slots),
                                   msg="replace_slots differs from what MEPT's hook writes")

    # gradients: the tokens and the new slots get the upstream gradient, the old slots get none
    leaf_h, leaf_s = hidden.clone().requires_grad_(), slots.clone().requires_grad_()
    upstream = torch.randn(B, P + T, D)
    mine = torch.autograd.grad((fn(1, leaf_h, leaf_s) * upstream).sum(), (leaf_h, leaf_s))
    expected = torch.autograd.grad((hook_rewrite(1, leaf_h, leaf_s) * upstream).sum(), (leaf_h, leaf_s))
    for name, g, e in zip(("hidden", "slots"), mine, expected):
        torch.testing.assert_close(g, e, msg=f"the gradient w.r.t. {name} differs from the hook's")


def test_your_insert_puts_the_slots_at_the_offset():
    try:
        check_insert(insert_slots)
    except NotImplementedError:
        pytest.skip("exercise 4 not solved yet: fill in insert_slots() in exercises/ex4_slots.py")


def test_your_replace_rewrites_the_slots_and_keeps_the_length():
    try:
        check_replace(replace_slots)
    except NotImplementedError:
        pytest.skip("exercise 4 not solved yet: fill in replace_slots() in exercises/ex4_slots.py")
