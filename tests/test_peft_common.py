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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(kind: str, dtype: torch.dtype) -> None:
    batch = make_batches()[0]
    model = _model(kind)
    reference = _logits(model, batch)
    half = _logits(model.to(dtype), batch)
    assert half.dtype == dtype and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=0.05, rtol=0.05)


def _second_config(kind: str):
    if kind == "sam":
        return SAMConfig(p=0.05, selection="random", init_weights=False, seed=1)
    if kind == "mpo":
        return MPOConfig(num_factors=3, init_weights=False, seed=1)
    if kind == "calisr_lora":
        inner = LoraConfig(r=2, target_modules=["query", "value"])
    else:
        inner = SAMConfig(p=0.05, selection="random", seed=1)
    return CaliSrConfig(adapter=inner, init_weights=False, seed=1)


@pytest.mark.parametrize("kind", KINDS)
def test_two_active_adapters_add_up(kind: str) -> None:
    """With two adapters active a layer computes x (W0 + delta_1 + delta_2)^T + b: each delta counts once."""
    model = _model(kind)
    model.add_adapter("other", _second_config(kind))
    layer = _layers(model, kind)[0]
    torch.manual_seed(1)
    x = torch.randn(3, layer.get_base_layer().weight.shape[1])
    if isinstance(layer.get_base_layer(), torch.nn.Embedding):
        x = torch.randint(0, layer.get_base_layer().num_embeddings, (3, 5))

    def out(adapters):
        layer.set_adapter(adapters)
        with torch.no_grad():
            return layer(x)

    with torch.no_grad():
        base = layer.get_base_layer()(x)
    one, two, both = out(["default"]), out(["other"]), out(["default", "other"])
    assert not torch.allclose(one, base) and not torch.allclose(two, base)
    torch.testing.assert_close(both - base, (one - base) + (two - base), atol=1e-5, rtol=1e-4)
