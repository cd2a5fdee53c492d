"""Does a trained MEPT see at training time the pathway it is scored on? Per routed block, on the run's own training
rows: how sure the router is of its choice (the chosen expert's probability, without noise), and how often the
router noise of training (the run's form: additive, or the paper's logits * (1 + sigma * eps)) picks another expert
than evaluation does. Over many blocks these flips compound: under the paper's noise an input whose noisy pathway
equals its evaluation pathway at every block is rare.

    python experiments/noisy_paths.py runs/results/smollm2/cb/mept_seed1 --data_dir path/to/superglue
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from mept import MEPT  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train.py output folder of a MEPT run (its best/ checkpoint is read)")
    p.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR"), help="official layout")
    p.add_argument("--rows", type=int, default=32, help="training rows measured")
    p.add_argument("--draws", type=int, default=3, help="noisy forward passes per row")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    saved = os.path.join(args.run, "best", "run_config.json")
    if not os.path.isfile(saved) or not args.data_dir:
        sys.exit(f"error: need {saved} (a finished train.py run) and --data_dir (or SUPERGLUE_DIR)")
    with open(saved) as f:
        config = json.load(f)
    if not config["mept"] or config["mept"]["n_experts"] < 2 or config["family"] == "seq2seq":  # T5: decoder inputs
        sys.exit(f"error: {args.run} is not a MEPT run with 2+ experts on an encoder or decoder: nothing to measure")
    name = config["tasks"][0]
    try:
        rows = train.load_split(train.TASKS[name], "train", args.data_dir)[:args.rows]
        backbone, tokenizer, family = train.load_backbone(config["model"])
    except train.UserError as e:
        sys.exit(f"error: {e}")
    model = MEPT.from_pretrained(backbone, os.path.join(args.run, "best"))
    budget = config["args"]["max_length"] - config["mept"]["prompt_len"]  # tokens beside the slots, as in train.py
    groups = train.encode_rows(name, rows, family, tokenizer, budget, False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch = train.collate(groups, pad_id, "cpu")  # right padding, as in train.py
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    means = {n: b.clone() for n, b in model.named_buffers() if n.startswith("prompts.")}  # the routers' running means

    def pathways():  # {block: (N,) the top expert of each input}
        with torch.no_grad():
            model(**inputs)
            for name, mean in means.items():  # a training forward moves the running means: every pass from the same
                model.get_buffer(name).copy_(mean)
        return {int(i): r.expert_idx[:, 0].clone() for i, r in model.routing.items()}
    model.eval()
    clean = pathways()
    sure = {int(i): r.probs.max(-1).values.mean().item() for i, r in model.routing.items()}
    model.train()  # the router noise is on; the frozen backbone's dropout too, as in training
    torch.manual_seed(0)
    draws = [pathways() for _ in range(args.draws)]
    flips = {i: statistics.mean((d[i] != clean[i]).float().mean().item() for d in draws) for i in clean}
    same = statistics.mean(torch.stack([d[i] == clean[i] for i in clean]).all(0).float().mean().item()
                           for d in draws)
    print(f"{args.run}: {len(groups)} training inputs, {args.draws} noisy passes each, "
          f"sigma {config['mept']['router_noise']}, noise {config['mept'].get('noise_form', 'paper')}")
    print("block | chosen expert's probability (no noise) | noisy choice differs from the evaluated one")
    for i in sorted(clean):
        print(f"{i:5d} | {sure[i]:.2f} | {flips[i]:.2f}")
    print(f"mean over {len(clean)} blocks: probability {statistics.mean(sure.values()):.2f}, differs "
          f"{statistics.mean(flips.values()):.2f}; inputs whose noisy pathway is the evaluated one at every block: "
          f"{same:.2f}")


if __name__ == "__main__":
    main()
