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


class SparseDeltaLinear(torch.autograd.Function):
    """``y = F.linear(x, W0 + Delta, bias)`` with Delta given by (out_idx, in_idx, values)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_idx, in_idx, values, dense):  # noqa: D102
        out_features, in_features = weight.shape
        if dense:
            full = _densify(weight, out_idx, in_idx, values)
            y = F.linear(x, full, bias)
            del full
        else:
            y = F.linear(x, weight, bias)
            x2 = x.reshape(-1, in_features)
            y2 = y.view(-1, out_features)
            for s in _chunks(values.numel(), x2.shape[0]):
                y2.index_add_(1, out_idx[s], x2[:, in_idx[s]] * values[s])
        ctx.dense = dense
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, out_idx, in_idx, values)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, out_idx, in_idx, values = ctx.saved_tensors
        out_features, in_features = weight.shape
        need_x, need_w, need_b, _, _, need_v, _ = ctx.needs_input_grad
        gy2 = grad_out.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features)
        grad_x = grad_w = grad_b = grad_v = None
        if ctx.dense:
            full = _densify(weight, out_idx, in_idx, values)
            if need_x:
                grad_x = (gy2 @ full).view_as(x)
            del full
            if need_w:
                grad_w = gy2.t() @ x2
                if need_v:
                    grad_v = grad_w[out_idx, in_idx]
            elif need_v:
                grad_v = _sampled_weight_grad(gy2, x2, out_idx, in_idx)
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
        return grad_x, grad_w, grad_b, None, None, grad_v, None


def _sampled_weight_grad(gy2: torch.Tensor, x2: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor):
    """``(gy^T x)[out_idx, in_idx]`` via a GEMM restricted to the rows (or columns) that hold trained entries.

    Gradient-chosen masks concentrate in few rows or columns (on MiniLM typically 20-50 % of either), so this
    costs that fraction of the full weight-gradient GEMM.
    """
    rows, row_pos = torch.unique(out_idx, return_inverse=True)
    cols, col_pos = torch.unique(in_idx, return_inverse=True)
    if rows.numel() * x2.shape[1] <= cols.numel() * gy2.shape[1]:
        return (gy2.index_select(1, rows).t() @ x2)[row_pos, in_idx]
    return (gy2.t() @ x2.index_select(1, cols))[out_idx, col_pos]


def _densify(weight: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor, values: torch.Tensor):
    full = weight.detach().clone()
    full.index_put_((out_idx, in_idx), values.detach(), accumulate=True)
    return full


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_idx: torch.Tensor,
    in_idx: torch.Tensor,
    values: torch.Tensor,
    strategy: str = "auto",
) -> torch.Tensor:
    """Apply ``F.linear(x, W0 + Delta, bias)``; ``weight`` is W0 in [out, in] layout (a transposed view is fine).

    ``out_idx``/``in_idx`` are integer tensors giving the (row, column) of each trained entry and ``values`` the
    offsets. ``strategy`` is ``"gather"``, ``"dense"`` or ``"auto"`` (by density, see ``DENSE_DENSITY_THRESHOLD``).
    """
    if strategy not in ("auto", "gather", "dense"):
        raise ValueError(f"strategy must be 'auto', 'gather' or 'dense', got {strategy!r}")
    if values.numel() == 0:
        return F.linear(x, weight, bias)
    if strategy == "auto":
        dense = values.numel() > DENSE_DENSITY_THRESHOLD * weight.numel()
    else:
        dense = strategy == "dense"
    values = values.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return SparseDeltaLinear.apply(x, weight, bias, out_idx, in_idx, values, dense)
