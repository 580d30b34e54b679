"""CaliSr layers: a wrapped lightweight-method layer (LoRA, SAM or MPO) plus, per adapter, the full-fine-tuning part.

A CaliSr layer's ``base_layer`` is the *inner* tuner layer (e.g. a LoRA ``Linear`` around the original
``nn.Linear``); everything the inner layer holds therefore belongs to the adapter as well (PEFT finds adapter tensors
structurally: all tensors of a tuner layer except its ``base_layer``). The layer computes, per active adapter,

* LoRA / SAM: ``inner(x)`` with the base weight ``W0`` replaced by ``W0 + W_extra`` (one matmul, like full
  fine-tuning), where ``W_extra`` (``calisr_extra``, base-weight layout, zero at start) is a dense trainable delta;
  under a wrapper that sets the weight as a plain attribute (FSDP, ``use_orig_params``) ``inner(x) + x W_extra^T``;
* MPO: ``inner(x)``; ``W_extra`` is the inner layer's trainable central tensor offset (``mpo_central_delta``, MPOP
  "full"), so no dense copy exists.

``W_core`` is everything else the inner layer trains. The effective weight is ``W = W_core + W_extra``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .._common import AdditiveDeltaLayer

MPO_EXTRA_NAME = "mpo_central_delta"


def inner_kind(layer: nn.Module) -> str:
    """'LORA', 'SAM' or 'MPO' for a supported inner tuner layer."""
    from peft.tuners.lora import LoraLayer

    from ..mpo.layer import MPOLayer
    from ..sam.layer import SAMLayer

    if isinstance(layer, LoraLayer):
        return "LORA"
    if isinstance(layer, SAMLayer):
        return "SAM"
    if isinstance(layer, MPOLayer):
        return "MPO"
    raise TypeError(f"CaliSr cannot wrap a {type(layer).__name__}: supported inner layers are LoRA, SAM and MPO.")


def _mpo_delta64(inner, adapter_name: str) -> torch.Tensor | None:
    """``MPO(A, C + dC) - MPO(A0, C)`` of an MPO layer in float64, in the base weight's layout (None if the MPO
    layer's internals are not the expected ones; the caller then falls back to its float32 delta)."""
    try:
        from ..mpo.decompose import central_index
        from ..mpo.layer import contract_interleaved

        rows, cols, _ = inner.mpo_shapes[adapter_name]
        n = len(rows)
        c = central_index(n)
        central = inner.central_tensor(adapter_name).detach().double()
        aux, initial = inner.mpo_aux[adapter_name], inner.mpo_init_aux[adapter_name]
        offset = (
            inner.mpo_central_delta[adapter_name].detach().double() if adapter_name in inner.mpo_central_delta else 0
        )
        current = [central + offset if k == c else aux[str(k)].detach().double() for k in range(n)]
        start = [central if k == c else initial[str(k)].detach().double() for k in range(n)]
    except (AttributeError, ImportError, KeyError):
        return None
    delta = contract_interleaved(current, c) - contract_interleaved(start, c)
    delta = delta.view([f for pair in zip(rows, cols) for f in pair])  # [i_0, j_0, i_1, j_1, ...]
    row_axes, col_axes = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
    order = col_axes + row_axes if inner.is_conv1d else row_axes + col_axes
    return delta.permute(order).reshape(-1)


