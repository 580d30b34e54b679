"""A linear map with a sparse trainable offset: y = x (W0 + Delta)^T + b, Delta non-zero on K chosen entries.

``SparseDeltaLinear`` is a custom autograd function that never materialises a dense gradient of W and keeps no
dense copy of W for backward. Two strategies, picked per call:

* ``gather`` (small K): forward adds ``x[:, in_k] * v_k`` into ``y[:, out_k]``; backward computes
  ``grad_v[k] = sum_n gy[n, out_k] * x[n, in_k]`` and adds ``gy[:, out_k] * v_k`` into ``grad_x[:, in_k]``.
  Cost O(N K) on top of the dense matmul, memory O(N * chunk) transient.
* ``dense`` (larger K): forward builds W0 + Delta in a temporary (not saved), backward rebuilds it for grad_x and
  gathers ``grad_v = (gy^T x)[idx]`` from a GEMM restricted to the rows (or columns) holding trained entries.
  Cost: a fraction of one extra GEMM, memory one transient W.

Only ``x`` (already kept alive by most graphs), W0 (a frozen base tensor) and the index/value vectors are saved.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Above this fraction of trained entries, the dense strategy is used. On this project's CPU the column gathers
# of the sparse strategy cost more than one extra GEMM already at density ~0.0015 (benchmarks/scaling.py).
DENSE_DENSITY_THRESHOLD = 0.001
# Transient gather buffers hold at most this many elements (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


def _chunks(num_entries: int, num_rows: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, num_rows))
    for start in range(0, num_entries, step):
        yield slice(start, min(start + step, num_entries))


class SparsePattern(NamedTuple):
    """Where the trained entries of one [out, in] weight sit, with everything derived from that computed once.

    A SAM layer builds it when its indices change and reuses it every step: no ``unique`` (a host sync on a
    GPU), division or modulo on the indices in the training loop.
    """

    out_idx: torch.Tensor  # row of each entry (int64)
    in_idx: torch.Tensor  # column of each entry (int64)
    flat: torch.Tensor  # out_idx * in_features + in_idx: position in a contiguous [out, in] tensor
    rows: torch.Tensor  # sorted distinct rows holding entries, and each entry's position among them
    row_pos: torch.Tensor
    cols: torch.Tensor  # the same for columns
    col_pos: torch.Tensor

    @classmethod
    def build(cls, out_idx: torch.Tensor, in_idx: torch.Tensor, in_features: int) -> SparsePattern:
        """The pattern of entries at (``out_idx``, ``in_idx``) of a weight with ``in_features`` columns."""
        out_idx, in_idx = out_idx.long(), in_idx.long()
        rows, row_pos = torch.unique(out_idx, return_inverse=True)
        cols, col_pos = torch.unique(in_idx, return_inverse=True)
        return cls(out_idx, in_idx, out_idx * in_features + in_idx, rows, row_pos, cols, col_pos)


class SparseDeltaLinear(torch.autograd.Function):
    """``y = F.linear(x, W0 + Delta, bias)`` with Delta given by a :class:`SparsePattern` and its values."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, dense, *pattern):  # noqa: D102
        pattern = SparsePattern(*pattern)
        out_features, in_features = weight.shape
        if dense:
            full = _densify(weight, pattern.flat, values)
            y = F.linear(x, full, bias)
            del full
        else:
            y = F.linear(x, weight, bias)
            x2 = x.reshape(-1, in_features)
            y2 = y.view(-1, out_features)
            for s in _chunks(values.numel(), x2.shape[0]):
                y2.index_add_(1, pattern.out_idx[s], x2[:, pattern.in_idx[s]] * values[s])
        ctx.dense = dense
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, values, *pattern)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, values, *saved = ctx.saved_tensors
        pattern = SparsePattern(*saved)
        out_idx, in_idx = pattern.out_idx, pattern.in_idx
        out_features, in_features = weight.shape
        need_x, need_w, need_b, need_v = ctx.needs_input_grad[:4]
        gy2 = grad_out.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features)
        grad_x = grad_w = grad_b = grad_v = None
        if ctx.dense:
            if need_x:
                full = _densify(weight, pattern.flat, values)
                grad_x = (gy2 @ full).view_as(x)
                del full
            if need_w:
                grad_w = gy2.t() @ x2
                if need_v:
                    grad_v = grad_w[out_idx, in_idx]
            elif need_v:
                grad_v = _sampled_weight_grad(gy2, x2, pattern)
        else:
            if need_x:
                gx2 = gy2 @ weight
                for s in _chunks(values.numel(), gy2.shape[0]):
                    gx2.index_add_(1, in_idx[s], gy2[:, out_idx[s]] * values[s])
                grad_x = gx2.view_as(x)
            if need_v:
                grad_v = torch.empty_like(values)
                for s in _chunks(values.numel(), gy2.shape[0]):
                    grad_v[s] = (gy2[:, out_idx[s]] * x2[:, in_idx[s]]).sum(0)
            if need_w:
                grad_w = gy2.t() @ x2
        if need_b and ctx.has_bias:
            grad_b = gy2.sum(0)
        return grad_x, grad_w, grad_b, grad_v, None, *([None] * len(saved))


def _sampled_weight_grad(gy2: torch.Tensor, x2: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """``(gy^T x)[out_idx, in_idx]`` via a GEMM restricted to the rows (or columns) that hold trained entries.

    Gradient-chosen masks concentrate in few rows or columns (on MiniLM typically 20-50 % of either), so this
    costs that fraction of the full weight-gradient GEMM.
    """
    if pattern.rows.numel() * x2.shape[1] <= pattern.cols.numel() * gy2.shape[1]:
        return (gy2.index_select(1, pattern.rows).t() @ x2)[pattern.row_pos, pattern.in_idx]
    return (gy2.t() @ x2.index_select(1, pattern.cols))[pattern.out_idx, pattern.col_pos]


def _densify(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A contiguous [out, in] copy of W0 + Delta (``index_add_``: no sort, duplicates add up)."""
    full = weight.detach().clone(memory_format=torch.contiguous_format)
    full.view(-1).index_add_(0, flat, values.detach())
    return full


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_idx: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    values: torch.Tensor,
    strategy: str = "auto",
    pattern: SparsePattern | None = None,
) -> torch.Tensor:
    """Apply ``F.linear(x, W0 + Delta, bias)``; ``weight`` is W0 in [out, in] layout (a transposed view is fine).

    ``out_idx``/``in_idx`` are integer tensors giving the (row, column) of each trained entry and ``values`` the
    offsets; callers that apply the same entries repeatedly pass a prebuilt ``pattern``
    (:meth:`SparsePattern.build`) instead. ``strategy`` is ``"gather"``, ``"dense"`` or ``"auto"`` (by density,
    see ``DENSE_DENSITY_THRESHOLD``).
    """
    if strategy not in ("auto", "gather", "dense"):
        raise ValueError(f"strategy must be 'auto', 'gather' or 'dense', got {strategy!r}")
    if values.numel() == 0:
        return F.linear(x, weight, bias)
    if pattern is None:
        if out_idx is None or in_idx is None:
            raise ValueError("sparse_delta_linear needs out_idx and in_idx, or a pattern.")
        pattern = SparsePattern.build(out_idx, in_idx, weight.shape[1])
    if strategy == "auto":
        dense = values.numel() > DENSE_DENSITY_THRESHOLD * weight.numel()
    else:
        dense = strategy == "dense"
    values = values.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return SparseDeltaLinear.apply(x, weight, bias, values, dense, *pattern)
