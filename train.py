"""Train and evaluate MEPT (and the paper's baselines) on SuperGLUE, in one file read top to bottom.

    python train.py --task cb                   # MEPT on CB with the paper's backbone (t5-base, from the Hub)
    python train.py --task cb --model path/to/all-MiniLM-L6-v2 --data_dir path/to/superglue \\
        --max_train_samples 64 --max_eval_samples 32 --max_steps 8   # a 30-second CPU smoke run, offline
    python train.py --task rte --method deep_prompt --output_dir out/rte     # a baseline; then the AX-b
    python train.py --task axb --eval_only out/rte/best          # the diagnostic, with the RTE checkpoint

Seq2seq backbones (T5) rank the label words (ReCoRD: the entities) by likelihood; an encoder (BERT) has a linear
head on [CLS], a decoder (GPT) on its last real token. The epoch is chosen on a 10% slice of train and the
validation split is reported at that epoch, as the official MEPT and SMoP code do.
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
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, set_seed
from transformers.utils import logging as hf_logging

import mept


# ---- The command line: help on every flag; --help shows every default --------------------------------------------
class UserError(Exception):
    """Bad input: the command line prints it as one line, `error: ...`, and exits with status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's complaint as our one line, not as usage + message
        raise UserError(message)


def number(kind, low, high=math.inf):
    """An argparse type: a number in [low, high), refused in one sentence otherwise."""
    def parse(text):  # argparse names this function in "invalid parse value"
        if not low <= kind(text) < high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}), got {text}")
        return kind(text)
    return parse


