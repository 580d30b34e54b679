"""SAM as a PEFT tuner: round trips, frozen entries, merge/unmerge, several adapters, model families."""

import copy
import os

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_auto_loads, assert_two_adapters, logits, make_batches, tiny_bert, train
from peft import PeftModel, get_peft_model

import peft_sam
from peft_sam import SAMConfig, SAMLayer
from peft_sam.tuners.sam.mask_functions import find_candidates


def _sam_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SAMLayer)]


def _calibrated(model_name="bert", p=0.05, seed=0, **cfg_kwargs):
    base = MODEL_FACTORIES[model_name](seed)
    model = get_peft_model(base, SAMConfig(p=p, task_type="SEQ_CLS", **cfg_kwargs))
    if model.peft_config["default"].needs_calibration:
        peft_sam.select_parameters(model, make_batches(), num_batches=3, show_progress=False)
    return model


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_frozen_entries_never_move(model_name):
    model = _calibrated(model_name)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    train(model, steps=5)
    moved_total = 0
    for name, layer in _sam_layers(model):
        for tensor_name in ("weight", "bias"):
            found = layer.entries("default", tensor_name)
            if found is None:
                continue
            idx, vals = found
            key = f"{name}.base_layer.{tensor_name}"
            layer.refresh_base()  # the last optimizer step came after the last forward
            # the base tensor holds W0 + Delta between forwards; W0 itself is kept exactly
            assert torch.equal(layer.pristine_tensor(tensor_name), theta0[key]), f"W0 of {key} was lost"
            live = layer.base_tensor(tensor_name).detach().reshape(-1)
            changed = torch.nonzero(live != theta0[key].view(-1)).view(-1)
            assert set(changed.tolist()) <= set(idx.tolist()), f"{key}: a non-selected entry moved"
            expected = theta0[key].view(-1)[idx] + vals.detach()
            torch.testing.assert_close(live[idx], expected, rtol=0, atol=0)
            moved_total += changed.numel()
    layer_states = model.state_dict()
    for key, value in theta0.items():  # state dicts show W0, and restore_base gives it back bit for bit
        assert torch.equal(layer_states[key], value), key
    for _, layer in _sam_layers(model):
        layer.restore_base()
    for name, prm in model.named_parameters():
        if name in theta0:
            assert torch.equal(prm, theta0[name]), name
    assert moved_total > 0.9 * sum(m.num_entries("default") for _, m in _sam_layers(model))


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_save_load_round_trip_is_bit_identical(tmp_path, model_name):
    model = _calibrated(model_name)
    train(model, steps=3)
    batch = make_batches(seed=5)[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODEL_FACTORIES[model_name](0), tmp_path).eval()
    assert torch.equal(logits(loaded, batch), expected)
    # file size: ~8 bytes per trained entry (int32 index + float32 value) plus the task head and the header
    n_entries = sum(m.num_entries("default") for _, m in _sam_layers(model))
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    payload = 8 * n_entries + 4 * head
    assert payload <= size <= payload + 30_000


def test_loading_takes_indices_from_the_file_even_on_a_perturbed_base(tmp_path):
    model = _calibrated(selection="magnitude")
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    saved = {
        n: (m.sam_indices["default"].clone(), m.sam_values["default"].detach().clone())
        for n, m in _sam_layers(model)
    }

    def perturbed_base():
        base = tiny_bert(0)
        with torch.no_grad():
            for p in base.bert.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return base

    # the perturbed base would choose other entries by itself ...
    own_choice = get_peft_model(
        perturbed_base(), SAMConfig(p=0.05, selection="magnitude", task_type="SEQ_CLS")
    )
    assert any(not torch.equal(m.sam_indices["default"], saved[n][0]) for n, m in _sam_layers(own_choice))
    # ... but loading restores exactly the saved entries and values
    loaded = PeftModel.from_pretrained(perturbed_base(), tmp_path)
    for name, layer in _sam_layers(loaded):
        assert torch.equal(layer.sam_indices["default"], saved[name][0])
        assert torch.equal(layer.sam_values["default"], saved[name][1])
    assert not any(m.is_pending("default") for _, m in _sam_layers(loaded))


