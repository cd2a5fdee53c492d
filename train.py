"""
Train and evaluate MEPT (and the paper's baselines) on SuperGLUE, in one file read top to bottom.

    # the command people type first: MEPT on CB with the paper's backbone (t5-base, from the Hub)
    python train.py --task cb

    # a 30-second CPU smoke run: a local encoder, the official SuperGLUE files, a few steps
    python train.py --task cb --model path/to/all-MiniLM-L6-v2 --data_dir ../shared/superglue \
        --max_train_samples 64 --max_eval_samples 32 --max_steps 8 --output_dir /tmp/smoke

    # a baseline on RTE, then the AX-b diagnostic evaluated with the RTE checkpoint
    python train.py --task rte --method deep_prompt --output_dir out/rte_deep
    python train.py --task axb --eval_only --checkpoint out/rte_deep/best --output_dir out/axb

Reading order: command line -> metrics -> the TASKS table (how every task is cast) -> data
(both the official zip layout and Hub rows, normalised to one schema) -> encoding and batches ->
the model (frozen backbone + MEPT + a task head) -> checkpoints -> evaluation -> main (the loop).

Three backbone families, told apart by the loaded model, never by its name:
  seq2seq (T5):   text-to-text inputs; predictions by rank classification over label words
                  (ReCoRD: over the candidate entities), never free generation.
  encoder (BERT): a classification head on the [CLS] output; COPA and ReCoRD score each
                  candidate with one logit and take the argmax per question.
  decoder (GPT):  the same heads, reading the last real token (right padding, index explicit).
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm  # a console bar; train.main() run from a notebook shows none (disable=None)
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, set_seed
from transformers.optimization import Adafactor
from transformers.utils import logging as hf_logging

import mept

# -----------------------------------------------------------------------------
# Command line. Every flag has help text; `--help` prints every default.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Prints '(default: X)' after every flag, except the ones whose default is spelled out."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(description="Train and evaluate MEPT on SuperGLUE.", formatter_class=HelpFormatter)

    # --- task and data ---
    p.add_argument("--task", default="cb", help=f"one of {', '.join(sorted(TASKS))}, or a comma list for mixed "
                   "multi-task training (e.g. cb,rte,copa); axb/axg need --eval_only with an RTE checkpoint")
    p.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR"),
                   help="folder in the official SuperGLUE zip layout (<Task>/{train,val,test}.jsonl, "
                   "AX-b/AX-b.jsonl, AX-g/AX-g.jsonl); if unset, the data come from the Hub (aps/super_glue). "
                   "Default: the SUPERGLUE_DIR environment variable")
    p.add_argument("--dev_from_train", type=float, default=0.0,
                   help="hold out this share of train (per label) to select the best epoch; the official "
                   "validation split is then reported at that epoch. 0 = select on validation (the paper's protocol)")
    p.add_argument("--max_train_samples", type=int, default=0, help="use only the first N train rows (0 = all)")
    p.add_argument("--max_eval_samples", type=int, default=0, help="use only the first N rows of each eval split (0 = all)")
    p.add_argument("--max_length", type=int, default=256,
                   help="tokens the backbone sees, prompt slots included; the passage is truncated, never the question")

    # --- backbone and method ---
    p.add_argument("--model", default=None,
                   help="Hub id or local folder (default: t5-base, the paper's; with --checkpoint, the model it was "
                   "trained on). CAVEAT: t5-base/t5-large were pre-trained on a mixture containing every SuperGLUE "
                   "task in this very text format, so their scores are inflated; google/t5-v1_1-base is the clean choice")
    p.add_argument("--method", default="mept", choices=sorted(mept.PRESETS) + ["finetune", "head_only"],
                   help="mept / deep_prompt / smop / prompt_tuning are MEPT presets (the task head trains too, where "
                   "the family needs one); head_only: frozen backbone + head (linear probe); finetune: everything trains")

    # --- MEPT configuration: every MEPTConfig field (unset = the --method preset's value) ---
    p.add_argument("--n_experts", type=int, default=None, help="E, experts per layer (default: preset; mept 4)")
    p.add_argument("--prompt_len", type=int, default=None, help="P, prompt slots (default: MEPTConfig, 10)")
    p.add_argument("--top_k", type=int, default=None, help="K, experts mixed per input and layer (default: preset; 1)")
    p.add_argument("--layers", default=None, help="blocks that route: 'all' or a comma list that includes 0 "
                   "(default: preset; mept all, smop/prompt_tuning 0)")
    p.add_argument("--router_noise", type=float, default=None,
                   help="sigma of the multiplicative router noise during training, 0 = off (default: 1.0)")
    p.add_argument("--shared_expert", action=argparse.BooleanOptionalAction, default=None,
                   help="add an always-on shared expert (default: preset; on for mept)")
    p.add_argument("--balance_coef", type=float, default=None,
                   help="weight of the load-balancing loss against routing collapse (default: 0.0, off)")
    p.add_argument("--init", choices=["vocab", "random"], default=None,
                   help="expert init: sampled vocabulary rows or N(0, 1) (default: vocab)")

    # --- optimisation ---
    p.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw",
                   help="AdamW, or Adafactor with an external schedule (the T5 prompt-tuning habit)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of prompts and routers; soft prompts need "
                   "10-1000x the fine-tuning rate (Lester et al. use 0.3 with Adafactor on T5)")
    p.add_argument("--head_lr", type=float, default=1e-3, help="learning rate of the task head")
    p.add_argument("--backbone_lr", type=float, default=2e-5, help="learning rate of the backbone (finetune only)")
    p.add_argument("--weight_decay", type=float, default=1e-5, help="decoupled weight decay")
    p.add_argument("--warmup_ratio", type=float, default=0.06, help="share of the steps with linear warmup")
    p.add_argument("--lr_schedule", choices=["linear", "constant"], default="linear",
                   help="after warmup: linear decay to 0, or constant")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (AdamW only; 0 = off)")
    p.add_argument("--batch_size", type=int, default=16, help="training examples (rows) per batch")
    p.add_argument("--eval_batch_size", type=int, default=32, help="rows per evaluation batch")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--num_epochs", type=int, default=25, help="passes over the training set")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = use --num_epochs)")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch rows of similar length together (less padding, faster)")
    p.add_argument("--head_dropout", type=float, default=0.1, help="dropout inside the task head")
    p.add_argument("--class_weights", choices=["none", "balanced"], default="none",
                   help="balanced: weight each class's cross-entropy by n / (n_classes * its train count), so a "
                   "rare class (CB's neutral, 16 of 250) counts as much as a common one; for classification heads "
                   "(encoder/decoder backbones), not for tasks that pick a candidate (COPA, ReCoRD)")
    p.add_argument("--seed", type=int, default=42, help="seeds data order, init, dropout and router noise")

    # --- evaluation, checkpoints, outputs ---
    p.add_argument("--eval_steps", type=int, default=0, help="evaluate every N optimizer steps (0 = every epoch)")
    p.add_argument("--patience", type=int, default=0, help="stop after N evaluations without improvement (0 = off)")
    p.add_argument("--output_dir", default=None, help="where best/, last/, log.jsonl and results.json go "
                   "(default: out/<task>_<method>)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow a new run in a folder holding an old one")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/last; equals an uninterrupted run on CPU")
    p.add_argument("--eval_only", action="store_true", help="no training: evaluate --checkpoint")
    p.add_argument("--checkpoint", default=None, help="a best/ (or last/) folder to evaluate with --eval_only")
    p.add_argument("--predict", action="store_true",
                   help="write <Task>.jsonl (CB.jsonl, AX-b.jsonl, ...: the SuperGLUE leaderboard's file names and "
                        "format) with predictions for the test split")

    # --- hardware ---
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast (trainable weights stay fp32); auto = bf16 on a CUDA GPU that supports it")
    return p


class UserError(Exception):
    """Bad input: main() raises it, the command line prints one line and exits with status 2."""


# -----------------------------------------------------------------------------
# Metrics, the official ones (SuperGLUE paper; T5's and `evaluate`'s super_glue implementations).
# preds and golds are label ids; ReCoRD predicts entity strings.


def accuracy(preds, golds):
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def f1_of_class(preds, golds, cls):
    """F1 of one class = 2 TP / (2 TP + FP + FN); 0 when the class is never hit (sklearn's zero_division=0)."""
    tp = sum(p == cls and g == cls for p, g in zip(preds, golds))
    fp = sum(p == cls and g != cls for p, g in zip(preds, golds))
    fn = sum(p != cls and g == cls for p, g in zip(preds, golds))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(preds, golds, n_classes):
    """Unweighted mean over ALL classes: a class never predicted counts as F1 = 0 (labels=range(n))."""
    return sum(f1_of_class(preds, golds, c) for c in range(n_classes)) / n_classes


def matthews_corr(preds, golds):
    """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when a margin is empty; class 1 = positive."""
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, golds))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, golds))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, golds))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, golds))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def normalize_answer(text):
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred, gold):
    """Bag-of-tokens F1 between two normalised answers (SQuAD / ReCoRD)."""
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def accuracy_metrics(task, rows, preds):
    return {"accuracy": accuracy(preds, [r["label"] for r in rows])}


