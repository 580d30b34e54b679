"""SAM keeps W0 + Delta in the base tensors between forwards: every way back to W0 is exact, and switching is cheap."""

import copy

import torch
from conftest import make_batches, tiny_bert
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import peft_sam
from peft_sam import SAMConfig, SAMLayer


def _trained(seed: int = 0, **config):
    model = get_peft_model(tiny_bert(seed), SAMConfig(p=0.05, task_type="SEQ_CLS", **config))
    if model.peft_config["default"].needs_calibration:
        peft_sam.select_parameters(model, make_batches(), num_batches=2, show_progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in make_batches(num=3, seed=1):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _layers(model):
    return [m for m in model.modules() if isinstance(m, SAMLayer)]


def test_the_base_holds_w0_plus_delta_and_only_at_the_entries():
    model = _trained()
    batch = make_batches(seed=2)[0]
    _logits(model, batch)  # the forward brought every base tensor up to date
    w0 = tiny_bert(0).state_dict()
    for name, layer in model.named_modules():
        if not isinstance(layer, SAMLayer):
            continue
        key = name.removeprefix("base_model.model.")
        for tensor_name in layer.adapted_tensor_names():
            expected = w0[f"{key}.{tensor_name}"].clone().reshape(-1)
            found = layer.entries("default", tensor_name)
            if found is not None:
                expected[found[0]] += found[1].detach()
            assert torch.equal(layer.base_tensor(tensor_name).detach().reshape(-1), expected), (key, tensor_name)
    assert all(layer.is_live() for layer in _layers(model))


def test_disable_adapter_is_the_base_model_bit_for_bit_and_enabling_again_restores_the_adapter():
    model = _trained()
    batch = make_batches(seed=2)[0]
    adapted = _logits(model, batch)
    with model.disable_adapter():
        disabled = _logits(model, batch)
        for name, prm in tiny_bert(0).named_parameters():
            assert torch.equal(model.base_model.model.get_parameter(_wrapped(model, name)), prm), name
    assert torch.equal(disabled, _logits(tiny_bert(0), batch))
    assert torch.equal(_logits(model, batch), adapted)


def _wrapped(model, name: str) -> str:
    """Parameter name inside the PEFT-wrapped model (SAM layers insert ``base_layer``)."""
    module, _, tensor = name.rpartition(".")
    target = model.base_model.model.get_submodule(module)
    return f"{module}.base_layer.{tensor}" if isinstance(target, SAMLayer) else name


def test_state_dict_load_state_dict_and_deepcopy_keep_outputs_and_w0():
    model = _trained()
    batch = make_batches(seed=2)[0]
    expected = _logits(model, batch)
    state = model.state_dict()
    checked = 0
    for name, value in tiny_bert(0).state_dict().items():
        key = f"base_model.model.{_wrapped(model, name)}"
        if ".base_layer." in key:
            assert torch.equal(state[key], value), name  # saved base tensors are W0, never W0 + Delta
            checked += 1
    assert checked > 10
    model.load_state_dict(state)  # loading into live layers starts from W0 again
    assert torch.equal(_logits(model, batch), expected)
    assert torch.equal(_logits(copy.deepcopy(model), batch), expected)


def test_two_adapters_on_one_layer_with_overlapping_entries_add_up_and_switch_exactly():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.3, selection="random", init_weights=False, seed=1,
                                                   task_type="SEQ_CLS"))  # fmt: skip
    model.add_adapter("b", SAMConfig(p=0.3, selection="random", init_weights=False, seed=2, task_type="SEQ_CLS"))
    model.eval()
    batch = make_batches(seed=2)[0]
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    ia, ib = layer.entries("default", "weight")[0], layer.entries("b", "weight")[0]
    assert len(set(ia.tolist()) & set(ib.tolist())) > 0  # the two masks overlap
    outputs = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        outputs[name] = _logits(model, batch)
    for sam_layer in _layers(model):
        sam_layer.set_adapter(["default", "b"])
    both = _logits(model, batch)
    w0 = tiny_bert(0).bert.encoder.layer[0].attention.self.query.weight.detach().reshape(-1)
    expected = w0.clone()
    for name in ("default", "b"):
        idx, values = layer.entries(name, "weight")
        expected.index_add_(0, idx, values.detach())
    torch.testing.assert_close(layer.base_tensor("weight").detach().reshape(-1), expected, rtol=0, atol=1e-7)
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["default", "b"])  # = the forward with both
    torch.testing.assert_close(_logits(merged, batch), both, atol=1e-6, rtol=0)
    for name in ("default", "b", "default"):
        model.set_adapter(name)
        assert torch.equal(_logits(model, batch), outputs[name]), name
    model.delete_adapter("b")
    assert torch.equal(_logits(model, batch), outputs["default"])
    model.delete_adapter("default")
    for name, prm in tiny_bert(0).named_parameters():  # nothing left: W0 bit for bit
        assert torch.equal(model.base_model.model.get_parameter(_wrapped(model, name)), prm), name


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(func.__name__)
        if not func.is_view and not func.__name__.split(".")[0].endswith("_"):
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.largest = max([self.largest] + [t.numel() for t in outs if isinstance(t, torch.Tensor)])
        return out