def test_auto_peft_model_and_transformers_load_adapter(tmp_path):
    def calibrate(model):
        peft_sam.select_parameters(model, make_batches(), num_batches=2, show_progress=False)

    assert_auto_loads(tmp_path, SAMConfig(p=0.05, task_type="SEQ_CLS"), calibrate)


def test_transformers_load_adapter_with_a_layer_without_entries_trains(tmp_path):
    """A layer whose tensors got no entries at all (their gradient was zero) has nothing in the file, so transformers'
    load_adapter leaves its placeholders as they were; the other layers' entries show a selection happened, so the
    loaded model trains and evaluates without a 'not calibrated' error or warning."""
    import warnings

    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, task_type="SEQ_CLS"))
    peft_sam.select_parameters(model, make_batches(), num_batches=2, show_progress=False)
    empty = dict(_sam_layers(model))["base_model.model.bert.encoder.layer.0.attention.self.key"]
    for tensor_name in ("weight", "bias"):
        empty.set_entries("default", tensor_name, torch.empty(0, dtype=torch.long))
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    batch = make_batches(seed=3)[0]
    hf = tiny_bert(0)
    hf.load_adapter(str(tmp_path), is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch.testing.assert_close(logits(hf, batch), logits(model, batch), atol=1e-6, rtol=0)
        hf.train()
        hf(**batch).loss.backward()  # trains: no SAMNotCalibratedError
    layer = dict(hf.named_modules())["bert.encoder.layer.0.attention.self.key"]
    assert not layer.is_pending("default") and "default" not in layer.sam_indices  # no entries, not pending


def test_bare_injection_brings_shared_tensors_up_to_date_before_the_forward():
    """A table used through a second, unwrapped module (T5's embeddings on transformers 4.57) is read before its SAM
    layer runs: the model's own forward brings the base tensors up to date first, for a PeftModel without task type
    (whose forward is the base model's) and for an injection without PeftModel (transformers' load_adapter,
    peft.inject_adapter_in_model) alike; unloading removes that hook."""
    from peft import inject_adapter_in_model

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(10, 4)
            self.alias = self.table  # the same module under a second name: wrapped under the first only
            self.head = torch.nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.alias(ids)) + 0 * self.table(ids).sum()

    config = SAMConfig(p=0.5, selection="random", target_modules=["table"], init_weights=False)
    ids = torch.tensor([[1, 2, 3]])
    reference = get_peft_model(Shared(), copy.deepcopy(config))
    bare = inject_adapter_in_model(copy.deepcopy(config), Shared())
    assert isinstance(bare.table, SAMLayer) and not isinstance(bare.alias, SAMLayer)
    with torch.no_grad():
        expected = reference(ids)  # the first forward already sees W0 + Delta
        assert not torch.equal(expected, Shared()(ids))
        assert torch.equal(bare(ids), expected)
        assert torch.equal(reference(ids), expected)
        merged = reference.merge_and_unload()
        assert not merged._forward_pre_hooks and torch.equal(merged(ids), expected)


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_merge_equals_forward_and_unmerge_restores_exactly(model_name):
    model = _calibrated(model_name)
    train(model, steps=3)
    batch = make_batches(seed=3)[0]
    expected = logits(model, batch)
    # W0 as state dicts report it (the base tensors hold W0 + Delta between forwards of an active adapter)
    theta0 = {n: p.clone() for n, p in model.state_dict().items() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in theta0:
            assert torch.equal(p, theta0[n]), n
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SAMLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_disable_adapter_gives_base_outputs_and_init_weights_false_changes_outputs():
    base = tiny_bert(0)
    batch = make_batches()[0]
    reference = logits(base, batch)
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="random", init_weights=False))
    assert not torch.allclose(logits(model, batch), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)
    identity = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="random"))
    assert torch.equal(logits(identity, batch), reference)


