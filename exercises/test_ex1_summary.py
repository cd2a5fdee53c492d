"""Grader of exercise 1: summarize() against mept.summarize and a per-input loop.

check_summary(fn) raises AssertionError with a sentence naming the first mistake it sees; the most
specific checks come first. test_graders.py proves it passes mept.py and fails each named mistake.
"""

import pytest
import torch
import torch.nn.functional as F

import mept
from ex1_summary import summarize

B, T, D = 5, 7, 6  # pairwise distinct, so that a mean over the wrong axis cannot keep the shape
LENGTHS = [7, 5, 3, 6, 1]  # real tokens per input; the rest is padding


def per_input_loop(hidden, mask):
    """The oracle: for each input, the parameter-free LayerNorm of its real tokens, averaged."""
    rows = [F.layer_norm(h[m.bool()].float(), h.shape[-1:]).mean(0) for h, m in zip(hidden, mask)]  # B x (D,)
    return torch.stack(rows)  # (B, D)


def check_summary(fn):
    torch.manual_seed(0)
    hidden = torch.randn(B, T, D) * 3 + 1  # (B, T, D)
    mask = (torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(1)).long()  # (B, T): right padding
    out = fn(hidden, mask)
    assert isinstance(out, torch.Tensor) and out.shape == (B, D), (
        f"summarize should return (B, D) = {(B, D)}, got {getattr(out, 'shape', type(out))}: average over the "
        "token axis (dim 1) only")

    # padding: new values in the padded positions, then more padding, must change nothing
    repadded = torch.where(mask.bool().unsqueeze(-1), hidden, 100 * torch.randn(B, T, D))  # (B, T, D)
    assert torch.allclose(fn(repadded, mask), out, atol=1e-5), (
        "padding counted in the mean: changing the hidden states of padding tokens changed the summary. Multiply "
        "by the mask before summing (mask.unsqueeze(-1) is (B, T, 1)), so that only real tokens count.")
    longer = torch.cat([hidden, torch.zeros(B, 3, D)], 1), torch.cat([mask, torch.zeros(B, 3, dtype=torch.long)], 1)
    assert torch.allclose(fn(*longer), out, atol=1e-5), (
        "padding counted in the mean: three more padding tokens changed the summary, although their values are "
        "masked out. Divide by the number of real tokens (mask.sum(1)), not by T.")
    empty = fn(hidden[:1], torch.zeros(1, T, dtype=torch.long))  # (1, D): an input with no real token
    assert torch.equal(empty, torch.zeros(1, D)), (
        f"an input with no real token should get a zero summary, got {empty[0, :3].tolist()}...: divide by "
        "mask.sum(1, keepdim=True).clamp(min=1), so that 0 / 0 never happens")

    # the norm: per token over D, before the mean
    assert torch.allclose(fn(10 * hidden - 3, mask), out, atol=1e-4), (
        "no LayerNorm: the summary changed when every hidden state was scaled by 10 and shifted by -3 (a LayerNorm "
        "ignores both, an RMS norm only the scale). Normalise each token over D first, "
        "F.layer_norm(hidden, hidden.shape[-1:]), with no weight and no bias.")
    mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, D): every input has a real token
    norm_after = F.layer_norm(mean, (D,))  # (B, D): the mean, then the norm
    assert not torch.allclose(out, norm_after, atol=1e-5), (
        "LayerNorm after the mean: you normalised the averaged vector. Normalise each token first, then average "
        "the real tokens: every token enters on the same scale.")

    # dtype, values, gradients
    half = fn(hidden.bfloat16(), mask)
    assert half.dtype == torch.float32, (
        f"a bfloat16 hidden should give a float32 summary, got {half.dtype}: cast with hidden.float() before the norm")
    for m in (mask, mask.float(), mask.flip(1)):  # long and float masks; left padding
        torch.testing.assert_close(fn(hidden, m), mept.summarize(hidden, m),
                                   msg="summarize differs from mept.summarize (values)")
        torch.testing.assert_close(fn(hidden, m), per_input_loop(hidden, m),
                                   msg="summarize differs from the per-input loop of the real tokens")
    leaf = hidden.clone().requires_grad_()
    upstream = torch.randn(B, D)
    mine = fn(leaf, mask)
    assert mine.requires_grad, "no gradient reaches hidden: do not detach, the earlier blocks' prompts learn through it"
    (grad,) = torch.autograd.grad((mine * upstream).sum(), leaf)
    (expected,) = torch.autograd.grad((mept.summarize(leaf, mask) * upstream).sum(), leaf)
    torch.testing.assert_close(grad, expected, msg="the gradient w.r.t. hidden differs from mept.summarize's")


def test_your_summary_is_a_layer_normed_mean_of_the_real_tokens():
    try:
        check_summary(summarize)
    except NotImplementedError:
        pytest.skip("exercise 1 not solved yet: fill in summarize() in exercises/ex1_summary.py")
