"""SAMModel: the PEFT tuner that wraps every candidate module of a model in a SAM layer."""

from __future__ import annotations

from weakref import WeakSet

import torch
from torch import nn

from .._common import LeafTunerModel
from .batched import BatchedStep
from .layer import (
    TENSOR_SLOTS,
    SAMLayer,
    SAMNotCalibratedError,
    link_tied_tensors,
    sam_layer_class_for,
)
from .mask_functions import select_data_free


class SAMModel(LeafTunerModel):
    """Sparse fine-tuning of the entries with the largest gradient signal at the pre-trained point (SAM).

    Created through ``peft.get_peft_model(model, SAMConfig(...))`` once ``peft_sam`` is imported.
    """

    prefix: str = "sam_"
    tuner_layer_cls = SAMLayer
    tuner_kind = "SAM"
    supported_modules_text = (
        "Linear, transformers Conv1D, Embedding, Conv and norm layers (leaf modules with only weight/bias)"
    )
    layer_class_for = staticmethod(sam_layer_class_for)

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # PeftModel without a task type, transformers' load_adapter / add_adapter and peft.inject_adapter_in_model
        # call the model's own forward, not this tuner's: the model's forward brings the base tensors up to date
        _refresh_before_forward(model)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        handle = model.__dict__.pop("_sam_refresh_hook", None)
        if handle is not None:
            handle.remove()
        return model

    def forward(self, *args, **kwargs):
        """The model's forward, with every SAM layer's base tensors brought up to date and its small tensors tapped
        in one batched pass (``batched.py``)."""
        state = self.__dict__.get("_sam_batched")
        if state is None:
            state = self.__dict__["_sam_batched"] = BatchedStep()
        layers = [m for m in self.model.modules() if isinstance(m, SAMLayer)]
        self.model.__dict__["_sam_refreshed"] = True  # the model's own pre-hook has nothing left to do
        try:
            if torch.compiler.is_compiling():  # traced: the refresh runs eagerly; compiled layers need no tap
                state.refresh(layers)
                return super().forward(*args, **kwargs)
            with state.step(layers):
                return super().forward(*args, **kwargs)
        finally:
            self.model.__dict__["_sam_refreshed"] = False

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Inject the SAM layers; data-free selections (magnitude, random, bitfit) choose their entries here.

        With ``low_cpu_mem_usage`` (PEFT's loading path) the placeholders stay on the meta device and the entries
        come from the file.
        """
        super().inject_adapter(model, adapter_name, **kwargs)
        layers = [m for m in model.modules() if isinstance(m, SAMLayer)]
        link_tied_tensors(layers, adapter_name)
        peers = _Peers(layers)  # one selection covers every layer: see SAMLayer._check_calibrated
        for layer in layers:
            layer._sam_peers = peers
        config = self.peft_config[adapter_name]
        if not config.needs_calibration and not kwargs.get("low_cpu_mem_usage", False):
            select_data_free(model, adapter_name, config)

    # ------------------------------------------------------------------ save / load hooks
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        pending = [
            name
            for name, module in model.named_modules()
            if isinstance(module, SAMLayer) and module.is_pending(adapter_name)
        ]
        if pending:
            raise SAMNotCalibratedError(
                f"SAM adapter {adapter_name!r} has not been calibrated ({len(pending)} layers have no entries, "
                f"e.g. {pending[0]}): call peft_sam.select_parameters(model, dataloader) before save_pretrained. "
                "Nothing was written."
            )
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        save_dtype = getattr(config, "save_dtype", None)
        if save_dtype is not None:
            dtype = getattr(torch, save_dtype)
            value_keys = tuple(f".{val}." for _, val in TENSOR_SLOTS.values())
            for key, tensor in to_return.items():
                if any(v in key for v in value_keys) and tensor.is_floating_point():
                    to_return[key] = tensor.to(dtype)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Resize each layer's placeholders to the entries stored in the file (indices always come from it)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for name, module in model.named_modules():
            if not isinstance(module, SAMLayer):
                continue
            shape_key = f"{name}.sam_shapes.{adapter_name}"
            if shape_key in remapped and adapter_name in module.sam_shapes:
                module.sam_shapes[adapter_name] = remapped[shape_key].to(module.sam_shapes[adapter_name].device)
                try:
                    module.check_shapes(adapter_name)
                except ValueError as err:
                    raise ValueError(f"Cannot load SAM adapter into module {name!r}: {err}") from err
            for tensor_name, (idx_name, val_name) in TENSOR_SLOTS.items():
                idx_key = f"{name}.{idx_name}.{adapter_name}"
                val_key = f"{name}.{val_name}.{adapter_name}"
                if adapter_name not in getattr(module, val_name):
                    continue
                if idx_key not in remapped:  # no entry in this tensor was saved (global scope): drop the slot
                    module.set_entries(adapter_name, tensor_name, torch.empty(0, dtype=torch.long))
                    continue
                indices, values = remapped[idx_key], remapped[val_key]
                if indices.numel() != values.numel():
                    raise ValueError(f"Corrupt SAM adapter: {idx_key} and {val_key} differ in length.")
                if values.dtype != module.base_tensor(tensor_name).dtype:
                    remapped[val_key] = values.to(module.base_tensor(tensor_name).dtype)
                try:
                    module.set_entries(adapter_name, tensor_name, indices, config=config)
                except ValueError as err:
                    raise ValueError(f"Cannot load SAM adapter into module {name!r}: {err}") from err
        return remapped


def _refresh_before_forward(model: nn.Module) -> None:
    """A forward pre-hook on ``model`` (once) that writes every SAM layer's current offsets into its base tensors.

    A layer refreshes its own tensor when it runs, but a tensor can be read before (or without) its SAM layer running:
    a module shared under two names is wrapped under one only (T5's embeddings on transformers 4.57 use the table
    through ``encoder.embed_tokens``, not the wrapped ``shared``). Under ``SAMModel.forward`` (PeftModelFor* task
    models), which has refreshed everything already, it returns at once; it keeps no arenas, so a deep copy of the
    model that carries the hook along shares nothing with the original.
    """
    if "_sam_refresh_hook" in model.__dict__:
        return
    model.__dict__["_sam_refresh_hook"] = model.register_forward_pre_hook(_RefreshHook())


class _Peers(WeakSet):
    """The SAM layers of one injection, held weakly; pickles (and deep-copies) as the set of its layers."""

    def __reduce__(self):
        return (_Peers, (list(self),))


class _RefreshHook:
    """The pre-hook of :func:`_refresh_before_forward`: a plain object, so a model carrying it pickles."""

    def __init__(self) -> None:
        self.state = BatchedStep(use_arenas=False)

    def __call__(self, module: nn.Module, args) -> None:
        if module.__dict__.get("_sam_refreshed"):  # called from SAMModel.forward, which refreshed everything
            return
        layers = [m for m in module.modules() if isinstance(m, SAMLayer)]
        if layers:
            self.state.refresh(layers)


def load_sam_indices(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int:
    """Give every SAM layer of ``model`` the entry indices stored in ``state_dict``; returns how many were found.

    For resuming a run with ``accelerator.load_state`` (or any plain ``load_state_dict``): an adapter that was not
    calibrated in this process holds placeholder indices whose lengths need not match the saved values, so the
    indices are set first, without re-running selection. Keys may carry a ``module.`` (DDP) prefix. A tensor whose
    indices are absent from ``state_dict`` (``global`` scope gave it no entry) is emptied as well.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    found = 0
    for name, module in model.named_modules():
        if not isinstance(module, SAMLayer):
            continue
        name = name.removeprefix("module.")
        for tensor_name, (idx_name, _) in TENSOR_SLOTS.items():
            for adapter in list(getattr(module, idx_name).keys()):
                key = f"{name}.{idx_name}.{adapter}"
                module.set_entries(adapter, tensor_name, state_dict.get(key, torch.empty(0, dtype=torch.long)))
                found += int(key in state_dict)
    if found == 0:
        raise ValueError(
            "No SAM indices in this state dict: was it saved from a model with a SAM adapter "
            "(keys like '<module>.sam_indices.<adapter>')?"
        )
    return found