class CaliSrLayer(AdditiveDeltaLayer, BaseTunerLayer):
    """Mixin holding the W_extra part of every CaliSr adapter on one inner tuner layer."""

    adapter_layer_names = ("calisr_extra",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.calisr_extra = nn.ParameterDict({})
        # adapter -> group name (attention / ffn1 / ffn2 / model); recomputed from the config, not saved
        self.calisr_group: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.inner_kind = inner_kind(base_layer)
        # path from the inner layer to the original module's weight, for functional_call
        path, module = [], base_layer
        while hasattr(module, "base_layer"):
            path.append("base_layer")
            module = module.base_layer
        self._weight_path = ".".join([*path, "weight"])
        self._is_conv1d = isinstance(module, Conv1D)  # weight [in, out] (GPT-2 style) instead of [out, in]
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    @property
    def inner(self) -> BaseTunerLayer:
        """The wrapped lightweight-method layer."""
        return self.base_layer

    # ------------------------------------------------------------------ adapter bookkeeping
    def update_layer(self, adapter_name: str, config, group: str, inference_mode: bool = False, **kwargs) -> None:
        """Create the W_extra of ``adapter_name`` (zero, or small random numbers with ``init_weights=False``)."""
        self.calisr_group[adapter_name] = group
        if self.inner_kind == "MPO":
            if adapter_name not in getattr(self.inner, MPO_EXTRA_NAME):
                raise ValueError(
                    f"The MPO layer has no trainable central tensor for adapter {adapter_name!r}: CaliSr needs "
                    "MPOConfig(train_central=True) (CaliSrConfig sets it)."
                )
            central = getattr(self.inner, MPO_EXTRA_NAME)[adapter_name]
            if not config.init_weights and not central.is_meta:  # random non-zero W_extra (PEFT's generic tests)
                gen = torch.Generator().manual_seed(int(config.seed) + central.numel())
                ref = self.inner.central_tensor(adapter_name).detach().float()
                scale = 0.02 * float(ref.std()) if ref.numel() > 1 else 0.02
                with torch.no_grad():
                    central.copy_((scale * torch.randn(central.shape, generator=gen)).to(central.dtype))
        else:
            weight = self.get_base_layer().weight
            if config.init_weights:
                extra = torch.zeros_like(weight)
            elif weight.is_meta:
                extra = torch.empty_like(weight)
            else:
                gen = torch.Generator().manual_seed(int(config.seed) + weight.numel())
                scale = 0.02 * float(weight.detach().float().std()) if weight.numel() > 1 else 0.02
                extra = (scale * torch.randn(weight.shape, generator=gen)).to(weight.dtype).to(weight.device)
            self.calisr_extra[adapter_name] = nn.Parameter(extra, requires_grad=True)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.calisr_group

    def extra_parameter(self, adapter_name: str) -> nn.Parameter:
        """The W_extra parameter of ``adapter_name`` (for MPO the inner layer's central tensor offset)."""
        if self.inner_kind == "MPO":
            return getattr(self.inner, MPO_EXTRA_NAME)[adapter_name]
        return self.calisr_extra[adapter_name]

    def extra_owner(self) -> tuple[BaseTunerLayer, str]:
        """(layer, attribute name) holding W_extra, for PEFT's ``frozen_peft_weight_names``."""
        if self.inner_kind == "MPO":
            return self.inner, MPO_EXTRA_NAME
        return self, "calisr_extra"

    def freeze_extra(self, adapter_name: str) -> None:
        """The switch: W_extra of ``adapter_name`` stops training for good (also across ``set_adapter`` calls)."""
        param = self.extra_parameter(adapter_name)
        param.requires_grad_(False)
        param.grad = None
        owner, attr = self.extra_owner()
        if "frozen_peft_weight_names" not in owner.__dict__:  # the class attribute is shared: give it its own dict
            owner.frozen_peft_weight_names = dict(owner.frozen_peft_weight_names)
        names = tuple(owner.frozen_peft_weight_names.get(adapter_name, ()))
        if attr not in names:
            owner.frozen_peft_weight_names[adapter_name] = (*names, attr)

    def extra_is_frozen(self, adapter_name: str) -> bool:
        owner, attr = self.extra_owner()
        return attr in owner.__dict__.get("frozen_peft_weight_names", {}).get(adapter_name, ())

    def unfreeze_extra(self, adapter_name: str) -> None:
        """Undo :meth:`freeze_extra` (used when a controller state from before the switch is loaded)."""
        owner, attr = self.extra_owner()
        frozen = owner.__dict__.get("frozen_peft_weight_names")
        if frozen and attr in frozen.get(adapter_name, ()):
            remaining = tuple(n for n in frozen[adapter_name] if n != attr)
            if remaining:
                frozen[adapter_name] = remaining
            else:
                del frozen[adapter_name]
        if adapter_name in self.active_adapters and not self.disable_adapters:
            self.extra_parameter(adapter_name).requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:  # noqa: D102
        self.calisr_group.pop(adapter_name, None)  # first: the base class picks the new active adapter from the rest
        super().delete_adapter(adapter_name)

    def _all_available_adapter_names(self) -> list[str]:  # noqa: D102
        return sorted(set(super()._all_available_adapter_names()) | set(self.calisr_group))

    # ------------------------------------------------------------------ weights
    def inner_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The inner method's dense delta ``W_core - W0`` in the base weight's layout (for MPO incl. W_extra)."""
        inner = self.inner
        if self.inner_kind == "SAM":
            return inner.get_delta_weight(adapter_name, "weight")
        if self.inner_kind == "LORA" and adapter_name not in inner.lora_A:
            return torch.zeros_like(self.get_base_layer().weight)
        return inner.get_delta_weight(adapter_name)

    @torch.no_grad()
    def inner_delta_weight64(self, adapter_name: str) -> torch.Tensor:
        """The inner method's delta computed in float64 from its stored tensors (the exact mathematical value).

        LoRA: ``s B A`` in float64; MPO: ``MPO(A, C + dC) - MPO(A0, C)`` contracted in float64 (a float32 contraction
        would add rounding noise of the size of the one-step differences CaliSr compares); SAM: its sparse delta
        (exact in any precision).
        """
        inner = self.inner
        if self.inner_kind == "LORA" and adapter_name in inner.lora_A:
            lora_a, lora_b = inner.lora_A[adapter_name], inner.lora_B[adapter_name]
            if isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear):
                delta = (lora_b.weight.detach().double() @ lora_a.weight.detach().double()) * float(
                    inner.scaling[adapter_name]
                )
                return delta.t() if inner.fan_in_fan_out else delta
        if self.inner_kind == "MPO":
            delta = _mpo_delta64(inner, adapter_name)
            if delta is not None:
                return delta.reshape(self.get_base_layer().weight.shape)
        return self.inner_delta_weight(adapter_name).to(torch.float64)

    @torch.no_grad()
    def core_weight64(self, adapter_name: str, include_base: bool = True) -> torch.Tensor:
        """``W_core`` (or ``W_core - W0``) in float64, for LoRA/SAM; for MPO this already includes ``W_extra``."""
        if self.merged:
            raise RuntimeError("Stable ranks cannot be measured while the adapter is merged: unmerge it first.")
        delta = self.inner_delta_weight64(adapter_name)
        if include_base:
            delta = delta + self.pristine_weight().detach().to(torch.float64)
        return delta

    def pristine_weight(self) -> torch.Tensor:
        """The pre-trained ``W0`` (a SAM inner layer keeps ``W0 + Delta`` in the base weight between forwards)."""
        if self.inner_kind == "SAM":
            return self.inner.pristine_tensor("weight")
        return self.get_base_layer().weight

    @torch.no_grad()
    def effective_weight64(self, adapter_name: str, include_base: bool = True) -> torch.Tensor:
        """``W = W_core + W_extra`` (or ``W - W0``) in float64, in the base weight's layout."""
        weight = self.core_weight64(adapter_name, include_base=include_base)
        if self.inner_kind != "MPO" and adapter_name in self.calisr_extra:
            weight = weight + self.calisr_extra[adapter_name].detach().to(torch.float64)
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``W - W0`` of ``adapter_name`` (inner delta plus W_extra), base weight layout and dtype."""
        weight = self.get_base_layer().weight
        with torch.no_grad():
            delta = self.inner_delta_weight(adapter_name).to(weight.dtype)
            if self.inner_kind != "MPO" and adapter_name in self.calisr_extra:
                delta = delta + self.calisr_extra[adapter_name].detach().to(weight.dtype)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold W_core and W_extra of the given (default: active) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        inner_todo = [a for a in adapter_names if a not in self.inner.merged_adapters]
        weight = self.get_base_layer().weight
        extras = [a for a in adapter_names if self.inner_kind != "MPO" and a in self.calisr_extra]
        if safe_merge:
            with torch.no_grad():
                check = weight.data.clone()
                for adapter in extras:
                    check += self.calisr_extra[adapter].detach().to(weight.dtype)
                if not torch.isfinite(check).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_names} seems broken.")
        if inner_todo:
            self.inner.merge(safe_merge=safe_merge, adapter_names=inner_todo)
        with torch.no_grad():
            for adapter in extras:
                weight.data += self.calisr_extra[adapter].detach().to(weight.dtype)
        self.merged_adapters.extend(adapter_names)

    def _merged_delta(self, adapter: str):
        """W_extra (merging also merged the inner layer, undone in :meth:`_after_unmerge`); MPO's lives inside."""
        if self.inner_kind != "MPO" and adapter in self.calisr_extra:
            return self.calisr_extra[adapter].detach()
        return None

    def _after_unmerge(self) -> None:
        if self.inner.merged:
            self.inner.unmerge()

    # ------------------------------------------------------------------ forward
    def dispatch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``inner(x)`` with ``W0`` replaced by ``W0 + sum of active W_extra`` (LoRA/SAM), else ``inner(x)``."""
        if self.disable_adapters:
            return self.disabled_forward(x, *args, **kwargs)
        if self.merged or self.inner_kind == "MPO":
            return self.base_layer(x, *args, **kwargs)
        extras = [self.calisr_extra[a] for a in self.active_adapters if a in self.calisr_extra]
        if not extras:
            return self.base_layer(x, *args, **kwargs)
        if self.inner_kind == "SAM":
            self.inner.refresh_base()  # before functional_call swaps the weight SAM writes its entries into
        leaf = self.get_base_layer()
        weight = leaf.weight
        if "weight" in vars(leaf):
            # A wrapper (FSDP with use_orig_params) has set the weight as a plain attribute for this forward, which
            # shadows the registered one functional_call swaps: add x W_extra^T to inner(x) instead.
            delta = extras[0].to(weight.dtype)
            for extra in extras[1:]:
                delta = delta + extra.to(weight.dtype)
            out = self.base_layer(x, *args, **kwargs)
            return out + F.linear(x.to(delta.dtype), delta.t() if self._is_conv1d else delta).to(out.dtype)
        for extra in extras:
            weight = weight + extra.to(weight.dtype)
        return torch.func.functional_call(
            self.base_layer, {self._weight_path: weight}, (x, *args), kwargs, tie_weights=False, strict=False
        )

    def __repr__(self) -> str:
        return "calisr." + super().__repr__()


class Linear(nn.Module, CaliSrLayer):
    """CaliSr on an inner LoRA / SAM / MPO layer around ``nn.Linear`` or transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, group: str, **kwargs: Any) -> None:
        super().__init__()
        CaliSrLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, group=group)

    forward = CaliSrLayer.dispatch_forward