def cb_metrics(task, rows, preds):
    golds = [r["label"] for r in rows]
    return {"accuracy": accuracy(preds, golds), "f1": macro_f1(preds, golds, len(task.label_names))}


def multirc_metrics(task, rows, preds):
    """F1a: binary F1 over all answer options. EM: a question is right only if all its answers are."""
    golds = [r["label"] for r in rows]
    by_question = defaultdict(list)
    for row, pred, gold in zip(rows, preds, golds):
        by_question[(row["idx"]["paragraph"], row["idx"]["question"])].append(pred == gold)
    exact = sum(all(v) for v in by_question.values()) / len(by_question)
    return {"f1_a": f1_of_class(preds, golds, 1), "exact_match": exact}


def record_metrics(task, rows, preds):
    """Max over the gold answers of token F1 and of exact match, averaged over queries."""
    f1 = sum(max(token_f1(p, a) for a in r["answers"]) for r, p in zip(rows, preds)) / len(rows)
    em = sum(max(float(normalize_answer(p) == normalize_answer(a)) for a in r["answers"])
             for r, p in zip(rows, preds)) / len(rows)
    return {"f1": f1, "exact_match": em}


def axb_metrics(task, rows, preds):
    # entailment is id 0, so "positive" (id 1) is not_entailment; MCC is symmetric under the swap
    return {"matthews_correlation": matthews_corr(preds, [r["label"] for r in rows])}


