"""Exercise 1 (about 10 minutes): what the router reads.

At the entrance of a block, MEPT's router scores the experts from ONE vector per input: the block's
hidden states of the real tokens, each normalised, then averaged (the router then subtracts the running
mean of these vectors over its training inputs: the walkthrough's section 7 shows why). Grade it with
    python -m pytest exercises/test_ex1_summary.py
"""

import torch
import torch.nn.functional as F


def summarize(hidden, mask):
    """The router's summary of each input.

    hidden (B, T, D): the hidden states of the tokens entering a block (the prompt slots already left out)
    mask   (B, T):    1 for a real token, 0 for padding (long, as tokenizers give it, or float)
    returns s (B, D), float32 whatever the dtype of hidden:

        x_t = LayerNorm(hidden_t)                    over D, with no weight and no bias
        s   = sum_t mask_t * x_t / max(1, sum_t mask_t)

    Why each part:
    - the mean runs over the real tokens only: the same sentence padded to another length must be routed
      the same way (the official MEPT code averaged the padding too, and routed it differently);
    - an input with no real token at all gets s = 0, not 0 / 0;
    - the LayerNorm has no parameters, so routers at every depth read inputs on one scale
      (hidden states grow from about 1 to about 10 per row through a post-LN encoder).

    Hints:
    - F.layer_norm(x, normalized_shape) without weight and bias is the parameter-free LayerNorm;
      normalized_shape is the last axis only: hidden.shape[-1:].
    - mask.unsqueeze(-1) is (B, T, 1) and broadcasts against (B, T, D).
    - Cast to float32 before the norm: a bfloat16 backbone would otherwise round away what the router reads.
    """
    raise NotImplementedError("exercise 1: write summarize() in exercises/ex1_summary.py")
