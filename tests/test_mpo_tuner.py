"""MPO as a PEFT tuner: identity start, what trains, round trips, file contents, merge, overrides, adapters."""

import copy
import json
import math
import os

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_auto_loads, assert_two_adapters, logits, make_batches, tiny_bert, train
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sam import MPOConfig, MPOLayer
from peft_sam.tuners.mpo.decompose import central_index, mpo_contract, mpo_num_params, site_count


def _mpo_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MPOLayer)]


def _mpo(model_name="bert", seed=0, **cfg):
    return get_peft_model(MODEL_FACTORIES[model_name](seed), MPOConfig(task_type="SEQ_CLS", **cfg))


def _aux_count(layer, adapter="default"):
    """Entries of the auxiliary tensors of one layer: all local tensors minus the central one."""
    rows, cols, bonds = layer.mpo_shapes[adapter]
    c = central_index(len(rows))
    return mpo_num_params(rows, cols, bonds) - bonds[c] * rows[c] * cols[c] * bonds[c + 1]


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_identity_start_is_exact_and_disable_adapter_gives_base(model_name):
    batch = make_batches()[0]
    reference = logits(MODEL_FACTORIES[model_name](0), batch)
    model = _mpo(model_name)
    assert _mpo_layers(model)
    assert torch.equal(logits(model, batch), reference)
    perturbed = _mpo(model_name, init_weights=False)
    assert not torch.allclose(logits(perturbed, batch), reference, atol=1e-4)
    with perturbed.disable_adapter():
        assert torch.equal(logits(perturbed, batch), reference)


def test_untruncated_chain_is_exact_and_only_the_central_tensor_is_weight_sized():
    model = _mpo()
    for name, layer in _mpo_layers(model):
        w0 = layer.get_base_layer().weight
        torch.testing.assert_close(mpo_contract(layer.mpo_tensors("default", initial=True)), w0, atol=1e-5, rtol=0)
        big = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()]
               if not n.startswith("base_layer") and t.numel() >= w0.numel()]
        assert big == ["mpo_central.default"], (name, big)
        assert not layer.mpo_central.persistent


def test_decomposition_is_deterministic():
    a, b = _mpo(init_weights=False), _mpo(init_weights=False)
    for (_, la), (_, lb) in zip(_mpo_layers(a), _mpo_layers(b)):
        for k, t in la.mpo_aux["default"].items():
            assert torch.equal(t, lb.mpo_aux["default"][k])
        assert torch.equal(la.mpo_central["default"], lb.mpo_central["default"])


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_only_auxiliaries_and_head_train_and_counts_match_the_formula(model_name):
    model = _mpo(model_name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    aux = {n for n in trainable if ".mpo_aux.default." in n}
    head = {n for n in trainable if ".modules_to_save.default." in n}
    assert aux and head and trainable == aux | head
    expected = sum(_aux_count(m) for _, m in _mpo_layers(model))
    expected += sum(p.numel() for n, p in model.named_parameters() if n in head)
    assert model.get_nb_trainable_parameters()[0] == expected
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if n not in trainable}
    train(model, steps=2)
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())  # W0, A0 (and everything else) untouched
    assert any(not torch.equal(p, p0) for (_, m) in _mpo_layers(model)
               for p, p0 in zip(m.mpo_aux["default"].values(), m.mpo_init_aux["default"].values()))


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_save_load_round_trip_is_bit_identical_and_file_holds_no_weight_sized_tensor(tmp_path, model_name):
    model = _mpo(model_name)
    train(model)
    batch = make_batches(seed=5)[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODEL_FACTORIES[model_name](0), tmp_path).eval()
    assert torch.equal(logits(loaded, batch), expected)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("mpo_central" in k for k in tensors)
    sizes = {n.removeprefix("base_model.model."): m.get_base_layer().weight.numel() for n, m in _mpo_layers(model)}
    for key, tensor in tensors.items():
        if ".mpo_" in key:
            module = key.removeprefix("base_model.model.").split(".mpo_")[0]
            assert tensor.numel() < sizes[module], key
    aux = sum(_aux_count(m) for _, m in _mpo_layers(model))
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    factors = sum(8 * 2 * m.num_sites("default") for _, m in _mpo_layers(model))  # int64 [2, n] per layer
    payload = 4 * (2 * aux + head) + factors  # trained + initial auxiliaries and the head in float32, factors
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == payload
    assert payload <= os.path.getsize(tmp_path / "adapter_model.safetensors") <= payload + 150 * len(tensors) + 1000


