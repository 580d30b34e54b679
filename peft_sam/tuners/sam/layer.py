"""SAM layers: a frozen base module plus, per adapter, a sparse trainable offset on chosen entries.

For every adapted tensor (the base module's ``weight`` and, optionally, ``bias``) an adapter holds
``sam_indices`` (flat indices into the tensor, an int32 buffer; int64 for tensors with >= 2**31 entries) and
``sam_values`` (a 1-D parameter with the offsets). The bias uses ``sam_bias_indices``/``sam_bias_values``.
The base tensors never change while training, so every non-chosen entry stays at its pre-trained value.
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
from transformers.pytorch_utils import Conv1D

from ...ops.sparse_delta import SparsePattern, sparse_delta_linear

# tensor name on the base module -> (indices buffer dict, values parameter dict) on the SAM layer
TENSOR_SLOTS = {"weight": ("sam_indices", "sam_values"), "bias": ("sam_bias_indices", "sam_bias_values")}


class SAMNotCalibratedError(RuntimeError):
    """Raised when a gradient-selected SAM adapter is trained or saved before ``select_parameters`` ran."""


PENDING_INDEX = -1  # placeholder index of an adapter whose entries have not been chosen yet


@lru_cache(maxsize=8)
def _warn_pending_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices address tensors below 2**31 entries; larger tensors need int64."""
    return torch.int32 if numel < 2**31 else torch.int64


