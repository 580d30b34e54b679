"""Bad input gets a clear error, and nothing already saved is overwritten or corrupted. Registration is idempotent."""

import importlib
import math

import pytest
import torch
from conftest import make_batches, tiny_bert
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import peft_sam
from peft_sam import SAMConfig, SAMNotCalibratedError


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, math.nan])
def test_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        SAMConfig(p=p)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"selection": "best"}, "selection must be one of"),
        ({"scope": "layer"}, "scope must be one of"),
        ({"save_dtype": "int8"}, "save_dtype must be one of"),
        ({"num_calibration_batches": 0}, "num_calibration_batches"),
        ({"selection": "bitfit", "include_bias": False}, "include_bias=True"),
    ],
)
def test_bad_config_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAMConfig(**kwargs)


def test_p_so_small_that_nothing_is_chosen():
    with pytest.raises(ValueError, match="selects no entry at all"):
        get_peft_model(tiny_bert(0), SAMConfig(p=1e-6, selection="magnitude"))
    model = get_peft_model(tiny_bert(0), SAMConfig(p=1e-6, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="selects no entry at all"):
        peft_sam.select_parameters(model, make_batches(), show_progress=False)


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_bert(0), SAMConfig(target_modules=["no_such_module"], selection="random"))


def test_unsupported_target_module_type():
    with pytest.raises(TypeError, match="SAM cannot adapt module"):
        get_peft_model(tiny_bert(0), SAMConfig(target_modules=["attention"], selection="random"))


def test_training_before_selection():
    from peft_sam.tuners.sam.layer import _warn_pending_once

    _warn_pending_once.cache_clear()  # the warning is given once per process: earlier tests may have seen it
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, task_type="SEQ_CLS"))
    model.train()
    with pytest.raises(SAMNotCalibratedError, match="select_parameters"):
        model(**make_batches()[0])
    model.eval()
    with pytest.warns(UserWarning, match="no selected entries"), torch.no_grad():
        model(**make_batches()[0])  # inference before selection is allowed: base outputs, with a warning


def test_saving_before_selection_writes_nothing_and_keeps_an_existing_adapter(tmp_path):
    good = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="magnitude", task_type="SEQ_CLS"))
    good.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, task_type="SEQ_CLS"))
    with pytest.raises(SAMNotCalibratedError, match="Nothing was written"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_failed_write_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="magnitude", task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("peft_sam.io.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"), peft_sam.atomic_adapter_writes():
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_importing_peft_sam_patches_nothing_and_the_atomic_block_restores_peft():
    import peft.peft_model
    import safetensors.torch

    assert peft.peft_model.safe_save_file is safetensors.torch.save_file  # peft_sam is imported by now
    with peft_sam.atomic_adapter_writes():
        assert peft.peft_model.safe_save_file is peft_sam.atomic_save_file
    assert peft.peft_model.safe_save_file is safetensors.torch.save_file


def test_adapter_loaded_on_a_base_with_other_shapes(tmp_path):
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, selection="magnitude", task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    cfg = BertConfig(**{**tiny_bert(0).config.to_dict(), "hidden_size": 40})  # the tiny BERT but 40 wide
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        PeftModel.from_pretrained(BertForSequenceClassification(cfg), tmp_path)


def test_empty_dataloader_and_missing_loss():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="yielded no batch"):
        peft_sam.select_parameters(model, [], show_progress=False)
    batch = {k: v for k, v in make_batches()[0].items() if k != "labels"}
    with pytest.raises(ValueError, match="returned no loss"):
        peft_sam.select_parameters(model, [batch], show_progress=False)
    with pytest.raises(ValueError, match="needs training batches"):
        peft_sam.select_parameters(model, None)


def test_nan_gradients_during_calibration():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.model.bert.encoder.layer[0].output.dense.base_layer.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite|NaN/inf"):
        peft_sam.select_parameters(model, make_batches(), show_progress=False)


def test_peft_mixed_model_is_refused():
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_bert(0), SAMConfig(selection="random"), mixed=True)


def test_registration_is_idempotent_and_clashes_are_refused():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    importlib.reload(peft_sam)  # re-import: a no-op
    peft_sam.register_tuner(peft_sam.PeftSamType.SAM, peft_sam.SAMConfig, peft_sam.SAMModel, prefix="sam_")
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAM"].__name__ == "SAMConfig"
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_sam.PeftSamType.SAM] == "sam_"

    class OtherConfig(SAMConfig):
        pass

    with pytest.raises(KeyError, match="already registered"):
        peft_sam.register_tuner(peft_sam.PeftSamType.SAM, OtherConfig, peft_sam.SAMModel, prefix="sam_")
    with pytest.raises(ValueError, match="Prefix of SAM must be"):
        peft_sam.register_tuner(
            peft_sam.PeftSamType.SAM, peft_sam.SAMConfig, peft_sam.SAMModel, prefix="lora_"
        )