def test_load_low_cpu_mem_usage_and_on_other_shapes(tmp_path):
    model = _mpo()
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    batch = make_batches(seed=5)[0]
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path, low_cpu_mem_usage=True).eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    other = tiny_bert(0).__class__(tiny_bert(0).config.__class__(**{**tiny_bert(0).config.to_dict(),
                                                                    "intermediate_size": 64}))
    with pytest.raises((ValueError, RuntimeError), match="factored as"):
        PeftModel.from_pretrained(other, tmp_path)


def test_auto_peft_model_and_transformers_load_adapter(tmp_path):
    assert_auto_loads(tmp_path, MPOConfig(task_type="SEQ_CLS"))


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_merge_equals_forward_and_unmerge_restores(model_name):
    model = _mpo(model_name)
    train(model)
    batch = make_batches(seed=3)[0]
    expected = logits(model, batch)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in theta0:
            torch.testing.assert_close(p, theta0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    assert not _mpo_layers(merged) and not any("mpo_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_factor_overrides_are_honoured_and_saved(tmp_path):
    overrides = {"attention.self.query": [[4, 8], [8, 4]], r"layer\.1\.intermediate\.dense": [[2, 2, 3, 4], None]}
    model = _mpo(factor_overrides=overrides)
    shapes = {n.removeprefix("base_model.model."): m.mpo_shapes["default"] for n, m in _mpo_layers(model)}
    for i in (0, 1):
        assert shapes[f"bert.encoder.layer.{i}.attention.self.query"][:2] == ((4, 8), (8, 4))
    rows, cols, _ = shapes["bert.encoder.layer.1.intermediate.dense"]
    assert rows == (2, 2, 3, 4) and len(cols) == 4 and math.prod(cols) == 32
    assert len(shapes["bert.encoder.layer.0.intermediate.dense"][0]) == 5  # not matched: default n
    train(model, steps=1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["factor_overrides"] == overrides and saved["peft_type"] == "MPO"
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    batch = make_batches()[0]
    assert torch.equal(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"attention.self.query": [[4, 4], [8, 4]]}, "multiply to 16.*attention.self.query|attention.self.query.*16"),
        ({"no_such_module": [[4, 8], [8, 4]]}, "match no adapted"),
        ({"query": [[4, 8], [2, 4, 4]]}, "differ in length"),
        ({"query": [[4, 8]]}, "pair"),
        ({"query": [[4, 0], [8, 4]]}, "positive integers"),
        ({"query": [None, None]}, "overrides nothing"),
        ({"query(": [[4, 8], [8, 4]]}, "not a valid regex"),
    ],
)
def test_bad_factor_overrides_raise_clear_errors(overrides, match):
    base = tiny_bert(0)
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, MPOConfig(task_type="SEQ_CLS", factor_overrides=overrides))
    assert [n for n, _ in base.named_modules()] == before  # nothing was injected


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="num_factors"):
        MPOConfig(num_factors=1)
    with pytest.raises(ValueError, match="max_bond"):
        MPOConfig(max_bond=0)


def test_truncation_and_zero_or_rank_deficient_weights_give_no_nan():
    base = tiny_bert(0)
    with torch.no_grad():
        base.bert.encoder.layer[0].attention.self.query.weight.zero_()
        value = base.bert.encoder.layer[0].attention.self.value.weight
        value.copy_(torch.outer(torch.randn(32), torch.randn(32)))  # rank 1
    batch = make_batches()[0]
    reference = logits(base, batch)
    for max_bond in (None, 3):
        model = get_peft_model(copy.deepcopy(base), MPOConfig(task_type="SEQ_CLS", max_bond=max_bond))
        for _, layer in _mpo_layers(model):
            bonds = layer.mpo_shapes["default"][2]
            assert max_bond is None or max(bonds) <= max_bond
            assert all(torch.isfinite(t).all() for t in layer.mpo_tensors("default"))
        assert torch.equal(logits(model, batch), reference)
        train(model, steps=2)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert torch.isfinite(logits(model, batch)).all()


