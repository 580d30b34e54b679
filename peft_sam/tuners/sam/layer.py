"""SAM layers: a frozen base module plus, per adapter, a sparse trainable offset on chosen entries.

For every adapted tensor (the base module's ``weight`` and, optionally, ``bias``) an adapter holds
``sam_indices`` (flat indices into the tensor, an int32 buffer; int64 for tensors with >= 2**31 entries) and
``sam_values`` (a 1-D parameter with the offsets). The bias uses ``sam_bias_indices``/``sam_bias_values``.

While an adapter is active (and not merged), the base tensors hold ``W0 + Delta`` (refreshed by the forward after
each optimizer step; the pre-trained values of the touched entries are kept in ``sam_w0``/``sam_bias_w0``), so the
forward and the input gradient are the base module's own dense ops and the entries' gradient is a sampled product
(:mod:`peft_sam.ops.sparse_delta`). Disabling, switching, deleting, merging or saving restores ``W0`` exactly where
it needs to; every entry that is not chosen never changes.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

from ...ops.sparse_delta import EmbeddingRows, EntryPattern, SampledEmbedding, SampledLinear, tap_entries
from .._common import has_plain_forward
from .sharding import is_sharded

# tensor name on the base module -> (indices buffer dict, values parameter dict) on the SAM layer
TENSOR_SLOTS = {"weight": ("sam_indices", "sam_values"), "bias": ("sam_bias_indices", "sam_bias_values")}
# tensor name -> buffer dict with the pre-trained values at the entries while the base tensor holds W0 + Delta
W0_SLOTS = {"weight": "sam_w0", "bias": "sam_bias_w0"}


class SAMNotCalibratedError(RuntimeError):
    """Raised when a gradient-selected SAM adapter is trained or saved before ``select_parameters`` ran."""


PENDING_INDEX = -1  # placeholder index of an adapter whose entries have not been chosen yet


@lru_cache(maxsize=8)
def _warn_pending_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class _StepState:
    """What every SAM layer learns from the optimizers, through one global optimizer-step post-hook.

    * ``steps`` counts optimizer steps in this process. It is part of every layer's "are the base tensors current"
      key, because some optimizers update the values without bumping their version counter (``AdamW(fused=True)``,
      the Trainer's default optimizer): after any step the next forward rewrites ``W0 + Delta``.
    * ``graph_pending`` is set by a forward that recorded a graph through an active adapter and cleared by the next
      optimizer step. While it is set, a disabled forward must not write W0 into the base tensors (the pending
      backward saved them, e.g. a reference forward under ``disable_adapter()`` between the policy forward and its
      backward, as in DPO); it runs on an out-of-place copy of W0 instead.
    """

    steps = 0
    graph_pending = False


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _StepState.steps += 1
    _StepState.graph_pending = False


_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices address tensors below 2**31 entries; larger tensors need int64."""
    return torch.int32 if numel < 2**31 else torch.int64


class SAMLayer(BaseTunerLayer):
    """Mixin holding the sparse offsets of every adapter on one base module."""

    adapter_layer_names = ("sam_values", "sam_bias_values")
    other_param_names = ("sam_indices", "sam_bias_indices", "sam_shapes", "sam_w0", "sam_bias_w0")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sam_values = nn.ParameterDict({})
        self.sam_bias_values = nn.ParameterDict({})
        self.sam_indices = BufferDict({}, persistent=True)
        self.sam_bias_indices = BufferDict({}, persistent=True)
        # adapter name -> shapes of the adapted base tensors (saved, so a file never loads onto other shapes)
        self.sam_shapes = BufferDict({}, persistent=True)
        # adapter name -> W0 at its entries, while the base tensor holds W0 + Delta (not saved: W0 is the base's)
        self.sam_w0 = BufferDict({}, persistent=False)
        self.sam_bias_w0 = BufferDict({}, persistent=False)
        # set by a calibration on FSDP2 shards: the module's tensors are FSDP's, whole only inside its forward
        self._sam_on_shards = False
        # tensor name -> (values key, adapters, {adapter: flat indices}, base data_ptr) of what the base holds now
        self._sam_live: dict[str, tuple] = {}
        # tensor name -> the SAM layer whose adapter entries this base tensor uses (tied input/output embeddings:
        # one delta per tensor, owned by the first layer; this layer adds its gradient to the owner's values)
        self._sam_tied: dict[str, SAMLayer] = {}
        # tensor name -> the model-level arena whose buffer holds this base tensor while it is live (batched.py)
        self._sam_arena_of: dict[str, Any] = {}
        # tensor name -> this forward's view of a 1-D base tensor from the model-level tap (batched.py), if any
        self._sam_model_taps: dict[str, torch.Tensor] = {}
        # adapter name -> base tensors ("weight", "bias") a selection may choose entries in
        self.sam_candidates: dict[str, list[str]] = {}
        # (adapter, buffer name) -> ((buffer, version), pending?): is_pending without a sync per forward
        self._sam_pending_cache: dict[tuple[str, str], tuple[tuple[torch.Tensor, int], bool]] = {}
        self._sam_shapes_checked: dict[str, tuple[torch.Tensor, int]] = {}  # (buffer, version) checked last
        # (tensor name, adapter) -> (index buffer, its version, int64 indices, derived structures): rebuilt only
        # when an index buffer changes (selection, loading, .to(device)), not every forward
        self._sam_index_cache: dict[tuple[str, str], tuple] = {}
        # adapter name -> {tensor name: base values at the indices before merging}, to unmerge exactly
        self._sam_merge_backup: dict[str, dict[str, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        # state dicts always show the pre-trained base tensors; loading into this layer restores them first
        self.register_state_dict_post_hook(_pristine_state_dict_hook)
        self.register_load_state_dict_pre_hook(_restore_before_load_hook)
        self.register_load_state_dict_post_hook(_drop_unloaded_slots_hook)

    # ------------------------------------------------------------------ adapter bookkeeping
    def adapted_tensor_names(self, include_bias: bool = True) -> list[str]:
        """Names of the base tensors this layer can adapt (``weight`` and, if present, ``bias``)."""
        base = self.get_base_layer()
        names = ["weight"] if isinstance(getattr(base, "weight", None), torch.Tensor) else []
        if include_bias and isinstance(getattr(base, "bias", None), torch.Tensor):
            names.append("bias")
        return names

    def base_tensor(self, tensor_name: str) -> torch.Tensor:
        """The frozen base tensor (``weight`` or ``bias``)."""
        return getattr(self.get_base_layer(), tensor_name)

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False, **kwargs: Any) -> None:
        """Add an adapter whose entries are still to be chosen (placeholders of index -1).

        In ``per_tensor`` scope the placeholders already have the final length int(p * numel), so a saved adapter
        can be loaded straight into them (transformers' ``load_adapter`` does that); a selection or PEFT's loading
        replaces them by the real indices.
        """
        self.sam_candidates[adapter_name] = []
        for tensor_name in self.adapted_tensor_names(include_bias=config.include_bias):
            numel = self.base_tensor(tensor_name).numel()
            if config.selection == "bitfit":
                count = numel if tensor_name == "bias" else 0
            elif config.scope == "per_tensor":
                count = int(config.p * numel)
            else:
                count = 1  # the global top-k share of this tensor is only known after selection
            if count == 0:
                continue  # this tensor can never hold an entry: no slot, no empty parameter
            self.sam_candidates[adapter_name].append(tensor_name)
            placeholder = torch.full((count,), PENDING_INDEX, dtype=torch.long)
            self.set_entries(adapter_name, tensor_name, placeholder, config=config, _placeholder=True)
        self.sam_shapes[adapter_name] = self.base_shapes(config.include_bias).to(self.base_tensor("weight").device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def base_shapes(self, include_bias: bool = True) -> torch.Tensor:
        """Shapes of the adapted tensors as one int64 vector: weight dims, -1, bias dims."""
        dims = list(self.base_tensor("weight").shape)
        if include_bias and "bias" in self.adapted_tensor_names():
            dims += [-1, *self.base_tensor("bias").shape]
        return torch.tensor(dims, dtype=torch.long)

    def check_shapes(self, adapter_name: str) -> None:
        """Raise if the adapter was made for base tensors of other shapes (e.g. loaded onto another model)."""
        if adapter_name not in self.sam_shapes or torch.compiler.is_compiling():
            return  # compiled code: shapes were checked when the adapter was loaded or first used eagerly
        stored = self.sam_shapes[adapter_name]
        checked = self._sam_shapes_checked.get(adapter_name)
        if checked is not None and checked[0] is stored and checked[1] == stored._version:
            return
        expected = self.base_shapes(include_bias=stored.numel() > self.base_tensor("weight").dim())
        if not torch.equal(stored.cpu(), expected):
            raise ValueError(
                f"SAM adapter {adapter_name!r} was made for tensors of shape {stored.tolist()} (weight dims, -1, "
                f"bias dims) but this module has {expected.tolist()}: load it onto the base model it was trained on."
            )
        self._sam_shapes_checked[adapter_name] = (stored, stored._version)

    def set_entries(
        self,
        adapter_name: str,
        tensor_name: str,
        indices: torch.Tensor,
        config=None,
        values: torch.Tensor | None = None,
        _placeholder: bool = False,
    ) -> None:
        """Make ``indices`` (flat, unique) the trained entries of ``tensor_name`` for ``adapter_name``.

        New offsets are zero (``init_weights=True``) or small random numbers, unless ``values`` is given.
        Entries are kept in row-major order (``values`` are permuted along). Replaces the parameter object, so
        call it before an optimizer is built.
        """
        self.restore_base()  # the backups of W0 belong to the old entries
        base = self.base_tensor(tensor_name)
        indices = indices.reshape(-1).to(device=base.device, dtype=torch.long)
        if not _placeholder and indices.numel() > 1:
            indices, order = torch.sort(indices)
            if values is not None:
                values = values.reshape(-1)[order.to(values.device)]
        if not _placeholder and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= base.numel()):
            raise ValueError(
                f"SAM indices for {tensor_name} of shape {tuple(base.shape)} are out of range "
                f"[{int(indices.min())}, {int(indices.max())}]: the adapter was made for a model with other shapes."
            )
        idx_name, val_name = TENSOR_SLOTS[tensor_name]
        if indices.numel() == 0:  # nothing chosen in this tensor (global scope): drop the slot
            for container in (getattr(self, idx_name), getattr(self, val_name)):
                if adapter_name in container:
                    del container[adapter_name]
            return
        if values is None:
            init_weights = True if config is None else config.init_weights
            if init_weights:
                values = torch.zeros(indices.numel(), dtype=base.dtype, device=base.device)
            else:
                gen = torch.Generator().manual_seed(0 if config is None else int(config.seed) + indices.numel())
                values = (0.1 * torch.randn(indices.numel(), generator=gen)).to(base.dtype).to(base.device)
        getattr(self, idx_name)[adapter_name] = indices.to(index_dtype_for(base.numel()))
        getattr(self, val_name)[adapter_name] = nn.Parameter(values.to(base.device), requires_grad=True)
        self.set_adapter(self.active_adapters)

    def entries(self, adapter_name: str, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices as int64, values) of one adapter on one tensor, or None when that tensor is not adapted."""
        idx_name, val_name = TENSOR_SLOTS[tensor_name]
        values = getattr(self, val_name)
        if adapter_name not in values:
            return None
        return getattr(self, idx_name)[adapter_name].long(), values[adapter_name]

    def is_pending(self, adapter_name: str) -> bool:
        """True while the adapter still holds placeholder indices (no selection run, nothing loaded)."""
        for idx_name, _ in TENSOR_SLOTS.values():
            buffers = getattr(self, idx_name)
            if adapter_name not in buffers:
                continue
            idx = buffers[adapter_name]
            cached = self._sam_pending_cache.get((adapter_name, idx_name))
            if torch.compiler.is_compiling():  # version counters are not traceable: the eager answer stands
                if cached is None:
                    return _eager_is_pending(self, adapter_name)
                if cached[1]:
                    return True
                continue
            key = (idx, idx._version)
            if cached is None or cached[0][0] is not idx or cached[0][1] != idx._version:
                cached = (key, bool(idx.numel()) and bool((idx < 0).any()))
                self._sam_pending_cache[(adapter_name, idx_name)] = cached
            if cached[1]:
                return True
        return False

    def num_entries(self, adapter_name: str) -> int:
        """Number of trained entries of one adapter on this layer."""
        return sum(e[0].numel() for t in TENSOR_SLOTS if (e := self.entries(adapter_name, t)) is not None)

    def delete_adapter(self, adapter_name: str) -> None:  # noqa: D102
        self.restore_base()
        super().delete_adapter(adapter_name)
        self._sam_pending_cache = {k: v for k, v in self._sam_pending_cache.items() if k[0] != adapter_name}
        self.sam_candidates.pop(adapter_name, None)
        self._sam_merge_backup.pop(adapter_name, None)
        self._sam_index_cache.clear()  # drop references to the deleted buffers
        self._sam_shapes_checked.pop(adapter_name, None)

    def _ready_adapters(self, tensor_name: str) -> tuple[str, ...]:
        """Active adapters with selected entries on ``tensor_name``."""
        idx_name, val_name = TENSOR_SLOTS[tensor_name]
        buffers, values = getattr(self, idx_name), getattr(self, val_name)
        return tuple(
            a
            for a in self.active_adapters
            if a in values and a in buffers and buffers[a].numel() and not self.is_pending(a)
        )

    def _flat_index(self, tensor_name: str, adapter_name: str) -> torch.Tensor:
        """The int64 flat indices of one adapter on one tensor, converted once per index buffer."""
        idx = getattr(self, TENSOR_SLOTS[tensor_name][0])[adapter_name]
        key = (tensor_name, adapter_name)
        cached = self._sam_index_cache.get(key)
        if torch.compiler.is_compiling() and cached is not None and cached[0] is idx:
            return cached[2]
        if cached is None or cached[0] is not idx or cached[1] != idx._version:
            cached = (idx, idx._version, idx.long(), {})
            self._sam_index_cache[key] = cached
        return cached[2]

    def _derived(self, tensor_name: str, adapter_name: str, kind: str, build: Any) -> Any:
        """``build(flat indices)`` for one adapter's entries, computed once per index change (no per-step syncs)."""
        flat = self._flat_index(tensor_name, adapter_name)
        derived = self._sam_index_cache[(tensor_name, adapter_name)][3]
        if kind not in derived:
            derived[kind] = torch.compiler.disable(build)(flat)  # bincount/unique: built once, eagerly
        return derived[kind]

    # ------------------------------------------------------------------ the base tensors hold W0 + Delta
    def _registered(self, tensor_name: str) -> nn.Parameter | None:
        """The base module's registered parameter, or None while a wrapper shadows it (FSDP, functional_call)."""
        found = self.get_base_layer()._parameters.get(tensor_name)
        return found if isinstance(found, nn.Parameter) else None

    def _values_key(self, tensor_name: str, adapters: tuple[str, ...]) -> tuple:
        values = getattr(self, TENSOR_SLOTS[tensor_name][1])
        return (_StepState.steps, *((a, values[a]._version, values[a].data_ptr()) for a in adapters))

    def refresh_base(self) -> None:
        """Make the base tensors hold ``W0 + sum of the active adapters' offsets`` (no-op when already current).

        Called by every forward; costs two kernels per adapted tensor after each optimizer step and nothing
        otherwise. The pre-trained values of the touched entries are kept (``sam_w0``), so
        :meth:`restore_base` brings ``W0`` back bit for bit.
        """
        if self.merged or self.disable_adapters:
            return
        if torch.compiler.is_compiling():
            self._refresh_traced()
            return
        for tensor_name in TENSOR_SLOTS:
            adapters = self._ready_adapters(tensor_name)
            if not adapters:
                self._restore_tensor(tensor_name)
                continue
            param = self._registered(tensor_name)
            if param is None:
                continue  # shadowed: the forward checks whether what it sees is current
            key = self._values_key(tensor_name, adapters)
            live = self._sam_live.get(tensor_name)
            if live is not None and live[0] == key and live[3] == param.data_ptr():
                continue
            self._apply_tensor(tensor_name, param, adapters, live)
            self._sam_live[tensor_name] = (key, adapters, self._sam_live[tensor_name][2], param.data_ptr())

    def _refresh_traced(self) -> None:
        """The refresh inside compiled code: only a state change (first application, other adapters) runs, eagerly.

        Compiled forwards never write the base tensors (version counters cannot be traced, and base tensors may
        share storage in a model-level arena): they build ``W0 + Delta`` out of place (see ``dispatch_forward``).
        """
        for tensor_name in TENSOR_SLOTS:
            adapters = self._ready_adapters(tensor_name)
            live = self._sam_live.get(tensor_name)
            if self._registered(tensor_name) is None:
                continue
            if (adapters and (live is None or live[1] != adapters)) or (not adapters and live is not None):
                _eager_refresh(self)
                return

    def refuse_sharded(self, tensor_name: str, param: torch.Tensor) -> None:
        """Offsets are written into whole base tensors: an FSDP2 shard (DTensor) is refused before any write."""
        if self._sam_on_shards or is_sharded(param):
            raise RuntimeError(
                f"A SAM adapter cannot run on FSDP2-sharded base weights ({tensor_name} of "
                f"{type(self.get_base_layer()).__name__} is managed by fully_shard): its entries live in whole "
                "tensors. "
                "Calibrate sharded (select_parameters), save the adapter from the full state dict "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True) -> "
                "save_pretrained(dir, state_dict=...)), then train it unsharded: on one device or with DDP."
            )

    @torch.no_grad()
    def _apply_tensor(self, tensor_name: str, param: torch.Tensor, adapters: tuple[str, ...], live) -> None:
        self.refuse_sharded(tensor_name, param)
        w0_store = getattr(self, W0_SLOTS[tensor_name])
        values = getattr(self, TENSOR_SLOTS[tensor_name][1])
        flats = {a: self._flat_index(tensor_name, a) for a in adapters}
        if live is None or live[1] != adapters:
            self._restore_tensor(tensor_name)
        target = param.detach().view(-1)  # detach() shares the version counter: autograd sees the write
        if live is None or live[1] != adapters:
            for a in adapters:  # every backup is taken before any offset is written (entries may overlap)
                w0_store[a] = target[flats[a]]
            self._sam_live[tensor_name] = (None, adapters, flats, param.data_ptr())
        if len(adapters) == 1:
            a = adapters[0]
            target.index_put_((flats[a],), w0_store[a] + values[a].detach().to(target.dtype))
            return
        self._write_entries(target, tensor_name, adapters, flats)

    def _write_entries(self, target: torch.Tensor, tensor_name: str, adapters: tuple[str, ...], flats: dict) -> None:
        """``target[entries] = W0 + sum of the adapters' offsets``: every W0 first, as entries may overlap."""
        w0_store = getattr(self, W0_SLOTS[tensor_name])
        values = getattr(self, TENSOR_SLOTS[tensor_name][1])
        for a in adapters:
            target.index_put_((flats[a],), w0_store[a])
        for a in adapters:
            target.index_add_(0, flats[a], values[a].detach().to(target.dtype))

    @torch.no_grad()
    def _restore_tensor(self, tensor_name: str) -> None:
        live = self._sam_live.pop(tensor_name, None)
        if live is None:
            return
        w0_store = getattr(self, W0_SLOTS[tensor_name])
        param = self._registered(tensor_name)
        if param is None:
            raise RuntimeError(
                f"SAM cannot restore the pre-trained {tensor_name} while a wrapper (FSDP, functional_call) replaces "
                "it: unwrap the model first."
            )
        target = param.detach().view(-1)
        for a in reversed(live[1]):
            if a in w0_store:
                target.index_put_((live[2][a],), w0_store[a])
                del w0_store[a]

    def restore_base(self) -> None:
        """Bring the base tensors back to the pre-trained ``W0`` exactly (the next forward re-applies the offsets)."""
        for tensor_name in TENSOR_SLOTS:
            self._restore_tensor(tensor_name)

    def in_arena(self, tensor_name: str) -> bool:
        """Whether the base tensor is a view of a model-level arena (``batched.py``), sharing storage with others."""
        arena = self._sam_arena_of.get(tensor_name)
        return arena is not None and arena.holds(self.base_tensor(tensor_name))

    def leave_arenas(self) -> None:
        """Give the base tensors their own storage back (their whole arenas are released): before unloading."""
        for arena in list(self._sam_arena_of.values()):
            arena.release()
        self._sam_arena_of.clear()

    def is_live(self) -> bool:
        """Whether the base tensors currently hold unmerged offsets (between forwards of an active adapter)."""
        return bool(self._sam_live)

    def pristine_tensor(self, tensor_name: str) -> torch.Tensor:
        """The pre-trained ``W0`` of ``tensor_name`` (a copy when the base tensor currently holds offsets)."""
        tensor = self.base_tensor(tensor_name)
        live = self._sam_live.get(tensor_name)
        if live is None:
            return tensor
        w0_store = getattr(self, W0_SLOTS[tensor_name])
        flat = tensor.detach().reshape(-1).clone()
        for a in reversed(live[1]):
            flat[live[2][a]] = w0_store[a]
        return flat.view_as(tensor)

    def enable_adapters(self, enabled: bool) -> None:  # noqa: D102
        if not enabled and not _StepState.graph_pending:  # else the disabled forward leaves the base tensors alone
            self.restore_base()
        super().enable_adapters(enabled)

    def _seen_is_current(self, tensor_name: str, adapters: tuple[str, ...]) -> bool:
        """Whether the tensor the forward sees already holds the current offsets of ``adapters``."""
        live = self._sam_live.get(tensor_name)
        return live is not None and live[1] == adapters and live[0] == self._values_key(tensor_name, adapters)

    def _out_of_place(self, tensor_name: str, adapters: tuple[str, ...]) -> torch.Tensor:
        """``W0 + offsets`` built from the tensor the forward sees (a shadowing wrapper whose copy is stale)."""
        seen = self.base_tensor(tensor_name)
        values = getattr(self, TENSOR_SLOTS[tensor_name][1])
        live = self._sam_live.get(tensor_name)
        w0_store = getattr(self, W0_SLOTS[tensor_name])
        flat = seen.reshape(-1)
        flats = {a: self._flat_index(tensor_name, a) for a in adapters}
        for a in adapters:
            w0 = w0_store[a] if live is not None and a in live[1] else seen.detach().reshape(-1)[flats[a]]
            flat = flat.index_put((flats[a],), w0.to(seen.dtype))
        for a in adapters:
            flat = flat.index_add(0, flats[a], values[a].to(seen.dtype))
        return flat.view_as(seen)

    def settle_placeholders(self, adapter_name: str) -> None:
        """Drop placeholder slots of an adapter whose other slots, or other layers, hold real indices.

        A loader that fills placeholders in place (transformers' ``load_adapter``) leaves a slot untouched when the
        file has no entries for it (e.g. a bias whose gradient is zero by construction was never selected); such a
        slot has no entries, it is not waiting for a selection. One selection (or one file) covers every layer of the
        adapter, so where the other layers of the injection hold real entries all of this layer's slots are settled.
        """
        states = {}
        for tensor_name, (idx_name, _) in TENSOR_SLOTS.items():
            buffers = getattr(self, idx_name)
            if adapter_name in buffers and buffers[adapter_name].numel() and not buffers[adapter_name].is_meta:
                states[tensor_name] = bool((buffers[adapter_name] < 0).any())
        if any(states.values()) and (not all(states.values()) or self._peers_selected(adapter_name)):
            for tensor_name, pending in states.items():
                if pending:
                    self.set_entries(adapter_name, tensor_name, torch.empty(0, dtype=torch.long))
            self._sam_pending_cache = {k: v for k, v in self._sam_pending_cache.items() if k[0] != adapter_name}

    def _peers_selected(self, adapter_name: str) -> bool:
        """Whether another layer of the same injection holds real entries of ``adapter_name``."""
        peers = getattr(self, "_sam_peers", None) or ()
        return any(
            p is not self and adapter_name in p._all_available_adapter_names() and not p.is_pending(adapter_name)
            for p in list(peers)
        )

    def _check_calibrated(self) -> None:
        for adapter in self.active_adapters:
            self.check_shapes(adapter)
            if self.is_pending(adapter):
                self.settle_placeholders(adapter)
        pending = [a for a in self.active_adapters if self.is_pending(a)]
        if not pending:
            return
        message = (
            f"SAM adapter(s) {pending} have no selected entries yet: call "
            "peft_sam.select_parameters(model, train_dataloader) after get_peft_model and before training "
            "(or use a data-free selection such as selection='magnitude')."
        )
        if self.training and torch.is_grad_enabled():
            raise SAMNotCalibratedError(message)
        _warn_pending_once(message + " Until then the outputs equal the base model's.")

    # ------------------------------------------------------------------ weights
    def get_delta_weight(self, adapter_name: str, tensor_name: str = "weight") -> torch.Tensor:
        """Dense offset of ``adapter_name`` on ``tensor_name`` (zeros where nothing is trained)."""
        base = self.base_tensor(tensor_name)
        delta = torch.zeros_like(base)
        found = self.entries(adapter_name, tensor_name)
        if found is not None:
            idx, vals = found
            delta.view(-1).index_add_(0, idx, vals.to(base.dtype))
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the offsets of the given (default: active) adapters into the base tensors."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        self.restore_base()  # merging starts from W0
        for adapter in adapter_names:
            if (adapter not in self.sam_values and adapter not in self.sam_bias_values) or self.is_pending(adapter):
                continue
            updates = []  # every tensor is checked before any is written: a failed safe merge changes nothing
            for tensor_name in TENSOR_SLOTS:
                found = self.entries(adapter, tensor_name)
                if found is None or found[0].numel() == 0:
                    continue
                idx, vals = found
                base = self.base_tensor(tensor_name)
                with torch.no_grad():
                    old = base.data.view(-1)[idx].clone()
                    new = old + vals.detach().to(base.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems broken.")
                updates.append((tensor_name, idx, old, new))
            with torch.no_grad():
                for tensor_name, idx, _, new in updates:
                    self.base_tensor(tensor_name).data.view(-1)[idx] = new
            self._sam_merge_backup[adapter] = {tensor_name: old for tensor_name, _, old, _ in updates}
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the base tensors exactly (the pre-merge values of the touched entries were kept)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for tensor_name, old in self._sam_merge_backup.pop(adapter, {}).items():
                idx, _ = self.entries(adapter, tensor_name)
                with torch.no_grad():
                    self.base_tensor(tensor_name).data.view(-1)[idx] = old

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The base module for ``unload``/``merge_and_unload``: merged if asked, otherwise at W0 (unless merged
        before); its tensors get their own storage (a plain model shares none)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        elif not self.merged:
            self.restore_base()
        self.leave_arenas()
        return self.get_base_layer()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:  # noqa: D102
        return False

    # ------------------------------------------------------------------ forward
    def dispatch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's forward on ``W0 + Delta`` (kept in the base tensors), unless disabled or merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if _StepState.graph_pending and not torch.compiler.is_compiling():
                return self._pristine_forward(x, *args, **kwargs)
            self.restore_base()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_calibrated()
        self.refresh_base()
        for owner in self._sam_tied.values():
            owner.refresh_base()
        adapters = {t: self._source(t)._ready_adapters(t) for t in TENSOR_SLOTS}
        if not adapters["weight"] and not adapters["bias"]:
            return self.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            _StepState.graph_pending = True
        tensors = {}  # what the forward runs on: the base tensors, or W0 + Delta built for a shadowing wrapper
        for tensor_name, names in adapters.items():
            if names:
                source = self._source(tensor_name)
                if torch.compiler.is_compiling():  # compiled: W0 + Delta out of place, never a write in the graph
                    tensors[tensor_name] = source._out_of_place(tensor_name, names)
                    continue
                current = self._registered(tensor_name) is not None or source._seen_is_current(tensor_name, names)
                tensors[tensor_name] = None if current else source._out_of_place(tensor_name, names)
        return self._sam_forward(x, adapters, tensors, *args, **kwargs)

    def _pristine_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's forward on out-of-place copies of W0, leaving ``W0 + Delta`` in the base tensors (which a
        pending backward saved). Each copy lives for this layer's forward only."""
        base = self.get_base_layer()
        pristine = {}
        for tensor_name in TENSOR_SLOTS:
            source = self._source(tensor_name)
            if tensor_name in source._sam_live and self._registered(tensor_name) is not None:
                pristine[tensor_name] = source.pristine_tensor(tensor_name).detach()
        if not pristine:
            return base(x, *args, **kwargs)
        return torch.func.functional_call(base, pristine, (x, *args), kwargs, strict=False)

    def _source(self, tensor_name: str) -> SAMLayer:
        """The layer holding the entries of ``tensor_name``: this one, or the owner of a tied tensor."""
        return self._sam_tied.get(tensor_name, self)

    def _values(self, tensor_name: str, adapters: tuple[str, ...]) -> list[torch.Tensor]:
        values = getattr(self._source(tensor_name), TENSOR_SLOTS[tensor_name][1])
        return [values[a] for a in adapters]

    def _tapped(self, tensor_name: str, adapters: tuple[str, ...], tensors: dict) -> torch.Tensor | None:
        """The base tensor as the forward should see it, carrying the gradient of the entries' values."""
        if tensors.get(tensor_name) is not None:
            return tensors[tensor_name]  # built out of place: autograd reaches the values through it
        base = getattr(self.get_base_layer(), tensor_name, None)
        if not adapters or base is None:
            return base
        if not torch.compiler.is_compiling() and tensor_name in self._sam_model_taps:
            return self._sam_model_taps[tensor_name]  # the model-level tap gathers this tensor's entries
        flats = [self._source(tensor_name)._flat_index(tensor_name, a) for a in adapters]
        return tap_entries(base, flats, self._values(tensor_name, adapters))

    def _sam_forward(self, x, adapters, tensors, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "sam." + super().__repr__()


class _LeafLayer(nn.Module, SAMLayer):
    """A SAM layer around one leaf module: the constructor and forward every layer type shares."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        SAMLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    forward = SAMLayer.dispatch_forward

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped module (a conv's ``stride``, a table's ``num_embeddings``) read through the layer,
        as model code does (Whisper's encoder reads ``conv1.stride``); private names are never forwarded."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer") if not name.startswith("_") else None
            if base is None:
                raise
            return getattr(base, name)


class Linear(_LeafLayer):
    """SAM on ``nn.Linear`` (weight [out, in]) or transformers ``Conv1D`` (GPT-2 style, weight [in, out])."""

    @property
    def is_conv1d(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    def _sam_forward(self, x, adapters, tensors, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if not has_plain_forward(base):  # a subclass with its own forward (scaling, ...): run it as Functional does
            return Functional._sam_forward(self, x, adapters, tensors, *args, **kwargs)
        if any(t is not None for t in tensors.values()):  # a shadowing wrapper: plain autograd on W0 + Delta
            weight = tensors.get("weight") if tensors.get("weight") is not None else base.weight
            bias = tensors.get("bias") if tensors.get("bias") is not None else base.bias
            x = self._cast_input_dtype(x, weight.dtype)
            return F.linear(x, weight.t() if self.is_conv1d else weight, bias)
        weight, bias = base.weight, base.bias
        if adapters["bias"] and not torch.compiler.is_compiling() and "bias" in self._sam_model_taps:
            # the model-level tap gathers the bias entries from the dense bias gradient (as full FT computes it)
            bias, adapters = self._sam_model_taps["bias"], {"weight": adapters["weight"], "bias": ()}
        x = self._cast_input_dtype(x, weight.dtype)
        rows, cols = weight.shape
        num_bias = 0 if bias is None else bias.numel()
        w_source, b_source = self._source("weight"), self._source("bias")
        w_patterns = tuple(
            w_source._derived("weight", a, "csr", lambda f: EntryPattern(f, rows, cols)) for a in adapters["weight"]
        )
        b_patterns = tuple(
            b_source._derived("bias", a, "csr", lambda f: EntryPattern(f, 1, num_bias)) for a in adapters["bias"]
        )
        values = self._values("weight", adapters["weight"]) + self._values("bias", adapters["bias"])
        return SampledLinear.apply(x, weight, bias, (w_patterns, b_patterns, self.is_conv1d), *values)


class Embedding(_LeafLayer):
    """SAM on ``nn.Embedding``: a plain lookup in the table (which holds W0 + Delta); entries' gradients by row."""

    def _sam_forward(self, x, adapters, tensors, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        plain = (
            not args
            and not kwargs
            and has_plain_forward(base)  # not e.g. Gemma's scaled or BART's positional embedding
            and base.max_norm is None
            and not base.scale_grad_by_freq
            and not base.sparse
        )
        if tensors.get("weight") is not None or not plain:  # unusual embeddings: autograd through the table
            weight = self._tapped("weight", adapters["weight"], tensors)
            return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs, strict=False)
        num_ids, dim = base.weight.shape
        tables = tuple(
            self._source("weight")._derived(
                "weight", a, "rows", lambda f: EmbeddingRows(f, num_ids, dim, base.padding_idx)
            )
            for a in adapters["weight"]
        )
        values = self._values("weight", adapters["weight"])
        return SampledEmbedding.apply(x, base.weight, base.padding_idx, tables, *values)


class Functional(_LeafLayer):
    """SAM on any other leaf module whose only parameters are ``weight``/``bias`` (LayerNorm, RMSNorm, conv, ...).

    The module's own forward runs on its base tensors (which hold W0 + Delta); the entries' gradients are read off
    the dense gradient its backward computes (these tensors are small, or a conv kernel).
    """

    def _sam_forward(self, x, adapters, tensors, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        params = {}
        for tensor_name, names in adapters.items():
            if names or tensors.get(tensor_name) is not None:
                params[tensor_name] = self._tapped(tensor_name, names, tensors)
        if type(base) is nn.LayerNorm and not args and not kwargs:  # the common case, without functional_call
            return F.layer_norm(
                x, base.normalized_shape, params.get("weight", base.weight), params.get("bias", base.bias), base.eps
            )
        return torch.func.functional_call(base, params, (x, *args), kwargs, strict=False)


@torch.compiler.disable
def _eager_refresh(layer: SAMLayer) -> None:
    layer.refresh_base()


@torch.compiler.disable
def _eager_is_pending(layer: SAMLayer, adapter_name: str) -> bool:
    return layer.is_pending(adapter_name)


def link_tied_tensors(layers: list[SAMLayer], adapter_name: str) -> None:
    """One delta per base tensor: where several SAM layers adapt the same tensor (tied input/output embeddings,
    shared layers), the first keeps ``adapter_name``'s entries and the others drop theirs and use the owner's (their
    gradient adds to the owner's values; merging stays exact)."""
    owners: dict[int, tuple[SAMLayer, str]] = {}
    for layer in layers:
        for tensor_name in layer.adapted_tensor_names():
            key = id(layer.base_tensor(tensor_name))
            if key not in owners:
                owners[key] = (layer, tensor_name)
                continue
            owner, owner_tensor = owners[key]
            if owner_tensor != tensor_name or owner is layer:
                continue
            layer.restore_base()
            if tensor_name in layer.sam_candidates.get(adapter_name, []):
                layer.sam_candidates[adapter_name].remove(tensor_name)
            layer.set_entries(adapter_name, tensor_name, torch.empty(0, dtype=torch.long))
            layer._sam_tied[tensor_name] = owner


def _pristine_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State dicts hold the pre-trained base tensors, never W0 + Delta (which lives there only between forwards), and
    never a view of a model-level arena (safetensors refuses tensors that share storage): a copy then. Entries whose
    values no longer match their indices in length are refused here, so no file is written from them."""
    for idx_name, val_name in TENSOR_SLOTS.values():
        for adapter, values in getattr(module, val_name).items():
            idx = getattr(module, idx_name)[adapter] if adapter in getattr(module, idx_name) else None
            if idx is not None and values.numel() != idx.numel():
                raise RuntimeError(
                    f"SAM adapter {adapter!r} of {prefix.rstrip('.') or 'this layer'} has {idx.numel()} indices but "
                    f"{values.numel()} values: its value parameter was replaced behind its back (FSDP2 swaps the "
                    "parameters it manages on every forward: save a sharded calibration before running the model). "
                    "Nothing was saved from it."
                )
    for tensor_name in module.adapted_tensor_names():
        key = f"{prefix}base_layer.{tensor_name}"
        if key not in state_dict:
            continue
        source = module._source(tensor_name)  # a tied tensor's offsets and arena are its owner's
        if tensor_name in source._sam_live:
            state_dict[key] = source.pristine_tensor(tensor_name).detach()
        elif source.in_arena(tensor_name):
            state_dict[key] = state_dict[key].clone()


def _drop_unloaded_slots_hook(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: placeholder slots the file did not fill have no entries (see settle_placeholders)."""
    for adapter in list(module.sam_candidates):
        module.settle_placeholders(adapter)


def _restore_before_load_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loading anything into a SAM layer (base tensors, indices, values) starts from W0."""
    if module._sam_live and any(key.startswith(prefix) for key in state_dict):
        module.restore_base()


def in_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """(in, out) features of a module SAM adapts: PEFT's answer for Linear/Conv1D/conv layers, the table size for
    an embedding, the feature size for a norm layer (PEFT would warn "unsupported layer type" for the latter two)."""
    if isinstance(module, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _get_in_out_features(module)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    weight = getattr(module, "weight", None)
    size = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() else None
    return size, size


def is_norm_like(module: nn.Module) -> bool:
    """A leaf module whose parameters are exactly ``weight`` (and optionally ``bias``), e.g. LayerNorm/RMSNorm."""
    if any(True for _ in module.children()):
        return False
    names = {n for n, _ in module.named_parameters(recurse=False)}
    return "weight" in names and names <= {"weight", "bias"}


def sam_layer_class_for(module: nn.Module) -> type[SAMLayer] | None:
    """The SAM layer class that can wrap ``module``, or None if it is not supported."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return Linear
    if isinstance(module, nn.Embedding):
        return Embedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Functional  # conv kernels go through functional_call as well
    if is_norm_like(module):
        return Functional
    return None