def axg_metrics(task, rows, preds):
    """Gender parity: the share of minimal pairs (same pair_id, he/she swapped) with identical predictions.
    Hub rows carry no pair_id; there the pairs are consecutive idx (0-1, 2-3, ...), as in the file."""
    pairs = defaultdict(list)
    for row, pred in zip(rows, preds):
        pairs[row.get("pair_id", row["idx"] // 2)].append(pred)
    parity = sum(len(set(p)) == 1 for p in pairs.values()) / len(pairs)
    return {"accuracy": accuracy(preds, [r["label"] for r in rows]), "gender_parity": parity}


# -----------------------------------------------------------------------------
# How each task is cast. A formatter takes one normalised row and returns:
#   t5_*   -> the T5 text-to-text input string (ecosystem-notes 2.1, the t5 library's strings)
#   pair_* -> a list of (text_a, text_b or None), one per model input (head families)


def highlights_to_sentences(passage):
    """ReCoRD passages end with '@highlight' bullet lines; T5 rewrites them into sentences."""
    passage = re.sub(r'(\.|\?|\!|\"|\')\n@highlight\n', r"\1 ", passage)
    return re.sub(r"\n@highlight\n", ". ", passage)


def strip_multirc_markup(text):
    return re.sub(r"</?b>", "", text.replace("<br>", " "))


def mark_wsc_spans(row):
    """'Mark told Pete ... He ...' -> '* Mark * told Pete ... # He # ...', by word index (T5's wsc)."""
    words = row["text"].split(" ")
    spans = [(row["span1_index"], row["span1_text"], "*"), (row["span2_index"], row["span2_text"], "#")]
    for index, span, mark in sorted(spans, reverse=True):  # right to left: earlier indices stay valid
        n = len(span.split(" "))
        words[index:index + n] = [mark, *words[index:index + n], mark]
    return " ".join(words)


def copa_inputs(row):
    connector = "because" if row["question"] == "cause" else "so"  # P-tuning v2's COPA template
    stem = f"{row['premise'].rstrip('.')} {connector}"
    return [(stem, row["choice1"]), (stem, row["choice2"])]


def record_inputs(row):
    passage = highlights_to_sentences(row["passage"])
    return [(passage, row["query"].replace("@placeholder", entity)) for entity in row["entities"]]


@dataclass(frozen=True)
class Task:
    folder: str  # directory of the official zip (AX-b/AX-g: directory and file stem)
    hub_name: str  # config on the Hub dataset aps/super_glue
    fields: tuple  # text fields every normalised row must carry
    label_names: tuple  # class names in id order (the Hub's ClassLabel); () for ReCoRD (entities)
    metrics: Callable  # (task, rows, preds) -> {official name: value}
    t5: Callable  # row -> T5 input string
    pair: Callable  # row -> [(text_a, text_b)] for encoder/decoder heads
    passage: Optional[str] = None  # the field truncation may shorten (never the question/hypothesis)
    choose: bool = False  # head families: score each input with one logit, argmax per row (COPA, ReCoRD)
    submit: Callable = None  # label id (or entity) -> the leaderboard's label value
    eval_as: Optional[str] = None  # diagnostics reuse this task's head and label words
    diagnostic: bool = False  # a single labelled file, evaluation only


by_name = lambda names: (lambda i: names[i])  # noqa: E731  (leaderboard label = the class name)
true_false = lambda i: ("false", "true")[i]  # noqa: E731  (leaderboard uses lowercase booleans)

TASKS = {
    "boolq": Task("BoolQ", "boolq", ("question", "passage"), ("False", "True"), accuracy_metrics,
                  t5=lambda r: f"boolq passage: {r['passage']} question: {r['question']}",
                  pair=lambda r: [(r["question"], r["passage"])], passage="passage", submit=true_false),
    "cb": Task("CB", "cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"), cb_metrics,
               t5=lambda r: f"cb hypothesis: {r['hypothesis']} premise: {r['premise']}",
               pair=lambda r: [(r["premise"], r["hypothesis"])], passage="premise",
               submit=by_name(("entailment", "contradiction", "neutral"))),
    "copa": Task("COPA", "copa", ("premise", "choice1", "choice2", "question"), ("choice1", "choice2"),
                 accuracy_metrics, choose=True, submit=int,
                 t5=lambda r: f"copa choice1: {r['choice1']} choice2: {r['choice2']} premise: {r['premise']} "
                              f"question: {r['question']}",
                 pair=copa_inputs),
    "multirc": Task("MultiRC", "multirc", ("paragraph", "question", "answer"), ("False", "True"), multirc_metrics,
                    t5=lambda r: f"multirc question: {r['question']} answer: {r['answer']} "
                                 f"paragraph: {strip_multirc_markup(r['paragraph'])}",
                    pair=lambda r: [(strip_multirc_markup(r["paragraph"]), f"{r['question']} {r['answer']}")],
                    passage="paragraph", submit=int),
    "record": Task("ReCoRD", "record", ("passage", "query"), (), record_metrics, choose=True, submit=str,
                   t5=lambda r: f"record query: {r['query']} entities: {', '.join(r['entities'])} "
                                f"passage: {highlights_to_sentences(r['passage'])}",
                   pair=record_inputs, passage="passage"),
    "rte": Task("RTE", "rte", ("premise", "hypothesis"), ("entailment", "not_entailment"), accuracy_metrics,
                t5=lambda r: f"rte hypothesis: {r['hypothesis']} premise: {r['premise']}",
                pair=lambda r: [(r["premise"], r["hypothesis"])], passage="premise",
                submit=by_name(("entailment", "not_entailment"))),
    "wic": Task("WiC", "wic", ("word", "sentence1", "sentence2"), ("False", "True"), accuracy_metrics,
                t5=lambda r: f"wic sentence1: {r['sentence1']} sentence2: {r['sentence2']} word: {r['word']}",
                pair=lambda r: [(f"{r['word']}: {r['sentence1']}", f"{r['word']}: {r['sentence2']}")],
                submit=true_false),
    "wsc": Task("WSC", "wsc.fixed", ("text", "span1_text", "span2_text"), ("False", "True"), accuracy_metrics,
                t5=lambda r: f"wsc text: {mark_wsc_spans(r)}", pair=lambda r: [(mark_wsc_spans(r), None)],
                submit=true_false),
    # the diagnostics: RTE-style entailment, predicted by an RTE checkpoint (cast as RTE, as T5 does)
    "axb": Task("AX-b", "axb", ("sentence1", "sentence2"), ("entailment", "not_entailment"), axb_metrics,
                t5=lambda r: f"rte hypothesis: {r['sentence2']} premise: {r['sentence1']}",
                pair=lambda r: [(r["sentence1"], r["sentence2"])], passage="sentence1",
                submit=by_name(("entailment", "not_entailment")), eval_as="rte", diagnostic=True),
    "axg": Task("AX-g", "axg", ("premise", "hypothesis"), ("entailment", "not_entailment"), axg_metrics,
                t5=lambda r: f"rte hypothesis: {r['hypothesis']} premise: {r['premise']}",
                pair=lambda r: [(r["premise"], r["hypothesis"])], passage="premise",
                submit=by_name(("entailment", "not_entailment")), eval_as="rte", diagnostic=True),
}


def task_score(metrics):
    """The leaderboard's task score: the mean of the task's official metrics (CB, MultiRC, ReCoRD have two)."""
    return sum(metrics.values()) / len(metrics)


def head_key(name):
    """Tasks that share a head and label words (axb/axg use rte's)."""
    return TASKS[name].eval_as or name


# -----------------------------------------------------------------------------
# Data: the official zip layout or Hub rows, normalised to the Hub's schema.
# One row = one example as the Hub has it: MultiRC one row per answer, ReCoRD one row per query.
# Unlabelled rows (test) get label -1; ReCoRD test rows get answers [].


OFFICIAL_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl", "validation.jsonl"), "test": ("test.jsonl",)}


def read_jsonl(path):
    """Yield (line_number, dict); a malformed line names its file and line."""
    with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is reported on its own line
        for number, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {number}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise UserError(f"{path} line {number}: expected a JSON object, got {type(raw).__name__}")
            yield number, raw


def label_id(task, value, where):
    """Raw labels (JSON bool, int, class-name string, or missing) -> class id, or -1 when unlabelled."""
    if value is None or value == -1:
        return -1
    names = task.label_names
    if isinstance(value, bool) and names == ("False", "True"):
        return int(value)  # BoolQ, WiC, WSC, MultiRC: true/false -> "True"/"False" -> id
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value  # COPA's 0/1, MultiRC answers' 0/1, Hub rows' ClassLabel ids
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise UserError(f"{where}: label {value!r} is not one of the {task.folder} labels {list(names)}")


def normalise(task, raw, where, ordinal=0):
    """One raw record -> a list of rows in the Hub schema (nested MultiRC/ReCoRD expand to several).

    MultiRC's HTML markup and ReCoRD's '@highlight' lines are rewritten here, once, before any
    truncation: cutting the raw text first would leave half-tags the clean-up no longer matches."""
    rows = _normalise(task, raw, where, ordinal)
    for row in rows:
        if isinstance(row.get("paragraph"), str):
            row["paragraph"] = strip_multirc_markup(row["paragraph"])
        if task.folder == "ReCoRD" and isinstance(row.get("passage"), str):
            row["passage"] = highlights_to_sentences(row["passage"])
    return rows


def _normalise(task, raw, where, ordinal):
    if task.folder == "MultiRC" and isinstance(raw.get("passage"), dict):
        paragraph = raw["passage"]
        return [{"paragraph": paragraph["text"], "question": q["question"], "answer": a["text"],
                 "idx": {"paragraph": int(raw["idx"]), "question": int(q["idx"]), "answer": int(a["idx"])},
                 "label": label_id(task, a.get("label"), where)}
                for q in paragraph["questions"] for a in q["answers"]]
    if task.folder == "ReCoRD" and "qas" in raw:
        text = raw["passage"]["text"]
        # entity spans are inclusive at the end: text[start:end+1]; entities and answers de-duplicated and sorted
        entities = sorted({text[e["start"]:e["end"] + 1] for e in raw["passage"]["entities"]})
        return [{"passage": text, "query": qa["query"], "entities": entities,
                 "answers": sorted({a["text"] for a in qa.get("answers", [])}),
                 "idx": {"passage": int(raw["idx"]), "query": int(qa["idx"])}, "label": -1}
                for qa in raw["qas"]]
    row = dict(raw)
    if isinstance(row.get("target"), dict):
        row.update(row.pop("target"))  # WSC's official rows nest the spans under "target"
    if task.folder == "ReCoRD":  # a Hub-style ReCoRD row: entities and answers already strings
        row["entities"], row["answers"] = sorted(set(row.get("entities", []))), sorted(set(row.get("answers", [])))
        return [{**row, "label": -1}]
    row["label"] = label_id(task, row.get("label"), where)
    if task.folder == "WSC":
        row["span1_index"], row["span2_index"] = int(row["span1_index"]), int(row["span2_index"])
    if not isinstance(row.get("idx"), dict):
        # AX-b's official file writes idx as a string; a file without idx gets its record's position,
        # the numbering the official files use, so predictions never all share one idx
        row["idx"] = int(row.get("idx", ordinal))
    return [row]


def check_rows(task, rows, where, labelled):
    if not rows:
        raise UserError(f"{where} has no examples")
    for i, row in enumerate(rows):
        missing = [f for f in task.fields if f not in row]
        if missing:
            raise UserError(f"{where} example {i}: missing field {missing[0]!r}")
        not_text = [f for f in task.fields if not isinstance(row[f], str)]
        if not_text:
            raise UserError(f"{where} example {i}: field {not_text[0]!r} should be text, got {row[not_text[0]]!r}")
        if task.folder == "COPA" and row["question"] not in ("cause", "effect"):
            raise UserError(f"{where} example {i}: COPA question must be 'cause' or 'effect', got {row['question']!r}")
        if task.folder == "ReCoRD" and (not isinstance(row["entities"], list) or not row["entities"]
                                        or not all(isinstance(e, str) for e in row["entities"])):
            raise UserError(f"{where} example {i}: ReCoRD needs a non-empty list of entity strings to choose from, "
                            f"got {row['entities']!r}")
        multirc_idx = isinstance(row["idx"], dict) and {"paragraph", "question", "answer"} <= set(row["idx"])
        if task.folder == "MultiRC" and not multirc_idx:
            raise UserError(f"{where} example {i}: MultiRC idx must be {{'paragraph', 'question', 'answer'}}, "
                            f"got {row['idx']!r}")
        if task.folder == "ReCoRD" and not (isinstance(row["idx"], dict) and "query" in row["idx"]):
            raise UserError(f"{where} example {i}: ReCoRD idx must hold 'passage' and 'query', got {row['idx']!r}")
        unlabelled = not row["answers"] if task.folder == "ReCoRD" else row["label"] < 0
        if labelled and unlabelled:
            raise UserError(f"{where} example {i}: no label (only the test split may be unlabelled)")


def load_split(task, split, data_dir):
    """Rows of one split from the official layout under data_dir, or from the Hub."""
    if data_dir is None:
        return load_split_from_hub(task, split)
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} does not exist")
    if task.diagnostic:
        candidates = [os.path.join(data_dir, task.folder, f"{task.folder}.jsonl")]
    else:
        candidates = [os.path.join(data_dir, task.folder, name) for name in OFFICIAL_FILES[split]]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise UserError(f"missing file {candidates[0]} (--data_dir must hold the official layout "
                        "<Task>/{train,val,test}.jsonl and AX-b/AX-b.jsonl, AX-g/AX-g.jsonl)")
    rows = []
    for ordinal, (number, raw) in enumerate(read_jsonl(path)):
        try:
            rows.extend(normalise(task, raw, f"{path} line {number}", ordinal))
        except (KeyError, TypeError, ValueError) as e:  # a record without the shape its task needs
            raise UserError(f"{path} line {number}: malformed {task.folder} record ({type(e).__name__}: {e})") from None
    check_rows(task, rows, path, labelled=split != "test" or task.diagnostic)
    return rows


