"""Tests for train.py: offline, on CPU, in seconds.

Tiny random T5, BERT and GPT-2 models are built from configs with a word-level tokenizer, and
every task gets a few rows written in the official SuperGLUE zip layout (<Task>/train.jsonl, val.jsonl, test.jsonl).
The metrics are checked against hand-computed cases.
"""

import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from collections import Counter

from safetensors.torch import load_file

import mept
import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and leave the second core to the rest of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# -----------------------------------------------------------------------------
# Fixtures: official-layout jsonl for every task, and tiny offline models

WORDS = ("the cat sat on a mat dog ran to park it was sunny day he she they saw bird sang tree man "
         "woman went home because so ate food rain fell street wet yes no true false").split()


def sentence(i, n=6):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + "."


def official_rows(task, split, n):
    """n raw records of `task` exactly as the official zip writes them; test rows carry no labels."""
    labelled = split != "test"
    rows = []
    for i in range(n):
        if task == "BoolQ":
            r = {"question": f"is {sentence(i, 3)}", "passage": sentence(i + 1, 12), "idx": i, "label": i % 2 == 0}
        elif task == "CB":
            r = {"premise": sentence(i, 10), "hypothesis": sentence(i + 2, 4), "idx": i,
                 "label": ["entailment", "contradiction", "neutral"][i % 3]}
        elif task == "COPA":
            r = {"premise": sentence(i), "choice1": sentence(i + 1, 4), "choice2": sentence(i + 2, 4),
                 "question": ["cause", "effect"][i % 2], "idx": i, "label": i % 2}
        elif task == "RTE":
            r = {"premise": sentence(i, 10), "hypothesis": sentence(i + 3, 4), "idx": i,
                 "label": ["entailment", "not_entailment"][i % 2]}
        elif task == "WiC":
            r = {"word": "cat", "sentence1": "the cat sat", "sentence2": sentence(i), "idx": i,
                 "label": i % 2 == 1, "start1": 4, "start2": 0, "end1": 7, "end2": 3, "version": 1.1}
        elif task == "WSC":
            r = {"text": "the man saw the dog because he was home", "idx": i, "label": i % 2 == 0,
                 "target": {"span1_index": 1, "span1_text": "man", "span2_index": 6, "span2_text": "he"}}
        elif task == "MultiRC":
            questions = [{"question": f"what {sentence(i + q, 3)}", "idx": 10 * i + q,
                          "answers": [{"text": sentence(a, 2), "idx": 100 * i + 10 * q + a, "label": (a + q) % 2}
                                      for a in range(2)]} for q in range(2)]
            r = {"idx": i, "version": 1.1, "passage": {"text": sentence(i, 14) + "<br>" + sentence(i + 1), "questions": questions}}
        elif task == "ReCoRD":
            text = "the cat sat on a mat.\n@highlight\nthe dog ran to park"
            span = lambda w: {"start": text.index(w), "end": text.index(w) + len(w) - 1}  # end is inclusive
            answer = ["cat", "dog"][i % 2]
            r = {"source": "Daily Mail", "idx": i, "passage": {"text": text, "entities": [span(w) for w in ("park", "cat", "dog", "cat")]},
                 "qas": [{"query": "the @placeholder was sunny", "idx": 50 + i, "answers": [{**span(answer), "text": answer}]}]}
        elif task == "AX-b":
            r = {"idx": str(i), "label": ["entailment", "not_entailment"][i % 2], "sentence1": sentence(i, 8),
                 "sentence2": sentence(i + 1, 4), "logic": "Negation"}
        elif task == "AX-g":
            r = {"hypothesis": f"{['he', 'she'][i % 2]} was home.", "idx": i, "pair_id": 551640 + i // 2,
                 "label": ["entailment", "not_entailment"][(i // 2) % 2], "premise": sentence(i // 2, 8)}
        if not labelled:
            r.pop("label", None)
            for q in r.get("passage", {}).get("questions", []) if task == "MultiRC" else []:
                for a in q["answers"]:
                    a.pop("label")
            for qa in r.get("qas", []):
                qa.pop("answers")
        rows.append(r)
    return rows


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("superglue")
    for task in ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC"):
        for split, n in (("train", 6), ("val", 4), ("test", 3)):
            write_jsonl(str(root / task / f"{split}.jsonl"), official_rows(task, split, n))
    for task in ("AX-b", "AX-g"):
        write_jsonl(str(root / task / f"{task}.jsonl"), official_rows(task, "diagnostic", 4))
    return str(root)


def tiny_tokenizer(family, more_words=()):
    """An offline word-level tokenizer; T5 appends </s>, BERT wraps pairs in [CLS] a [SEP] b [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "[CLS]", "[SEP]"]
    extra = "boolq cb copa multirc record rte wic wsc passage question premise hypothesis choice1 choice2 answer " \
            "paragraph entities query text sentence1 sentence2 word entailment contradiction neutral " \
            "not_entailment False True cause effect what is * # : , . @ placeholder".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + extra + list(more_words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    if family == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
    kwargs = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if family == "encoder":  # segment ids for [CLS] a [SEP] b [SEP], as BERT's own tokenizer returns them
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if family == "decoder":
        kwargs.pop("pad_token")  # like GPT-2: no pad token, train.py pads with </s> (masked out)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs), len(vocab)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{family: folder} of tiny random models that `--model folder` loads through the Auto classes."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    folders = {}
    for family in ("seq2seq", "encoder", "decoder"):
        tokenizer, vocab_size = tiny_tokenizer(family)
        if family == "seq2seq":
            model = T5ForConditionalGeneration(T5Config(
                vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        elif family == "encoder":
            # initializer_range 0.2 (not 0.02): with tiny weights a random BERT's [CLS] output barely
            # depends on the input, and nothing could be learned from it
            model = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                         initializer_range=0.2, hidden_dropout_prob=0.0))
        else:
            model = GPT2Model(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=1, eos_token_id=1))
        folder = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


def run(tmp_path, model, data_dir, *extra, out="out"):
    """train.main with small, fast settings; returns (results, output_dir)."""
    out = str(tmp_path / out)
    argv = ["--model", model, "--data_dir", data_dir, "--output_dir", out, "--max_length", "64",
            "--prompt_len", "3", "--batch_size", "4", "--num_epochs", "1", *extra]
    return train.main(argv), out


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# Metrics, each on a case small enough to compute by hand


def score(task, rows, preds):  # a task's official metrics, as train.py calls them
    return train.TASKS[task].metrics(rows, preds, [r.get("label", -1) for r in rows])


def test_cb_macro_f1_counts_a_never_predicted_class_as_zero():
    golds, preds = [0, 0, 1, 2], [0, 0, 1, 1]  # "neutral" (2) is never predicted
    # class 0: F1 1; class 1: tp 1, fp 1 -> 2/3; class 2: 0  -> mean (1 + 2/3 + 0) / 3 = 5/9
    metrics = score("cb", [{"label": g} for g in golds], preds)
    assert metrics == pytest.approx({"accuracy": 0.75, "f1": 5 / 9}), metrics


def test_multirc_f1a_over_answers_and_em_per_question():
    idx = lambda p, q, a: {"paragraph": p, "question": q, "answer": a}  # noqa: E731
    rows = [{"idx": idx(0, 0, 0), "label": 1}, {"idx": idx(0, 0, 1), "label": 0},
            {"idx": idx(0, 1, 2), "label": 1}, {"idx": idx(1, 1, 3), "label": 0}]  # (1, 1) is another question
    preds = [1, 0, 0, 1]
    # answers: tp 1, fp 1, fn 1 -> F1a = 2/4; questions (0,0) right, (0,1) wrong, (1,1) wrong -> EM 1/3
    metrics = score("multirc", rows, preds)
    assert metrics == pytest.approx({"f1_a": 0.5, "exact_match": 1 / 3}), metrics


def test_record_takes_the_max_over_gold_answers_after_squad_normalisation():
    rows = [{"answers": ["The Eiffel Tower", "Eiffel"]}, {"answers": ["Paris France"]}]
    preds = ["eiffel tower!", "France"]
    # query 1: normalised "eiffel tower" == "eiffel tower" -> EM 1, F1 1; query 2: F1 = 2*(1*0.5)/1.5 = 2/3
    metrics = score("record", rows, preds)
    assert metrics == pytest.approx({"f1": (1 + 2 / 3) / 2, "exact_match": 0.5}), metrics


def test_axb_matthews_correlation_by_hand():
    golds, preds = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]  # tp 2, tn 2, fp 1, fn 1 -> (4 - 1) / 9 = 1/3
    metrics = score("axb", [{"label": g} for g in golds], preds)
    assert metrics["matthews_correlation"] == pytest.approx(1 / 3)
    assert train.matthews_corr([0, 0], [0, 1]) == 0.0, "an empty margin must give 0, not a division error"


def test_axg_gender_parity_is_the_share_of_pairs_with_identical_predictions():
    rows = [{"label": 0, "pair_id": 7, "idx": 0}, {"label": 0, "pair_id": 7, "idx": 1},
            {"label": 1, "pair_id": 9, "idx": 2}, {"label": 1, "pair_id": 9, "idx": 3}]
    metrics = score("axg", rows, [0, 0, 1, 0])
    assert metrics == pytest.approx({"accuracy": 0.75, "gender_parity": 0.5}), metrics


def test_hub_config_names_are_accepted_as_task_names(tmp_path):
    assert train.parse_args(["--task", "WSC.fixed, cb,wsc", "--output_dir", str(tmp_path)]).names == ["wsc", "cb"]
    with pytest.raises(train.UserError, match="axb is a diagnostic"):
        train.parse_args(["--task", "AX-b", "--output_dir", str(tmp_path)])


def test_accuracy_tasks_report_accuracy():
    assert score("rte", [{"label": 0}, {"label": 1}], [0, 0]) == {"accuracy": 0.5}


def test_routing_health_matches_hand_computed_load_entropy_top_share_and_mutual_information():
    """E = 4 experts (3 never chosen), K = 2, 2 classes; the entropies are in bits and read the top expert."""
    def h(*q):  # entropy in bits of the non-zero masses q
        return -sum(x * math.log2(x) for x in q)
    experts, gold = [[0, 1], [0, 2], [0, 1], [1, 0]], [0, 0, 1, 1]  # each example's K experts, the top one first
    health = train.routing_health(experts, 4, gold, 2)
    # load: every choice counts -> expert 0 four times, 1 three, 2 once, 3 never
    # top experts 0, 0, 0, 1 -> shares (3/4, 1/4): entropy H(3/4, 1/4), top share 3/4
    # (top expert, class): (0, 0) twice, (0, 1) once, (1, 1) once -> I = H(E) + H(C) - H(E, C)
    assert health["load"] == [4, 3, 1, 0], health
    assert {k: v for k, v in health.items() if k != "load"} == pytest.approx(
        {"load_entropy": h(3 / 4, 1 / 4), "top_share": 3 / 4,
         "mutual_information": h(3 / 4, 1 / 4) + h(1 / 2, 1 / 2) - h(1 / 2, 1 / 4, 1 / 4)}), health
    follows_label = train.routing_health([[0], [1], [0], [1]], 4, [0, 1, 0, 1], 2)  # the expert IS the class
    assert follows_label["mutual_information"] == pytest.approx(1.0) and follows_label["load_entropy"] == 1.0
    collapsed = train.routing_health([[2], [2], [2]], 4, [0, 1, 1], 2)
    assert collapsed["top_share"] == 1.0 and collapsed["load_entropy"] == 0 and collapsed["mutual_information"] == 0
    assert "mutual_information" not in train.routing_health(experts, 4), "no classes (COPA, ReCoRD, test): no MI"


# -----------------------------------------------------------------------------
# Data: both layouts normalise to the Hub schema


def test_official_layout_normalises_to_the_hub_schema(data_dir):
    load = lambda name, split="train": train.load_split(train.TASKS[name], split, data_dir)  # noqa: E731
    assert load("boolq")[0]["label"] == 1, "JSON true -> 'True' -> id 1"
    assert load("cb")[1]["label"] == 1, "'contradiction' -> id 1"
    assert load("copa")[1]["label"] == 1
    wsc = load("wsc")[0]
    assert (wsc["span1_text"], wsc["span2_index"]) == ("man", 6), "WSC's target is flattened"
    multirc = load("multirc")
    assert len(multirc) == 6 * 2 * 2, "MultiRC: one row per answer"
    assert multirc[1]["idx"] == {"paragraph": 0, "question": 0, "answer": 1} and multirc[1]["label"] == 1
    record = load("record")[1]
    assert record["entities"] == ["cat", "dog", "park"], "entity spans end inclusively, sorted and de-duplicated"
    assert record["answers"] == ["dog"] and record["idx"] == {"passage": 1, "query": 51}
    assert load("axb", "test")[2]["idx"] == 2, "AX-b's string idx is cast to int"
    assert load("axg", "test")[0]["pair_id"] == 551640, "AX-g keeps pair_id for gender parity"
    assert all(r["label"] == -1 for r in load("cb", "test")), "unlabelled test rows get label -1"
    assert all(r["answers"] == [] for r in load("record", "test"))


def test_hub_style_rows_are_read_too(tmp_path):
    write_jsonl(str(tmp_path / "CB" / "train.jsonl"), [{"premise": "a", "hypothesis": "b", "idx": 0, "label": 2}])
    write_jsonl(str(tmp_path / "MultiRC" / "train.jsonl"), [
        {"paragraph": "p", "question": "q", "answer": "a", "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}])
    write_jsonl(str(tmp_path / "ReCoRD" / "train.jsonl"), [
        {"passage": "p", "query": "@placeholder q", "entities": ["b", "a", "a"], "answers": ["a"],
         "idx": {"passage": 0, "query": 0}}])
    assert train.load_split(train.TASKS["cb"], "train", str(tmp_path))[0]["label"] == 2
    assert train.load_split(train.TASKS["multirc"], "train", str(tmp_path))[0]["label"] == 1
    assert train.load_split(train.TASKS["record"], "train", str(tmp_path))[0]["entities"] == ["a", "b"]


def test_a_byte_order_mark_is_accepted_and_a_missing_idx_becomes_the_record_position(tmp_path):
    rows = [{"premise": "a", "hypothesis": "b", "label": "neutral"}, {"premise": "c", "hypothesis": "d", "label": "neutral"}]
    os.makedirs(tmp_path / "CB")
    with open(tmp_path / "CB" / "train.jsonl", "w", encoding="utf-8-sig") as f:  # Windows editors add a BOM
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["idx"] for r in train.load_split(train.TASKS["cb"], "train", str(tmp_path))] == [0, 1]


def test_the_dev_slice_is_stratified_by_label_and_never_splits_a_multirc_question(data_dir):
    rows = [{"idx": i, "label": label} for i, label in enumerate([0] * 40 + [1] * 20 + [2] * 10)]
    multirc = train.load_split(train.TASKS["multirc"], "train", data_dir)  # each question: answers labelled 0 and 1
    for seed in range(3):
        rest, dev = train.split_off_dev("cb", rows, 0.25, seed)
        assert sorted(r["idx"] for r in rest + dev) == list(range(70)), "train and dev partition the rows"
        for label, n in Counter(r["label"] for r in rows).items():  # 10, 5 and 2.5 expected
            n_dev = sum(r["label"] == label for r in dev)
            assert abs(n_dev - 0.25 * n) <= 0.5, f"seed {seed}: label {label} has {n_dev} of {n} rows in dev"
        rest, dev = train.split_off_dev("multirc", multirc, 0.34, seed)
        sides = {}  # (paragraph, question) -> the parts its answers went to
        for part, part_rows in (("train", rest), ("dev", dev)):
            for r in part_rows:
                sides.setdefault((r["idx"]["paragraph"], r["idx"]["question"]), set()).add(part)
        assert rest and dev and all(len(s) == 1 for s in sides.values()), f"seed {seed}: {sides}"


def test_t5_inputs_follow_the_t5_strings_and_wsc_marks_spans_by_word_index(data_dir):
    row = {"premise": "P.", "hypothesis": "H."}
    assert train.t5_input(train.TASKS["cb"], row) == "cb hypothesis: H. premise: P."
    assert train.t5_input(train.TASKS["axb"], row) == "rte hypothesis: H. premise: P.", "a diagnostic reads as RTE"
    wsc = train.load_split(train.TASKS["wsc"], "train", data_dir)[0]
    assert wsc["text"] == "the * man * saw the dog because # he # was home"
    assert train.t5_input(train.TASKS["wsc"], wsc) == "wsc text: the * man * saw the dog because # he # was home"
    record = {"idx": 0, "passage": {"text": "a.\n@highlight\nb\n@highlight\nc", "entities": [{"start": 0, "end": 0}]},
              "qas": [{"idx": 0, "query": "@placeholder", "answers": [{"text": "a"}]}]}
    assert train.normalise(train.TASKS["record"], record, "", 0)[0]["passage"] == "a. b. c", "T5's @highlight rewrite"


def test_truncation_cuts_the_passage_and_keeps_the_hypothesis(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["encoder"])
    row = {"premise": " ".join(["cat"] * 100), "hypothesis": "dog ran to park", "label": 0}
    (ids, _), = train.encode_inputs(train.TASKS["cb"], row, "encoder", tokenizer, budget=20)
    text = tokenizer.decode(ids)
    assert len(ids) <= 20 and text.rstrip().endswith("dog ran to park [SEP]"), text


def test_markup_is_cleaned_before_a_long_passage_is_cut(tmp_path):
    """MultiRC's <b>/<br> and ReCoRD's @highlight are rewritten before truncation, not after: cutting
    first would leave decoded half-tags ('< b >') that the clean-up no longer recognises."""
    tokenizer, _ = tiny_tokenizer("encoder", more_words="< > / b br highlight Sent 1 2 who".split())
    long = "<b>Sent 1: </b>" + " ".join(["cat"] * 60) + "<br><b>Sent 2: </b>the dog ran<br>"
    multirc = {"idx": 0, "passage": {"text": long, "questions": [
        {"idx": 0, "question": "who ran", "answers": [{"idx": 0, "text": "dog", "label": True}]}]}}
    record = {"idx": 0, "passage": {"text": "cat " * 60 + "dog.\n@highlight\ncat ran\n@highlight\ndog ran", "entities": [
        {"start": 0, "end": 2}]}, "qas": [{"idx": 0, "query": "@placeholder ran", "answers": [{"text": "cat"}]}]}
    write_jsonl(str(tmp_path / "MultiRC" / "train.jsonl"), [multirc])
    write_jsonl(str(tmp_path / "ReCoRD" / "train.jsonl"), [record])
    for name in ("multirc", "record"):
        row = train.load_split(train.TASKS[name], "train", str(tmp_path))[0]
        for family in ("encoder", "seq2seq"):
            for ids, _ in train.encode_inputs(train.TASKS[name], row, family, tokenizer, budget=30):
                text = tokenizer.decode(ids)
                assert "<unk>" not in text and len(ids) <= 30, text
                assert "<" not in text and "@" not in text.replace("@ placeholder", ""), text


def test_a_decoder_head_pools_the_last_real_token_after_the_prompt_slots(models):
    """Right-padded rows of lengths 5, 2, 7 under MEPT (P = 3): the head must read position P + len - 1 of each.
    Oracle: each row run alone, unpadded, whose last position is that token (causal attention: pads after a
    token never change it)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    core = mept.MEPT(AutoModel.from_pretrained(models["decoder"]), mept.MEPTConfig(n_experts=4, prompt_len=3, top_k=2))
    model = train.TaskModel(core, "decoder", ["cb"], 0.0, 32).eval()
    rows = [[5, 9, 12, 7, 30], [8, 4], [11, 6, 3, 22, 17, 9, 14]]
    pooled = []  # what the head reads, (N, D)
    model.heads["cb"].register_forward_hook(lambda module, args, out: pooled.append(args[0]))
    with torch.no_grad():
        model(train.collate([train.Group(i, [ids], None, None, [0]) for i, ids in enumerate(rows)], 1, "cpu"), "cb")
        alone = torch.stack([core(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for ids in rows])  # (N, D)
    torch.testing.assert_close(pooled[0], alone, atol=1e-5, rtol=1e-4, msg="the head did not pool P + len - 1")


# -----------------------------------------------------------------------------
# End to end: every task on every backbone family


@pytest.mark.parametrize("family", ["seq2seq", "encoder", "decoder"])
def test_every_task_trains_evaluates_and_predicts(tmp_path, data_dir, models, family):
    """`train.main` on each task: official metric names, log.jsonl, best/, leaderboard predictions."""
    official = {"cb": {"accuracy", "f1"}, "multirc": {"f1_a", "exact_match"}, "record": {"f1", "exact_match"}}
    for task in ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"):
        results, out = run(tmp_path, models[family], data_dir, "--task", task, "--predict", out=task)
        assert set(results["metrics"][task]) == official.get(task, {"accuracy"}), (task, results["metrics"])
        assert results["family"] == family
        if task in ("copa", "record"):  # a candidate is picked, not a class
            assert task not in results["predicted"]
        else:  # every validation row's prediction counted under its class name
            names = train.TASKS[task].label_names
            assert list(results["predicted"][task]) == list(names) and sum(results["predicted"][task].values()) == \
                results["n_rows"][task]["report"], results["predicted"]
        entry = read_log(out)[-1]
        assert {"epoch", "step", "loss", "lr", "metrics", "elapsed", "routing"} <= set(entry), entry
        assert set(entry["routing"][task]) == {"0", "1"}, "the routing is logged for every routed block"
        health = entry["routing"][task]["1"]
        assert sum(health["load"]) == results["n_rows"][task]["report"] and 0 <= health["top_share"] <= 1, health
        assert ("mutual_information" in health) == (task not in ("copa", "record")), "MI where there are classes"
        assert sorted(os.listdir(os.path.join(out, "best"))) == sorted(
            ["mept_model.safetensors", "run_config.json"]
            + (["head.safetensors"] if family != "seq2seq" else [])), task
        with open(os.path.join(out, f"{train.TASKS[task].folder}.jsonl")) as f:  # the leaderboard's file name
            predictions = [json.loads(line) for line in f]
        if task == "multirc":
            answers = [a for p in predictions for q in p["passage"]["questions"] for a in q["answers"]]
            assert len(answers) == 3 * 2 * 2 and {a["label"] for a in answers} <= {0, 1}
        else:
            assert len(predictions) == 3 and all(set(p) == {"idx", "label"} for p in predictions), predictions
        if task == "record":
            assert {p["label"] for p in predictions} <= {"cat", "dog", "park"} and predictions[0]["idx"] == 50
        if task == "copa":
            assert {p["label"] for p in predictions} <= {0, 1}


@pytest.mark.parametrize("family", ["seq2seq", "encoder", "decoder"])
def test_diagnostics_are_evaluated_with_an_rte_checkpoint(tmp_path, data_dir, models, family):
    _, rte_out = run(tmp_path, models[family], data_dir, "--task", "rte", out="rte")
    axb, _ = run(tmp_path, models[family], data_dir, "--task", "axb", "--eval_only",
                 os.path.join(rte_out, "best"), "--predict", out="axb")
    axg, _ = run(tmp_path, models[family], data_dir, "--task", "axg", "--eval_only",
                 os.path.join(rte_out, "best"), out="axg")
    assert set(axb["metrics"]["axb"]) == {"matthews_correlation"}
    assert set(axg["metrics"]["axg"]) == {"accuracy", "gender_parity"}
    assert axb["report_split"].startswith("test"), "the diagnostics are their own labelled test split"
    with pytest.raises(train.UserError, match="was trained on rte, not on cb"):  # T5 has no head that would refuse
        run(tmp_path, models[family], data_dir, "--task", "cb", "--eval_only", os.path.join(rte_out, "best"),
            out="wrong")


def test_mixed_multitask_run_reports_per_task_metrics(tmp_path, data_dir, models):
    for family in ("encoder", "seq2seq"):
        results, out = run(tmp_path, models[family], data_dir, "--task", "cb,rte,copa", out=family)
        assert set(results["metrics"]) == {"cb", "rte", "copa"}, results["metrics"]
        assert set(read_log(out)[-1]["metrics"]) == {"cb", "rte", "copa"}


@pytest.mark.parametrize("method", ["prompt_tuning", "smop", "deep_prompt", "head_only", "finetune"])
def test_every_method_runs_and_its_checkpoint_reloads(tmp_path, data_dir, models, method):
    results, out = run(tmp_path, models["encoder"], data_dir, "--task", "cb", "--method", method)
    again, _ = run(tmp_path, models["encoder"], data_dir, "--task", "cb", "--eval_only",
                   os.path.join(out, "best"), out="reload")
    assert again["method"] == method
    assert again["metrics"] == results["metrics"], "reloading best/ must reproduce the reported metrics"


def test_full_finetuning_of_a_model_with_tied_embeddings_saves_and_reloads(tmp_path, data_dir, models):
    """T5 ties its embedding matrices; the backbone checkpoint stores the shared tensor once."""
    results, out = run(tmp_path, models["seq2seq"], data_dir, "--task", "cb", "--method", "finetune", "--max_steps", "2")
    again, _ = run(tmp_path, models["seq2seq"], data_dir, "--task", "cb", "--eval_only",
                   os.path.join(out, "best"), out="reload")
    assert again["metrics"] == results["metrics"]


def test_resume_keeps_an_early_stop_and_refuses_other_flags(tmp_path, data_dir, models):
    """A run that ran out of patience and is resumed (say it was killed before results.json) stops
    where the uninterrupted run stopped; resuming with another method is refused in one line."""
    flags = ("--task", "cb", "--num_epochs", "4", "--patience", "1", "--lr", "1e-12",
             "--head_lr", "1e-12", "--max_train_samples", "8")
    whole, out = run(tmp_path, models["encoder"], data_dir, *flags)
    assert whole["steps"] == 2, "no improvement after the first evaluation: patience 1 stops at the second"
    os.remove(os.path.join(out, "results.json"))
    resumed, _ = run(tmp_path, models["encoder"], data_dir, *flags, "--resume")
    assert (resumed["steps"], resumed["best_epoch"], resumed["metrics"]) == (whole["steps"], whole["best_epoch"], whole["metrics"])
    with pytest.raises(train.UserError, match="had --method mept, not head_only"):
        run(tmp_path, models["encoder"], data_dir, *flags, "--resume", "--method", "head_only")
    with pytest.raises(train.UserError, match="had --batch_size 4, not 2"):
        run(tmp_path, models["encoder"], data_dir, *flags[:-2], "--resume", "--batch_size", "2", "--max_train_samples", "8")


@pytest.mark.parametrize("kind", ["electra_small", "opt_350m"])
def test_a_backbone_mept_cannot_serve_is_one_error_line_with_mepts_sentence(tmp_path, data_dir, kind):
    """ELECTRA-small (16-wide embeddings, 32-wide blocks) and OPT-350m (16-wide embeddings and output
    around 32-wide blocks) change width inside: mept.py refuses them in one sentence, and train.py
    passes that sentence on as its one error line; input-only prompts (--layers 0) still run."""
    from transformers import ElectraConfig, ElectraModel, OPTConfig, OPTModel

    family = "encoder" if kind == "electra_small" else "decoder"
    tokenizer, vocab_size = tiny_tokenizer(family)
    torch.manual_seed(0)
    if kind == "electra_small":
        model = ElectraModel(ElectraConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=128))
    else:
        model = OPTModel(OPTConfig(vocab_size=vocab_size, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                                   num_attention_heads=4, ffn_dim=64, max_position_embeddings=128))
    folder = str(tmp_path / kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(train.UserError, match=r"unsupported backbone: block 1 of \w+ receives hidden states .*--layers 0"):
        run(tmp_path, folder, data_dir, "--task", "cb")
    assert not os.path.exists(tmp_path / "out" / "best"), "a refused backbone leaves no checkpoint"


def test_checkpoint_reload_reproduces_the_metrics(tmp_path, data_dir, models):
    for family in ("seq2seq", "encoder", "decoder"):
        results, out = run(tmp_path, models[family], data_dir, "--task", "copa", "--num_epochs", "2", out=family)
        again, _ = run(tmp_path, models[family], data_dir, "--task", "copa", "--eval_only",
                       os.path.join(out, "best"), out=family + "_reload")
        assert again["metrics"] == results["metrics"], family
        log = read_log(out)
        best = max(log, key=lambda e: e["dev_metrics"]["copa"]["accuracy"])
        assert results["metrics"] == best["metrics"], "results.json reports the best epoch's numbers"


def test_loss_falls_on_a_repeated_tiny_batch(tmp_path, data_dir, models):
    """The same 4 CB rows every step through a frozen BERT: MEPT's prompts and the head must fit them."""
    _, out = run(tmp_path, models["encoder"], data_dir, "--task", "cb", "--max_train_samples", "4", "--dev_from_train", "0",
                 "--num_epochs", "40", "--lr", "0.1", "--head_lr", "0.05", "--router_noise", "0",
                 "--head_dropout", "0", "--warmup_ratio", "0")
    losses = [e["loss"] for e in read_log(out)]
    assert losses[-1] < 0.3 * losses[0], losses


def test_prompts_get_trained_and_the_backbone_stays_frozen(tmp_path, data_dir, models, monkeypatch):
    """Two steps of MEPT on BERT: every tensor MEPT trains (each block's experts, router, shared expert) moved
    away from where it started, and every backbone weight is bit for bit the one loaded. (A falling loss
    alone proves neither: the head can fit a tiny batch by itself.)"""
    from transformers import AutoModel

    original, snapshots = train.train, []

    def train_between_snapshots(run):  # the core's parameters as training found them and as it left them
        snapshots.append({k: v.detach().clone() for k, v in run.model.core.named_parameters()})
        original(run)
        snapshots.append({k: v.detach().clone() for k, v in run.model.core.named_parameters()})

    monkeypatch.setattr(train, "train", train_between_snapshots)
    results, out = run(tmp_path, models["encoder"], data_dir, "--task", "rte", "--num_epochs", "2")
    before, after = snapshots
    prompts, backbone = ([k for k in before if k.startswith(part)] for part in ("prompts.", "backbone."))
    assert results["steps"] == 2 and prompts and backbone and len(prompts) + len(backbone) == len(before)
    still = [k for k in prompts if (after[k] - before[k]).abs().max() < 1e-4]  # an Adam step moves ~lr = 1e-2
    assert not still, f"MEPT tensors that did not train: {still}"
    changed = [k for k in backbone if not torch.equal(after[k], before[k])]
    assert not changed, f"backbone weights that changed: {changed}"
    saved = load_file(os.path.join(out, "best", "mept_model.safetensors"))
    assert saved and all(k.startswith("prompts.") for k in saved), "best/ holds only MEPT's trainable tensors"
    fresh = AutoModel.from_pretrained(models["encoder"])
    rebuilt = mept.MEPT.from_pretrained(fresh, os.path.join(out, "best"))
    assert rebuilt.config.prompt_len == 3 and rebuilt.config.n_experts == 4


def test_same_seed_gives_the_same_numbers_and_resume_equals_an_uninterrupted_run(tmp_path, data_dir, models, monkeypatch):
    """With dropout and router noise on. Run on a GPU (or MPS) machine, this checks the device's own random stream
    too, which they draw from there; on the CPU the checkpoint holds the CPU's alone, as one from before did."""
    args = ["--task", "cb", "--num_epochs", "3", "--batch_size", "2"]
    full, full_out = run(tmp_path, models["decoder"], data_dir, *args, out="full")
    twin, twin_out = run(tmp_path, models["decoder"], data_dir, *args, out="twin")
    assert twin["metrics"] == full["metrics"]

    original, calls = train.save_checkpoint, []

    def crash_after_the_second_last_save(model, directory, run_config, trainer_state=None):
        original(model, directory, run_config, trainer_state)
        calls.append(directory)
        if trainer_state is not None and sum(c.endswith("last") for c in calls) == 2:
            raise KeyboardInterrupt  # a kill after epoch 2's checkpoint, as if during epoch 3

    monkeypatch.setattr(train, "save_checkpoint", crash_after_the_second_last_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, models["decoder"], data_dir, *args, out="resumed")
    monkeypatch.setattr(train, "save_checkpoint", original)
    last = str(tmp_path / "resumed" / "last")
    os.rename(last, last + ".old")  # and as if the kill came between a save's two renames: the good copy is last.old
    resumed, resumed_out = run(tmp_path, models["decoder"], data_dir, *args, "--resume", out="resumed")

    assert resumed["metrics"] == full["metrics"] and resumed["best_epoch"] == full["best_epoch"]
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed"} for e in log]  # noqa: E731
    assert strip(read_log(resumed_out)) == strip(read_log(full_out)), "every evaluation matches, in order"
    for name in ("mept_model.safetensors", "head.safetensors"):
        a = load_file(os.path.join(full_out, "last", name))
        b = load_file(os.path.join(resumed_out, "last", name))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_a_dev_slice_of_train_chooses_the_epoch_and_patience_stops(tmp_path, data_dir, models):
    results, out = run(tmp_path, models["seq2seq"], data_dir, "--task", "boolq", "--lr", "1e-12", "--dev_from_train",
                       "0.34", "--patience", "1", "--num_epochs", "4", "--batch_size", "2")
    assert results["selected_on"].startswith("train slice") and "dev_metrics" in read_log(out)[0]
    assert results["n_rows"]["boolq"]["dev"] == 2 and results["n_rows"]["boolq"]["train"] == 4
    assert len(read_log(out)) == 2 and results["steps"] == 4, "no gain after epoch 1: patience 1 stops after epoch 2"


# -----------------------------------------------------------------------------
# Bad input: one clear line, a non-zero exit, no traceback, nothing saved harmed


def bad(tmp_path, models, data_dir, *extra):
    return ["--model", models["encoder"], "--data_dir", data_dir, "--output_dir", str(tmp_path / "bad"),
            "--max_length", "64", "--prompt_len", "3", "--max_steps", "1", *extra]


def test_bad_inputs_each_get_a_clear_message(tmp_path, data_dir, models):
    broken = tmp_path / "broken"
    write_jsonl(str(broken / "CB" / "train.jsonl"), official_rows("CB", "train", 3))
    write_jsonl(str(broken / "CB" / "val.jsonl"), [])
    write_jsonl(str(broken / "RTE" / "val.jsonl"), official_rows("RTE", "val", 2))
    write_jsonl(str(broken / "RTE" / "train.jsonl"), official_rows("RTE", "train", 2) + [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
    write_jsonl(str(broken / "COPA" / "val.jsonl"), official_rows("COPA", "val", 2))
    with open(broken / "COPA" / "train.jsonl", "w") as f:
        f.write(json.dumps(official_rows("COPA", "train", 1)[0]) + "\n{not json\n")
    write_jsonl(str(broken / "WiC" / "train.jsonl"), official_rows("WiC", "train", 2))
    with open(broken / "WiC" / "train.jsonl", "ab") as f:
        f.write(b'{"word": "caf\xe9"}\n')  # latin-1, not UTF-8
    no_entities = official_rows("ReCoRD", "train", 1)
    no_entities[0]["passage"]["entities"] = []
    write_jsonl(str(broken / "ReCoRD" / "train.jsonl"), no_entities)
    write_jsonl(str(broken / "BoolQ" / "train.jsonl"), [{**official_rows("BoolQ", "train", 1)[0], "passage": None}])
    write_jsonl(str(broken / "BoolQ" / "val.jsonl"), official_rows("BoolQ", "val", 1))
    (tmp_path / "nodata").mkdir()
    from transformers import ViTConfig, ViTModel

    vit = str(tmp_path / "vit")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=8, patch_size=4)).save_pretrained(vit)

    from transformers import CanineConfig, CanineModel, FSMTConfig, FSMTForConditionalGeneration

    canine, fsmt = str(tmp_path / "canine"), str(tmp_path / "fsmt")  # characters; decoder inputs not from labels
    CanineModel(CanineConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             num_hash_buckets=64)).save_pretrained(canine)
    FSMTForConditionalGeneration(FSMTConfig(langs=["en", "de"], src_vocab_size=90, tgt_vocab_size=90, d_model=32,
                                            encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                            max_position_embeddings=64)).save_pretrained(fsmt)
    tiny_tokenizer("seq2seq")[0].save_pretrained(fsmt)

    cases = [
        (["--task", "cola"], "unknown task 'cola'"),
        (["--task", "cb", "--data_dir", str(tmp_path / "nowhere")], "data folder .*nowhere does not exist"),
        (["--task", "boolq", "--data_dir", str(tmp_path / "nodata")], r"missing file .*BoolQ.train\.jsonl"),
        (["--task", "boolq", "--data_dir", str(broken)], r"BoolQ.train\.jsonl example 0: field 'passage' should be text"),
        (["--task", "wic", "--data_dir", str(broken)], r"WiC.train\.jsonl line 3: not UTF-8 text"),
        (["--task", "record", "--data_dir", str(broken)], r"ReCoRD.train\.jsonl example 0: field 'entities' should be text \(or a non-empty list"),
        (["--task", "copa", "--data_dir", str(broken)], r"COPA.train\.jsonl line 2: not valid JSON"),
        (["--task", "rte", "--data_dir", str(broken)], r"RTE.train\.jsonl line 3: label 'maybe' is not one of"),
        (["--task", "cb", "--data_dir", str(broken), "--dev_from_train", "0"], r"CB.val\.jsonl has no examples"),
        (["--task", "cb", "--model", str(tmp_path / "no_model")], "could not load the model .*no_model: no model folder there"),
        (["--task", "cb", "--model", "nobody/no-such-model"], "--model PATH.*--data_dir DIR"),
        (["--task", "cb", "--model", vit], "unsupported backbone"),
        (["--task", "cb", "--model", canine], "unsupported backbone: CanineModel has no token embedding table"),
        (["--task", "cb", "--model", fsmt], "unsupported backbone: FSMTForConditionalGeneration fails on 16 random tokens"),
        (["--task", "cb", "--max_length", "200"], "--max_length 200 exceeds the 128 positions"),
        (["--task", "cb", "--prompt_len", "60"], "prompt_len 60 leaves no room within max_length 64"),
        (["--task", "cb", "--top_k", "5"], "impossible MEPT settings: .*top_k <= n_experts"),
        (["--task", "cb", "--layers", "0,7"], r"impossible MEPT settings: layers \[0, 7\] go beyond"),
        (["--task", "cb", "--layers", "1,2"], "must be block indices with 0"),
        (["--task", "axb"], "diagnostic without training data"),
        (["--task", "cb", "--eval_only", str(tmp_path)], "is no checkpoint of this script"),
        (["--task", "cb", "--resume"], "nothing to resume"),
        (["--task", "cb", "--lr", "-1"], r"argument --lr: must be in \[0, inf\), got -1"),
        (["--task", "cb", "--head_dropout", "1.5"], r"argument --head_dropout: must be in \[0, 1\)"),
        (["--task", "cb", "--batch_size", "x"], "argument --batch_size: invalid parse value: 'x'"),
        (["--task", "cb", "--num_epochs", "0"], r"argument --num_epochs: must be in \[1, inf\), got 0"),
        (["--task", "cb", "--layers", "0,x"], "--layers must be 'all' or a comma list"),
        (["--task", "cb", "--output_dir", str(broken / "CB" / "train.jsonl")], "is a file, not a folder"),
        (["--task", "cb", "--dev_from_train", "0.99", "--data_dir", str(broken)], "leaves no cb rows to train on"),
    ]
    for extra, message in cases:
        with pytest.raises(train.UserError, match=message):
            train.main(bad(tmp_path, models, data_dir, *extra))
    assert not (tmp_path / "bad").exists(), "a rejected run writes nothing"


def test_hub_data_without_network_points_to_data_dir(tmp_path, models, monkeypatch):
    monkeypatch.delenv("SUPERGLUE_DIR", raising=False)
    argv = ["--model", models["encoder"], "--output_dir", str(tmp_path / "o"), "--task", "cb"]
    with pytest.raises(train.UserError, match="--data_dir DIR"):
        train.main(argv)


def test_a_failed_run_never_harms_a_saved_one(tmp_path, data_dir, models):
    _, out = run(tmp_path, models["encoder"], data_dir, "--task", "cb")
    before = {f: os.path.getmtime(os.path.join(out, "best", f)) for f in os.listdir(os.path.join(out, "best"))}
    with pytest.raises(train.UserError, match="already holds a run"):
        run(tmp_path, models["encoder"], data_dir, "--task", "cb")
    with pytest.raises(train.UserError, match="impossible MEPT settings"):
        run(tmp_path, models["encoder"], data_dir, "--task", "cb", "--overwrite_output_dir", "--n_experts", "0")
    after = {f: os.path.getmtime(os.path.join(out, "best", f)) for f in os.listdir(os.path.join(out, "best"))}
    assert before == after and os.path.exists(os.path.join(out, "results.json"))


def test_the_command_line_prints_one_error_line_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--task", "nope"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown task 'nope'; choose from axb, axg, boolq, cb, copa, multirc, record, rte, wic, wsc "
        "or a comma list of them"], proc.stderr


def test_help_documents_every_flag_and_every_mept_config_field():
    import dataclasses

    parser = train.build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    missing = [f.name for f in dataclasses.fields(mept.MEPTConfig) if f.name not in flags]
    assert not missing, f"MEPTConfig fields without a flag: {missing}"
    assert all(a.help for a in flags.values()), [d for d, a in flags.items() if not a.help]
    text = parser.format_help()
    assert "(default: 16)" in text and "t5-base" in text and "inflated" in text, "defaults and the leakage caveat"


def test_an_interrupted_save_never_replaces_a_good_checkpoint(tmp_path):
    model, good = torch.nn.Module(), str(tmp_path / "best")  # a model with an (empty) task head and a plain core
    model.core, model.heads = torch.nn.Linear(2, 2), torch.nn.ModuleDict()
    train.save_checkpoint(model, good, {"method": "head_only", "note": "good"})
    with pytest.raises(TypeError):  # a set is no JSON: the save dies half-way through writing
        train.save_checkpoint(model, good, {"method": "head_only", "note": {"half"}})
    with open(os.path.join(good, "run_config.json")) as f:
        assert json.load(f)["note"] == "good", "a crash while writing leaves the good checkpoint in place"
    train.save_checkpoint(model, good, {"method": "head_only", "note": "new"})
    with open(os.path.join(good, "run_config.json")) as f:
        assert json.load(f)["note"] == "new" and not os.path.exists(good + ".tmp") and not os.path.exists(good + ".old")


@pytest.mark.parametrize("family", ["encoder", "seq2seq"])
def test_two_processes_under_torchrun_train_as_one_and_only_rank_0_writes(tmp_path, data_dir, family):
    """torchrun --nproc_per_node 2 (gloo, on the CPU): each process takes half of every batch and DDP averages
    the gradients, so with dropout and router noise off the trainable weights end as one process's do, and so
    do the metrics. Every loss must be the whole batch's: the balance term is on (its f_e counts every process's
    choices), and T5's targets have unequal lengths (entailment: 2 tokens, not_entailment: 4), so that the mean
    over the whole batch's tokens differs from the mean of the halves' means. Only rank 0 writes."""
    from tokenizers import pre_tokenizers
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    tokenizer, vocab_size = tiny_tokenizer(family, more_words=["not", "_"])
    torch.manual_seed(0)
    if family == "encoder":
        model = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:  # not_entailment -> not _ entailment </s>, as T5's own tokenizer splits it into pieces
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Split("_", "isolated")])
        assert len(tokenizer("not_entailment")["input_ids"]) == 2 + len(tokenizer("entailment")["input_ids"])
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            dropout_rate=0.0))
    folder = str(tmp_path / family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    flags = ["--task", "cb" if family == "encoder" else "rte", "--model", folder, "--data_dir", data_dir,
             "--max_length", "64", "--prompt_len", "3", "--batch_size", "2", "--num_epochs", "2", "--dev_from_train",
             "0", "--router_noise", "0", "--head_dropout", "0", "--balance_coef", "0.01"]
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
    for processes, out in ((1, "one"), (2, "two")):
        launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node", "2"]
        proc = subprocess.run([*launch, os.path.join(HERE, "train.py"), *flags, "--output_dir", str(tmp_path / out)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "two")) == ["best", "last", "log.jsonl", "results.json"], "only rank 0 writes"
    weights = [name for name in os.listdir(tmp_path / "one" / "last") if name.endswith(".safetensors")]
    assert "mept_model.safetensors" in weights and ("head.safetensors" in weights) == (family == "encoder"), weights
    for name in weights:
        one, two = (load_file(str(tmp_path / out / "last" / name)) for out in ("one", "two"))
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=f"{name}:{key} differs")
    results = [json.load(open(tmp_path / out / "results.json")) for out in ("one", "two")]
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["steps"] == results[1]["steps"]
    losses = [[e["loss"] for e in read_log(str(tmp_path / out))] for out in ("one", "two")]
    assert losses[0] != losses[1], "rank 0 logs the loss of its half of the batches: the batches were split"
    if family == "seq2seq":
        return  # the rows that divide evenly, once is enough
    uneven = subprocess.run([*launch, os.path.join(HERE, "train.py"), *flags, "--batch_size", "5", "--output_dir",
                             str(tmp_path / "uneven")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert uneven.returncode == 0, uneven.stderr[-2000:]  # 6 rows in batches of 5 and 1: 4 rows train, 1 step an epoch
    assert json.load(open(tmp_path / "uneven" / "results.json"))["steps"] == 2, "a batch keeps rows that divide evenly"
