"""FSDP-wrapped models (SPEC 1; PEFT's ``TestPeftFsdpStateDict``): the forward is unchanged by the wrap and
``get_peft_model_state_dict`` of the wrapped model loads into a fresh unwrapped one with the same outputs.

One process (gloo, world size 1); FSDP with ``use_orig_params=True`` swaps each weight for a plain-tensor view
during its forward, which is what broke CaliSr's ``functional_call`` before (W_extra was silently ignored).
"""

import platform

import pytest
import torch
import torch.distributed as dist
from conftest import MODEL_FACTORIES, make_batches
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_sam import CaliSrConfig, MPOConfig, SAMConfig

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux", reason="FSDP tests run on Linux only"),
    pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed"),
]

LORA_TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_fc"]}


def _config(kind: str, model_name: str, init_weights: bool):
    if kind == "sam":
        return SAMConfig(p=0.05, selection="random", init_weights=init_weights, task_type="SEQ_CLS")
    if kind == "mpo":
        return MPOConfig(init_weights=init_weights, task_type="SEQ_CLS")
    inner = {
        "calisr_lora": LoraConfig(r=2, target_modules=LORA_TARGETS[model_name]),
        "calisr_sam": SAMConfig(p=0.05, selection="random"),
        "calisr_mpo": MPOConfig(),
    }[kind]
    return CaliSrConfig(adapter=inner, init_weights=init_weights, task_type="SEQ_CLS")


def _build(kind: str, model_name: str, init_weights: bool):
    torch.manual_seed(0)
    return get_peft_model(MODEL_FACTORIES[model_name](0), _config(kind, model_name, init_weights)).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def process_group():
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "kind, model_name",
    [("sam", "bert"), ("mpo", "bert"), ("calisr_lora", "bert"), ("calisr_sam", "bert"), ("calisr_mpo", "bert"),
     ("sam", "gpt2"), ("calisr_lora", "gpt2")],
)  # fmt: skip
def test_fsdp_forward_and_state_dict_round_trip(process_group, kind: str, model_name: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    batch = make_batches()[0]
    model = _build(kind, model_name, init_weights=False)  # a random non-zero delta: the adapter changes outputs
    plain = _logits(model, batch)
    base = _logits(_build(kind, model_name, init_weights=True), batch)
    assert not torch.allclose(plain, base, atol=1e-7, rtol=0)

    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    torch.testing.assert_close(_logits(wrapped, batch), plain, atol=1e-6, rtol=1e-5)

    state = get_peft_model_state_dict(wrapped)
    fresh = _build(kind, model_name, init_weights=True)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(_logits(fresh, batch), plain, atol=1e-6, rtol=1e-5)


def test_fsdp_calisr_extra_gets_the_dense_gradient(process_group) -> None:
    """Under FSDP the W_extra gradient is the dense weight gradient of the unwrapped model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    batch = make_batches()[0]
    grads = []
    for wrap in (False, True):
        model = _build("calisr_lora", "bert", init_weights=False)
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        net = FSDP(model, use_orig_params=True, device_id=torch.device("cpu")) if wrap else model
        net(**batch).loss.backward()
        grads.append(layer.calisr_extra["default"].grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