def build_parser():
    p = Parser(description="Train and evaluate MEPT on SuperGLUE.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows every default
    flag, count, rate = p.add_argument, number(int, 0), number(float, 0)
    # --- task and data ---
    flag("--task", default="cb", help=f"{', '.join(sorted(TASKS))}, or a comma list for mixed training (cb,rte)")
    flag("--data_dir", default=os.environ.get("SUPERGLUE_DIR"), help="official layout: <Task>/{train,val,test}.jsonl"
         " (unset: the Hub's aps/super_glue)")
    flag("--dev_from_train", type=number(float, 0, 1), default=0.1, help="share of train (per label) that "
         "chooses the epoch; 0 chooses on the reported validation split itself, which flatters it")
    flag("--max_train_samples", type=count, default=0, help="use only the first N train rows (0 = all)")
    flag("--max_eval_samples", type=count, default=0, help="use only the first N rows of each eval split")
    flag("--max_length", type=number(int, 1), default=256, help="tokens per input, prompt slots included")
    # --- backbone, method, head ---
    flag("--model", default=None, help="Hub id or folder (default: t5-base, the paper's). CAVEAT: t5-base saw "
         "every SuperGLUE task in pre-training, so its scores are inflated; google/t5-v1_1-base is clean")
    flag("--method", default="mept", choices=sorted(mept.PRESETS) + ["finetune", "head_only"], help="a MEPT preset "
         "(a head trains too), head_only (a linear probe on the frozen backbone) or finetune (all trains)")
    flag("--head_dropout", type=number(float, 0, 1), default=0.1, help="dropout before the head")
    # --- MEPT: every MEPTConfig field; unset = the --method preset's value ---
    flag("--n_experts", type=int, default=None, help="E, experts per block (preset; mept: 4)")
    flag("--prompt_len", type=int, default=None, help="P, prompt slots (MEPTConfig: 10)")
    flag("--top_k", type=int, default=None, help="K, experts mixed per input and block (1)")
    flag("--layers", default=None, help="blocks that route: 'all' or a comma list with 0 (preset)")
    flag("--router_noise", type=float, default=None, help="sigma of the router noise, 0 = off (0.1; the paper: 1.0)")
    flag("--noise_form", choices=["additive", "paper"], default=None, help="the router noise: logits + sigma*eps "
         "(additive), or the paper's logits * (1 + sigma*eps), which flips a sure router as often as an unsure one")
    flag("--same_start", action=argparse.BooleanOptionalAction, default=None, help="a block's experts start alike")
    flag("--router_center", action=argparse.BooleanOptionalAction, default=None, help="routers read centered inputs")
    flag("--shared_expert", action=argparse.BooleanOptionalAction, default=None, help="a shared expert (preset)")
    flag("--balance_coef", type=float, default=None, help="weight of the load-balancing loss (0.0)")
    flag("--init", choices=["vocab", "random"], default=None, help="the experts' init (vocab)")
    # --- optimisation ---
    flag("--lr", type=rate, default=1e-2, help="prompts' and routers' rate (10-1000x fine-tuning's)")
    flag("--head_lr", type=rate, default=1e-3, help="learning rate of the task head")
    flag("--backbone_lr", type=rate, default=2e-5, help="learning rate of the backbone (finetune)")
    flag("--weight_decay", type=rate, default=1e-5, help="decoupled weight decay")
    flag("--warmup_ratio", type=number(float, 0, 1), default=0.06, help="share of the steps warming up")
    flag("--max_grad_norm", type=rate, default=1.0, help="gradient clipping (0 = off)")
    flag("--batch_size", type=number(int, 1), default=16, help="training rows per batch")
    flag("--num_epochs", type=number(int, 1), default=25, help="passes over the training rows")
    flag("--max_steps", type=count, default=0, help="stop after N optimizer steps (0: --num_epochs decides)")
    flag("--seed", type=int, default=42, help="seeds the data order, init, dropout and router noise")
    # --- evaluation, checkpoints, outputs ---
    flag("--patience", type=count, default=0, help="stop after N evaluations without gain (0 = off)")
    flag("--output_dir", default=None, help="for best/, last/, log.jsonl, results.json (out/<task>_<method>)")
    flag("--overwrite_output_dir", action="store_true", help="start anew in a folder that holds a run")
    mode = p.add_mutually_exclusive_group()  # argparse refuses --resume with --eval_only
    mode.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last/")
    mode.add_argument("--eval_only", metavar="DIR", help="no training: evaluate this best/ folder (RTE's for axb, axg)")
    flag("--predict", action="store_true", help="write the leaderboard's <Task>.jsonl for the test split")
    return p


# ---- The official metrics (the SuperGLUE paper; T5's and `evaluate`'s super_glue code) ---------------------------
def accuracy(preds, golds):  # preds and golds are class ids; ReCoRD's are entity strings
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def class_f1(preds, golds, c):
    """2 TP / (2 TP + FP + FN); 0 when the class is never hit (sklearn's zero_division=0)."""
    tp = sum(p == g == c for p, g in zip(preds, golds))
    wrong = sum((p == c) != (g == c) for p, g in zip(preds, golds))  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def matthews_corr(preds, golds):
    """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when a margin is empty; class 1 = positive."""
    n = Counter(zip(preds, golds))  # (prediction, gold) -> count
    tp, tn, fp, fn = n[1, 1], n[0, 0], n[1, 0], n[0, 1]
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def record_metrics(rows, preds, golds):
    """Token F1 and exact match, the max over gold answers, after SQuAD's normalisation (case, punctuation, a/the)."""
    def words(text):
        return re.sub(r"\b(a|an|the)\b", " ", "".join(c for c in text.lower() if c not in string.punctuation)).split()

    def f1(pred, gold):  # bag-of-words F1
        return 2 * sum((Counter(words(pred)) & Counter(words(gold))).values()) / (len(words(pred) + words(gold)) or 1)
    return {"f1": sum(max(f1(p, a) for a in r["answers"]) for r, p in zip(rows, preds)) / len(rows),
            "exact_match": sum(words(p) in map(words, r["answers"]) for r, p in zip(rows, preds)) / len(rows)}


def multirc_metrics(rows, preds, golds):
    """F1a: binary F1 over all answer options. EM: a question is right only if all its answers are."""
    by_question = defaultdict(list)
    for row, pred in zip(rows, preds):
        by_question[row["idx"]["paragraph"], row["idx"]["question"]].append(pred == row["label"])
    return {"f1_a": class_f1(preds, golds, 1),
            "exact_match": sum(map(all, by_question.values())) / len(by_question)}


def axg_metrics(rows, preds, golds):
    """Accuracy and gender parity: the share of he/she pairs predicted alike (Hub rows: idx 0-1, 2-3, ... pair)."""
    pairs = defaultdict(set)
    for row, pred in zip(rows, preds):
        pairs[row.get("pair_id", row["idx"] // 2)].add(pred)
    return {"accuracy": accuracy(preds, golds), "gender_parity": sum(len(p) == 1 for p in pairs.values()) / len(pairs)}


# ---- How each task is cast ---------------------------------------------------------------------------------------
# T5 reads "<task> field: value field: value ..." (the t5 library's strings, in its order of fields); the heads
# read `pair(row)`, a (text_a, text_b or None) per model input
@dataclass(frozen=True)
class Task:
    folder: str  # folder of the official zip (AX-b, AX-g: folder and file stem)
    hub_name: str  # config of the Hub dataset aps/super_glue
    label_names: tuple  # class names in id order (the Hub's ClassLabel); () for ReCoRD (entities)
    t5: tuple  # the fields of T5's input, in its order; every row must have them
    pair: Callable  # row -> [(text_a, text_b)], for the encoder and decoder heads
    metrics: Callable = lambda rows, preds, golds: {"accuracy": accuracy(preds, golds)}  # the official metrics
    passage: Optional[str] = None  # the field truncation may shorten (never the question or hypothesis)
    choose: bool = False  # heads: one logit per input, argmax per row (COPA, ReCoRD)
    submit: Callable = None  # class id (or entity) -> the leaderboard's label; None: the class name
    eval_as: Optional[str] = None  # a diagnostic uses this task's head and label words


def t5_input(task, row):  # "cb hypothesis: ... premise: ..."; a diagnostic reads as RTE, as in T5
    fields = [f"{f}: {', '.join(row[f]) if f == 'entities' else row[f]}" for f in task.t5]
    return " ".join([task.eval_as or task.folder.lower()] + fields)


BOOL, NLI, CB = ("False", "True"), ("entailment", "not_entailment"), ("entailment", "contradiction", "neutral")
LOWER = lambda i: ("false", "true")[i]  # noqa: E731  (the leaderboard's booleans are lowercase)
PREMISE = lambda r: [(r["premise"], r["hypothesis"])]  # noqa: E731  (the NLI tasks' pair)
CONNECTIVE = {"cause": "because", "effect": "so"}  # COPA's question
TASKS = {
    "boolq": Task("BoolQ", "boolq", BOOL, ("passage", "question"), lambda r: [(r["question"], r["passage"])],
                  passage="passage", submit=LOWER),
    "cb": Task("CB", "cb", CB, ("hypothesis", "premise"), PREMISE, passage="premise", metrics=lambda _, p, g: {
        "accuracy": accuracy(p, g), "f1": sum(class_f1(p, g, c) for c in range(3)) / 3}),  # macro-F1: ALL 3 classes
    "copa": Task("COPA", "copa", ("choice1", "choice2"), ("choice1", "choice2", "premise", "question"), choose=True,
                 submit=int, pair=lambda r: [(f"{r['premise'].rstrip('.')} {CONNECTIVE[r['question']]}", r[c])
                                             for c in ("choice1", "choice2")]),  # "The sun rose because" + each
    "multirc": Task("MultiRC", "multirc", BOOL, ("question", "answer", "paragraph"), passage="paragraph", submit=int,
                    pair=lambda r: [(r["paragraph"], f"{r['question']} {r['answer']}")], metrics=multirc_metrics),
    "record": Task("ReCoRD", "record", (), ("query", "entities", "passage"), metrics=record_metrics, choose=True,
                   pair=lambda r: [(r["passage"], r["query"].replace("@placeholder", e)) for e in r["entities"]],
                   passage="passage", submit=str),
    "rte": Task("RTE", "rte", NLI, ("hypothesis", "premise"), PREMISE, passage="premise"),
    "wic": Task("WiC", "wic", BOOL, ("sentence1", "sentence2", "word"), submit=LOWER,
                pair=lambda r: [(f"{r['word']}: {r['sentence1']}", f"{r['word']}: {r['sentence2']}")]),
    "wsc": Task("WSC", "wsc.fixed", BOOL, ("text",), lambda r: [(r["text"], None)], submit=LOWER),  # spans marked
    # the diagnostics: labelled test files, read as RTE (AX-b's sentence1 and 2 as premise and hypothesis)
    "axb": Task("AX-b", "axb", NLI, ("hypothesis", "premise"), PREMISE, passage="premise", eval_as="rte",
                metrics=lambda r, p, g: {"matthews_correlation": matthews_corr(p, g)}),
    "axg": Task("AX-g", "axg", NLI, ("hypothesis", "premise"), PREMISE, passage="premise", eval_as="rte",
                metrics=axg_metrics),
}
ALIASES = {"wsc.fixed": "wsc", "ax-b": "axb", "ax-g": "axg"}  # the Hub's config names
show = lambda metrics: " ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())  # noqa: E731


# ---- Data: the official zip layout or Hub rows, normalised to the Hub's schema -----------------------------------
# A row is one example as the Hub has it (MultiRC: one per answer; ReCoRD: one per query); unlabelled: label -1
def normalise(task, raw, where, ordinal):
    """One raw record -> its rows in the Hub schema, markup rewritten before any truncation could cut it."""
    def clean(text):  # MultiRC's markup
        return re.sub(r"</?b>", "", text.replace("<br>", " "))

    def label_id(value):  # a JSON bool (BoolQ, WiC, WSC, MultiRC), a class id or name -> class id; missing -> -1
        if value is None or type(value) in (bool, int) and -1 <= value < len(task.label_names):
            return -1 if value is None else int(value)
        if value not in task.label_names:
            raise UserError(f"{where}: label {value!r} is not one of the {task.folder} labels {list(task.label_names)}")
        return task.label_names.index(value)

    if task.folder == "MultiRC" and isinstance(raw.get("passage"), dict):  # the official nesting
        return [{"paragraph": clean(raw["passage"]["text"]), "question": q["question"], "answer": a["text"],
                 "label": label_id(a.get("label")),
                 "idx": {"paragraph": int(raw["idx"]), "question": int(q["idx"]), "answer": int(a["idx"])}}
                for q in raw["passage"]["questions"] for a in q["answers"]]
    if task.folder == "ReCoRD":  # the official nesting (entity spans end inclusively), or a Hub row
        nested = "qas" in raw
        text = raw["passage"]["text"] if nested else raw["passage"]
        entities = {text[e["start"]:e["end"] + 1] for e in raw["passage"]["entities"]} if nested else raw["entities"]
        passage = re.sub(r"\n@highlight\n", ". ", re.sub(r'(\.|\?|\!|\"|\')\n@highlight\n', r"\1 ", text))  # T5's
        return [{"passage": passage, "query": qa["query"], "entities": sorted(set(entities)), "label": -1,
                 "answers": sorted({a["text"] if nested else a for a in qa.get("answers", [])}),
                 "idx": {"passage": int(raw["idx"]), "query": int(qa["idx"])} if nested else raw["idx"]}
                for qa in (raw["qas"] if nested else [raw])]
    row = {**raw, **raw.get("target", {}), "label": label_id(raw.get("label"))}  # WSC nests its spans
    if task.folder == "MultiRC":  # a Hub row
        row["paragraph"] = clean(row["paragraph"])
    if task.folder == "WSC":  # 'Mark told Pete ... He ...' -> '* Mark * told Pete ... # He # ...' (T5's wsc)
        words = row["text"].split(" ")
        spans = [(row["span1_index"], row["span1_text"], "*"), (row["span2_index"], row["span2_text"], "#")]
        for start, span, mark in sorted(spans, reverse=True):  # right to left, so that the left index still holds
            end = start + len(span.split(" "))
            words[start:end] = [mark, *words[start:end], mark]
        row["text"] = " ".join(words)
    if task.folder == "AX-b":  # read as RTE
        row["premise"], row["hypothesis"] = row.pop("sentence1", None), row.pop("sentence2", None)
    if not isinstance(row.get("idx"), dict):  # AX-b writes idx as a string; a missing idx is the position
        row["idx"] = int(row.get("idx", ordinal))
    return [row]


def load_split(task, split, data_dir):
    """The rows of one split, from the official layout under data_dir or from the Hub, checked."""
    if data_dir is None:
        import datasets  # only Hub runs pay for it
        path = f"aps/super_glue/{task.hub_name} {split}"
        try:
            records = enumerate(datasets.load_dataset("aps/super_glue", task.hub_name, split=split), start=1)
        except Exception as e:  # offline, no such dataset...: the same advice
            raise UserError(f"could not load aps/super_glue/{task.hub_name} from the Hub ({type(e).__name__}); "
                            "without a network pass --data_dir DIR with the official SuperGLUE files") from None
    else:
        stem = task.folder if task.eval_as else {"train": "train", "validation": "val", "test": "test"}[split]
        path = os.path.join(data_dir, task.folder, f"{stem}.jsonl")
        if not os.path.isfile(path):
            raise UserError(f"data folder {data_dir} does not exist" if not os.path.isdir(data_dir) else
                            f"missing file {path} (--data_dir holds the official layout <Task>/<split>.jsonl)")
        with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte is reported on its line
            records = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for ordinal, (number, record) in enumerate(records):
        where = f"{path} line {number}"
        try:  # json.loads of bytes: UTF-8, a byte order mark (Windows editors write one) dropped
            rows += normalise(task, json.loads(record) if isinstance(record, bytes) else dict(record), where, ordinal)
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a record without its task's shape
            raise UserError(f"{where}: malformed {task.folder} record ({type(e).__name__}: {e})") from None
    if not rows:
        raise UserError(f"{path} has no examples")
    for i, row in enumerate(rows):
        bad = [f for f in task.t5 if not isinstance(row.get(f), (str, list)) or row[f] == []]  # ReCoRD's entities
        if bad:
            raise UserError(f"{path} example {i}: field {bad[0]!r} should be text (or a non-empty list of strings), "
                            f"got {row.get(bad[0])!r}")
        unlabelled = not row["answers"] if task.folder == "ReCoRD" else row["label"] < 0
        if unlabelled and (split != "test" or task.eval_as):
            raise UserError(f"{path} example {i}: no label (only the test split may be unlabelled)")
    return rows


def split_off_dev(name, rows, share, seed):
    """(train, dev): `share` of each label's rows chooses the epoch; a MultiRC question's answers stay together."""
    def group(row):
        return (row["idx"]["paragraph"], row["idx"]["question"]) if name == "multirc" else str(row["idx"])
    rng, by_label, dev = random.Random(seed), defaultdict(list), set()
    for key, label in {group(row): row["label"] for row in rows}.items():
        by_label[label].append(key)
    for label in sorted(by_label):
        dev.update(rng.sample(by_label[label], max(1, round(share * len(by_label[label]))) if share else 0))
    return [r for r in rows if group(r) not in dev], [r for r in rows if group(r) in dev]


# ---- Batches: rows -> token ids, in batches of similar lengths, padded per batch ---------------------------------
@dataclass
class Group:
    """A row for the model: one input (a class), one per candidate (COPA, ReCoRD), or T5's once per label word."""
    row: int  # index into the split's rows
    input_ids: list  # one token-id list per model input
    token_type_ids: Optional[list]  # the same shape, or None
    targets: Optional[list]  # T5: one target token-id list per input
    gold: list  # a class: [class id]; a choice: the indices of the right inputs; [] if unlabelled


def encode_inputs(task, row, family, tokenizer, budget):
    """A row's inputs within `budget` tokens; too long, the passage is cut (never the question or hypothesis)."""
    def encode(r, cut=None):
        texts = [(t5_input(task, r), None)] if family == "seq2seq" else task.pair(r)
        texts = [(f"{a}\n{b}", None) if family == "decoder" and b else (a, b) for a, b in texts]  # 'a\nb'; BERT: a pair
        out = [tokenizer(a, *[b] * bool(b), **(dict(truncation=True, max_length=cut) if cut else {})) for a, b in texts]
        return [(e["input_ids"], e.get("token_type_ids") if family == "encoder" else None) for e in out]

    def overflow():  # tokens beyond the budget in the longest input
        return max(len(ids) for ids, _ in encoded) - budget
    encoded, passage = encode(row), tokenizer(row.get(task.passage, ""), add_special_tokens=False)["input_ids"]
    keep = len(passage) - overflow()
    while overflow() > 0 and task.passage and keep > 0:
        encoded = encode({**row, task.passage: tokenizer.decode(passage[:keep])})
        keep -= max(overflow(), 1)
    return encoded if overflow() <= 0 else encode(row, budget)  # else the tokenizer cuts


def encode_rows(name, rows, family, tokenizer, budget, training):
    """Rows -> Groups. T5 trains on (input, gold word) pairs and ranks every word; the heads see the same inputs."""
    task, groups = TASKS[name], []
    for i, row in enumerate(rows):
        ids, types = map(list, zip(*encode_inputs(task, row, family, tokenizer, budget)))  # one of each per input
        if task.label_names:  # a class
            words, gold = task.label_names, [row["label"]] if row["label"] >= 0 else []
        else:  # ReCoRD: the entities, and which of them answer
            words, gold = row["entities"], [j for j, e in enumerate(row["entities"]) if e in row["answers"]]
        if family == "seq2seq" and training:
            answers = [words[row["label"]]] if task.label_names else row["answers"]
            groups += [Group(i, ids, None, [tokenizer(a)["input_ids"]], [0]) for a in answers]
        elif family == "seq2seq":  # the input once per word, to rank the words
            groups.append(Group(i, ids * len(words), None, [tokenizer(w)["input_ids"] for w in words], gold))
        elif gold or not (task.choose and training):  # a choice without a right answer teaches nothing
            groups.append(Group(i, ids, types if types[0] is not None else None, None, gold))
    return groups


def make_batches(groups, batch_size, seed=None):
    """Lists of group indices by length; with a seed, sorted only within windows of 50 batches, then shuffled."""
    rng, order = random.Random(seed), list(range(len(groups)))
    window = 50 * batch_size if seed is not None else len(order) + 1  # without a seed, one window: all sorted
    order = rng.sample(order, len(order)) if seed is not None else order
    order = [i for s in range(0, len(order), window)
             for i in sorted(order[s:s + window], key=lambda i: sum(map(len, groups[i].input_ids)))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return rng.sample(batches, len(batches)) if seed is not None else batches


def collate(groups, pad_id, device):
    """Flatten the groups' inputs, padded to the longest in THIS batch (never to max_length)."""
    def pad(seqs, value):
        return torch.tensor([s + [value] * (max(map(len, seqs)) - len(s)) for s in seqs], device=device)  # (N, T)
    ids = [x for g in groups for x in g.input_ids]
    batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(x) for x in ids], 0),  # 1 = real
             "sizes": [len(g.input_ids) for g in groups]}  # inputs per group
    if groups[0].token_type_ids is not None:
        batch["token_type_ids"] = pad([x for g in groups for x in g.token_type_ids], 0)
    if groups[0].targets is not None:
        batch["labels"] = pad([t for g in groups for t in g.targets], -100)  # (N, T_target): -100 is ignored
    return batch


# ---- The model: a backbone (frozen under MEPT), MEPT's prompt experts, and a head per task -----------------------
def load_backbone(name):
    """Backbone, tokenizer and family ('seq2seq', 'encoder' or 'decoder'), read from the loaded model."""
    hf_logging.set_verbosity_error()  # "some weights were not used" and progress bars would bury the log
    hf_logging.disable_progress_bar()
    try:
        auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(name).is_encoder_decoder else AutoModel
        backbone, tokenizer = auto.from_pretrained(name), AutoTokenizer.from_pretrained(name)
        family = mept.backbone_family(backbone)
    except OSError as e:  # no such folder, or not on the Hub (or no network)
        raise UserError(f"could not load the model {name}: no model folder there, nor on the Hub; pass --model PATH, a "
                        f"model folder (offline, with --data_dir DIR). transformers: {e}".splitlines()[0]) from None
    except (ValueError, ImportError, KeyError) as e:  # mept's refusals are ValueErrors; KeyError: no tokenizer (4.x)
        raise UserError(f"unsupported backbone {name}: {e if isinstance(e, ValueError) else type(e).__name__}"
                        .splitlines()[0]) from None
    return backbone, tokenizer, family


class TaskModel(nn.Module):
    """MEPT(backbone) or the backbone, and the same linear head per task for every method (so that the prompts, not
    the head, carry the adaptation); no head for seq2seq: T5 scores the label words with its LM head."""

    def __init__(self, core, family, head_names, dropout, d):  # d: the width of the backbone's output
        super().__init__()
        self.core, self.family, self.heads = core, family, nn.ModuleDict()
        for name in head_names if family != "seq2seq" else []:
            outputs = 1 if TASKS[name].choose else len(TASKS[name].label_names)  # a score per input, or per class
            self.heads[name] = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, outputs))

    def forward(self, batch, task):
        """-> (T5's loss or None, scores): (N, n_labels) for a classification head, else (N,), one per input."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in batch}
        if self.family == "seq2seq":  # labels (N, T_target), -100 past a target's end; the decoder reads them too
            logits = self.core(**inputs).logits.float().transpose(1, 2)  # (N, vocabulary, T_target)
            token_nll = nn.functional.cross_entropy(logits, inputs["labels"], reduction="none")  # (N, T_target)
            # the whole batch's mean -log p per token: each process divides by the processes' mean count (DDP averages)
            n_tokens = (inputs["labels"] != -100).sum().float()  # ()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(n_tokens)  # every process's tokens
                n_tokens = n_tokens / torch.distributed.get_world_size()  # (): their mean count
            return token_nll.sum() / n_tokens, -token_nll.sum(-1)  # (N,): log p(target | input), to rank
        hidden = self.core(**inputs).last_hidden_state  # (N, P+T, D) under MEPT, (N, T, D) without
        if self.family == "encoder":
            pooled = hidden[:, 0]  # (N, D): [CLS]; MEPT's slots sit right after it
        else:  # the last real token (right padding); under MEPT the P slots lead the sequence
            last = hidden.shape[1] - batch["input_ids"].shape[1] + batch["attention_mask"].sum(1) - 1  # (N,)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, D)
        logits = self.heads[TASKS[task].eval_as or task](pooled).float()  # (N, n_out)
        return None, (logits[:, 0] if TASKS[task].choose else logits)


def group_loss_and_predictions(model, batch, groups, task):
    """Run a batch: the training loss (None when nothing is labelled) and the predicted choice per group."""
    lm_loss, scores = model(batch, task)
    if scores.dim() == 1:  # one score per input: each group's scores in a row, -inf where a group has fewer
        scores = nn.utils.rnn.pad_sequence(list(scores.split(batch["sizes"])), True, -math.inf)  # (G, C), batch first
    labelled, preds = [i for i, g in enumerate(groups) if g.gold], scores.argmax(-1).tolist()
    if lm_loss is not None or not labelled:  # T5 trains with its LM loss on the gold word
        return lm_loss, preds
    rows = scores[labelled]  # (G', C): -log(softmax mass on the gold choices) is the cross-entropy; ReCoRD has several
    is_gold = torch.tensor([[c in groups[i].gold for c in range(rows.shape[1])] for i in labelled], device=rows.device)
    return (rows.logsumexp(-1) - rows.masked_fill(~is_gold, -math.inf).logsumexp(-1)).mean(), preds


# ---- Checkpoints: best/ and last/ hold only what trains; an interrupted save never replaces a good one ------------
def save_checkpoint(model, directory, run_config, trainer_state=None):
    """Written into directory.tmp, then two renames: at every moment directory or directory.old is a good copy."""
    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if isinstance(model.core, mept.MEPT):
        model.core.save_pretrained(tmp)  # mept_model.safetensors: prompts, routers and the MEPT config
    elif run_config["method"] == "finetune":  # save_model stores T5's tied embeddings once
        save_model(model.core, os.path.join(tmp, "backbone.safetensors"))
    if len(model.heads):
        save_model(model.heads, os.path.join(tmp, "head.safetensors"))
    with open(os.path.join(tmp, "run_config.json"), "w") as f:
        json.dump(run_config, f, indent=2)
    if trainer_state is not None:  # last/ only: what --resume needs
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def build_model(backbone, family, method, mept_config, head_names, args, checkpoint=None):
    """Wrap the backbone for the method, add the heads, and restore a checkpoint's weights if one is given."""
    if method in mept.PRESETS:
        try:
            core = mept.MEPT.from_pretrained(backbone, checkpoint) if checkpoint else mept.MEPT(backbone, mept_config)
        except mept.UnsupportedBackbone as e:  # mept.py speaks of MEPTConfig fields; here they are flags
            raise UserError(f"unsupported backbone: {e}".replace("layers=[0]", "--layers 0")) from None
        except ValueError as e:  # settings MEPT cannot take, or a checkpoint of another backbone
            raise UserError(f"{'' if checkpoint else 'impossible MEPT settings: '}{e}") from None
    else:
        core = backbone.requires_grad_(method == "finetune")  # head_only: a linear probe on a frozen backbone
        if checkpoint and method == "finetune":
            load_model(backbone, os.path.join(checkpoint, "backbone.safetensors"))
    model = TaskModel(core, family, head_names, args.head_dropout, backbone.config.hidden_size)
    if checkpoint and len(model.heads):
        load_model(model.heads, os.path.join(checkpoint, "head.safetensors"))
    return model