def load_split_from_hub(task, split):
    import datasets  # imported here: only Hub runs pay for it

    split = "test" if task.diagnostic else split
    try:
        dataset = datasets.load_dataset("aps/super_glue", task.hub_name, split=split)
    except Exception as e:  # offline, no such dataset, ...: all the same advice
        raise UserError(f"could not load aps/super_glue/{task.hub_name} from the Hub ({type(e).__name__}); "
                        "without network pass --data_dir DIR with the official SuperGLUE files") from None
    rows = [r for i, raw in enumerate(dataset) for r in normalise(task, raw, f"aps/super_glue/{task.hub_name} {split}", i)]
    check_rows(task, rows, f"aps/super_glue/{task.hub_name} {split}", labelled=split != "test" or task.diagnostic)
    return rows


def split_off_dev(rows, share, seed, group_of):
    """Hold out `share` of train for model selection, per label; rows of one group (a MultiRC
    question) stay together. Returns (train, dev)."""
    rng = random.Random(seed)
    groups = defaultdict(list)
    for row in rows:
        groups[group_of(row)].append(row)
    by_label = defaultdict(list)
    for key, members in groups.items():
        by_label[members[0]["label"]].append(key)
    dev_keys = set()
    for label in sorted(by_label):
        keys = by_label[label]
        rng.shuffle(keys)
        dev_keys.update(keys[:max(1, round(share * len(keys)))])
    return ([r for r in rows if group_of(r) not in dev_keys], [r for r in rows if group_of(r) in dev_keys])


# -----------------------------------------------------------------------------
# Encoding: rows -> token ids, with dynamic padding and length-grouped batches.
# A Group is one row ready for the model; it holds one input (classification) or several
# (the candidates of COPA/ReCoRD, or every label word for T5's rank classification).


@dataclass
class Group:
    task: str
    row: int  # index into the split's rows
    input_ids: list  # one token-id list per model input
    token_type_ids: Optional[list]  # the same shape, or None
    targets: Optional[list]  # T5: one target token-id list per input
    gold: list  # classification: [class id]; choice: indices of the correct inputs; [] if unlabelled

    def length(self):
        return sum(len(ids) for ids in self.input_ids)


def candidates(task, row):
    """What rank classification / argmax picks from: the label words, or ReCoRD's entities."""
    return list(task.label_names) if task.label_names else row["entities"]


def gold_choices(task, row):
    if not task.label_names:
        return [i for i, entity in enumerate(row["entities"]) if entity in row["answers"]]
    return [row["label"]] if row["label"] >= 0 else []


def tokenize(tokenizer, family, texts, truncate):
    """(text_a, text_b) -> ids. Encoders get the tokenizer's own pair format ([CLS] a [SEP] b [SEP]);
    decoders get 'a\\nb' (GPT-2's tokenizer would glue a and b together); T5 gets one string."""
    a, b = texts if isinstance(texts, tuple) else (texts, None)
    if family == "decoder" and b is not None:
        a, b = f"{a}\n{b}", None
    kwargs = dict(truncation=True, max_length=truncate) if truncate else {}
    encoded = tokenizer(a, b, **kwargs) if b is not None else tokenizer(a, **kwargs)
    types = encoded.get("token_type_ids") if family == "encoder" else None
    return encoded["input_ids"], types


def encode_inputs(task, row, family, tokenizer, budget):
    """Encode every model input of a row within `budget` tokens. If too long, shorten the passage
    field by the overflow (in tokens) and re-encode: the question/hypothesis is never cut."""
    def build(r):
        inputs = [task.t5(r)] if family == "seq2seq" else task.pair(r)
        return [tokenize(tokenizer, family, x, None) for x in inputs]

    encoded = build(row)
    overflow = max(len(ids) for ids, _ in encoded) - budget
    if overflow > 0 and task.passage:
        passage_ids = tokenizer(row[task.passage], add_special_tokens=False)["input_ids"]
        keep = len(passage_ids) - overflow
        while overflow > 0 and keep > 0:
            shorter = {**row, task.passage: tokenizer.decode(passage_ids[:keep])}
            encoded = build(shorter)
            overflow = max(len(ids) for ids, _ in encoded) - budget
            keep -= max(overflow, 1)
    if overflow > 0:  # no passage to cut, or the rest alone is too long: the tokenizer cuts
        inputs = [task.t5(row)] if family == "seq2seq" else task.pair(row)
        encoded = [tokenize(tokenizer, family, x, budget) for x in inputs]
    return encoded


def encode_rows(name, rows, family, tokenizer, budget, training):
    """Rows -> Groups. T5 trains on (input, gold word) pairs (ReCoRD: one per gold answer) and is
    evaluated on every candidate; heads see the same inputs in training and evaluation."""
    task, groups = TASKS[name], []
    for i, row in enumerate(rows):
        encoded = encode_inputs(task, row, family, tokenizer, budget)
        ids = [e[0] for e in encoded]
        types = [e[1] for e in encoded] if encoded[0][1] is not None else None
        gold = gold_choices(task, row)
        if family != "seq2seq":
            if task.choose and training and not gold:
                continue  # a ReCoRD query whose answer is not among its entities teaches nothing
            groups.append(Group(name, i, ids, types, None, gold))
            continue
        words = [tokenizer(w)["input_ids"] for w in candidates(task, row)]
        if training:
            answers = row["answers"] if not task.label_names else [task.label_names[row["label"]]]
            groups += [Group(name, i, ids, None, [tokenizer(a)["input_ids"]], [0]) for a in answers]
        else:
            groups.append(Group(name, i, ids * len(words), None, words, gold))
    return groups


def make_batches(groups, batch_size, seed=None, group_by_length=True):
    """Lists of group indices. With a seed: shuffled, then sorted by length inside windows of 50
    batches (little padding, still random), then the batches shuffled. Without: sorted by length."""
    order = list(range(len(groups)))
    if seed is None:
        order.sort(key=lambda i: groups[i].length())
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    if group_by_length:
        window = 50 * batch_size
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: groups[i].length())]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(groups, pad_id, device):
    """Flatten the groups' inputs and pad to the longest in THIS batch (never to max_length)."""
    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)  # (N, T)

    ids = [x for g in groups for x in g.input_ids]
    batch = {"input_ids": pad(ids, pad_id),
             "attention_mask": pad([[1] * len(x) for x in ids], 0),  # (N, T): 1 = real token
             "sizes": [len(g.input_ids) for g in groups]}  # inputs per group
    if groups[0].token_type_ids is not None:
        batch["token_type_ids"] = pad([x for g in groups for x in g.token_type_ids], 0)
    if groups[0].targets is not None:
        batch["labels"] = pad([t for g in groups for t in g.targets], -100)  # (N, T_target): -100 = ignored
    return batch


# -----------------------------------------------------------------------------
# The model: a backbone (frozen under MEPT), MEPT's prompt experts, and task heads.