class SAMLayer(BaseTunerLayer):
    """Mixin holding the sparse offsets of every adapter on one base module."""

    adapter_layer_names = ("sam_values", "sam_bias_values")
    other_param_names = ("sam_indices", "sam_bias_indices", "sam_shapes")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sam_values = nn.ParameterDict({})
        self.sam_bias_values = nn.ParameterDict({})
        self.sam_indices = BufferDict({}, persistent=True)
        self.sam_bias_indices = BufferDict({}, persistent=True)
        # adapter name -> shapes of the adapted base tensors (saved, so a file never loads onto other shapes)
        self.sam_shapes = BufferDict({}, persistent=True)
        # adapter name -> base tensors ("weight", "bias") a selection may choose entries in
        self.sam_candidates: dict[str, list[str]] = {}
        # (adapter, buffer name) -> ((buffer, version), pending?): is_pending without a sync per forward
        self._sam_pending_cache: dict[tuple[str, str], tuple[tuple[torch.Tensor, int], bool]] = {}
        self._sam_shapes_checked: dict[str, tuple[torch.Tensor, int]] = {}  # (buffer, version) checked last
        # tensor name -> (key of the active adapters' index buffers, int64 indices, derived index structures):
        # rebuilt only when an index buffer changes (selection, loading, .to(device)), not every forward
        self._sam_index_cache: dict[str, tuple[tuple, torch.Tensor, Any]] = {}
        # adapter name -> {tensor name: base values at the indices before merging}, to unmerge exactly
        self._sam_merge_backup: dict[str, dict[str, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

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
        self.sam_shapes[adapter_name] = self.base_shapes(config.include_bias).to(
            self.base_tensor("weight").device
        )
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def base_shapes(self, include_bias: bool = True) -> torch.Tensor:
        """Shapes of the adapted tensors as one int64 vector: weight dims, -1, bias dims."""
        dims = list(self.base_tensor("weight").shape)
        if include_bias and "bias" in self.adapted_tensor_names():
            dims += [-1, *self.base_tensor("bias").shape]
        return torch.tensor(dims, dtype=torch.long)

    def check_shapes(self, adapter_name: str) -> None:
        """Raise if the adapter was made for base tensors of other shapes (e.g. loaded onto another model)."""
        if adapter_name not in self.sam_shapes:
            return
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
        Replaces the parameter object, so call it before an optimizer is built.
        """
        base = self.base_tensor(tensor_name)
        indices = indices.reshape(-1).to(device=base.device, dtype=torch.long)
        if (
            not _placeholder
            and indices.numel()
            and (int(indices.min()) < 0 or int(indices.max()) >= base.numel())
        ):
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
                gen = torch.Generator().manual_seed(
                    0 if config is None else int(config.seed) + indices.numel()
                )
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
            key = (idx, idx._version)
            cached = self._sam_pending_cache.get((adapter_name, idx_name))
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
        super().delete_adapter(adapter_name)
        self._sam_pending_cache = {k: v for k, v in self._sam_pending_cache.items() if k[0] != adapter_name}
        self.sam_candidates.pop(adapter_name, None)
        self._sam_merge_backup.pop(adapter_name, None)
        self._sam_index_cache.clear()  # drop references to the deleted buffers
        self._sam_shapes_checked.pop(adapter_name, None)

    def _active_entries(self, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Indices (int64) and values of all active, selected adapters on one tensor, concatenated.

        The indices come from a cache keyed by the index buffers (so the same tensor object is returned while
        they do not change, and :meth:`_derived_indices` can hang index structures on it).
        """
        idx_name, val_name = TENSOR_SLOTS[tensor_name]
        buffers, values = getattr(self, idx_name), getattr(self, val_name)
        ready = [
            a
            for a in self.active_adapters
            if a in values and a in buffers and buffers[a].numel() and not self.is_pending(a)
        ]
        if not ready:
            return None
        # the key holds the buffers themselves (compared by identity and version): a freed buffer's address
        # cannot be reused by a new one while the cache refers to it
        key = tuple((a, buffers[a], buffers[a]._version) for a in ready)
        cached = self._sam_index_cache.get(tensor_name)
        if cached is None or not _same_buffers(cached[0], key):
            idx = torch.cat([buffers[a].long() for a in ready]) if len(ready) > 1 else buffers[ready[0]].long()
            cached = (key, idx, None)
            self._sam_index_cache[tensor_name] = cached
        vals = values[ready[0]] if len(ready) == 1 else torch.cat([values[a] for a in ready])
        return cached[1], vals

    def _derived_indices(self, tensor_name: str, build: Any) -> Any:
        """``build(indices)`` for the current active indices of ``tensor_name``, computed once per index change."""
        key, idx, derived = self._sam_index_cache[tensor_name]
        if derived is None:
            derived = build(idx)
            self._sam_index_cache[tensor_name] = (key, idx, derived)
        return derived

    def _check_calibrated(self) -> None:
        for adapter in self.active_adapters:
            self.check_shapes(adapter)
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
        for adapter in adapter_names:
            if (adapter not in self.sam_values and adapter not in self.sam_bias_values) or self.is_pending(
                adapter
            ):
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

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:  # noqa: D102
        return False

    # ------------------------------------------------------------------ forward
    def dispatch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output, plus the offsets of the active adapters unless disabled or merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_calibrated()
        weight_entries = self._active_entries("weight")
        bias_entries = self._active_entries("bias")
        if weight_entries is None and bias_entries is None:
            return self.base_layer(x, *args, **kwargs)
        return self._sam_forward(x, weight_entries, bias_entries, *args, **kwargs)

    def _effective_bias(self, bias_entries) -> torch.Tensor | None:
        bias = self.get_base_layer().bias
        if bias is None or bias_entries is None:
            return bias
        idx, vals = bias_entries
        return bias.index_add(0, idx, vals.to(bias.dtype))

    def _sam_forward(self, x, weight_entries, bias_entries, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "sam." + super().__repr__()


class Linear(nn.Module, SAMLayer):
    """SAM on ``nn.Linear`` (weight [out, in]) or transformers ``Conv1D`` (GPT-2 style, weight [in, out])."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        SAMLayer.__init__(self, base_layer, **kwargs)
        self.is_conv1d = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    forward = SAMLayer.dispatch_forward

    def _sam_forward(self, x, weight_entries, bias_entries, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        x = self._cast_input_dtype(x, weight.dtype)
        bias = self._effective_bias(bias_entries)
        if weight_entries is None:
            w = weight.t() if self.is_conv1d else weight
            return F.linear(x, w, bias)
        _, vals = weight_entries
        pattern = self._derived_indices("weight", self._build_pattern)
        w = weight.t() if self.is_conv1d else weight
        return sparse_delta_linear(x, w, bias, None, None, vals, pattern=pattern)

    def _build_pattern(self, idx: torch.Tensor) -> SparsePattern:
        weight = self.get_base_layer().weight
        if self.is_conv1d:  # weight [in, out]; the op works on its [out, in] view
            n_out = weight.shape[1]
            return SparsePattern.build(idx % n_out, torch.div(idx, n_out, rounding_mode="floor"), weight.shape[0])
        n_in = weight.shape[1]
        return SparsePattern.build(torch.div(idx, n_in, rounding_mode="floor"), idx % n_in, n_in)


class Embedding(nn.Module, SAMLayer):
    """SAM on ``nn.Embedding``: the looked-up rows get the offsets of their chosen entries added."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        SAMLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    forward = SAMLayer.dispatch_forward

    def _sam_forward(self, x, weight_entries, bias_entries, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if weight_entries is None:
            return result
        _, vals = weight_entries
        row_of_id, flat_in_table, num_rows = self._derived_indices("weight", self._build_row_table)
        # the offsets live in a small [rows holding entries + 1, dim] table (the last row stays zero, for ids
        # without entries); looking ids up in it needs no vocabulary-sized tensor and no host sync
        dim = self.get_base_layer().weight.shape[1]
        table = vals.new_zeros((num_rows + 1) * dim).index_add(0, flat_in_table, vals).view(num_rows + 1, dim)
        return result + F.embedding(row_of_id[x], table).to(result.dtype)

    def _build_row_table(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(id -> row of the offset table, or the zero row; each entry's flat position in the table; rows)."""
        num_ids, dim = self.get_base_layer().weight.shape
        rows, row_pos = torch.unique(torch.div(idx, dim, rounding_mode="floor"), return_inverse=True)
        row_of_id = torch.full((num_ids,), rows.numel(), dtype=torch.long, device=idx.device)
        row_of_id[rows] = torch.arange(rows.numel(), device=idx.device)
        return row_of_id, row_pos * dim + idx % dim, rows.numel()


class Functional(nn.Module, SAMLayer):
    """SAM on any other leaf module whose only parameters are ``weight``/``bias`` (LayerNorm, RMSNorm, ...).

    The module's own forward runs with ``weight + offset`` substituted via ``torch.func.functional_call``
    (``nn.LayerNorm``: ``F.layer_norm`` directly, without that call's overhead); these tensors are small (hidden
    size), so the dense temporary is cheap.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        SAMLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    forward = SAMLayer.dispatch_forward

    def _sam_forward(self, x, weight_entries, bias_entries, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        params = {}
        if weight_entries is not None:
            idx, vals = weight_entries
            params["weight"] = (
                base.weight.reshape(-1).index_add(0, idx, vals.to(base.weight.dtype)).view_as(base.weight)
            )
        if bias_entries is not None:
            params["bias"] = self._effective_bias(bias_entries)
        if type(base) is nn.LayerNorm and not args and not kwargs:  # the common case, without functional_call
            return F.layer_norm(
                x, base.normalized_shape, params.get("weight", base.weight), params.get("bias", base.bias), base.eps
            )
        return torch.func.functional_call(base, params, (x, *args), kwargs, strict=False)


def _same_buffers(a: tuple, b: tuple) -> bool:
    """Whether two cache keys ((adapter, buffer, version), ...) name the same buffers at the same versions."""
    return len(a) == len(b) and all(x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a, b))


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
