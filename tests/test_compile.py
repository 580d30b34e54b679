"""SAM, MPO and CaliSr(SAM) train under torch.compile (CPU inductor) with eager's losses; the SAM Linear compiles with
fullgraph."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_batches, tiny_bert
from peft import get_peft_model

from peft_sam import CaliSrConfig, MPOConfig, SAMConfig, SAMLayer

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")


def _config(kind: str):
    if kind == "sam":
        return SAMConfig(p=0.05, selection="magnitude", init_weights=False, task_type="SEQ_CLS")
    if kind == "calisr_sam":  # W_extra and the SAM entries overlap: compiled SAM must not drop W_extra there
        inner = SAMConfig(p=0.05, selection="magnitude", init_weights=False)
        return CaliSrConfig(adapter=inner, init_weights=False, task_type="SEQ_CLS")
    return MPOConfig(init_weights=False, task_type="SEQ_CLS")


def _losses(kind: str, compiled: bool) -> list[float]:
    model = get_peft_model(tiny_bert(0), _config(kind))
    model.eval()  # dropout off: eager and inductor draw different masks; gradients flow as in training
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    forward = torch.compile(model) if compiled else model
    losses = []
    for batch in make_batches(num=3, seed=1):
        loss = forward(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("kind", ["sam", "mpo", "calisr_sam"])
def test_compiled_training_matches_eager(kind: str) -> None:
    torch._dynamo.reset()
    eager, compiled = _losses(kind, False), _losses(kind, True)
    assert eager[0] != eager[-1]  # the adapter trains
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_sam_linear_compiles_with_fullgraph() -> None:
    torch._dynamo.reset()
    model = get_peft_model(tiny_bert(0), _config("sam"))
    layer = model.base_model.model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, SAMLayer)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()  # eager: the base weight now holds W0 + Delta
    eager_grad = layer.sam_values["default"].grad.clone()
    layer.sam_values["default"].grad = None
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close(layer.sam_values["default"].grad, eager_grad)