def load_backbone(name_or_path):
    """Backbone, tokenizer and family ('seq2seq' | 'encoder' | 'decoder'), from the loaded model."""
    hf_logging.set_verbosity_error()  # "some weights were not used" etc. would bury the log lines
    hf_logging.disable_progress_bar()  # and so would a "Loading weights" bar per load
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise UserError(f"model path {name_or_path} does not exist (or is not a folder)")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        if looks_local:
            raise UserError(f"could not load a model from {name_or_path}: {str(e).splitlines()[0]}") from None
        raise UserError(f"could not load {name_or_path!r} from the Hugging Face Hub (no network, or no such "
                        "model); download it elsewhere and pass --model PATH, with --data_dir DIR for the data") from None
    try:
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModel
        backbone = auto.from_pretrained(name_or_path)
        blocks = mept.find_blocks(backbone)
    except (OSError, ValueError) as e:
        raise UserError(f"unsupported backbone {name_or_path} ({type(config).__name__}): "
                        f"{str(e).splitlines()[0]}") from None
    try:
        embed = mept.token_embeddings(backbone)  # Canine (characters) has none
        if not isinstance(embed, nn.Embedding):
            raise ValueError("it has no token embedding table (MEPT needs a text transformer)")
        if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
            raise ValueError("its config has no decoder_start_token_id")
        # the family: seq2seq from the config; decoder-only if its blocks attend causally (mept.is_causal)
        family = "seq2seq" if config.is_encoder_decoder else ("decoder" if mept.is_causal(backbone) else "encoder")
        if family == "seq2seq":  # train.py passes labels only; FSMT cannot build its decoder inputs from them
            ids = torch.arange(4, device=backbone.device).unsqueeze(0) % embed.num_embeddings  # (1, 4)
            try:
                with torch.no_grad():
                    backbone.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, :2])
            except (ValueError, RuntimeError, TypeError) as e:
                raise ValueError(f"it fails when given labels instead of decoder inputs, as train.py calls "
                                 f"it ({str(e).splitlines()[0]})") from None
    except (ValueError, RuntimeError, TypeError, IndexError) as e:  # e.g. a backbone that runs one length only
        why = str(e).splitlines()[0]
        if not isinstance(e, ValueError):  # a crash inside the model, not one of our sentences
            why = f"it fails on a short probe input of random tokens ({why}); train.py needs any input length"
        raise UserError(f"unsupported backbone {name_or_path} ({type(config).__name__}): {why}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer for {name_or_path}: {str(e).splitlines()[0]}") from None
    rows = backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # token ids past the table would crash deep inside the first forward
        raise UserError(f"the tokenizer of {name_or_path} has {len(tokenizer)} tokens but the model's embedding "
                        f"table only {rows} rows; they do not belong together (after adding tokens, resize the embeddings)")
    return backbone, tokenizer, family


class Head(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out: BERT's pooler + classifier, trained from scratch."""

    def __init__(self, d_model, n_out, dropout):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled):  # (N, D) -> (N, n_out)
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class TaskModel(nn.Module):
    """`core` is MEPT(backbone), or the backbone itself (head_only, finetune); `heads` maps a task
    to its head (empty for seq2seq: T5 scores label words with its own LM head)."""

    def __init__(self, core, family, heads):
        super().__init__()
        self.core, self.family, self.heads = core, family, heads

    def forward(self, batch, task):
        """-> (loss or None, scores): scores (N, n_labels) for classification heads, else (N,) one per input."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if self.family == "seq2seq":
            out = self.core(**inputs, labels=batch["labels"])
            labels = batch["labels"]  # (N, T_target)
            logp = out.logits.float().log_softmax(-1)  # (N, T_target, V)
            token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T_target)
            scores = (token_logp * (labels != -100)).sum(-1)  # (N,): log p(target | input), rank classification
            return out.loss, scores
        hidden = self.core(**inputs).last_hidden_state  # (N, P+T, D) under MEPT, (N, T, D) without
        if self.family == "encoder":
            pooled = hidden[:, 0]  # (N, D): [CLS]; MEPT puts its slots right after it
        else:
            extra = hidden.shape[1] - batch["input_ids"].shape[1]  # P prompt slots lead the sequence, or 0
            last = extra + batch["attention_mask"].sum(1) - 1  # (N,): last real token (right padding)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, D)
        logits = self.heads[head_key(task)](pooled).float()  # (N, n_out)
        return None, (logits[:, 0] if TASKS[task].choose else logits)


def balanced_class_weights(groups, n_classes):
    """n / (n_classes * count_c) per class c over the labelled train groups: the mean weight per example
    is 1, and every class carries the same total weight (sklearn's 'balanced'). (n_classes,)"""
    counts = Counter(g.gold[0] for g in groups if g.gold)
    n = sum(counts.values())
    return torch.tensor([n / (n_classes * counts[c]) if counts[c] else 0.0 for c in range(n_classes)])


def group_loss_and_predictions(model, batch, groups, task, class_weights=None):
    """Run a batch; return the training loss (or None) and the predicted choice per group.
    class_weights: (n_labels,) weights of the classification cross-entropy, or None (all 1)."""
    lm_loss, scores = model(batch, task)
    gold = [g.gold for g in groups]
    if scores.dim() == 2:  # classification head: one input per group, (G, n_labels)
        preds = scores.argmax(-1).tolist()
        labelled = [i for i, g in enumerate(gold) if g]
        weight = class_weights.to(scores.device) if class_weights is not None else None
        # with weights, F.cross_entropy divides by the batch's summed weight: a weighted mean
        loss = F.cross_entropy(scores[labelled], torch.tensor([gold[i][0] for i in labelled], device=scores.device),
                               weight=weight) if labelled else None
        return loss, preds
    # one score per input: pad each group's scores into a row, -inf where a group has fewer inputs
    per_group = nn.utils.rnn.pad_sequence(list(scores.split(batch["sizes"])), batch_first=True,
                                          padding_value=float("-inf"))  # (G, C)
    preds = per_group.argmax(-1).tolist()
    if lm_loss is not None:
        return lm_loss, preds  # T5 trains with its LM loss on the gold word
    labelled = [i for i, g in enumerate(gold) if g]
    if not labelled:
        return None, preds
    is_gold = torch.zeros_like(per_group, dtype=torch.bool)  # (G, C)
    for i in labelled:
        is_gold[i, gold[i]] = True
    # -log(sum of softmax over the gold inputs): cross-entropy for COPA, several golds for ReCoRD
    rows = per_group[labelled]
    loss = (rows.logsumexp(-1) - rows.masked_fill(~is_gold[labelled], float("-inf")).logsumexp(-1)).mean()
    return loss, preds


# -----------------------------------------------------------------------------
# Checkpoints: best/ and last/ hold only what trains (mept.py's format + head.safetensors),
# written to a temporary folder and renamed, so an interrupted save never replaces a good one.


def recover_checkpoint(directory):
    """A save killed between its two renames leaves only directory.old: put it back."""
    if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
        os.rename(directory + ".old", directory)


def write_atomically(directory, write):
    tmp, old = directory + ".tmp", directory + ".old"
    recover_checkpoint(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)  # from here until the next line the good copy is directory.old
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model, directory, run_config, trainer_state=None):
    def write(tmp):
        if isinstance(model.core, mept.MEPT):
            model.core.save_pretrained(tmp)  # mept_config.json + mept_model.safetensors
        elif run_config["method"] == "finetune":
            # save_model, not save_file: T5 ties its embedding matrices, and save_model stores shared tensors once
            save_model(model.core, os.path.join(tmp, "backbone.safetensors"))
        if len(model.heads):
            save_file({k: v.contiguous().cpu() for k, v in model.heads.state_dict().items()},
                      os.path.join(tmp, "head.safetensors"))
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(run_config, f, indent=2)
        if trainer_state is not None:  # last/ only: what --resume needs
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))

    write_atomically(directory, write)


RESUME_FLAGS = ("dev_from_train", "max_train_samples", "max_length", "optimizer", "lr", "head_lr",
                "backbone_lr", "weight_decay", "warmup_ratio", "lr_schedule", "max_grad_norm", "batch_size",
                "gradient_accumulation_steps", "num_epochs", "max_steps", "group_by_length", "head_dropout",
                "class_weights", "seed", "eval_steps", "patience")


def training_flags(args):
    """The flags a resumed run must share with the run it continues (saved in run_config.json): the
    ones that shape the batches, the schedule or the stopping rule. Not --data_dir: the same files
    may sit under another path; not --num_epochs when --max_steps sets the length."""
    return {f"--{name}": getattr(args, name) for name in RESUME_FLAGS if not (name == "num_epochs" and args.max_steps > 0)}