def test_several_adapters_set_and_delete():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="random", seed=1, init_weights=False))
    model.add_adapter("other", SAMConfig(p=0.05, selection="magnitude", init_weights=False))
    assert_two_adapters(model, make_batches()[0])
    assert all("default" not in m.sam_values for _, m in _sam_layers(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    model = get_peft_model(
        tiny_bert(0).to(dtype), SAMConfig(p=0.05, selection="magnitude", init_weights=False)
    )
    out = logits(model, make_batches()[0])
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_trainable_parameter_count_and_head_is_modules_to_save():
    model = _calibrated()
    entries = sum(m.num_entries("default") for _, m in _sam_layers(model))
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == entries + head
    assert head == 32 * 2 + 2  # classifier Linear(32, 2)
    names = {c.name for c in find_candidates(model, "default")}
    assert not any(n.startswith("classifier") for n in names)
    assert "bert.embeddings.word_embeddings" in names and "bert.embeddings.LayerNorm" in names


def test_save_dtype_bf16_halves_value_bytes(tmp_path):
    model = _calibrated(save_dtype="bfloat16")
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    values = [v for k, v in tensors.items() if "sam_values" in k]
    assert values and all(v.dtype == torch.bfloat16 for v in values)
    assert all(v.dtype == torch.int32 for k, v in tensors.items() if "sam_indices" in k)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    for (_, a), (_, b) in zip(_sam_layers(model), _sam_layers(loaded)):
        torch.testing.assert_close(
            a.sam_values["default"].to(torch.bfloat16).float(), b.sam_values["default"]
        )


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_gradients_of_every_layer_kind_equal_a_dense_reference(model_name):
    # Linear/Conv1D, Embedding and norm layers: d loss / d sam_values == (d loss / d W at W0 + Delta)[indices]
    model = _calibrated(model_name, init_weights=False).eval()  # eval: no dropout, identical forwards
    batch = make_batches(seed=4)[0]
    model(**batch).loss.backward()
    reference = _calibrated(model_name, init_weights=False).merge_and_unload().eval()
    for prm in reference.parameters():
        prm.requires_grad_(True)
    reference(**batch).loss.backward()
    dense = dict(reference.named_parameters())
    kinds = set()
    for name, layer in _sam_layers(model):
        for tensor_name in ("weight", "bias"):
            entries = layer.entries("default", tensor_name)
            if entries is None or not entries[0].numel():
                continue
            idx, values = entries
            ref = dense[f"{name.removeprefix('base_model.model.')}.{tensor_name}"].grad.reshape(-1)[idx]
            torch.testing.assert_close(values.grad, ref, atol=1e-6, rtol=1e-4, msg=f"{name}.{tensor_name}")
            kinds.add(type(layer).__name__)
    assert {"Linear", "Embedding", "Functional"} <= kinds


def test_new_indices_take_effect_after_the_index_cache_was_built():
    # the layers cache index structures per mask; set_entries (a new selection or a load) must invalidate them
    model = _calibrated("bert", init_weights=False).eval()
    batch = make_batches(seed=5)[0]
    logits(model, batch)  # builds the caches
    gen = torch.Generator().manual_seed(0)
    for _, layer in _sam_layers(model):
        for tensor_name in ("weight", "bias"):
            entries = layer.entries("default", tensor_name)
            if entries is None or not entries[0].numel():
                continue
            numel = layer.base_tensor(tensor_name).numel()
            new = torch.randperm(numel, generator=gen)[: entries[0].numel()].sort().values
            layer.set_entries("default", tensor_name, new, values=torch.randn(new.numel(), generator=gen))
    after = logits(model, batch)
    merged = copy.deepcopy(model).merge_and_unload()  # merging reads the buffers directly, not the caches
    torch.testing.assert_close(after, logits(merged, batch), atol=1e-5, rtol=0)