def test_truncated_adapter_is_smaller_and_round_trips(tmp_path):
    full, truncated = _mpo(), _mpo(max_bond=4)
    assert truncated.get_nb_trainable_parameters()[0] < full.get_nb_trainable_parameters()[0]
    train(truncated, steps=2)
    truncated.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    batch = make_batches()[0]
    assert torch.equal(logits(loaded, batch), logits(truncated, batch))


def test_several_adapters_set_and_delete():
    model = get_peft_model(tiny_bert(0), MPOConfig(init_weights=False))  # no head: two can be active at once
    model.add_adapter("other", MPOConfig(num_factors=3, init_weights=False, seed=1))
    for _, m in _mpo_layers(model):  # 5 sites (3 for "other"), fewer on the 2 x 32 classifier (site_count)
        out, inp = m.get_base_layer().weight.shape
        assert m.num_sites("other") == site_count(out, inp, 3) and m.num_sites("default") == site_count(out, inp, 5)
    assert {m.num_sites("default") for _, m in _mpo_layers(model)} == {5, 3}
    assert_two_adapters(model, make_batches()[0])
    for _, m in _mpo_layers(model):  # nothing of "default" is left in the layers
        assert all("default" not in getattr(m, a) for a in m.adapter_layer_names + m.other_param_names)
        assert "default" not in m.mpo_shapes


def test_train_central_trains_and_saves_the_central_offset(tmp_path):
    model = _mpo(train_central=True)
    batch = make_batches()[0]
    assert torch.equal(logits(model, batch), logits(tiny_bert(0), batch))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".mpo_central_delta.default" in n for n in trainable)
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith(".mpo_central_delta") for k in keys) and not any(".mpo_central." in k for k in keys)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    model = get_peft_model(tiny_bert(0).to(dtype), MPOConfig(init_weights=False, task_type="SEQ_CLS"))
    layer = _mpo_layers(model)[0][1]
    assert layer.mpo_aux["default"]["0"].dtype == torch.float32  # PEFT's autocast of adapter weights
    out = logits(model, make_batches()[0])
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_delta_converts_to_lora():
    from conftest import tiny_gpt2
    from peft import convert_to_lora, set_peft_model_state_dict

    batch = make_batches()[0]
    # PEFT's converter copies target_modules and needs them explicit (a set or "all-linear"), not None
    config = MPOConfig(init_weights=False, task_type="SEQ_CLS", target_modules="all-linear")
    model = get_peft_model(tiny_gpt2(0), config)  # Conv1D layers
    lora_config, lora_state = convert_to_lora(model, rank=32)  # full rank for these 32-wide layers: exact
    lora = get_peft_model(tiny_gpt2(0), lora_config)  # untrained heads: both equal the base head
    set_peft_model_state_dict(lora, lora_state)
    torch.testing.assert_close(logits(lora, batch), logits(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "num_factors", "max_bond"), [((48, 32), 5, None), ((32, 96), 3, 5), ((12, 20), 2, None)]
)
def test_forward_contraction_matches_mpo_contract(shape, num_factors, max_bond):
    from peft_sam.tuners.mpo.decompose import mpo_decompose, mpo_shapes
    from peft_sam.tuners.mpo.layer import contract_interleaved

    weight = torch.randn(*shape, dtype=torch.float64)
    rows, cols = mpo_shapes(*shape, num_factors)
    tensors = mpo_decompose(weight, rows, cols, max_bond=max_bond)
    flat = contract_interleaved(tensors, central_index(len(rows)))
    n = len(rows)
    matrix = flat.view([f for p in zip(rows, cols) for f in p]).permute([*range(0, 2 * n, 2), *range(1, 2 * n, 2)])
    torch.testing.assert_close(matrix.reshape(shape), mpo_contract(tensors), atol=1e-12, rtol=0)


def test_mpo_trains_on_peft_toy_mlp_where_lora_does():
    """PEFT's generic tests train a 10 -> 20 Linear with SGD at lr 0.5 for three steps on arange inputs: five 1-2 entry
    sites (some scalars) multiplied their updates to inf there; small weights now get fewer, larger sites."""
    from peft import LoraConfig

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)

        def forward(self, x):
            return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)

    x = torch.arange(90, dtype=torch.float32).view(9, 10)
    for config in (LoraConfig(target_modules=["lin0"]), MPOConfig(target_modules=["lin0"])):
        torch.manual_seed(0)
        model = get_peft_model(MLP(), config)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), type(config).__name__
        assert torch.isfinite(model(x)).all(), type(config).__name__
