"""Optimizer parameter groups for a CaliSr model (core and W_extra, with and without weight decay)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .model import calisr_layers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The PeftModel inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def calisr_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight"),
    extra_weight_decay: float | None = None,
    **group_kwargs: Any,
) -> list[dict]:
    """Optimizer parameter groups for a CaliSr model: core and W_extra, each with and without weight decay.

    Any grouping works, but separate groups make the split explicit and let W_extra have its own learning rate and
    ``extra_weight_decay`` (default: ``weight_decay``); the W_extra of biases and norm weights (1-D tensors) gets no
    decay, as those tensors get none in full fine-tuning. Each group carries ``"calisr": "core" | "extra"``; empty
    groups are left out.
    """
    peft_model = unwrap_model(model)
    extras = {
        id(p)
        for _, layer in calisr_layers(peft_model)
        for adapter in layer.calisr_group
        for p in layer.extra_parameters(adapter)
    }
    decay, plain, extra, extra_plain = [], [], [], []
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in extras:  # W_extra of a bias or a norm weight (1-D): no decay, as full fine-tuning's tensor
            (extra if p.dim() > 1 else extra_plain).append(p)
        elif any(nd in name for nd in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    extra_decay = weight_decay if extra_weight_decay is None else extra_weight_decay
    groups = [
        {"params": decay, "weight_decay": weight_decay, "calisr": "core", **group_kwargs},
        {"params": plain, "weight_decay": 0.0, "calisr": "core", **group_kwargs},
        {"params": extra, "weight_decay": extra_decay, "calisr": "extra", **group_kwargs},
        {"params": extra_plain, "weight_decay": 0.0, "calisr": "extra", **group_kwargs},
    ]
    return [g for g in groups if g["params"]]
