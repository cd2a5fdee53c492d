"""Exercise 3 (about 20 minutes): the batched top-k gather.

Each input b mixes its own K experts: mixed_prompt[b] = sum_k gate[b, k] * expert_pool[expert_idx[b, k]].
Write it for every b and k at once. Grade it with
    python -m pytest exercises/test_ex3_gather.py
"""

import torch


def gather_experts(expert_pool, expert_idx, gate):
    """Each input's mixture of its own chosen experts.

    expert_pool (E, P, D): one block's experts, each P slots of width D
    expert_idx  (B, K) long: the experts each input chose (exercise 2)
    gate        (B, K): their weights, usually float32, even when the pool is bfloat16
    returns mixed_prompt (B, P, D), in the pool's dtype:

        mixed_prompt[b] = sum_k gate[b, k] * expert_pool[expert_idx[b, k]]

    Rules:
    - no Python loop (no for, while or comprehension) over the batch or over k: one indexing of the
      pool fetches every (b, k) at once, one product weights them and sums over k;
    - the same lines for K = 1 and K > 1, and for batch size 1 (the official MEPT code broke there);
    - input b's result depends on expert_idx[b] and gate[b] only, never on its batch mates.

    Hints:
    - expert_pool[expert_idx] indexes the first axis with a (B, K) tensor: what shape comes out?
    - gate.unsqueeze(-1).unsqueeze(-1) is (B, K, 1, 1); torch.bmm and torch.einsum work too, if each
      letter of the einsum means one axis (write the output's letters last, and check the batch letter).
    - Cast the gate to the pool's dtype first (gate.to(expert_pool.dtype)).
    - Never a bare .squeeze(): at batch size 1 it drops the batch axis too.
    """
    raise NotImplementedError("exercise 3: write gather_experts() in exercises/ex3_gather.py")
