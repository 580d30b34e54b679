"""Tokenisation of the task splits and the matching batch collators.

Input formats, by ``TaskSpec.kind``:

* ``single`` (CoLA): ``sentence``.
* ``pair`` (STS-B, MRPC, RTE, CB): ``(sentence1, sentence2)`` or ``(premise, hypothesis)``,
  ``truncation="longest_first"``.
* ``choice`` (COPA): multiple choice with two options. Option ``k`` is the pair
  ``(premise + " " + connector, choice_k)`` with connector ``"What was the cause?"`` (``question == "cause"``)
  or ``"What happened as a result?"`` (``question == "effect"``); each example holds ``input_ids`` of shape
  ``[2, L]`` (two lists) and ``labels`` = index of the correct choice; use ``AutoModelForMultipleChoice``.
* ``wsc`` (WSC): the pair ``(text, f'Does "{span2_text}" refer to "{span1_text}"?')``, i.e. the passage and a
  yes/no question asking whether the pronoun (span 2) refers to the candidate noun phrase (span 1);
  ``labels`` 1 = yes. Truncation (``longest_first``) only ever shortens the passage in practice, since the
  question is short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from .data import TaskSpec, get_spec

__all__ = [
    "COPA_CONNECTORS",
    "MultipleChoiceCollator",
    "collate_multiple_choice",
    "get_collator",
    "model_class_for",
    "tokenize_task",
    "wsc_question",
]

COPA_CONNECTORS = {"cause": "What was the cause?", "effect": "What happened as a result?"}
_PAIR_COLUMNS = {
    "stsb": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "cb": ("premise", "hypothesis"),
}
_MODEL_OUTPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def wsc_question(span1_text: str, span2_text: str) -> str:
    """The second segment of a WSC example: does the pronoun (span 2) refer to the noun phrase (span 1)?"""
    return f'Does "{span2_text}" refer to "{span1_text}"?'


def model_class_for(spec: str | TaskSpec) -> str:
    """Name of the ``transformers`` Auto class to use for a task."""
    return (
        "AutoModelForMultipleChoice"
        if get_spec(spec).kind == "choice"
        else "AutoModelForSequenceClassification"
    )


def _keep_model_keys(enc: Any) -> dict[str, Any]:
    return {k: enc[k] for k in _MODEL_OUTPUT_KEYS if k in enc}


def _encode_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, spec: TaskSpec, max_length: int
) -> dict[str, list]:
    kw: dict[str, Any] = {
        "truncation": True if spec.kind == "single" else "longest_first",
        "max_length": max_length,
    }
    if spec.kind == "single":
        out = _keep_model_keys(tokenizer(batch["sentence"], **kw))
    elif spec.kind == "pair":
        a, b = _PAIR_COLUMNS[spec.name]
        out = _keep_model_keys(tokenizer(batch[a], batch[b], **kw))
    elif spec.kind == "wsc":
        questions = [wsc_question(s1, s2) for s1, s2 in zip(batch["span1_text"], batch["span2_text"])]
        out = _keep_model_keys(tokenizer(batch["text"], questions, **kw))
    elif spec.kind == "choice":
        firsts, seconds = [], []
        for premise, question, c1, c2 in zip(
            batch["premise"], batch["question"], batch["choice1"], batch["choice2"]
        ):
            first = f"{premise} {COPA_CONNECTORS[question]}"
            firsts += [first, first]
            seconds += [c1, c2]
        flat = _keep_model_keys(tokenizer(firsts, seconds, **kw))
        out = {k: [v[i : i + 2] for i in range(0, len(v), 2)] for k, v in flat.items()}
    else:  # pragma: no cover - TaskSpec.kind is one of the four above
        raise ValueError(f"unknown task kind {spec.kind!r}")
    out["labels"] = batch["label"]
    return out


def tokenize_task(
    splits: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    name_or_spec: str | TaskSpec,
    max_length: int = 128,
) -> datasets.DatasetDict:
    """Tokenise every split of :func:`load_task`'s output, without padding.

    The result has only ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them)
    and ``labels``; pad batches with :func:`get_collator`.
    """
    spec = get_spec(name_or_spec)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return _encode_batch(batch, tokenizer, spec, max_length)

    out = {}
    for split, ds in splits.items():
        out[split] = ds.map(
            encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenising {spec.name}/{split}"
        )
    return datasets.DatasetDict(out)


@dataclass
class MultipleChoiceCollator:
    """Pad multiple-choice features (``input_ids`` of shape ``[C, L_i]``) into tensors ``[B, C, L]``."""

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        num_choices = len(features[0]["input_ids"])
        keys = [k for k in _MODEL_OUTPUT_KEYS if k in features[0]]
        flat = [{k: f[k][c] for k in keys} for f in features for c in range(num_choices)]
        batch = self.tokenizer.pad(
            flat, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        out = {k: v.view(len(features), num_choices, -1) for k, v in batch.items()}
        label_key = "labels" if "labels" in features[0] else "label" if "label" in features[0] else None
        if label_key is not None:
            out["labels"] = torch.tensor([int(f[label_key]) for f in features], dtype=torch.long)
        return out


def collate_multiple_choice(
    features: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """Functional form of :class:`MultipleChoiceCollator`."""
    return MultipleChoiceCollator(tokenizer)(features)


def get_collator(
    spec: str | TaskSpec, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorWithPadding | MultipleChoiceCollator:
    """Batch collator for a task: multiple-choice padding for COPA, ``DataCollatorWithPadding`` otherwise."""
    if get_spec(spec).kind == "choice":
        return MultipleChoiceCollator(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
