"""How PEFT users train: fused optimizers, a reference forward with the adapter disabled before the backward (DPO),
modules with their own forward, token-classification and QA heads, pickling the whole model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import _TINY_SIZES, VOCAB, logits, make_batches, tiny_bert
from peft import get_peft_model
from peft.utils import ModulesToSaveWrapper
from torch import nn

from peft_sam import CaliSrConfig, CaliSrOptimizer, MPOConfig, SAMConfig, calisr_param_groups
from peft_sam.tuners.sam.layer import SAMLayer


def _sam(p: float = 0.1, **kwargs) -> SAMConfig:
    return SAMConfig(p=p, selection="random", seed=1, task_type="SEQ_CLS", **kwargs)


def _merged_logits(model, batch: dict) -> torch.Tensor:
    merged = copy.deepcopy(model).merge_and_unload().eval()
    return logits(merged, batch)


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "adafactor", "data"])
def test_forward_uses_the_values_after_any_optimizer_step(optimizer: str) -> None:
    """``AdamW(fused=True)`` (the Trainer's default) updates the values without bumping their version counter; the
    next forward must still run on ``W0 + Delta`` of the new values (the merged model's outputs, exactly)."""
    model = get_peft_model(tiny_bert(0), _sam())
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False)
    elif optimizer == "data":  # a hand-written update through .data, then told to autograd
        opt = None
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, **{optimizer: True})
    model.train()
    for batch in make_batches(num=3, seed=1):
        model(**batch).loss.backward()
        if opt is None:
            for p in params:
                p.data.add_(p.grad, alpha=-1e-1)
                torch.autograd.graph.increment_version(p)  # what docs/sam.md asks of code that writes .data
                p.grad = None
        else:
            opt.step()
            opt.zero_grad()
    model.eval()
    batch = make_batches(seed=9)[0]
    out = logits(model, batch)
    assert not torch.equal(out, logits(tiny_bert(0), batch))  # it trained
    assert torch.equal(out, _merged_logits(model, batch))


def test_fused_optimizer_calisr_sam() -> None:
    """The same for CaliSr(SAM), through its switch (the optimizer wrapper steps a fused AdamW)."""
    config = CaliSrConfig(adapter=SAMConfig(p=0.1, selection="random", seed=1), task_type="SEQ_CLS", switch_at=0.5)
    model = get_peft_model(tiny_bert(0), config)
    inner = torch.optim.AdamW(calisr_param_groups(model), lr=1e-2, fused=True)
    opt = CaliSrOptimizer(inner, model, steps_per_epoch=2, total_steps=4)
    model.train()
    for batch in make_batches(num=4, seed=1):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    batch = make_batches(seed=9)[0]
    assert torch.equal(logits(model, batch), _merged_logits(model, batch))


