"""CaliSr layers: every backbone module full fine-tuning would train, plus (where the wrapped lightweight method adapts
it) that method's layer, and per adapter the full-fine-tuning part ``W_extra``.

A CaliSr layer's ``base_layer`` is the original module (an ``nn.Linear``, ``nn.Embedding``, ``LayerNorm``, ...). Where
the wrapped method adapts the module, its layer (e.g. a LoRA ``Linear``) sits in ``calisr_inner``: that layer still
reads the original module as its own ``base_layer``, but holds it as a plain attribute, not as a registered child, so
the module appears once in the tree (``<name>.base_layer.weight``) and every adapter tensor's name carries the
``calisr_`` prefix (``<name>.calisr_inner.lora_A.default.weight``), as PEFT's conventions and transformers' loader
expect. Per adapter a layer holds dense, zero-initialised deltas of the module's own ``weight`` (``calisr_extra``) and
``bias`` (``calisr_extra_bias``); for an MPO inner layer the weight's W_extra is the MPO central tensor offset
(``mpo_central_delta``, MPOP "full"), so no dense copy exists. The forward runs the inner layer (or the module) with
``weight -> weight + W_extra`` and ``bias -> bias + W_extra_bias`` (``torch.func.functional_call``: one matmul, as
full fine-tuning); under a wrapper that sets the weight as a plain attribute (FSDP with ``use_orig_params``) the
deltas' contribution is added to the output instead (Linear, Conv1D, Embedding and LayerNorm are linear in their
parameters).

``W_core`` is everything else the inner layer trains (W0 for a module without inner layer); the effective weight is
``W = W_core + W_extra``. Only Linear/Conv1D layers of a component group have their stable rank measured; the others
(embeddings, norms, matrices outside every group) train in the full-fine-tuning phase and stop with the last group.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .._common import AdditiveDeltaLayer
from ..sam.layer import _pristine_state_dict_hook, _restore_before_load_hook, in_out_features

MPO_EXTRA_NAME = "mpo_central_delta"


def inner_kind(layer: nn.Module) -> str | None:
    """'LORA', 'SAM' or 'MPO' for a supported inner tuner layer, None for a plain module."""
    from peft.tuners.lora import LoraLayer

    from ..mpo.layer import MPOLayer
    from ..sam.layer import SAMLayer

    if isinstance(layer, LoraLayer):
        return "LORA"
    if isinstance(layer, SAMLayer):
        return "SAM"
    if isinstance(layer, MPOLayer):
        return "MPO"
    if isinstance(layer, BaseTunerLayer):
        raise TypeError(f"CaliSr cannot wrap a {type(layer).__name__}: supported inner layers are LoRA, SAM and MPO.")
    return None


EXTRA_SLOTS = {"weight": "calisr_extra", "bias": "calisr_extra_bias"}
INNER_NAME = "calisr_inner"  # where a CaliSr layer registers the wrapped method's layer


def attach_inner(layer: nn.Module, inner: BaseTunerLayer) -> None:
    """Register ``inner`` as ``layer.calisr_inner`` and its original module as ``layer.base_layer``; ``inner`` keeps
    reading that module as ``inner.base_layer``, an unregistered attribute, so it is not a second path in the tree."""
    original = inner._modules.pop("base_layer", None)
    if original is None:  # already detached (e.g. a deep copy made while attached)
        original = inner.__dict__["base_layer"]
    object.__setattr__(inner, "base_layer", original)
    layer.base_layer = original
    layer.calisr_inner = inner


def detach_inner(layer: nn.Module) -> BaseTunerLayer:
    """Undo :func:`attach_inner`: the inner layer owns its original module again (the layer keeps a reference)."""
    inner = layer._modules.pop(INNER_NAME)
    original = inner.__dict__.pop("base_layer")
    inner._modules["base_layer"] = original
    return inner


def own_tensor_names(module: nn.Module) -> tuple[str, ...]:
    """Which of ``weight`` / ``bias`` the module registers itself as floating-point parameters."""
    return tuple(
        name
        for name in EXTRA_SLOTS
        if isinstance(module._parameters.get(name), torch.Tensor) and module._parameters[name].is_floating_point()
    )


def _extra_contribution(leaf: nn.Module, x: torch.Tensor, deltas: dict[str, torch.Tensor], conv1d: bool):
    """What ``deltas`` add to the output of ``leaf`` (which is linear in its parameters), or None if unknown."""
    weight, bias = deltas.get("weight"), deltas.get("bias")
    if isinstance(leaf, (nn.Linear, Conv1D)):
        out = 0
        if weight is not None:
            out = F.linear(x.to(weight.dtype), weight.t() if conv1d else weight)
        return out + bias if bias is not None else out
    if isinstance(leaf, nn.Embedding) and weight is not None and leaf.max_norm is None:
        return F.embedding(x, weight, leaf.padding_idx)
    if isinstance(leaf, nn.LayerNorm):
        out = 0
        if weight is not None:
            out = F.layer_norm(x.to(weight.dtype), leaf.normalized_shape, None, None, leaf.eps) * weight
        return out + bias if bias is not None else out
    return None


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
    """Mixin holding the full-fine-tuning part (W_extra) of every CaliSr adapter on one module."""

    adapter_layer_names = tuple(EXTRA_SLOTS.values())
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if inner_kind(base_layer) is not None:  # the wrapped method's layer around the original module
            attach_inner(self, base_layer)
        else:
            self.base_layer = base_layer
        self.calisr_extra = nn.ParameterDict({})  # W_extra of the module's weight, per adapter
        self.calisr_extra_bias = nn.ParameterDict({})  # W_extra of its bias, per adapter
        # adapter -> group name (attention / ffn1 / ffn2 / model), None for a module outside every group (it stops
        # training with the last group); recomputed from the config, not saved
        self.calisr_group: dict[str, str | None] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.bind_inner()

    def bind_inner(self) -> None:
        """Derive what depends on the inner layer (again after the wrapped method adapts a plain module later)."""
        inner = self.inner
        self.inner_kind = inner_kind(inner) if inner is not None else None
        self._leaf_path = "base_layer" if inner is not None else ""  # from the forward target to the module
        module = self.base_layer
        self._is_conv1d = isinstance(module, Conv1D)  # weight [in, out] (GPT-2 style) instead of [out, in]
        self.is_matrix = isinstance(module, (nn.Linear, Conv1D))
        self.tensor_names = own_tensor_names(module)
        self.in_features, self.out_features = in_out_features(module)

    def _path(self, tensor_name: str) -> str:
        return f"{self._leaf_path}.{tensor_name}" if self._leaf_path else tensor_name

    @property
    def inner(self) -> BaseTunerLayer | None:
        """The wrapped lightweight-method layer (None where the method does not adapt this module)."""
        return self._modules.get(INNER_NAME)

    @property
    def forward_target(self) -> nn.Module:
        """What the forward runs: the inner layer, else the original module."""
        inner = self.inner
        return inner if inner is not None else self.base_layer

    def _inner_has(self, adapter_name: str) -> bool:
        return self.inner is not None and adapter_name in self.inner._all_available_adapter_names()

    # ------------------------------------------------------------------ adapter bookkeeping
    def update_layer(
        self, adapter_name: str, config, group: str | None, inference_mode: bool = False, **kwargs
    ) -> None:
        """Create the W_extra of ``adapter_name`` (zero, or small random numbers with ``init_weights=False``)."""
        self.calisr_group[adapter_name] = group
        leaf = self.get_base_layer()
        for tensor_name in self.tensor_names:
            if tensor_name == "weight" and self._mpo_holds_extra(adapter_name):
                self._init_mpo_central(adapter_name, config)
                continue
            base = getattr(leaf, tensor_name)
            if config.init_weights:
                extra = torch.zeros_like(base)
            elif base.is_meta:
                extra = torch.empty_like(base)
            else:
                gen = torch.Generator().manual_seed(int(config.seed) + base.numel() + len(tensor_name))
                std = float(base.detach().float().std()) if base.numel() > 1 else 0.0
                scale = 0.02 * std if std > 0 else 0.02
                extra = (scale * torch.randn(base.shape, generator=gen)).to(base.dtype).to(base.device)
            getattr(self, EXTRA_SLOTS[tensor_name])[adapter_name] = nn.Parameter(extra, requires_grad=True)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _init_mpo_central(self, adapter_name: str, config) -> None:
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

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.calisr_group

    @property
    def is_measured(self) -> bool:
        """Whether this layer's weight is a matrix whose stable rank CaliSr measures (it belongs to a group)."""
        return self.is_matrix and any(g is not None for g in self.calisr_group.values())

    def extra_parameter(self, adapter_name: str) -> nn.Parameter | None:
        """The W_extra of the weight of ``adapter_name`` (for MPO the inner layer's central tensor offset)."""
        if "weight" in self.tensor_names and self._mpo_holds_extra(adapter_name):
            return getattr(self.inner, MPO_EXTRA_NAME)[adapter_name]
        return self.calisr_extra[adapter_name] if adapter_name in self.calisr_extra else None

    def extra_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every W_extra of ``adapter_name`` on this layer (weight, bias)."""
        found = [self.extra_parameter(adapter_name)]
        if adapter_name in self.calisr_extra_bias:
            found.append(self.calisr_extra_bias[adapter_name])
        return [p for p in found if p is not None]

    def _mpo_holds_extra(self, adapter_name: str) -> bool:
        """Whether the weight's W_extra of ``adapter_name`` is the MPO central tensor offset (its MPO adapts this
        module); otherwise it is dense (``calisr_extra``), also on a module another adapter's MPO adapts."""
        return self.inner_kind == "MPO" and self._inner_has(adapter_name)

    def _extra_owners(self, adapter_name: str) -> list[tuple[BaseTunerLayer, str]]:
        """(layer, attribute name) pairs holding W_extra, for PEFT's ``frozen_peft_weight_names``."""
        owners = [(self, EXTRA_SLOTS["bias"])] if "bias" in self.tensor_names else []
        if "weight" in self.tensor_names:
            owners.insert(
                0,
                (self.inner, MPO_EXTRA_NAME) if self._mpo_holds_extra(adapter_name) else (self, EXTRA_SLOTS["weight"]),
            )
        return owners

    def freeze_extra(self, adapter_name: str) -> None:
        """The switch: W_extra of ``adapter_name`` stops training for good (also across ``set_adapter`` calls)."""
        for param in self.extra_parameters(adapter_name):
            param.requires_grad_(False)
            param.grad = None
        for owner, attr in self._extra_owners(adapter_name):
            if "frozen_peft_weight_names" not in owner.__dict__:  # the class attribute is shared: give it its own
                owner.frozen_peft_weight_names = dict(owner.frozen_peft_weight_names)
            names = tuple(owner.frozen_peft_weight_names.get(adapter_name, ()))
            if attr not in names:
                owner.frozen_peft_weight_names[adapter_name] = (*names, attr)

    def extra_is_frozen(self, adapter_name: str) -> bool:
        owners = self._extra_owners(adapter_name)
        if not owners:
            return False
        owner, attr = owners[0]
        return attr in owner.__dict__.get("frozen_peft_weight_names", {}).get(adapter_name, ())

    def unfreeze_extra(self, adapter_name: str) -> None:
        """Undo :meth:`freeze_extra` (used when a controller state from before the switch is loaded)."""
        for owner, attr in self._extra_owners(adapter_name):
            frozen = owner.__dict__.get("frozen_peft_weight_names")
            if frozen and attr in frozen.get(adapter_name, ()):
                remaining = tuple(n for n in frozen[adapter_name] if n != attr)
                if remaining:
                    frozen[adapter_name] = remaining
                else:
                    del frozen[adapter_name]
        if adapter_name in self.active_adapters and not self.disable_adapters:
            for param in self.extra_parameters(adapter_name):
                param.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` here and in the inner layer (PEFT skips tuner layers under a prefixed name)."""
        self.calisr_group.pop(adapter_name, None)  # first: the base class picks the new active adapter from the rest
        if self._inner_has(adapter_name):
            self.inner.delete_adapter(adapter_name)
        super().delete_adapter(adapter_name)

    def _all_available_adapter_names(self) -> list[str]:  # noqa: D102
        return sorted(set(super()._all_available_adapter_names()) | set(self.calisr_group))

    # ------------------------------------------------------------------ weights
    def _dense_extras(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """{tensor name: dense W_extra} of ``adapter_name`` (MPO's weight part lives inside the inner layer)."""
        out = {}
        if adapter_name in self.calisr_extra:  # absent where the weight's W_extra is an MPO central offset
            out["weight"] = self.calisr_extra[adapter_name]
        if adapter_name in self.calisr_extra_bias:
            out["bias"] = self.calisr_extra_bias[adapter_name]
        return out

    def inner_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The inner method's dense delta ``W_core - W0`` in the base weight's layout (for MPO incl. W_extra)."""
        if not self._inner_has(adapter_name):
            return torch.zeros_like(self.get_base_layer().weight)
        if self.inner_kind == "SAM":
            return self.inner.get_delta_weight(adapter_name, "weight")
        return self.inner.get_delta_weight(adapter_name)

    @torch.no_grad()
    def inner_delta_weight64(self, adapter_name: str) -> torch.Tensor:
        """The inner method's delta computed in float64 from its stored tensors (the exact mathematical value).

        LoRA: ``s B A`` in float64; MPO: ``MPO(A, C + dC) - MPO(A0, C)`` contracted in float64 (a float32 contraction
        would add rounding noise of the size of the one-step differences CaliSr compares); SAM: its sparse delta
        (exact in any precision); zero where the wrapped method does not adapt the module.
        """
        inner = self.inner
        if self.inner_kind == "LORA" and adapter_name in inner.lora_A:
            lora_a, lora_b = inner.lora_A[adapter_name], inner.lora_B[adapter_name]
            if isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear):
                delta = (lora_b.weight.detach().double() @ lora_a.weight.detach().double()) * float(
                    inner.scaling[adapter_name]
                )
                return delta.t() if inner.fan_in_fan_out else delta
        if self.inner_kind == "MPO" and self._inner_has(adapter_name):
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
        extra = self._dense_extras(adapter_name).get("weight")
        return weight if extra is None else weight + extra.detach().to(torch.float64)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``W - W0`` of ``adapter_name`` (inner delta plus W_extra), base weight layout and dtype."""
        weight = self.get_base_layer().weight
        with torch.no_grad():
            delta = self.inner_delta_weight(adapter_name).to(weight.dtype)
            extra = self._dense_extras(adapter_name).get("weight")
            if extra is not None:
                delta = delta + extra.detach().to(weight.dtype)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold W_core and W_extra of the given (default: active) adapters into the base tensors."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        leaf = self.get_base_layer()
        if safe_merge:
            with torch.no_grad():
                for tensor_name in self.tensor_names:
                    check = getattr(leaf, tensor_name).data.clone()
                    for adapter in adapter_names:
                        extra = self._dense_extras(adapter).get(tensor_name)
                        if extra is not None:
                            check += extra.detach().to(check.dtype)
                    if not torch.isfinite(check).all():
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {adapter_names} seems broken."
                        )
        if self.inner is not None:
            inner_todo = [a for a in adapter_names if a not in self.inner.merged_adapters and self._inner_has(a)]
            if inner_todo:
                self.inner.merge(safe_merge=safe_merge, adapter_names=inner_todo)
        with torch.no_grad():
            for adapter in adapter_names:
                for tensor_name, extra in self._dense_extras(adapter).items():
                    target = getattr(leaf, tensor_name)
                    target.data += extra.detach().to(target.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Subtract the merged W_extra again (newest first), then unmerge the inner layer."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        leaf = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                for tensor_name, extra in self._dense_extras(self.merged_adapters.pop()).items():
                    target = getattr(leaf, tensor_name)
                    target.data -= extra.detach().to(target.dtype)
        if self.inner is not None and self.inner.merged:
            self.inner.unmerge()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The original module for ``unload``/``merge_and_unload``: merged if asked, otherwise as the inner layer
        leaves it (a SAM inner layer puts W0 back into the tensors it keeps W0 + Delta in between forwards)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        inner = self.inner
        if inner is not None and hasattr(inner, "unload_and_optionally_merge_module"):
            inner.unload_and_optionally_merge_module(merge=False)
        return self.get_base_layer()

    # ------------------------------------------------------------------ forward
    def dispatch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The inner layer (or module) with its weight and bias replaced by ``tensor + sum of active W_extra``."""
        if self.disable_adapters:
            return self.disabled_forward(x, *args, **kwargs)
        target = self.forward_target
        if self.merged:
            return target(x, *args, **kwargs)
        leaf = self.get_base_layer()
        deltas: dict[str, torch.Tensor] = {}
        for adapter in self.active_adapters:
            for tensor_name, extra in self._dense_extras(adapter).items():
                dtype = getattr(leaf, tensor_name).dtype
                found = deltas.get(tensor_name)
                deltas[tensor_name] = extra.to(dtype) if found is None else found + extra.to(dtype)
        if not deltas:
            return target(x, *args, **kwargs)
        if self.inner_kind == "SAM":
            self.inner.refresh_base()  # before functional_call swaps the tensors SAM writes its entries into
            if torch.compiler.is_compiling():
                return self._sam_traced_forward(x, deltas, *args, **kwargs)
        if any(tensor_name in vars(leaf) for tensor_name in deltas):
            # A wrapper (FSDP with use_orig_params) has set the tensors as plain attributes for this forward, which
            # shadow the registered ones functional_call swaps: add the deltas' contribution to the output instead.
            out = target(x, *args, **kwargs)
            extra = None if args or kwargs else _extra_contribution(leaf, x, deltas, self._is_conv1d)
            if extra is None:
                raise NotImplementedError(
                    f"CaliSr's full-fine-tuning part of a {type(leaf).__name__} cannot run while a wrapper (FSDP with "
                    "use_orig_params=True) sets its parameters as plain attributes (supported there: Linear, Conv1D, "
                    "Embedding, LayerNorm). Leave the module out with CaliSrConfig(exclude_modules=[...])."
                )
            return out + extra.to(out.dtype)
        params = {self._path(name): getattr(leaf, name) + delta for name, delta in deltas.items()}
        return torch.func.functional_call(target, params, (x, *args), kwargs, tie_weights=False, strict=False)

    def _sam_traced_forward(self, x: torch.Tensor, deltas: dict[str, torch.Tensor], *args: Any, **kwargs: Any):
        """Compiled forward around a SAM inner layer: the module on ``W0 + Delta + W_extra``, built out of place.

        Compiled SAM never reads the base tensors as current (it rebuilds ``W0 + Delta`` from them by overwriting its
        entries), which would drop W_extra at the entries if W_extra were already added; so ``W0 + Delta`` is built
        from the registered tensors first and W_extra added to it (the same values as the eager path).
        """
        inner, leaf = self.inner, self.get_base_layer()
        inner._check_calibrated()
        params = {}
        for tensor_name in self.tensor_names:
            source = inner._source(tensor_name)
            adapters = source._ready_adapters(tensor_name)
            tensor = source._out_of_place(tensor_name, adapters) if adapters else getattr(leaf, tensor_name)
            if tensor_name in deltas:
                tensor = tensor + deltas[tensor_name]
            params[tensor_name] = tensor
        return torch.func.functional_call(leaf, params, (x, *args), kwargs, tie_weights=False, strict=False)

    def disabled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output with every adapter disabled: the inner layer (disabled alongside) or the original module."""
        if self.merged:
            self.unmerge()
        return self.forward_target(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "calisr." + super().__repr__()


def _sam_inner_state_dict_hook(module: CaliSrLayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """A SAM inner layer's original tensors are registered here (``<prefix>base_layer.*``): save them as W0."""
    if module.inner_kind == "SAM":
        _pristine_state_dict_hook(module.inner, state_dict, prefix, local_metadata)


def _sam_inner_load_hook(module: CaliSrLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loading anything into the layer starts from W0 (a SAM inner layer keeps W0 + Delta in the base tensors)."""
    if module.inner_kind == "SAM":
        _restore_before_load_hook(module.inner, state_dict, prefix, *args)


class CaliSrModule(nn.Module, CaliSrLayer):
    """CaliSr around one module: an inner LoRA / SAM / MPO layer, or a module the wrapped method does not adapt."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, group: str | None, **kwargs: Any) -> None:
        super().__init__()
        CaliSrLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.register_state_dict_post_hook(_sam_inner_state_dict_hook)
        self.register_load_state_dict_pre_hook(_sam_inner_load_hook)
        self.update_layer(adapter_name, config, group=group)

    forward = CaliSrLayer.dispatch_forward