# ---- Evaluation: every row of a split scored, the official metrics, and the routing's health ---------------------
def routing_health(experts, n_experts, gold=None, n_classes=1):
    """One routed block, from each example's experts: the load (every top-k choice); of the top expert: the load's
    entropy in bits (log2 E: even, 0: one takes all), the busiest one's share (> 0.9: collapsed) and, given classes,
    the mutual information of expert and class in bits (0: the routing ignores the label)."""
    def bits(q):  # the entropy of a distribution
        return abs((q[q > 0] * q[q > 0].log2()).sum().item())
    joint = torch.zeros(n_experts, max(n_classes, 1))  # (E, C): how many examples of class c took expert e
    for chosen, c in zip(experts, gold or [0] * len(experts)):
        joint[chosen[0], c] += 1
    p, load = joint / joint.sum(), Counter(e for chosen in experts for e in chosen)  # (E, C)
    mi = {"mutual_information": bits(p.sum(1)) + bits(p.sum(0)) - bits(p.flatten())} if gold else {}  # H(E)+H(C)-H(E,C)
    return {"load": [load[e] for e in range(n_experts)], "load_entropy": bits(p.sum(1)),
            "top_share": p.sum(1).max().item(), **mi}


@torch.no_grad()
def evaluate_split(run, split):
    """One split of every task scored: ({task: official metrics}, {task: predictions}, {task: routing})."""
    run.model.eval()
    metrics, predictions, routing = {}, {}, {}
    for name in [n for n in run.names if split in run.data[n]]:
        task, rows, groups, picks = TASKS[name], run.data[name][split], run.encoded[name][split], defaultdict(dict)
        preds = predictions[name] = [None] * len(rows)
        for indices in make_batches(groups, 2 * run.args.batch_size):  # no gradients to keep: twice the rows
            batch_groups = [groups[i] for i in indices]
            batch = collate(batch_groups, run.pad_id, run.device)
            _, choices = group_loss_and_predictions(run.model, batch, batch_groups, name)
            for g, choice in zip(batch_groups, choices):
                preds[g.row] = choice if task.label_names else rows[g.row]["entities"][choice]
            first = [sum(batch["sizes"][:i]) for i in range(len(batch_groups))]  # each group's first input
            for layer, routed in getattr(run.model.core, "routing", {}).items():  # picks[layer][row]: its experts
                picks[layer].update(zip([g.row for g in batch_groups], routed.expert_idx[first].tolist()))
        gold = [r["label"] for r in rows] if split != "test" else None  # test rows have no labels
        metrics[name] = task.metrics(rows, preds, gold) if gold else None
        routing[name] = {str(layer): routing_health([by_row[r] for r in range(len(rows))], run.mept_config.n_experts,
                                                    None if task.choose else gold, len(task.label_names))
                         for layer, by_row in sorted(picks.items())}
    return metrics, predictions, routing


