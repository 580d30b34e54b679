"""Task registry, readers and protocol splits for the GLUE / SuperGLUE tasks used in the SAM paper.

Protocol: ``train`` = 90% of the official train file, ``val`` = the other 10% (seeded shuffle),
``test`` = the official dev (GLUE) / val (SuperGLUE) file. Every split has a ``label`` column plus the raw
text columns the task needs, and nothing else.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

__all__ = ["TASKS", "TaskSpec", "get_spec", "load_task", "resolve_data_dir"]

DATA_DIR_ENV = "PEFT_SAM_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = _REPO_ROOT / "data"
FALLBACK_DATA_DIR = _REPO_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a task.

    ``kind`` is one of ``"single"`` (one sentence), ``"pair"`` (sentence pair), ``"choice"`` (multiple
    choice, COPA) or ``"wsc"`` (coreference, turned into a sentence pair). ``num_labels`` is the number of
    classes, 1 for regression, or the number of choices for ``"choice"`` tasks.
    """

    name: str
    kind: str
    num_labels: int
    is_regression: bool
    metric: str
    label_names: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "single", 2, False, "mcc", ("unacceptable", "acceptable")),
    "stsb": TaskSpec("stsb", "pair", 1, True, "pearson_spearman", ("similarity",)),
    "mrpc": TaskSpec("mrpc", "pair", 2, False, "acc_f1", ("not_equivalent", "equivalent")),
    "rte": TaskSpec("rte", "pair", 2, False, "accuracy", ("entailment", "not_entailment")),
    "cb": TaskSpec("cb", "pair", 3, False, "acc_macro_f1", ("entailment", "contradiction", "neutral")),
    "copa": TaskSpec("copa", "choice", 2, False, "accuracy", ("choice1", "choice2")),
    "wsc": TaskSpec("wsc", "wsc", 2, False, "accuracy", ("False", "True")),
}


@dataclass(frozen=True)
class _Source:
    """Where a task's files live (relative to the data dir) and how to read them."""

    subdir: str
    train_file: str
    test_file: str
    fmt: str  # "tsv" or "jsonl"
    read_kwargs: tuple[tuple[str, Any], ...] = ()


_TSV = (("delimiter", "\t"), ("quoting", csv.QUOTE_NONE), ("keep_default_na", False))
_SOURCES: dict[str, _Source] = {
    "cola": _Source(
        "glue/CoLA",
        "train.tsv",
        "dev.tsv",
        "tsv",
        _TSV + (("column_names", ["source", "label", "original_mark", "sentence"]),),
    ),
    "mrpc": _Source("glue/MRPC", "train.tsv", "dev.tsv", "tsv", _TSV + (("encoding", "utf-8-sig"),)),
    "rte": _Source("glue/RTE", "train.tsv", "dev.tsv", "tsv", _TSV),
    "stsb": _Source("glue/STS-B", "train.tsv", "dev.tsv", "tsv", _TSV),
    "cb": _Source("superglue/CB", "train.jsonl", "val.jsonl", "jsonl"),
    "copa": _Source("superglue/COPA", "train.jsonl", "val.jsonl", "jsonl"),
    "wsc": _Source("superglue/WSC", "train.jsonl", "val.jsonl", "jsonl"),
}


def get_spec(name_or_spec: str | TaskSpec) -> TaskSpec:
    """Return the :class:`TaskSpec` for a task name (case-insensitive) or pass a spec through."""
    if isinstance(name_or_spec, TaskSpec):
        return name_or_spec
    key = str(name_or_spec).lower().replace("-", "")
    if key not in TASKS:
        raise KeyError(f"unknown task {name_or_spec!r}; known tasks: {sorted(TASKS)}")
    return TASKS[key]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Pick the data folder: ``data_dir``, ``$PEFT_SAM_DATA_DIR``, ``<repo>/data``, ``<repo>/../shared/data``.

    Raises ``FileNotFoundError`` (saying how to fix it) when none exists.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir {str(path)!r} does not exist")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${DATA_DIR_ENV}={env!r} does not exist; fix it or unset it")
        return path
    for path in (DEFAULT_DATA_DIR, FALLBACK_DATA_DIR):
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"no task data found at {str(DEFAULT_DATA_DIR)!r} or {str(FALLBACK_DATA_DIR)!r}; "
        f"pass data_dir=... (a folder with glue/ and superglue/) or set ${DATA_DIR_ENV}"
    )