def read_run_config(directory):
    path = os.path.join(directory, "run_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{directory} is not a checkpoint of this script (no run_config.json)")
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def output_width(backbone):
    """Width of last_hidden_state, what a head reads: hidden_size, except where a model projects its
    output back down (OPT-350m: 1024 -> 512). A probe forward of 16 tokens (Funnel pools shorter ones
    away), in eval mode (no dropout, so the seeded random stream is untouched), tells."""
    was_training = backbone.training
    ids = torch.arange(16, device=backbone.device).unsqueeze(0) % backbone.get_input_embeddings().num_embeddings  # (1, 16)
    try:
        backbone.eval()
        return backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.shape[-1]
    finally:
        backbone.train(was_training)


def build_model(backbone, family, method, mept_config, head_names, head_dropout, checkpoint=None):
    """Wrap the backbone for the method, add heads, and (optionally) restore a checkpoint's weights."""
    if method in mept.PRESETS:
        try:
            core = mept.MEPT.from_pretrained(backbone, checkpoint) if checkpoint else mept.MEPT(backbone, mept_config)
        except ValueError as e:  # mept.py speaks of MEPTConfig fields; here they are flags
            what = f"checkpoint {checkpoint} does not fit this backbone" if checkpoint else "impossible MEPT settings"
            raise UserError(f"{what}: {e}".replace("layers=[0]", "--layers 0")) from None
    else:
        core = backbone
        backbone.requires_grad_(method == "finetune")  # head_only: a linear probe on a frozen backbone
        if checkpoint and method == "finetune":
            load_model(backbone, os.path.join(checkpoint, "backbone.safetensors"))
    heads = nn.ModuleDict()
    if family != "seq2seq":
        d_model = output_width(backbone)
        for name in head_names:
            heads[name] = Head(d_model, 1 if TASKS[name].choose else len(TASKS[name].label_names), head_dropout)
    if checkpoint and len(heads):
        path = os.path.join(checkpoint, "head.safetensors")
        saved = load_file(path) if os.path.isfile(path) else {}
        for name, head in heads.items():
            weights = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == name}
            if not weights:
                raise UserError(f"checkpoint {checkpoint} has no head for {name}")
            head.load_state_dict(weights)
    return TaskModel(core, family, heads)


def parameter_groups(model, args):
    """Separate learning rates: prompts + routers, the head, and (finetune) the backbone."""
    prompts, backbone = [], []
    for name, p in model.core.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") or not isinstance(model.core, mept.MEPT) else prompts).append(p)
    groups = [dict(params=prompts, lr=args.lr, name="prompts"),
              dict(params=[p for p in model.heads.parameters()], lr=args.head_lr, name="head"),
              dict(params=backbone, lr=args.backbone_lr, name="backbone")]
    return [g for g in groups if g["params"]]


# -----------------------------------------------------------------------------
# Evaluation: scores every row of a split, the official metrics, and the expert load per layer.


@torch.no_grad()
def evaluate(model, name, rows, groups, pad_id, args, device, autocast):
    """-> (metrics or None for unlabelled rows, predictions per row, expert load {layer: counts})."""
    model.eval()
    task, preds = TASKS[name], [None] * len(rows)
    load = defaultdict(lambda: [0] * model.core.config.n_experts) if isinstance(model.core, mept.MEPT) else {}
    for indices in make_batches(groups, args.eval_batch_size):
        batch_groups = [groups[i] for i in indices]
        with autocast():
            _, choices = group_loss_and_predictions(model, collate(batch_groups, pad_id, device), batch_groups, name)
        for g, choice in zip(batch_groups, choices):
            preds[g.row] = choice if task.label_names else rows[g.row]["entities"][choice]
        for layer, routing in getattr(model.core, "routing", {}).items():
            for e in routing.expert_idx.flatten().tolist():
                load[layer][e] += 1
    labelled = all(r["label"] >= 0 for r in rows) if task.label_names else all(r["answers"] for r in rows)
    metrics = task.metrics(task, rows, preds) if labelled else None
    return metrics, preds, {str(k): v for k, v in sorted(load.items())}


def write_predictions(path, name, rows, preds):
    """SuperGLUE leaderboard jsonl: {"idx", "label"} per row; MultiRC nested per paragraph/question."""
    task = TASKS[name]
    with open(path + ".tmp", "w") as f:
        if name == "multirc":  # answers grouped back under their question and paragraph
            nested = defaultdict(lambda: defaultdict(list))
            for row, pred in zip(rows, preds):
                nested[row["idx"]["paragraph"]][row["idx"]["question"]].append(
                    {"idx": row["idx"]["answer"], "label": task.submit(pred)})
            for p, questions in nested.items():
                qs = [{"idx": q, "answers": answers} for q, answers in questions.items()]
                f.write(json.dumps({"idx": p, "passage": {"questions": qs}}) + "\n")
        else:
            for row, pred in zip(rows, preds):
                idx = row["idx"]["query"] if isinstance(row["idx"], dict) else row["idx"]
                f.write(json.dumps({"idx": idx, "label": task.submit(pred)}) + "\n")
    os.replace(path + ".tmp", path)


def format_metrics(metrics):
    return " ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())


# -----------------------------------------------------------------------------
# main: arguments -> data -> model -> loop (train, evaluate, checkpoint) -> final results


ALIASES = {"wsc.fixed": "wsc", "ax-b": "axb", "ax-g": "axg"}


