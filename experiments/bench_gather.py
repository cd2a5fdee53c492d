"""The batched top-k gather of mept.py against the two obvious ways of writing the same mixture:
a Python loop over the batch and K (one tiny op per pair), and a dense mixture over all E experts
(the gates scattered into a (B, E) matrix, times the whole pool).

    python experiments/bench_gather.py                 # B=32, P=10, D=768, one thread, 200 repeats
    python experiments/bench_gather.py --repeats 400   # steadier medians

Medians of repeats interleaved in a fresh random order (what ran just before moves a method's time
by up to 1.5x on a CPU, and a fixed order would always give each method the same neighbour), forward
and forward+backward, with a dense upstream gradient like the one a training step sends.

Why the gather is not always the fastest on a CPU: it copies B*K*P*D numbers into a (B, K, P*D)
buffer and rereads it, where the dense mixture reads a small pool that stays in cache and writes only
its (B, P*D) output. At E=8 the dense matmul is a cheap way to mix on a CPU; as E grows, dense does
E/K times the arithmetic and the gather wins. glibc hands freed buffers of the gather's size (2 MB at
B=32, K=2) back to the OS, so the next call page-faults them in again; run with
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 to see the time without that.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mept import gather_experts  # noqa: E402


def loop_gather(pool, idx, gate):
    """The slow baseline: one small op per (b, k)."""
    return torch.stack([sum(gate[b, k] * pool[idx[b, k]] for k in range(idx.shape[1])) for b in range(idx.shape[0])])


def dense_mixture(pool, idx, gate):
    """The dense baseline: the gates scattered into (B, E), then w @ pool over all E experts."""
    w = torch.zeros(idx.shape[0], pool.shape[0], dtype=gate.dtype, device=gate.device).scatter(1, idx, gate)  # (B, E)
    return (w @ pool.flatten(1)).view(idx.shape[0], *pool.shape[1:])  # (B, P*D) -> (B, P, D)


def time_gathers(methods, pool, idx, gate, backward, repeats, order):
    """Median microseconds per call of each (name, fn), forward or forward+backward, interleaved in a
    fresh random order per repeat (drawn from the generator `order`)."""
    grad_out = pool.new_empty(idx.shape[0], *pool.shape[1:]).normal_() if backward else None  # (B, P, D)

    def timed(fn):
        start = time.perf_counter()
        out = fn(pool, idx, gate)
        if backward:  # a dense gradient, like a slice of the hidden states' gradient in a training step
            out.backward(grad_out)
        return time.perf_counter() - start

    times = {name: [] for name, _ in methods}
    for _, fn in methods:  # warm up: the first call of an op pays one-off costs
        timed(fn)
    for _ in range(repeats):
        for i in torch.randperm(len(methods), generator=order).tolist():
            times[methods[i][0]].append(timed(methods[i][1]))
    return {name: sorted(t)[len(t) // 2] * 1e6 for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="B, examples per call")
    p.add_argument("--prompt_len", type=int, default=10, help="P, prompt slots")
    p.add_argument("--d_model", type=int, default=768, help="D, the width")
    p.add_argument("--repeats", type=int, default=200, help="interleaved repeats; medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, P, D, order = args.batch, args.prompt_len, args.d_model, torch.Generator().manual_seed(0)
    print(f"gather benchmark, {args.threads} CPU thread(s), B={B} P={P} D={D}, median of {args.repeats} repeats")
    print("targets: fwd+bwd >= 5x faster than the loop; at E=8 fwd within 1.25x of dense (dense/gather >= 0.80);"
          " at E=64 fwd+bwd >= 1.5x faster than dense")
    methods = [("gather", gather_experts), ("loop", loop_gather), ("dense", dense_mixture)]
    for E, K in [(8, 2), (64, 1)]:
        pool = torch.randn(E, P, D, requires_grad=True)  # (E, P, D)
        gate = torch.rand(B, K, requires_grad=True)  # (B, K)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(B)])  # (B, K): distinct experts per row
        for backward in (False, True):
            med = time_gathers(methods, pool, idx, gate, backward, args.repeats, order)
            print(f"E={E:2d} K={K} {'fwd+bwd' if backward else 'fwd    '}: gather {med['gather']:7.0f} us | "
                  f"loop {med['loop']:7.0f} us ({med['loop'] / med['gather']:4.1f}x) | "
                  f"dense {med['dense']:7.0f} us ({med['dense'] / med['gather']:4.2f}x)")


if __name__ == "__main__":
    main()
