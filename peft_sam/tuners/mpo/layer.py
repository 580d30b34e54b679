"""MPO layers: a frozen base Linear/Conv1D plus, per adapter, a matrix product operator of its weight.

Per adapter the layer holds (``k`` = site index as a string, the central index ``c`` absent):

- ``mpo_aux[adapter][k]``: the trainable auxiliary tensors ``A_k`` (``[d_k, i_k, j_k, d_{k+1}]``);
- ``mpo_init_aux[adapter][k]``: their initial values ``A0_k`` (persistent buffers, saved with the adapter);
- ``mpo_factors[adapter]``: the row and column factors as an int64 ``[2, n]`` buffer (saved), so that loading onto
  a weight of another shape or factorisation fails clearly instead of silently refitting the central tensor;
- ``mpo_central[adapter]``: the central tensor ``C`` (a non-persistent buffer, never saved: it is recomputed from
  the base weight and ``A0`` with :func:`central_from_weight` whenever ``A0`` is replaced, e.g. by loading);
- ``mpo_central_delta[adapter]``: only with ``train_central=True``, a trainable offset so the central tensor is
  ``C + mpo_central_delta`` (zero-initialised, saved).

The adapted weight is ``W0 + MPO(A, C) - MPO(A0, C)``: identical to ``W0`` before training, whatever the
truncation. The delta is contracted once per forward and added to ``W0`` before a single matmul, so autograd
reuses it for the backward pass and no second W-sized tensor is stored besides ``C``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._common import AdditiveDeltaLayer, has_plain_forward
from .decompose import central_from_weight, central_index, mpo_bond_dims, mpo_decompose, mpo_shapes

SUPPORTED_MODULES = (nn.Linear, Conv1D)


def override_key_for(factor_overrides: dict | None, module_name: str) -> str | None:
    """The first ``factor_overrides`` key matching ``module_name`` (as a name suffix or a full regex), or None.

    Same matching rule as PEFT's ``rank_pattern``: ``re.match(rf"(.*\\.)?({key})$", module_name)``.
    """
    for key in factor_overrides or {}:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def resolve_factors(
    config, module_name: str, out_features: int, in_features: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column factors of one module: its ``factor_overrides`` entry, else balanced automatic factors."""
    key = override_key_for(config.factor_overrides, module_name)
    rows, cols = (None, None) if key is None else config.factor_overrides[key]
    try:
        return mpo_shapes(out_features, in_features, config.num_factors, rows, cols)
    except ValueError as err:
        raise ValueError(
            f"MPO factor_overrides[{key!r}] does not fit module {module_name!r} with weight [out={out_features}, "
            f"in={in_features}]: {err}. Row factors must multiply to out_features and column factors to "
            "in_features."
        ) from err


@contextmanager
def _single_threaded_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the small SVDs of TT-SVD on one CPU thread: multi-threaded LAPACK is 20-30x slower on them (measured on
    a loaded 2-core machine: 8 MiniLM-sized weights took 9-17 s with 2 threads, 0.4-0.5 s with 1)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def contract_interleaved(tensors: list[torch.Tensor], center: int) -> torch.Tensor:
    """Contract an MPO chain to its matrix in *interleaved* layout ``[i_0 j_0 i_1 j_1 ...]`` (flattened, 1-D).

    Same values as ``mpo_contract`` (up to float rounding and axis order), but built for the forward pass: the
    small left and right products ``L`` (``[prod_{k<c} i_k j_k, d_c]``) and ``R`` are formed first and the central
    tensor is multiplied in last, in the cheaper of ``(L C) R`` and ``L (C R)``. Only reshapes of contiguous
    tensors occur (no per-site permute copies), and autograd keeps one W-sized intermediate.
    """
    left = tensors[0].new_ones(1, 1)
    for t in tensors[:center]:
        left = (left @ t.reshape(t.shape[0], -1)).reshape(-1, t.shape[3])  # [P_l * i_k j_k, d_{k+1}]
    right = tensors[0].new_ones(1, 1)
    for t in reversed(tensors[center + 1 :]):
        right = (t.reshape(-1, t.shape[3]) @ right).reshape(t.shape[0], -1)  # [d_k, i_k j_k * P_r]
    core = tensors[center]
    d_c, pair, d_next = core.shape[0], core.shape[1] * core.shape[2], core.shape[3]
    p_left, p_right = left.shape[0], right.shape[1]
    left_first = p_left * pair * d_next * (d_c + p_right) <= d_c * pair * p_right * (d_next + p_left)
    if left_first:
        return ((left @ core.reshape(d_c, -1)).reshape(-1, d_next) @ right).reshape(-1)
    return (left @ (core.reshape(-1, d_next) @ right).reshape(d_c, -1)).reshape(-1)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return -1