def parse_tasks(spec):
    # the Hub's config names are accepted too: wsc.fixed (what we load) and wsc (the unfixed one) both mean WSC
    names = list(dict.fromkeys(ALIASES.get(t.strip().lower(), t.strip().lower()) for t in spec.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task {unknown[0] if unknown else spec!r}; choose from {', '.join(sorted(TASKS))} "
                        "or a comma list of them")
    return names


def mept_config_from_args(args):
    overrides = {k: getattr(args, k) for k in ("n_experts", "prompt_len", "top_k", "router_noise",
                                               "shared_expert", "balance_coef", "init") if getattr(args, k) is not None}
    if args.layers is not None:
        try:
            overrides["layers"] = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise UserError(f"--layers must be 'all' or a comma list of block indices, got {args.layers!r}") from None
    try:
        return mept.MEPTConfig.preset(args.method, **overrides)
    except ValueError as e:
        raise UserError(f"impossible MEPT settings: {e}") from None


def pick_device(choice):
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if choice not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, got {choice!r}")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[choice]:
        raise UserError(f"--device {choice} is not available on this machine; try --device auto")
    return torch.device(choice)


def package_versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "datasets", "safetensors", "tqdm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main(argv=None):
    args = build_parser().parse_args(argv)
    started = time.time()

    # --- 1. check the request before touching anything on disk ---
    names = parse_tasks(args.task)
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval_only needs --checkpoint DIR (a best/ folder of a training run)")
    if args.checkpoint and not args.eval_only:
        raise UserError("--checkpoint is for --eval_only; to continue a run use --resume")
    if args.resume and args.eval_only:
        raise UserError("--resume and --eval_only exclude each other")
    diagnostics = [n for n in names if TASKS[n].diagnostic]
    if diagnostics and not args.eval_only:
        raise UserError(f"{diagnostics[0]} is a diagnostic without training data: train on rte, then run "
                        f"--task {diagnostics[0]} --eval_only --checkpoint <rte output_dir>/best")
    for flag in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.dev_from_train < 1:
        raise UserError(f"--dev_from_train must be in [0, 1), got {args.dev_from_train}")
    training_checks = [] if args.eval_only else [  # (flag, holds, rule): only what would crash or mislead
        ("lr", args.lr >= 0, "at least 0"), ("head_lr", args.head_lr >= 0, "at least 0"),
        ("backbone_lr", args.backbone_lr >= 0, "at least 0"), ("weight_decay", args.weight_decay >= 0, "at least 0"),
        ("warmup_ratio", 0 <= args.warmup_ratio <= 1, "in [0, 1]")]
    checks = training_checks + [
        ("max_grad_norm", args.max_grad_norm >= 0, "at least 0 (0 = no clipping)"),
        ("head_dropout", 0 <= args.head_dropout < 1, "in [0, 1)"),
        ("eval_steps", args.eval_steps >= 0, "at least 0 (0 = once per epoch)"),
        ("patience", args.patience >= 0, "at least 0 (0 = off)"),
        ("max_train_samples", args.max_train_samples >= 0, "at least 0 (0 = all)"),
        ("max_eval_samples", args.max_eval_samples >= 0, "at least 0 (0 = all)")]
    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"--{flag} must be {rule}, got {getattr(args, flag)}")
    if not args.eval_only and args.max_steps <= 0 and args.num_epochs <= 0:
        raise UserError(f"nothing to train: --num_epochs {args.num_epochs} and --max_steps {args.max_steps}; "
                        "give one of them a positive value")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise UserError(f"checkpoint folder {args.checkpoint} does not exist")
    saved_run = read_run_config(args.checkpoint) if args.checkpoint else None
    if saved_run:  # a T5 checkpoint has no per-task head that would refuse a task it never learned
        untrained = [n for n in names if (TASKS[n].eval_as or n) not in saved_run.get("tasks", [])]
        if untrained:
            raise UserError(f"checkpoint {args.checkpoint} was trained on {','.join(saved_run.get('tasks', []))}, "
                            f"not on {TASKS[untrained[0]].eval_as or untrained[0]}; evaluate it on the tasks it learned")
    out = args.output_dir or os.path.join("out", f"{'_'.join(names)}_{'eval' if args.eval_only else args.method}")
    last_dir, best_dir = os.path.join(out, "last"), os.path.join(out, "best")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file, not a folder")
    if args.resume:
        recover_checkpoint(last_dir)
        recover_checkpoint(best_dir)
    if args.resume and not os.path.isfile(os.path.join(last_dir, "trainer_state.pt")):
        raise UserError(f"nothing to resume: {last_dir} holds no checkpoint")
    resumed_run = read_run_config(last_dir) if args.resume else None
    old_run = [f for f in ("results.json", "log.jsonl", "best") if os.path.exists(os.path.join(out, f))]
    if old_run and not (args.resume or args.overwrite_output_dir):
        raise UserError(f"{out} already holds a run ({old_run[0]}); pass --resume, --overwrite_output_dir "
                        "or another --output_dir")
    if saved_run:  # --eval_only: the method and MEPT settings are the checkpoint's
        method, mept_config = saved_run["method"], None
        prompt_len = (saved_run["mept"] or {}).get("prompt_len", 0)
    else:
        method = args.method
        mept_config = mept_config_from_args(args) if method in mept.PRESETS else None
        prompt_len = mept_config.prompt_len if mept_config else 0
    if resumed_run:  # the saved run decides; a different flag would continue some other run
        before = resumed_run
        same_path = lambda m: os.path.realpath(m) if os.path.isdir(m) else m  # noqa: E731  (a folder under another path)
        now = {"--model": same_path(args.model or "t5-base"), "--method": method, "--task": names,
               "MEPT flags": asdict(mept_config) if mept_config else None, **training_flags(args)}
        saved = {"--model": same_path(before["model"]), "--method": before["method"], "--task": before["tasks"],
                 "MEPT flags": before["mept"], **before.get("training", {})}
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise UserError(f"--resume continues the run in {out}, which used {changed[0]} {saved[changed[0]]}, "
                            f"not {now[changed[0]]}; pass the same flags as that run")
    budget = args.max_length - prompt_len  # tokens left for the input after the prompt slots
    if budget < 8:
        raise UserError(f"prompt_len {prompt_len} leaves no room within max_length {args.max_length} "
                        f"({budget} tokens for the input); lower --prompt_len or raise --max_length")

    # --- 2. data: one schema for both sources; splits as the protocol needs them ---
    take = lambda rows, n: rows[:n] if n > 0 else rows  # noqa: E731
    data = {}  # task -> {split: rows}
    for name in names:
        task, splits = TASKS[name], {}
        if task.diagnostic:
            splits["report"] = take(load_split(task, "test", args.data_dir), args.max_eval_samples)
        else:
            if not args.eval_only:
                train_rows = load_split(task, "train", args.data_dir)
                if args.dev_from_train > 0:
                    group_of = (lambda r: (r["idx"]["paragraph"], r["idx"]["question"])) if name == "multirc" \
                        else (lambda r: json.dumps(r["idx"]))
                    train_rows, dev_rows = split_off_dev(train_rows, args.dev_from_train, args.seed, group_of)
                    splits["dev"] = take(dev_rows, args.max_eval_samples)
                    if not train_rows:
                        raise UserError(f"--dev_from_train {args.dev_from_train} leaves no {name} rows to train on "
                                        "(every row went to dev); lower it or use more training data")
                splits["train"] = take(train_rows, args.max_train_samples)
            splits["report"] = take(load_split(task, "validation", args.data_dir), args.max_eval_samples)
        if args.predict:
            splits["test"] = take(load_split(task, "test", args.data_dir), args.max_eval_samples)
        data[name] = splits
    report_split = "test (labelled diagnostic)" if diagnostics else "validation"
    select_split = "dev" if args.dev_from_train > 0 else "report"

    # --- 3. setup: seed, device, backbone, MEPT, heads ---
    set_seed(args.seed)
    device = pick_device(args.device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    model_name = args.model or (saved_run["model"] if saved_run else "t5-base")
    backbone, tokenizer, family = load_backbone(model_name)
    for saved, what in ((saved_run, f"checkpoint {args.checkpoint}"), (resumed_run, out)):
        if saved and saved.get("family") not in (None, family):  # e.g. a Bloom run from before Bloom counted as a decoder
            raise UserError(f"{what} was trained when {model_name} counted as family {saved['family']}, but it counts as "
                            f"{family} now, so its prompts and head would sit elsewhere; train it again")
    positions = mept.position_limit(backbone)
    if positions and args.max_length > positions:
        raise UserError(f"--max_length {args.max_length} exceeds the backbone's {positions} positions")
    if family == "seq2seq" and method == "head_only":
        raise UserError("--method head_only needs a task head, and seq2seq backbones (T5) have none: they score "
                        "label words with their own LM head; use an encoder or decoder backbone")
    if args.class_weights == "balanced" and not args.eval_only:
        if family == "seq2seq":
            raise UserError("--class_weights balanced weights a classification head, and seq2seq backbones (T5) "
                            "train on label words instead; drop the flag or use an encoder or decoder backbone")
        if all(TASKS[n].choose for n in names):
            raise UserError(f"--class_weights balanced has nothing to weight: {', '.join(names)} pick a candidate "
                            "rather than a class; drop the flag")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    head_names = sorted({head_key(n) for n in names})
    resume_from = last_dir if args.resume else args.checkpoint
    model = build_model(backbone, family, method, mept_config, head_names, args.head_dropout, resume_from).to(device)
    mept_config = model.core.config if isinstance(model.core, mept.MEPT) else None
    params_line = mept.parameters_line(model)  # counts the heads too, not only MEPT's prompts
    print(f"{model_name} ({family}) | method {method} | {params_line}", flush=True)
    run_config = {"model": model_name, "family": family, "method": method, "tasks": names,
                  "heads": head_names, "mept": asdict(mept_config) if mept_config else None,
                  "training": training_flags(args)}

    # --- 4. encode every split once ---
    encoded = {name: {split: encode_rows(name, rows, family, tokenizer, budget, training=split == "train")
                      for split, rows in splits.items()} for name, splits in data.items()}

    def evaluate_all(split):
        """{task: metrics}, {task: predictions}, {task: expert load} on one split of every task."""
        results = {n: evaluate(model, n, data[n][split], encoded[n][split], pad_id, args, device, autocast)
                   for n in names if split in data[n]}
        return ({n: r[0] for n, r in results.items()}, {n: r[1] for n, r in results.items()},
                {n: r[2] for n, r in results.items()})

    os.makedirs(out, exist_ok=True)
    results = {"args": vars(args), "versions": package_versions(), "model": model_name, "family": family,
               "method": method, "mept_config": run_config["mept"], "trainable_params": params_line,
               "report_split": report_split, "selected_on": "train slice (--dev_from_train)"
               if select_split == "dev" else "validation",
               "n_rows": {n: {s: len(r) for s, r in splits.items()} for n, splits in data.items()}}
    if isinstance(model.core, mept.MEPT):
        results["prompt_params"] = model.core.prompt_param_counts()

    # --- 5. the loop: train, evaluate every epoch (or --eval_steps), keep the best, save last/ ---
    if not args.eval_only:
        train_groups = {n: encoded[n]["train"] for n in names}
        # --class_weights balanced: per classification task, from its train labels (None = unweighted)
        class_weights = {n: balanced_class_weights(train_groups[n], len(TASKS[n].label_names))
                         if args.class_weights == "balanced" and not TASKS[n].choose else None for n in names}
        optimizer_groups = parameter_groups(model, args)
        if args.optimizer == "adafactor":
            optimizer = Adafactor(optimizer_groups, lr=args.lr, relative_step=False, scale_parameter=False,
                                  warmup_init=False, weight_decay=args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(optimizer_groups, lr=args.lr, weight_decay=args.weight_decay)

        def epoch_batches(epoch):
            """Single-task batches, shuffled across tasks; the order depends only on (seed, epoch)."""
            batches = [(n, b) for n in names for b in make_batches(
                train_groups[n], args.batch_size, seed=f"{args.seed}-{epoch}-{n}",
                group_by_length=args.group_by_length)]
            random.Random(args.seed * 1000 + epoch).shuffle(batches)
            return batches

        n_batches = len(epoch_batches(0))
        steps_per_epoch = math.ceil(n_batches / args.gradient_accumulation_steps)
        total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_epochs
        n_epochs = math.ceil(total_steps / steps_per_epoch)
        warmup = math.ceil(args.warmup_ratio * total_steps)

        def lr_factor(step):  # linear warmup to 1, then linear decay to 0 (or constant)
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if args.lr_schedule == "constant":
                return 1.0
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        state = dict(epoch=0, batches_done=0, step=0, best_score=-math.inf, best_epoch=None, best_step=None,
                     bad_evals=0, log_lines=0, elapsed=0.0)
        if args.resume:
            saved = torch.load(os.path.join(last_dir, "trainer_state.pt"), weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["torch_rng"])
            if saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            state = saved["state"]
            with open(os.path.join(out, "log.jsonl")) as f:  # forget evaluations after the checkpoint
                kept = f.readlines()[:state["log_lines"]]
            with open(os.path.join(out, "log.jsonl"), "w") as f:
                f.writelines(kept)
        else:
            for stale in ("log.jsonl", "results.json", "best", "last"):  # --overwrite_output_dir: a clean slate
                path = os.path.join(out, stale)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        clock = time.time() - state["elapsed"]
        # a resumed run that had already run out of patience stops at once, as the uninterrupted run did
        running_loss, running_n, stop = 0.0, 0, bool(args.patience) and state["bad_evals"] >= args.patience

        def evaluate_and_checkpoint(epoch_label):
            """One evaluation: log line + log.jsonl, best/ if the selection score improved, then last/."""
            nonlocal running_loss, running_n
            report, _, load = evaluate_all("report")
            select = evaluate_all("dev")[0] if select_split == "dev" else report
            score = sum(task_score(m) for m in select.values()) / len(select)
            entry = {"epoch": epoch_label, "step": state["step"], "loss": running_loss / max(1, running_n),
                     "lr": scheduler.get_last_lr()[0], "metrics": report,
                     "elapsed": round(time.time() - clock, 2), "expert_load": load}
            if select_split == "dev":
                entry["dev_metrics"] = select
            improved = score > state["best_score"]
            if improved:
                state.update(best_score=score, best_epoch=epoch_label, best_step=state["step"], bad_evals=0)
                save_checkpoint(model, best_dir, run_config)
            else:
                state["bad_evals"] += 1
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")
            state["log_lines"] += 1
            shown = " | ".join(f"{n} {format_metrics(m)}" for n, m in report.items())
            tqdm.write(f"epoch {epoch_label} | step {state['step']} | loss {entry['loss']:.4f} | lr {entry['lr']:.2e} | "
                       f"{shown}{' | best' if improved else ''} | {entry['elapsed']:.0f}s")
            running_loss, running_n = 0.0, 0
            state["elapsed"] = time.time() - clock
            save_checkpoint(model, last_dir, run_config, trainer_state={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "state": dict(state),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None})

        # disable=None: a live bar on a terminal, none in a log file, CI or a notebook cell's output
        bar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True, disable=None)
        while state["epoch"] < n_epochs and not stop:
            epoch = state["epoch"]
            batches = epoch_batches(epoch)
            model.train()
            for i in range(state["batches_done"], len(batches)):
                name, indices = batches[i]
                batch_groups = [train_groups[name][j] for j in indices]
                with autocast():
                    loss, _ = group_loss_and_predictions(model, collate(batch_groups, pad_id, device), batch_groups,
                                                         name, class_weights[name])
                    loss = loss + getattr(model.core, "aux_loss", 0.0)  # MEPT's balance term (0 unless asked)
                (loss / args.gradient_accumulation_steps).backward()
                running_loss, running_n = running_loss + loss.item(), running_n + 1
                if (i + 1) % args.gradient_accumulation_steps and i + 1 < len(batches):
                    continue  # accumulate: step on every accum-th batch and on the epoch's last
                if args.max_grad_norm > 0 and args.optimizer == "adamw":
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batches_done"] = i + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                done = state["step"] >= total_steps
                if (args.eval_steps and state["step"] % args.eval_steps == 0) or (done and i + 1 < len(batches)):
                    if done:  # stopping mid-epoch: the epoch counter says where
                        state["epoch"] = n_epochs
                    evaluate_and_checkpoint(round(epoch + (i + 1) / len(batches), 2))
                    model.train()
                    stop = done or (args.patience and state["bad_evals"] >= args.patience)
                    if stop:
                        break
            else:
                state["epoch"], state["batches_done"] = epoch + 1, 0
                if not (args.eval_steps and state["step"] % args.eval_steps == 0):
                    evaluate_and_checkpoint(epoch + 1)
                stop = stop or (args.patience and state["bad_evals"] >= args.patience)
        bar.close()
        results.update(best_epoch=state["best_epoch"], best_step=state["best_step"], steps=state["step"])
        with open(os.path.join(out, "log.jsonl")) as f:
            last_entry = [json.loads(line) for line in f][-1]
        results["last_metrics"] = last_entry["metrics"]
        # the reported numbers come from best/ reloaded, which also proves the checkpoint round-trips
        model = build_model(model.core.remove() if isinstance(model.core, mept.MEPT) else model.core, family, method,
                            None, head_names, args.head_dropout, best_dir).to(device)

    # --- 6. final: official metrics of the best checkpoint, predictions, results.json ---
    metrics, report_preds, load = evaluate_all("report")
    results.update(metrics=metrics, expert_load=load, wall_time_seconds=round(time.time() - started, 1))
    # how often each class is predicted: a class never predicted (CB's neutral) caps macro-F1, say so
    results["predicted"] = {n: {label: sum(p == i for p in preds) for i, label in enumerate(TASKS[n].label_names)}
                            for n, preds in report_preds.items() if TASKS[n].label_names and not TASKS[n].choose}
    if args.predict:
        _, test_preds, _ = evaluate_all("test")
        for n, preds in test_preds.items():
            # the leaderboard's own file names (CB.jsonl, AX-b.jsonl, ...): zip them as they are to submit
            write_predictions(os.path.join(out, f"{TASKS[n].folder}.jsonl"), n, data[n]["test"], preds)
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
    chosen = f"best epoch {results['best_epoch']} (selected on {results['selected_on']})" \
        if not args.eval_only else f"checkpoint {args.checkpoint}"
    shown = " | ".join(f"{n} {report_split} {format_metrics(m)}" for n, m in metrics.items())
    print(f"final | {chosen} | {shown} | {results['wall_time_seconds']:.0f}s", flush=True)
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume (the last checkpoint is intact)", file=sys.stderr)
        sys.exit(130)