def write_predictions(path, name, rows, preds):
    """The leaderboard's jsonl: {"idx", "label"} per row; MultiRC nested by paragraph and question."""
    submit = TASKS[name].submit or (lambda i: TASKS[name].label_names[i])  # by default the class name
    lines = [{"idx": r["idx"]["query"] if name == "record" else r["idx"], "label": submit(p)}
             for r, p in zip(rows, preds)]
    if name == "multirc":  # the answers go back under their question and paragraph
        nested = defaultdict(lambda: defaultdict(list))
        for line in lines:
            nested[line["idx"]["paragraph"]][line["idx"]["question"]].append({**line, "idx": line["idx"]["answer"]})
        lines = [{"idx": p, "passage": {"questions": [{"idx": q, "answers": a} for q, a in qs.items()]}}
                 for p, qs in nested.items()]
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


# ---- The recipe's five steps -------------------------------------------------------------------------------------
# They hand on `run`: args, names (tasks), heads, out (folder), method, mept_config, saved (a run_config.json); data
# (task -> split -> rows; splits: train, dev (of train), report, test), encoded (Groups); model, family, device...
def parse_args(argv):
    """Step 1: the flags, checked before anything on disk is touched; a bad one is a UserError."""
    args = build_parser().parse_args(argv)
    names = list(dict.fromkeys(ALIASES.get(t.strip().lower(), t.strip().lower()) for t in args.task.split(",")))
    diagnostic = next((n for n in names if n in TASKS and TASKS[n].eval_as), None)
    out = args.output_dir or os.path.join("out", f"{'_'.join(names)}_{'eval' if args.eval_only else args.method}")
    old = next((f for f in ("results.json", "log.jsonl", "best") if os.path.exists(os.path.join(out, f))), None)
    last = os.path.join(out, "last")
    for folder in (last, os.path.join(out, "best")) if args.resume else ():  # a save killed between its two renames
        if not os.path.isdir(folder) and os.path.isdir(folder + ".old"):  # left the good copy as folder.old
            os.rename(folder + ".old", folder)
    for wrong, sentence in [  # (what is wrong, the sentence that says so)
            (any(n not in TASKS for n in names), f"unknown task {next((n for n in names if n not in TASKS), '')!r}; "
             f"choose from {', '.join(sorted(TASKS))} or a comma list of them"),
            (diagnostic and not args.eval_only, f"{diagnostic} is a diagnostic without training data: train on rte, "
             f"then run --task {diagnostic} --eval_only <rte output_dir>/best"),
            (args.eval_only and not os.path.isfile(os.path.join(str(args.eval_only), "run_config.json")),
             f"{args.eval_only} is no checkpoint of this script (no run_config.json)"),
            (args.resume and not os.path.isfile(os.path.join(last, "trainer_state.pt")), f"nothing to resume: {last} "
             "holds no checkpoint"),
            (os.path.exists(out) and not os.path.isdir(out), f"--output_dir {out} is a file, not a folder"),
            (old and not (args.resume or args.overwrite_output_dir), f"{out} already holds a run ({old}); pass "
             "--resume, --overwrite_output_dir or another --output_dir"),
            (args.layers and not re.fullmatch(r"all|\d+(,\d+)*", args.layers), f"--layers must be 'all' or a comma "
             f"list of block indices, got {args.layers!r}")]:
        if wrong:
            raise UserError(sentence)
    saved, heads = None, sorted({TASKS[n].eval_as or n for n in names})
    if args.eval_only or args.resume:
        with open(os.path.join(args.eval_only or last, "run_config.json")) as f:
            saved = json.load(f)
        untrained = [h for h in heads if args.eval_only and h not in saved["tasks"]]  # T5 has no head that would fail
        free = {"data_dir", "output_dir", "overwrite_output_dir", "resume", "predict",
                "max_eval_samples"} | ({"num_epochs"} if args.max_steps else set())  # flags --resume may change
        changed = [k for k, v in vars(args).items() if args.resume and k not in free and saved["args"][k] != v]
        if untrained or changed:  # a resumed run must be the same run
            raise UserError(f"--resume continues the run in {out}, which had --{changed[0]} {saved['args'][changed[0]]}"
                            f", not {vars(args)[changed[0]]}; pass the same flags" if changed else
                            f"checkpoint {args.eval_only} was trained on {','.join(saved['tasks'])}, not on "
                            f"{untrained[0]}; evaluate it on the tasks it learned")
    method = saved["method"] if args.eval_only else args.method
    overrides = {f.name: getattr(args, f.name) for f in fields(mept.MEPTConfig) if getattr(args, f.name) is not None}
    if args.layers:
        overrides["layers"] = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    try:
        config = mept.MEPTConfig.preset(method, **overrides) if method in mept.PRESETS and not args.eval_only else None
    except ValueError as e:
        raise UserError(f"impossible MEPT settings: {e}") from None
    prompt_len = config.prompt_len if config else ((saved or {}).get("mept") or {}).get("prompt_len", 0)
    if args.max_length - prompt_len < 8:
        raise UserError(f"prompt_len {prompt_len} leaves no room within max_length {args.max_length}; lower "
                        "--prompt_len or raise --max_length")
    return argparse.Namespace(args=args, names=names, heads=heads, out=out, method=method, mept_config=config,
                              saved=saved, trained={}, started=time.time())


