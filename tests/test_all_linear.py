"""``target_modules="all-linear"`` (PEFT's shorthand) with the SAM and MPO tuners: exactly the backbone's Linear layers
are adapted (not embeddings, LayerNorms or the classifier head), and training changes only those and the head."""

import copy

import pytest
import torch
from conftest import make_batches, tiny_bert
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_sam import MPOConfig, SAMConfig

PREFIX = "base_model.model."
CONFIGS = {
    # p=0.1 so that every weight and bias of the tiny model holds entries
    "sam": lambda: SAMConfig(target_modules="all-linear", selection="magnitude", p=0.1, task_type="SEQ_CLS"),
    "mpo": lambda: MPOConfig(target_modules="all-linear", task_type="SEQ_CLS"),
}


def _backbone_linears() -> set[str]:
    names = {n for n, m in tiny_bert(0).named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.")}
    # query/key/value/attention.output.dense/intermediate.dense/output.dense per layer, and the pooler
    assert len(names) == 2 * 6 + 1
    return names


def _adapted(model) -> set[str]:
    return {n.removeprefix(PREFIX) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_all_linear_adapts_exactly_the_backbone_linears(method):
    model = get_peft_model(tiny_bert(0), CONFIGS[method]())
    expected = _backbone_linears()
    assert _adapted(model) == expected
    # PEFT resolves the shorthand into the module names (as stored in adapter_config.json)
    assert set(model.peft_config["default"].target_modules) == expected
    assert not any(isinstance(m, BaseTunerLayer) for m in model.base_model.model.classifier.modules())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_all_linear_training_changes_only_the_adapted_linears_and_the_head(method):
    before = {k: v.clone() for k, v in tiny_bert(0).state_dict().items()}
    model = get_peft_model(tiny_bert(0), CONFIGS[method]())
    expected = _backbone_linears()
    adapted = {PREFIX + n for n in expected}
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_adapted = any(name.startswith(a + ".") for a in adapted)
            in_head = name.startswith(PREFIX + "classifier.modules_to_save.")
            assert in_adapted or in_head, f"{name} is trainable"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**make_batches(num=1, seed=1)[0]).loss.backward()
    opt.step()
    model.eval()
    after = copy.deepcopy(model).merge_and_unload().state_dict()
    assert after.keys() == before.keys()
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected | {"classifier"}
