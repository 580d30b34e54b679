"""A training step under bf16 autocast, in a bf16 model, and under fp16 autocast + GradScaler (clipping before the
step), for SAM, MPO and CaliSr(LoRA) on BERT and Llama: finite loss, the adapter's tensors move, nothing else does;
models loaded in bf16 / fp16 (``torch_dtype``) train, save, load and merge."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, make_batches, tiny_bert
from peft import LoraConfig, get_peft_model

from peft_sam import CaliSrConfig, MPOConfig, SAMConfig


def _config(kind: str, model_name: str = "bert"):
    if kind == "sam":
        return SAMConfig(p=0.05, selection="magnitude", task_type="SEQ_CLS")
    if kind == "mpo":
        return MPOConfig(task_type="SEQ_CLS")
    targets = ["q_proj", "v_proj"] if model_name == "llama" else ["query", "value"]
    return CaliSrConfig(adapter=LoraConfig(r=2, target_modules=targets), task_type="SEQ_CLS")


@pytest.mark.parametrize("mode", ["bf16_autocast", "bf16_model", "fp16_autocast_scaler"])
@pytest.mark.parametrize("kind", ["sam", "mpo", "calisr"])
@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_a_mixed_precision_training_step(model_name: str, kind: str, mode: str) -> None:
    model = get_peft_model(MODEL_FACTORIES[model_name](0), _config(kind, model_name))
    if mode == "bf16_model":
        model = model.to(torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.state_dict().items() if n not in trainable}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = make_batches(seed=5)[0]
    if mode == "fp16_autocast_scaler":
        scaler = torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert sum(not torch.equal(a, p.detach()) for a, p in zip(before, params)) > 0.5 * len(params)
    after = model.state_dict()
    for name, value in frozen.items():  # frozen tensors (as state dicts show them) are untouched
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("kind", ["sam", "mpo"])
def test_fp32_adapter_on_a_bf16_model_trains_saves_and_merges(kind: str, tmp_path) -> None:
    import copy

    from peft import PeftModel

    model = get_peft_model(tiny_bert(0).to(torch.bfloat16), _config(kind), autocast_adapter_dtype=True)
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and kind + "_" in n]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)  # PEFT's autocast_adapter_dtype
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batches(seed=5)[0]
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(0).to(torch.bfloat16), tmp_path).eval()
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=2e-2, rtol=0)  # bf16 rounding of W0 + Δ


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sam", "mpo", "calisr"])
def test_a_model_loaded_in_half_precision_trains_saves_loads_and_merges(kind: str, dtype, tmp_path) -> None:
    """``from_pretrained(..., torch_dtype=...)``: the tuners take the base's dtype (PEFT keeps fp32 adapters with
    ``autocast_adapter_dtype``), train a step, save -> load gives the same logits, merge_and_unload is close."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tiny_bert(0).save_pretrained(tmp_path / "base")
    load = dict(torch_dtype=dtype, num_labels=2)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", **load), _config(kind))
    assert model.get_base_model().bert.embeddings.word_embeddings.weight.dtype == dtype
    model.train()
    # SGD: AdamW's eps (1e-8) underflows in an fp16 head (PEFT keeps modules_to_save in the model's dtype)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    batch = make_batches(seed=5)[0]
    model(**batch).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", **load)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        torch.testing.assert_close(merged(**batch).logits.float(), expected.float(), atol=5e-2, rtol=0)
