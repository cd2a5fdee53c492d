"""Why mept.py's gather is written the way it is: the ways of writing the same batched top-k gather,
timed side by side in one run against mept.gather_experts, plus the dense mixture and the loop.

    python experiments/bench_gather_variants.py                 # B=32, P=10, D=768, one thread
    python experiments/bench_gather_variants.py --repeats 400   # steadier medians

Each variant returns mixed[b] = sum_k gate[b, k] * pool[idx[b, k]] (checked against the loop first).
Medians of repeats interleaved in a fresh random order, forward and forward+backward; the last column
divides each time by mept.py's.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gather import dense_mixture, loop_gather, time_gathers  # noqa: E402
from mept import gather_experts  # noqa: E402


def single_rows(pool, idx, gate, weighted_sum):
    """Fetch the B*K*P single rows e*P + p of the (E*P, D) view, then sum over k."""
    E, P, D = pool.shape  # E, P, D
    B, K = idx.shape  # B, K
    rows = torch.add(torch.arange(P, device=idx.device), idx.unsqueeze(-1), alpha=P)  # (B, K, P)
    picked = pool.reshape(E * P, D).index_select(0, rows.reshape(-1)).view(B, K, P * D)  # (B, K, P*D)
    return weighted_sum(gate, picked).view(B, P, D)  # (B, P, D)


def rows_einsum(pool, idx, gate):  # mept.py until this benchmark: single rows, einsum over k
    return single_rows(pool, idx, gate, lambda g, x: torch.einsum("bk,bkn->bn", g, x))


def rows_bmm(pool, idx, gate):  # single rows, bmm over k
    return single_rows(pool, idx, gate, lambda g, x: torch.bmm(g.unsqueeze(1), x))


def whole_rows_cast_if_needed(pool, idx, gate):  # mept.py before: the gates cast only when the dtypes differ
    E, P, D = pool.shape  # E, P, D
    B, K = idx.shape  # B, K
    picked = pool.reshape(E, P * D).index_select(0, idx.reshape(-1)).view(B, K, P * D)  # (B, K, P*D)
    weights = gate.unsqueeze(1) if gate.dtype == picked.dtype else gate.unsqueeze(1).to(picked.dtype)  # (B, 1, K)
    return torch.bmm(weights, picked).view(B, P, D)  # (B, P, D)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200, help="timed calls per variant and pass")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the targets are for one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    order = torch.Generator().manual_seed(0)
    variants = [("mept.gather_experts (whole runs, bmm)", gather_experts), ("single rows, einsum", rows_einsum),
                ("single rows, bmm", rows_bmm), ("whole runs, bmm, cast if needed", whole_rows_cast_if_needed),
                ("dense w @ pool", dense_mixture), ("per-example loop", loop_gather)]
    B, P, D = 32, 10, 768
    print(f"B={B} P={P} D={D}, {args.threads} thread(s), median of {args.repeats} repeats in random order")
    for E, K in [(8, 2), (64, 1)]:
        pool = torch.randn(E, P, D, requires_grad=True)
        gate = torch.rand(B, K, requires_grad=True)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(B)])  # (B, K), distinct experts per row
        want = loop_gather(pool, idx, gate)
        for name, fn in variants:
            torch.testing.assert_close(fn(pool, idx, gate), want, msg=f"{name} disagrees with the loop")
        for backward in (False, True):
            med = time_gathers(variants, pool, idx, gate, backward, args.repeats, order)
            ours = med[variants[0][0]]
            print(f"\nE={E} K={K} {'forward + backward' if backward else 'forward'}")
            for name, us in med.items():
                print(f"  {name:40s} {us:7.0f} us  {us / ours:5.2f}x mept.py's time")


if __name__ == "__main__":
    main()
