"""PEFT's generic tuner checks (``PeftCommonTester``) that apply to every peft-sam tuner alike: safe merging,
a safe merge that refuses a broken adapter without touching the base, and the trainable-parameter count."""

import pytest
import torch
from conftest import make_batches, tiny_bert
from peft import LoraConfig, get_peft_model

from peft_sam import CaliSrConfig, MPOConfig, SAMConfig
from peft_sam.tuners.calisr import CaliSrLayer
from peft_sam.tuners.mpo.layer import MPOLayer
from peft_sam.tuners.sam.layer import SAMLayer

KINDS = ["sam", "mpo", "calisr_lora", "calisr_sam"]


def _model(kind: str, init_weights: bool = False):
    torch.manual_seed(0)
    if kind == "sam":
        config = SAMConfig(p=0.05, selection="random", init_weights=init_weights, task_type="SEQ_CLS")
    elif kind == "mpo":
        config = MPOConfig(init_weights=init_weights, task_type="SEQ_CLS")
    else:
        if kind == "calisr_lora":
            inner = LoraConfig(r=2, target_modules=["query", "value"])
        else:
            inner = SAMConfig(p=0.05, selection="random")
        config = CaliSrConfig(adapter=inner, init_weights=init_weights, task_type="SEQ_CLS")
    return get_peft_model(tiny_bert(0), config).eval()


def _layers(model, kind: str) -> list:
    cls = {"sam": SAMLayer, "mpo": MPOLayer}.get(kind, CaliSrLayer)
    return [m for m in model.modules() if isinstance(m, cls)]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _break(layer, kind: str) -> None:
    """Put a NaN into the adapter part that the layer's merge folds in last (so a partial write would show)."""
    with torch.no_grad():
        if kind == "sam":
            layer.sam_bias_values["default"][0] = float("nan")
        elif kind == "mpo":
            next(iter(layer.mpo_aux["default"].values())).view(-1)[0] = float("nan")
        else:
            layer.calisr_extra["default"].view(-1)[0] = float("nan")


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_and_unload_keeps_the_outputs(kind: str) -> None:
    batch = make_batches()[0]
    model = _model(kind)
    base = _logits(_model(kind, init_weights=True), batch)
    with_adapter = _logits(model, batch)
    assert not torch.allclose(with_adapter, base, atol=1e-6, rtol=1e-6)  # the adapter does something
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, (SAMLayer, MPOLayer, CaliSrLayer)) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, batch), with_adapter, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_a_broken_adapter_and_changes_nothing(kind: str) -> None:
    model = _model(kind)
    layer = next(m for m in _layers(model, kind) if getattr(m.get_base_layer(), "bias", None) is not None)
    if kind == "sam":
        assert layer.sam_values["default"].numel() > 0 and layer.sam_bias_values["default"].numel() > 0
    _break(layer, kind)
    base = layer.get_base_layer()
    before = {n: t.detach().clone() for n, t in base.named_parameters()}
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    for n, t in base.named_parameters():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameter_count(kind: str, capsys) -> None:
    model = _model(kind)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected > 0
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out