@pytest.mark.parametrize("method", ["sam", "calisr_sam", "mpo"])
def test_reference_forward_with_adapter_disabled_before_backward(method: str) -> None:
    """DPO's pattern: policy forward, reference forward under ``disable_adapter()`` (no grad), then the backward.
    The reference equals the base model exactly and the gradients equal those of the policy forward alone."""
    config = {
        "sam": _sam(init_weights=False),
        "calisr_sam": CaliSrConfig(
            adapter=SAMConfig(p=0.1, selection="random", seed=1, init_weights=False), task_type="SEQ_CLS"
        ),
        "mpo": MPOConfig(task_type="SEQ_CLS", init_weights=False),
    }[method]
    base = tiny_bert(0)
    batch = make_batches(seed=3)[0]
    base_out = logits(base, batch)

    def grads(with_reference: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        model.train()
        policy = model(**batch)
        reference = None
        if with_reference:
            model.eval()
            with torch.no_grad(), model.disable_adapter():
                reference = model(**batch).logits
            model.train()
        policy.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, reference

    expected, _ = grads(False)
    got, reference = grads(True)
    assert torch.equal(reference, base_out)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class ScaledEmbedding(nn.Embedding):
    """A table with its own forward, as Gemma's ``GemmaTextScaledWordEmbedding``."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0 + 1.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(VOCAB, 16)
        self.lin = ScaledLinear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


@pytest.mark.parametrize("kind", ["sam", "mpo"])
def test_subclasses_with_their_own_forward_keep_it(kind: str) -> None:
    """Outputs equal the base module's at init and the merged model's after training; SAM's entry gradients equal
    the dense gradient of the subclass's own forward at the entries."""
    torch.manual_seed(0)
    net = Net()
    ids = torch.randint(0, VOCAB, (4, 6))
    if kind == "sam":
        config = SAMConfig(p=0.2, selection="random", seed=1, target_modules=["emb", "lin"], init_weights=False)
    else:
        config = MPOConfig(target_modules=["lin"], init_weights=False)
    identity = copy.deepcopy(config)
    identity.init_weights = True
    with torch.no_grad():
        assert torch.equal(get_peft_model(copy.deepcopy(net), identity)(ids), net(ids))
    model = get_peft_model(copy.deepcopy(net), config)
    out = model(ids)
    with torch.no_grad():
        assert torch.allclose(out, copy.deepcopy(model).merge_and_unload()(ids), atol=1e-6)
    if kind != "sam":
        return
    out.square().sum().backward()
    dense = copy.deepcopy(model).merge_and_unload()
    for p in dense.parameters():
        p.requires_grad_(True)
    dense(ids).square().sum().backward()
    for name in ("emb", "lin"):
        layer = getattr(model.base_model.model, name)
        idx, _ = layer.entries("default", "weight")
        expected = getattr(dense, name).weight.grad.reshape(-1)[idx]
        assert torch.allclose(layer.sam_values["default"].grad, expected, atol=1e-5), name


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
@pytest.mark.parametrize("kind", ["sam", "mpo"])
def test_default_targets_leave_task_heads_to_modules_to_save(task: str, kind: str) -> None:
    """PEFT adds these task models' heads to ``modules_to_save`` only after injection: the defaults skip them."""
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, **_TINY_SIZES)
    base = (BertForTokenClassification if task == "TOKEN_CLS" else BertForQuestionAnswering)(cfg)
    config = SAMConfig(p=0.05, selection="magnitude", task_type=task) if kind == "sam" else MPOConfig(task_type=task)
    model = get_peft_model(base, config)
    head = model.base_model.model.classifier if task == "TOKEN_CLS" else model.base_model.model.qa_outputs
    assert isinstance(head, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    model(input_ids=torch.randint(0, VOCAB, (2, 5)))


def test_whole_model_pickles() -> None:
    """``torch.save(model)`` of a SAM model: the copy gives the same outputs and its layers know only each other."""
    model = get_peft_model(tiny_bert(0), _sam(init_weights=False)).eval()
    batch = make_batches(seed=4)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    layers = [m for m in loaded.modules() if isinstance(m, SAMLayer)]
    assert all(set(layer._sam_peers) <= set(layers) for layer in layers) and len(layers[0]._sam_peers) == len(layers)


def test_model_code_reads_wrapped_module_attributes() -> None:
    """Whisper's encoder reads ``conv1.stride`` off the modules SAM wraps by default: the layer answers for them."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_source_positions=8,
        max_target_positions=16,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    base = WhisperForConditionalGeneration(config).eval()
    batch = {"input_features": torch.randn(2, 8, 16), "decoder_input_ids": torch.randint(3, VOCAB, (2, 5))}
    model = get_peft_model(copy.deepcopy(base), SAMConfig(p=0.1, selection="random", seed=1, init_weights=False))
    conv = model.base_model.model.model.encoder.conv1
    assert isinstance(conv, SAMLayer) and conv.stride == base.model.encoder.conv1.stride
    with torch.no_grad():
        out = model(**batch).logits
        assert not torch.equal(out, base(**batch).logits)
        assert torch.allclose(out, copy.deepcopy(model).merge_and_unload()(**batch).logits, atol=1e-5)
    with pytest.raises(AttributeError):
        conv._not_an_attribute  # noqa: B018
