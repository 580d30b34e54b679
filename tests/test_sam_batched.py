"""The model-level SAM step (tuners/sam/batched.py): arenas for the refresh, one tap for the small tensors.

Gradients equal a dense reference, storage is shared only inside the adapter's lifetime (state dicts, safetensors,
unload and merge_and_unload see plain tensors), a stale graph is still caught, and the refresh is one write.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batches, tiny_bert
from peft import get_peft_model
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from peft_sam import SAMConfig, SAMLayer


def _model(seed: int = 0):
    model = get_peft_model(tiny_bert(seed), SAMConfig(p=0.1, selection="random", seed=3, task_type="SEQ_CLS"))
    return model.eval()  # dropout off: the dense reference below must see the same function


def _step(model, batch, lr: float = 1e-2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


def _sam_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SAMLayer)}


def _storages(model) -> set[int]:
    ptrs = set()
    for layer in _sam_layers(model).values():
        for tensor_name in layer.adapted_tensor_names():
            ptrs.add(layer.base_tensor(tensor_name).untyped_storage().data_ptr())
    return ptrs


def test_every_entry_gradient_equals_the_dense_gradient_at_the_entries():
    model = _model()
    batch = make_batches(seed=4)[0]
    _step(model, batch)  # the entries hold non-zero offsets now
    model(**batch).loss.backward()
    layers = _sam_layers(model)
    assert len(_storages(model)) == 1  # one arena holds every adapted tensor of this small model
    dense = copy.deepcopy(model).merge_and_unload()  # W0 + Delta (and the trained head) as plain parameters
    dense.requires_grad_(True)
    dense(**batch).loss.backward()  # full fine-tuning's gradient
    checked = {"weight": 0, "bias": 0, "norm": 0}
    for name, layer in layers.items():
        module = dense.get_submodule(name)
        for tensor_name in layer.adapted_tensor_names():
            found = layer.entries("default", tensor_name)
            if found is None or found[0].numel() == 0:
                continue
            idx, values = found
            expected = getattr(module, tensor_name).grad.reshape(-1)[idx]
            torch.testing.assert_close(values.grad, expected, rtol=1e-5, atol=1e-7)
            kind = "norm" if isinstance(module, torch.nn.LayerNorm) else tensor_name
            checked[kind] += 1
    assert all(checked.values()), checked  # weights, Linear biases and norms all went through the check


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_refresh_after_an_optimizer_step_is_one_write_for_the_whole_model():
    model = _model()
    batch = make_batches(seed=4)[0]
    _step(model, batch)
    model.train()
    with _Ops() as ops:
        model(**batch).loss.backward()
    adapted = sum(len(layer.adapted_tensor_names()) for layer in _sam_layers(model).values())
    assert adapted > 20
    assert ops.names.count("index_put_.default") == 1
    # the small tensors' entries: one gather for all of them, none per tensor
    assert ops.names.count("index_select.default") == 1


def _assert_no_shared_storage(state_dict: dict) -> None:
    seen: dict[int, str] = {}
    for name, tensor in state_dict.items():
        ptr = tensor.untyped_storage().data_ptr()
        assert ptr not in seen, f"{name} shares storage with {seen[ptr]}"
        seen[ptr] = name


def test_state_dicts_safetensors_and_unloading_never_see_shared_storage(tmp_path):
    model = _model()
    batch = make_batches(seed=4)[0]
    _step(model, batch)
    expected = model(**batch).logits.detach()
    assert len(_storages(model)) == 1
    _assert_no_shared_storage(model.state_dict())
    save_file(model.state_dict(), str(tmp_path / "live.safetensors"))  # what accelerate's save_state does
    with model.disable_adapter():  # W0 restored in place; the tensors stay in the arena
        _assert_no_shared_storage(model.state_dict())
        save_file(model.state_dict(), str(tmp_path / "disabled.safetensors"))
    merged = copy.deepcopy(model).merge_and_unload()
    _assert_no_shared_storage(merged.state_dict())
    save_file(merged.state_dict(), str(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-6)
    unloaded = model.unload()
    _assert_no_shared_storage(unloaded.state_dict())
    save_file(unloaded.state_dict(), str(tmp_path / "unloaded.safetensors"))
    for name, prm in tiny_bert(0).named_parameters():  # unload() gives W0 back bit for bit (the head trained)
        if not name.startswith("classifier."):
            assert torch.equal(unloaded.get_parameter(name), prm), name


def test_moving_or_copying_the_model_rebuilds_the_arena_and_keeps_training_exact():
    model = _model()
    batch = make_batches(seed=4)[0]
    _step(model, batch)
    twin = copy.deepcopy(model)
    assert _storages(twin) != _storages(model)  # the copy never shares the original's storage
    model.to(torch.float64).to(torch.float32)  # new storage for every tensor: the arena is rebuilt
    for m in (model, twin):
        _step(m, batch)
    torch.testing.assert_close(model(**batch).logits, twin(**batch).logits, rtol=0, atol=1e-6)
    assert len(_storages(model)) == 1 and len(_storages(twin)) == 1


def test_a_graph_made_stale_by_the_refresh_is_refused():
    model = _model()
    batch = make_batches(seed=4)[0]
    _step(model, batch)
    model.train()
    stale = model(**batch).loss
    with torch.no_grad():  # an optimizer step on the entries only (the head's saved weights stay valid)
        for name, p in model.named_parameters():
            if "sam_" in name:
                p.add_(0.1)
    model(**batch)  # refreshes W0 + Delta in place: every adapted tensor the stale graph saved has changed
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_entry_gradients(reentrant: bool):
    batch = make_batches(seed=4)[0]
    grads, calls = [], []
    for checkpointing in (False, True):
        model = _model()
        _step(model, batch)
        model.train()  # checkpointing runs in training mode only; dropout off so both runs see one function
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:  # recomputation runs after the forward: the layers tap their own tensors then
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        query = model.base_model.model.bert.encoder.layer[0].attention.self.query
        seen = []
        query.register_forward_hook(lambda *args, seen=seen: seen.append(1))
        model(**batch).loss.backward()
        calls.append(len(seen))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "sam_" in n and p.grad is not None})
    assert calls == [1, 2]  # the checkpointed layer ran again in backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_first_forward_under_inference_mode_leaves_plain_tensors_that_train():
    model = _model()
    batch = make_batches(seed=4)[0]
    with torch.inference_mode():  # e.g. a baseline evaluation before training
        model(**batch)
    assert not any(p.is_inference() for p in model.parameters())
    _step(model, batch)
    _step(model, batch)
    assert len(_storages(model)) == 1


def test_a_stale_graph_is_refused_when_the_arena_write_goes_through_another_tensor():
    model = _model()
    batch = make_batches(seed=4)[0]
    model(**batch)  # the arena holds every adapted tensor, the word embeddings first
    query = "bert.encoder.layer.0.attention.self.query"
    model.add_adapter("b", SAMConfig(p=0.1, selection="random", seed=5, target_modules=[query], task_type="SEQ_CLS"))
    model.set_adapter("b")
    model.train()
    model(**batch)
    layer = _sam_layers(model)[query]
    assert layer.in_arena("weight") and layer._sam_arena_of["weight"].params[0] is not layer.base_tensor("weight")
    stale = model(**batch).loss
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sam_" in name and name.endswith(".b"):
                p.add_(0.1)
    model(**batch)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_a_tied_output_embedding_shows_w0_in_state_dicts_as_a_plain_tensor():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    w0 = base.transformer.wte.weight.detach().clone()
    model = get_peft_model(base, SAMConfig(p=0.1, selection="random", seed=3, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 64, (2, 8))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model(input_ids=ids)  # W0 + Delta in the (shared) table now
    state = model.state_dict()
    keys = [k for k in state if k.endswith(("wte.base_layer.weight", "lm_head.base_layer.weight"))]
    assert len(keys) == 2
    for key in keys:
        assert torch.equal(state[key], w0), key
        assert state[key].untyped_storage().nbytes() == w0.numel() * w0.element_size(), key
