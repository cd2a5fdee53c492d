"""Exercise 4 (about 15 minutes): writing the slots.

MEPT puts P prompt slots into the sequence once, beside the token embeddings (block 0). At every later
block a forward pre-hook rewrites those same P positions with the block's mixed prompt. Grade it with
    python -m pytest exercises/test_ex4_slots.py
"""

import torch


def insert_slots(offset, seq, slots):
    """Put P slots into a sequence: the first insertion, before block 0.

    offset s: where the slots go. 1 for encoders (BERT, MiniLM...): [CLS] stays at position 0,
              because the classification head reads position 0. 0 for T5 and decoders.
    seq   (B, T, ...): the token embeddings (B, T, D), or the attention mask or token type ids (B, T)
    slots (B, P, ...): the same trailing shape as seq
    returns (B, P+T, ...):  seq[:, :s], then the P slots, then seq[:, s:]

    Hint: torch.cat along dim 1. Index only the first two axes (seq[:, :s]), so that one function
    serves the embeddings (B, T, D) and the mask (B, T) alike.
    """
    raise NotImplementedError("exercise 4: write insert_slots() in exercises/ex4_slots.py")


def replace_slots(offset, hidden, slots):
    """Rewrite the slots at the entrance of a later block.

    hidden (B, P+T, D): the block's input; positions s .. s+P-1 hold the slots the previous block saw
    slots  (B, P, D): this block's mixed prompt
    returns (B, P+T, D): hidden with positions s .. s+P-1 replaced by slots, every token unchanged

    Replace, never concatenate: the sequence keeps its length P+T at every depth, so the attention mask
    and T5's relative position bias, built once for P+T positions, stay valid. In mept.py the hook first
    takes the old slots out, tokens = hidden without positions s .. s+P-1 (B, T, D), the router reads
    those tokens (exercise 1), and the new slots go in where the old ones were.

    Hints:
    - Build it from insert_slots(): two slices of hidden and one torch.cat take the old slots out.
    - Do not assign into hidden in place: it is the previous block's output, and autograd may need it.
    """
    raise NotImplementedError("exercise 4: write replace_slots() in exercises/ex4_slots.py")