class MPOLayer(AdditiveDeltaLayer, BaseTunerLayer):
    """Mixin holding the MPO tensors of every adapter on one base Linear/Conv1D module."""

    adapter_layer_names = ("mpo_aux", "mpo_central_delta")
    other_param_names = ("mpo_init_aux", "mpo_factors", "mpo_central")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mpo_aux = nn.ModuleDict({})
        self.mpo_init_aux = nn.ModuleDict({})
        self.mpo_factors = BufferDict({}, persistent=True)
        self.mpo_central = BufferDict({}, persistent=False)
        self.mpo_central_delta = nn.ParameterDict({})
        # adapter -> (row factors, col factors, bond dims): shapes of the chain
        self.mpo_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        # adapter -> [(tensor, version)] of the A0 (and factor) tensors the central tensor was computed from; held
        # strongly so that identity checks cannot be fooled by a reused id (the tensors are small)
        self._mpo_central_source: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_MODULES):
            raise TypeError(f"MPO adapts nn.Linear and transformers Conv1D, got {type(base).__name__}.")
        self.is_conv1d = isinstance(base, Conv1D)
        self.out_features, self.in_features = self._weight_matrix().shape

    # ------------------------------------------------------------------ weights as [out, in]
    def _weight_matrix(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a view; Conv1D stores ``[in, out]``)."""
        weight = self.get_base_layer().weight
        return weight.t() if self.is_conv1d else weight

    def _to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t() if self.is_conv1d else matrix

    def _reference_weight(self) -> torch.Tensor:
        """``W0 [out, in]``: the base weight minus the deltas of merged adapters (exactly W0 when none is)."""
        weight = self._weight_matrix().detach()
        for adapter in self.merged_adapters:
            weight = weight - self._to_base_layout(self.get_delta_weight(adapter))
        return weight

    # ------------------------------------------------------------------ adapter bookkeeping
    def update_layer(
        self, adapter_name: str, config, module_name: str = "", inference_mode: bool = False, **kwargs: Any
    ) -> None:
        """Decompose the base weight for ``adapter_name``: trainable auxiliaries, their initial copy and ``C``."""
        weight = self._reference_weight()
        if weight.is_meta:
            raise ValueError(
                f"MPO cannot decompose {module_name!r}: its base weight is on the meta device. Load the base model's "
                "weights before adding an MPO adapter."
            )
        rows, cols = resolve_factors(config, module_name, self.out_features, self.in_features)
        with _single_threaded_on_cpu(weight.device):
            tensors = mpo_decompose(weight, rows, cols, max_bond=config.max_bond)
        c = central_index(len(rows))
        gen = None if config.init_weights else torch.Generator().manual_seed(
            int(config.seed) * 1_000_003 + zlib.crc32(module_name.encode())
        )
        trainable, initial = nn.ParameterDict({}), BufferDict({}, persistent=True)
        for k, tensor in enumerate(tensors):
            if k == c:
                continue
            initial[str(k)] = tensor
            start = tensor.clone()
            if gen is not None:  # random non-zero delta: perturb by 10 % of the tensor's RMS
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float64).to(tensor.device)
                scale = 0.1 * tensor.double().pow(2).mean().sqrt()
                start = (tensor.double() + scale * noise).to(tensor.dtype)
            trainable[str(k)] = nn.Parameter(start, requires_grad=True)
        self.mpo_aux[adapter_name] = trainable
        self.mpo_init_aux[adapter_name] = initial
        self.mpo_factors[adapter_name] = torch.tensor([rows, cols], dtype=torch.int64, device=weight.device)
        self.mpo_shapes[adapter_name] = (rows, cols, mpo_bond_dims(rows, cols, config.max_bond))
        self._refresh_central(adapter_name)
        if config.train_central:
            central = self.mpo_central[adapter_name]
            self.mpo_central_delta[adapter_name] = nn.Parameter(torch.zeros_like(central), requires_grad=True)
        elif adapter_name in self.mpo_central_delta:
            del self.mpo_central_delta[adapter_name]
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:  # noqa: D102
        super().delete_adapter(adapter_name)
        self.mpo_shapes.pop(adapter_name, None)
        self._mpo_central_source.pop(adapter_name, None)

    def num_sites(self, adapter_name: str) -> int:
        """Number of local tensors of one adapter on this layer."""
        return len(self.mpo_shapes[adapter_name][0])

    def _source_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        """What the central tensor is computed from (besides W0): the initial auxiliaries and the factors."""
        initial = self.mpo_init_aux[adapter_name]
        return [*(initial[k] for k in sorted(initial.keys(), key=int)), self.mpo_factors[adapter_name]]

    def _check_factors(self, adapter_name: str) -> None:
        rows, cols, _ = self.mpo_shapes[adapter_name]
        stored = self.mpo_factors[adapter_name]
        if tuple(stored.shape) != (2, len(rows)) or stored.tolist() != [list(rows), list(cols)]:
            raise ValueError(
                f"MPO adapter {adapter_name!r} was made for a weight factored as {stored.tolist()} (rows, cols), but "
                f"this layer's weight [out={self.out_features}, in={self.in_features}] is factored as "
                f"{[list(rows), list(cols)]}: the adapter belongs to a model with other shapes, or to another "
                "num_factors / factor_overrides than its adapter_config.json says."
            )

    def _refresh_central(self, adapter_name: str) -> None:
        """(Re)compute ``C = L0^T W0 R0^T`` from the base weight and the initial auxiliaries ``A0``."""
        self._check_factors(adapter_name)
        n = self.num_sites(adapter_name)
        c = central_index(n)
        initial = self.mpo_init_aux[adapter_name]
        chain = [None if k == c else initial[str(k)] for k in range(n)]
        central = central_from_weight(self._reference_weight(), chain, c)
        self.mpo_central[adapter_name] = central.to(device=chain[0 if c else 1].device)
        self._mpo_central_source[adapter_name] = [(t, _version(t)) for t in self._source_tensors(adapter_name)]

    def central_tensor(self, adapter_name: str) -> torch.Tensor:
        """The frozen central tensor ``C``, recomputed first if ``A0`` was replaced since (loading, ``.to()``)."""
        source = self._mpo_central_source.get(adapter_name)
        current = self._source_tensors(adapter_name)
        stale = (
            source is None
            or len(source) != len(current)
            or any(held is not t or version != _version(t) for (held, version), t in zip(source, current))
        )
        if stale:
            if adapter_name in self.merged_adapters:
                # merged: the base weight holds this adapter's delta, and C itself moved along with A0
                self._mpo_central_source[adapter_name] = [(t, _version(t)) for t in current]
            else:
                self._refresh_central(adapter_name)
        return self.mpo_central[adapter_name]

    def mpo_tensors(self, adapter_name: str, initial: bool = False) -> list[torch.Tensor]:
        """The chain of local tensors: trainable auxiliaries (or ``A0``) around the (effective) central tensor.

        All in the dtype of the trainable auxiliaries. ``initial=True`` gives ``[A0, C]`` (no central offset).
        """
        n = self.num_sites(adapter_name)
        c = central_index(n)
        aux = self.mpo_aux[adapter_name]
        dtype = aux[str(0 if c else 1)].dtype
        central = self.central_tensor(adapter_name).to(dtype)
        if not initial and adapter_name in self.mpo_central_delta:
            central = central + self.mpo_central_delta[adapter_name].to(dtype)
        source = self.mpo_init_aux[adapter_name] if initial else aux
        return [central if k == c else source[str(k)].to(dtype) for k in range(n)]

    def _delta_in_base_layout(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``MPO(A) - MPO(A0)`` as a strided view of shape ``dims`` (the base weight's layout split into factors).

        Differentiable with respect to the trainable tensors; ``MPO(A0)`` is contracted without autograd. The
        difference is taken in the interleaved layout and only permuted (not copied) here.
        """
        rows, cols, _ = self.mpo_shapes[adapter_name]
        c = central_index(len(rows))
        with torch.no_grad():
            initial = contract_interleaved(self.mpo_tensors(adapter_name, initial=True), c)
        delta = (contract_interleaved(self.mpo_tensors(adapter_name), c) - initial).to(dtype)
        n = len(rows)
        delta = delta.view([f for pair in zip(rows, cols) for f in pair])  # [i_0, j_0, i_1, j_1, ...]
        row_axes, col_axes = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
        if self.is_conv1d:  # weight [in, out]
            return delta.permute(col_axes + row_axes), (*cols, *rows)
        return delta.permute(row_axes + col_axes), (*rows, *cols)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense delta of ``adapter_name`` in the base weight's layout and dtype (no gradient)."""
        weight = self.get_base_layer().weight
        with torch.no_grad():
            delta, _ = self._delta_in_base_layout(adapter_name, weight.dtype)
        return delta.reshape(weight.shape)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``MPO(A) - MPO(A0)`` of the given (default: active) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in self.mpo_aux:
                continue
            delta = self.get_delta_weight(adapter)
            with torch.no_grad():
                if safe_merge:
                    merged = weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems broken.")
                    weight.data.copy_(merged)
                else:
                    weight.data += delta
            self.merged_adapters.append(adapter)

    # ------------------------------------------------------------------ forward
    def dispatch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output, or ``x (W0 + sum of active deltas)^T + b`` unless disabled or merged."""
        if self.disable_adapters:
            return self.disabled_forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.mpo_aux]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight
        for adapter in active:  # W0 + sum of deltas, each added through a strided view (one W-sized result each)
            delta, dims = self._delta_in_base_layout(adapter, weight.dtype)
            weight = (weight.reshape(dims) + delta).reshape(base.weight.shape)
        if not has_plain_forward(base):  # a subclass with its own forward: run it on W0 + Delta
            return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs, strict=False)
        x = self._cast_input_dtype(x, weight.dtype)
        if self.is_conv1d:  # mirrors transformers' Conv1D.forward
            size_out = x.size()[:-1] + (weight.shape[1],)
            flat = x.reshape(-1, x.size(-1))
            out = torch.mm(flat, weight) if base.bias is None else torch.addmm(base.bias, flat, weight)
            return out.view(size_out)
        return F.linear(x, weight, base.bias)

    def __repr__(self) -> str:
        return "mpo." + super().__repr__()


class Linear(nn.Module, MPOLayer):
    """MPO on ``nn.Linear`` (weight ``[out, in]``) or transformers ``Conv1D`` (GPT-2 style, weight ``[in, out]``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        MPOLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    forward = MPOLayer.dispatch_forward