def load_data(run):
    """Step 2: train and its dev slice, the reported split (a diagnostic's own labelled file), test (--predict)."""
    args, run.data = run.args, {}
    n_train, n_eval = args.max_train_samples or None, args.max_eval_samples or None  # rows[:None]: every row
    for name in run.names:
        task, splits = TASKS[name], {}
        if not task.eval_as and not args.eval_only:
            rows, dev = split_off_dev(name, load_split(task, "train", args.data_dir), args.dev_from_train, args.seed)
            if not rows:
                raise UserError(f"--dev_from_train {args.dev_from_train} leaves no {name} rows to train on (every "
                                "row went to dev); lower it or use more training data")
            splits.update(train=rows[:n_train], dev=dev[:n_eval])
        splits["report"] = load_split(task, "test" if task.eval_as else "validation", args.data_dir)[:n_eval]
        if args.predict:
            splits["test"] = load_split(task, "test", args.data_dir)[:n_eval]
        run.data[name] = splits


def build(run):
    """Step 3: seed, device, backbone, MEPT (or not), heads; a checkpoint's weights. Every split encoded."""
    args = run.args
    set_seed(args.seed)
    on_cuda = torch.cuda.is_available()
    # under torchrun: one process per device, rank 0 the one that writes; plain python: one process, rank 0
    run.rank, run.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))  # this machine's device number
    if run.world > 1:
        torch.distributed.init_process_group("nccl" if on_cuda else "gloo")
    if on_cuda:
        torch.cuda.set_device(local)
    run.device = torch.device(f"cuda:{local}" if on_cuda else "mps" if torch.backends.mps.is_available() else "cpu")
    name = args.model or (run.saved["model"] if run.saved else "t5-base")
    backbone, tokenizer, run.family = load_backbone(name)
    limit = min(tokenizer.model_max_length, getattr(backbone.config, "max_position_embeddings", None) or math.inf)
    if args.max_length > limit:
        raise UserError(f"--max_length {args.max_length} exceeds the {limit} positions of {name}")
    if run.family == "seq2seq" and run.method == "head_only":
        raise UserError("--method head_only needs a task head, and a seq2seq backbone (T5) has none: it scores the "
                        "label words with its LM head; use an encoder or a decoder")
    run.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    weights = os.path.join(run.out, "last") if args.resume else args.eval_only  # a checkpoint to restore, or None
    run.model = build_model(backbone, run.family, run.method, run.mept_config, run.heads, args, weights).to(run.device)
    run.mept_config = run.model.core.config if isinstance(run.model.core, mept.MEPT) else None
    run.run_config = {"model": name, "family": run.family, "method": run.method, "tasks": run.names, "heads": run.heads,
                      "mept": asdict(run.mept_config) if run.mept_config else None, "args": vars(args)}
    if run.rank == 0:
        print(f"{name} ({run.family}) | method {run.method} | {mept.parameters_line(run.model)}", flush=True)
    budget = args.max_length - (run.mept_config.prompt_len if run.mept_config else 0)  # tokens beside the slots
    run.encoded = {n: {split: encode_rows(n, rows, run.family, tokenizer, budget, training=split == "train")
                       for split, rows in splits.items()} for n, splits in run.data.items()}