def test_switching_adapters_touches_the_entries_only():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.01, selection="magnitude", task_type="SEQ_CLS"))
    model.add_adapter("b", SAMConfig(p=0.01, selection="random", task_type="SEQ_CLS"))
    batch = make_batches(seed=2)[0]
    for name in ("b", "default"):
        model.set_adapter(name)
        _logits(model, batch)
    layers = _layers(model)
    with _Ops() as ops:
        model.set_adapter("b")
        for layer in layers:
            layer.refresh_base()
    largest_entries = max(e[0].numel() for layer in layers if (e := layer.entries("b", "weight")) is not None)
    assert 0 < ops.largest <= largest_entries  # no copy of a weight, only entry-sized tensors
    assert "clone.default" not in ops.names and "copy_.default" not in ops.names
    assert len(ops.names) <= 8 * sum(len(layer.adapted_tensor_names()) for layer in layers)


def test_a_training_step_adds_no_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "is_nonzero", "equal"}

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in syncing:
                self.found.append(func.__name__)
            return func(*args, **(kwargs or {}))

    found = {}
    for kind in ("full", "sam"):
        torch.manual_seed(0)
        model = tiny_bert(0) if kind == "full" else _trained()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)  # step counters: the same .item()s for both
        model.train()
        batch = make_batches(seed=3)[0]
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        with Syncs() as syncs:  # after an optimizer step: this forward refreshes the base tensors
            model(**batch).loss.backward()
        found[kind] = sorted(syncs.found)  # (AdamW's own .item()s on its CPU step counters are not counted)
    assert found["sam"] == found["full"]


def test_bf16_autocast_and_a_bf16_model_train_with_the_sampled_gradients():
    batch = make_batches(seed=4)[0]
    grads = {}
    for mode in ("fp32", "autocast", "bf16"):
        model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="magnitude", init_weights=False,
                                                       task_type="SEQ_CLS"))  # fmt: skip
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        model.eval()
        layer = model.base_model.model.bert.encoder.layer[1].intermediate.dense
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            model(**batch).loss.backward()
        grads[mode] = layer.sam_values["default"].grad.float()
        assert layer.sam_values["default"].grad.dtype == layer.sam_values["default"].dtype
        assert torch.isfinite(grads[mode]).all() and grads[mode].abs().sum() > 0
    for mode in ("autocast", "bf16"):  # bfloat16 keeps ~3 digits
        cosine = torch.nn.functional.cosine_similarity(grads[mode], grads["fp32"], dim=0)
        assert cosine > 0.98, (mode, float(cosine))


def test_creating_a_default_sam_model_prints_no_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_bert(0), SAMConfig(task_type="SEQ_CLS"))  # norm layers and embeddings included
    assert not [str(w.message) for w in caught if "Unsupported layer type" in str(w.message)]


def test_tied_input_and_output_embeddings_have_one_delta_with_the_gradient_of_both_uses(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    assert base.lm_head.weight is base.transformer.wte.weight
    model = get_peft_model(base, SAMConfig(p=0.1, selection="random", init_weights=False, task_type="CAUSAL_LM"))
    wte = model.base_model.model.transformer.wte
    head = model.base_model.model.lm_head
    assert wte.entries("default", "weight") is not None and head.entries("default", "weight") is None  # one delta
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model(input_ids=ids, labels=ids).loss.backward()  # the entries' gradient: both uses of the tied tensor
    got = wte.sam_values["default"].grad.clone()
    reference = copy.deepcopy(model).merge_and_unload()
    for prm in reference.parameters():
        prm.requires_grad_(True)
    reference(input_ids=ids, labels=ids).loss.backward()
    idx = wte.entries("default", "weight")[0]
    torch.testing.assert_close(got, reference.transformer.wte.weight.grad.reshape(-1)[idx], atol=1e-6, rtol=1e-4)
    first = _logits_lm(model, ids)
    assert torch.equal(first, _logits_lm(model, ids))
    torch.testing.assert_close(_logits_lm(reference, ids), first, atol=1e-5, rtol=0)  # merging is exact
    with model.disable_adapter():
        torch.testing.assert_close(_logits_lm(model, ids), _logits_lm(_plain_gpt2(config), ids), atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_plain_gpt2(config), tmp_path).eval()
    assert torch.equal(_logits_lm(loaded, ids), first)


def _logits_lm(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _plain_gpt2(config):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()
