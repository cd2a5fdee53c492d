"""Exercise 2 (about 10 minutes): the gate, and why it is not renormalised.

The router turns its logits W_l s (B, E) into a choice of K experts per input and one weight per
choice. Grade it with
    python -m pytest exercises/test_ex2_gate.py
"""

import torch


def top_k_gate(logits, top_k):
    """The router's choice and gate.

    logits (B, E), top_k K (an int, 1 <= K <= E)
    returns gate (B, K), expert_idx (B, K) long, probs (B, E):

        probs                 = softmax(logits)                 over the E experts of each input
        expert_idx[b]         = the K most probable experts of input b, the most probable first
        gate[b, k]            = probs[b, expert_idx[b, k]]      as it is, NOT divided by its sum over k

    Before you write it, answer on paper: MEPT's default is K = 1. If the gate were renormalised,
    gate[b, 0] = probs[b, i] / probs[b, i], what would its value be for every input, and what gradient
    would the task loss send to the router's logits through it? (The grader's message tells you too.)

    Hints:
    - Tensor.softmax(dim) and Tensor.topk(k, dim) do the work; topk returns (values, indices), sorted.
    - Every input must sum to 1 over its E experts: softmax over the last axis, not over the batch.
    """
    raise NotImplementedError("exercise 2: write top_k_gate() in exercises/ex2_gate.py")