def train(run):
    """Step 4, the loop; after each epoch best/ keeps the best score on the dev slice, last/ what --resume needs."""
    args, model, groups = run.args, run.model, {n: run.encoded[n]["train"] for n in run.names}

    def epoch_batches(epoch):  # the order depends on (seed, epoch) alone, so that a resumed run replays it
        seed = f"{args.seed}-{epoch}"
        batches = [(n, b[:len(b) - len(b) % run.world]) for n in run.names  # torchrun: the rows that divide evenly
                   for b in make_batches(groups[n], args.batch_size, seed + n) if len(b) >= run.world]
        return random.Random(seed).sample(batches, len(batches))

    total = args.max_steps or len(epoch_batches(0)) * args.num_epochs  # optimizer steps
    # under torchrun every process takes a share of each batch; DDP averages their gradients into the whole batch's
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if run.world > 1 else model
    core_lr = args.lr if isinstance(model.core, mept.MEPT) else args.backbone_lr  # prompts and routers, or the backbone
    param_groups = [g for g in (dict(params=[p for p in model.core.parameters() if p.requires_grad], lr=core_lr),
                                dict(params=list(model.heads.parameters()), lr=args.head_lr)) if g["params"]]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=args.weight_decay)
    warmup = math.ceil(args.warmup_ratio * total)  # steps; then a linear decay to 0 at the last step
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / (warmup + 1),
                                                                          (total - s) / max(1, total - warmup)))
    state = dict(epoch=0, step=0, best_score=-math.inf, best_epoch=0, best_step=None, elapsed=0, log=[])
    gpu, gpu_rng = {"cuda": torch.cuda, "mps": torch.mps}.get(run.device.type), f"{run.device.type}_rng"  # CPU: None
    if args.resume:  # the optimizer, the schedule, the random streams, the counters and the log, as they were saved
        saved = torch.load(os.path.join(run.out, "last", "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        if gpu and gpu_rng in saved:  # a GPU's dropout and router noise draw from its own stream; old checkpoints: none
            gpu.set_rng_state(saved[gpu_rng])
    if run.rank == 0:  # only rank 0 writes; a new run keeps nothing of the one it overwrites
        os.makedirs(run.out, exist_ok=True)
        for stale in ("best", "last", "results.json", "log.jsonl") if not args.resume else ():
            path = os.path.join(run.out, stale)
            if os.path.exists(path):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    clock, bar = time.time() - state["elapsed"], tqdm(total=total, initial=state["step"], disable=run.rank or None)
    while state["step"] < total and not (args.patience and state["epoch"] - state["best_epoch"] >= args.patience):
        batches, losses = epoch_batches(state["epoch"]), []
        model.train()
        for name, indices in batches:
            batch_groups = [groups[name][j] for j in indices[run.rank::run.world]]  # this process's share
            batch = collate(batch_groups, run.pad_id, run.device)
            loss = group_loss_and_predictions(net, batch, batch_groups, name)[0]
            loss = loss + getattr(model.core, "aux_loss", 0.0)  # MEPT's balance term (0 unless asked for)
            loss.backward()
            losses.append(loss.item())
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm or math.inf)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            bar.update(1)
            if state["step"] == total:
                break
        state["epoch"] += 1
        report, _, routing = evaluate_split(run, "report")
        select = evaluate_split(run, "dev")[0] if args.dev_from_train > 0 else report  # the dev slice chooses
        score = [sum(sum(m.values()) / len(m) for m in select.values()) / len(select)]  # the leaderboard's task score
        if run.world > 1:  # every process evaluated alike; rank 0's score decides, so that all stop together
            torch.distributed.broadcast_object_list(score, src=0)
        improved = score[0] > state["best_score"]
        state["elapsed"] = time.time() - clock
        if improved:
            state.update(best_score=score[0], best_epoch=state["epoch"], best_step=state["step"])
        entry = {"epoch": state["epoch"], "step": state["step"], "loss": sum(losses) / len(losses), "metrics": report,
                 "lr": schedule.get_last_lr()[0], "dev_metrics": select, "elapsed": round(state["elapsed"], 2),
                 "routing": routing}  # under torchrun the loss is rank 0's share of the batches
        state["log"].append(entry)
        if run.rank == 0:
            if improved:
                save_checkpoint(model, os.path.join(run.out, "best"), run.run_config)
            with open(os.path.join(run.out, "log.jsonl"), "w") as f:  # the whole log: a resumed run's ends as saved
                f.writelines(json.dumps(e) + "\n" for e in state["log"])
            scores = " | ".join(f"{n} {show(m)}" for n, m in report.items())
            tqdm.write(f"epoch {entry['epoch']} | step {entry['step']} | loss {entry['loss']:.4f} | lr "
                       f"{entry['lr']:.2e} | {scores}{' | best' if improved else ''} | {entry['elapsed']:.0f}s")
            save_checkpoint(model, os.path.join(run.out, "last"), run.run_config, trainer_state={
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "state": state,
                "torch_rng": torch.get_rng_state(), **({gpu_rng: gpu.get_rng_state()} if gpu else {})})
    bar.close()
    run.trained = {"best_epoch": state["best_epoch"], "best_step": state["best_step"], "steps": state["step"]}


def report(run):
    """Step 5: best/ reloaded (proof that it round-trips) and scored; predictions, results.json, the final line."""
    args, core = run.args, run.model.core
    if run.world > 1:  # when rank 0 has written best/, the processes need each other no more
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not args.eval_only:  # the numbers come from best/
        core = core.remove() if isinstance(core, mept.MEPT) else core
        best = os.path.join(run.out, "best")
        run.model = build_model(core, run.family, run.method, None, run.heads, args, best).to(run.device)
    metrics, preds, routing = evaluate_split(run, "report")
    results = {**run.run_config, **run.trained, "metrics": metrics, "routing": routing, "predictions": preds,
               "versions": {p: version(p) for p in ("torch", "transformers", "datasets", "tqdm")},
               "trainable_params": mept.parameters_line(run.model),
               "wall_time_seconds": round(time.time() - run.started, 1),
               "report_split": "test (diagnostic)" if any(TASKS[n].eval_as for n in run.names) else "validation",
               "selected_on": "train slice (--dev_from_train)" if args.dev_from_train > 0 else "validation",
               "n_rows": {n: {s: len(r) for s, r in splits.items()} for n, splits in run.data.items()},
               # how often each class is predicted: a class never predicted (CB's neutral) caps macro-F1
               "predicted": {n: {label: p.count(i) for i, label in enumerate(TASKS[n].label_names)}
                             for n, p in preds.items() if TASKS[n].label_names and not TASKS[n].choose},
               "prompt_params": run.model.core.prompt_param_counts() if run.mept_config else None}
    if run.rank > 0:  # every process has the metrics; rank 0 alone writes them
        return results
    os.makedirs(run.out, exist_ok=True)
    for n, p in evaluate_split(run, "test")[1].items() if args.predict else []:  # the leaderboard's files
        write_predictions(os.path.join(run.out, f"{TASKS[n].folder}.jsonl"), n, run.data[n]["test"], p)
    with open(os.path.join(run.out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(os.path.join(run.out, "results.json.tmp"), os.path.join(run.out, "results.json"))
    # the routing's health, per task (a single expert has nothing to route: no line)
    for n, blocks in [(n, list(b.values())) for n, b in routing.items() if b and run.mept_config.n_experts > 1]:
        entropies = " ".join(f"{b['load_entropy']:.2f}" for b in blocks)
        print(f"routing | {n} | {sum(b['top_share'] > 0.9 for b in blocks)} of {len(blocks)} blocks collapsed (top "
              f"expert > 90%) | load entropy per block, of {math.log2(run.mept_config.n_experts):.2f} bits: "
              f"{entropies} | expert-label MI up to {max(b.get('mutual_information', 0) for b in blocks):.3f} bits")
    chosen = f"checkpoint {args.eval_only}" if args.eval_only else \
        f"best epoch {results['best_epoch']} (selected on {results['selected_on']})"
    shown = " | ".join(f"{n} {results['report_split']} {show(m)}" for n, m in metrics.items())
    print(f"final | {chosen} | {shown} | {results['wall_time_seconds']:.0f}s", flush=True)
    return results


# ---- main: the recipe --------------------------------------------------------------------------------------------
def main(argv=None):
    run = parse_args(argv)  # 1. a bad flag stops here, before anything on disk is touched
    load_data(run)  # 2. the rows of train, its dev slice, validation (and test, for --predict)
    build(run)  # 3. the backbone, MEPT or not, the heads; every split encoded once
    if not run.args.eval_only:
        train(run)  # 4. the loop: best/ and last/ on disk, log.jsonl
    return report(run)  # 5. best/ reloaded, the official metrics, results.json


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