def _read_official(name: str, root: Path, include_test: bool = True) -> datasets.DatasetDict:
    """Read the official train and dev/val files of a task as ``{"train", "test"}`` (``include_test=False``:
    the dev/val file is not opened)."""
    src = _SOURCES[name]
    files = {"train": root / src.subdir / src.train_file, "test": root / src.subdir / src.test_file}
    if not include_test:
        del files["test"]
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"missing data file {str(path)!r} for task {name!r}; pass data_dir=... pointing at a folder "
                f"with the layout glue/<TASK>/{{train,dev}}.tsv and superglue/<TASK>/{{train,val}}.jsonl"
            )
    data_files = {k: str(v) for k, v in files.items()}
    if src.fmt == "tsv":
        return datasets.load_dataset("csv", data_files=data_files, **dict(src.read_kwargs))
    return datasets.load_dataset("json", data_files=data_files)


_RTE_LABELS = {"entailment": 0, "not_entailment": 1}
_CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def _normalise(name: str, ds: datasets.Dataset) -> datasets.Dataset:
    """Map a raw split to the task's needed text columns plus an int / float ``label`` column."""
    if name == "cola":
        ds = ds.select_columns(["sentence", "label"])
    elif name == "mrpc":
        ds = ds.select_columns(["#1 String", "#2 String", "Quality"])
        ds = ds.rename_columns({"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"})
    elif name == "rte":
        ds = ds.select_columns(["sentence1", "sentence2", "label"])
        ds = ds.map(lambda ex: {"label": _RTE_LABELS[ex["label"]]})
    elif name == "stsb":
        ds = ds.select_columns(["sentence1", "sentence2", "score"]).rename_column("score", "label")
    elif name == "cb":
        ds = ds.select_columns(["premise", "hypothesis", "label"])
        ds = ds.map(lambda ex: {"label": _CB_LABELS[ex["label"]]})
    elif name == "copa":
        ds = ds.select_columns(["premise", "choice1", "choice2", "question", "label"])
    elif name == "wsc":
        ds = ds.map(
            lambda ex: {
                "span1_text": ex["target"]["span1_text"],
                "span2_text": ex["target"]["span2_text"],
                "span1_index": ex["target"]["span1_index"],
                "span2_index": ex["target"]["span2_index"],
                "label": int(ex["label"]),
            },
            remove_columns=["target"],
        )
        ds = ds.select_columns(["text", "span1_text", "span2_text", "span1_index", "span2_index", "label"])
    else:  # pragma: no cover - guarded by get_spec
        raise KeyError(name)
    label_type = "float32" if TASKS[name].is_regression else "int64"
    return ds.cast_column("label", datasets.Value(label_type))


def load_task(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 42,
    val_fraction: float = 0.1,
    drop_fraction: float = 0.0,
    drop_seed: int = 0,
    include_test: bool = True,
) -> datasets.DatasetDict:
    """Load a task as ``DatasetDict(train, val, test)`` following the SAM paper's protocol.

    ``val`` takes ``ceil(val_fraction * n)`` rows of the shuffled official train file (shuffle seeded by
    ``seed``), ``train`` the rest; ``test`` is the official dev/val file. If ``drop_fraction > 0``,
    ``round(drop_fraction * len(train))`` random rows (seeded by ``drop_seed``) are then removed from
    ``train`` only; the kept rows stay in their order. ``include_test=False`` returns ``train`` and ``val`` only,
    without opening the official dev file (model selection that must not see the test split: learning-rate sweeps).
    """
    spec = get_spec(name)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    raw = _read_official(spec.name, resolve_data_dir(data_dir), include_test=include_test)
    train_full = _normalise(spec.name, raw["train"])
    split = train_full.train_test_split(test_size=val_fraction, shuffle=True, seed=seed)
    train, val = split["train"], split["test"]
    if drop_fraction > 0.0:
        n_drop = int(round(drop_fraction * len(train)))
        keep = np.sort(np.random.default_rng(drop_seed).permutation(len(train))[n_drop:])
        train = train.select(keep.tolist())
    out = {"train": train, "val": val}
    if include_test:
        out["test"] = _normalise(spec.name, raw["test"])
    return datasets.DatasetDict(out)
