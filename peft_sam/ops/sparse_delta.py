"""Gradients of a sparse offset whose values already live in the base tensor (the merged-weight SAM op).

A SAM layer keeps ``W = W0 + Delta`` in the base tensor itself (refreshed once per optimizer step), so the forward
and the input gradient are exactly full fine-tuning's dense ops. What remains is the gradient of the K trained
entries, ``grad_v[k] = (dL/dW)[r_k, c_k]``, which this module computes without the dense weight-gradient GEMM:

* :class:`EntryPattern`: the entries of one 2-D tensor in row-major order as a CSR template, built once per mask;
* :func:`sampled_matmul`: ``(a @ b)`` at those entries only, a sampled dense-dense product (SDDMM,
  ``torch.sparse.sampled_addmm``), O(K * inner) FLOPs instead of O(rows * cols * inner);
* :class:`SampledLinear` / :class:`SampledEmbedding`: ``F.linear`` / ``F.embedding`` whose backward returns the
  entries' gradients (and ``grad_x``), saving only what full fine-tuning saves (x and W);
* :class:`EntryTap`: an identity on a small tensor (norm weights, biases) whose backward gathers the entries'
  gradients from the dense gradient the module's own backward computes anyway.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# dtypes torch.sparse.sampled_addmm accepts; others (float16, bfloat16) run the product in float32
_SDDMM_DTYPES = (torch.float32, torch.float64)


class EntryPattern:
    """The trained entries of one tensor viewed as [rows, cols], with a CSR template for the sampled product.

    ``flat`` must be sorted and unique (row-major order); the layer guarantees it when it sets entries.
    """

    def __init__(self, flat: torch.Tensor, rows: int, cols: int) -> None:
        self.flat = flat.long()
        self.rows, self.cols = int(rows), int(cols)
        row = torch.div(self.flat, self.cols, rounding_mode="floor")
        self.col = self.flat - row * self.cols
        self.crow = torch.zeros(self.rows + 1, dtype=torch.long, device=flat.device)
        self.crow[1:] = torch.bincount(row, minlength=self.rows).cumsum(0)
        self._templates: dict[torch.dtype, torch.Tensor] = {}

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) rebuild the CSR templates lazily
        return {k: v for k, v in self.__dict__.items() if k != "_templates"} | {"_templates": {}}

    def template(self, dtype: torch.dtype) -> torch.Tensor:
        """A sparse CSR tensor with the entries' positions (values unused: the product runs with beta=0)."""
        found = self._templates.get(dtype)
        if found is None:
            zeros = torch.zeros(self.flat.numel(), dtype=dtype, device=self.flat.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we use one stable op of it
                warnings.simplefilter("ignore", UserWarning)
                found = torch.sparse_csr_tensor(
                    self.crow, self.col, zeros, (self.rows, self.cols), check_invariants=False
                )
            self._templates[dtype] = found
        return found


def sampled_matmul(pattern: EntryPattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a @ b).view(-1)[pattern.flat]`` for a [rows, n] and b [n, cols], without forming ``a @ b``."""
    out_dtype = a.dtype if a.dtype == b.dtype else torch.float32
    dtype = out_dtype if out_dtype in _SDDMM_DTYPES else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    if torch.compiler.is_compiling():  # inductor has no sparse CSR kernels: the dense product, then a gather
        return (a @ b).reshape(-1)[pattern.flat].to(out_dtype)
    result = torch.sparse.sampled_addmm(pattern.template(a.dtype), a, b, beta=0.0).values()
    return result if result.dtype == out_dtype else result.to(out_dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class SampledLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` (W as stored; transposed for ``Conv1D``) whose backward gives the entries' gradients.

    ``plan`` is ``(weight_patterns, bias_patterns, conv1d)``: one :class:`EntryPattern` per adapter for the
    weight (over the stored [rows, cols] layout) and for the bias (its ``flat`` indices are used); ``values`` are the
    matching value tensors, weight adapters first. Their forward contribution is already inside ``weight``/``bias``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *values):  # noqa: D102
        weight_patterns, bias_patterns, conv1d = plan
        cast = _autocast_dtype(x)
        if cast is not None:  # run as autocast would, and save the cast tensors for backward (as full FT does)
            x, weight = x.to(cast), weight.to(cast)
            bias = None if bias is None else bias.to(cast)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight.t() if conv1d else weight, bias)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight = ctx.saved_tensors
        weight_patterns, bias_patterns, conv1d = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_v = ctx.needs_input_grad[4:]
        out_features = weight.shape[1] if conv1d else weight.shape[0]
        gy2 = grad_out.reshape(-1, out_features)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = (gy2 @ (weight.t() if conv1d else weight)).view(grad_out.shape[:-1] + (x.shape[-1],))
        if need_w:  # the base weight itself trains (e.g. CaliSr's W_extra before its switch): full FT's GEMM
            grad_w = x2.t() @ gy2 if conv1d else gy2.t() @ x2
        if need_b and ctx.has_bias:
            grad_b = gy2.sum(0)
        grads = []
        for pattern, needed in zip(weight_patterns, need_v[: len(weight_patterns)]):
            if not needed:
                grads.append(None)
            elif grad_w is not None:
                grads.append(grad_w.reshape(-1)[pattern.flat])
            elif conv1d:  # stored [in, out]: (x^T gy) at the entries
                grads.append(sampled_matmul(pattern, x2.t(), gy2))
            else:  # stored [out, in]: (gy^T x) at the entries
                grads.append(sampled_matmul(pattern, gy2.t(), x2))
        for pattern, needed in zip(bias_patterns, need_v[len(weight_patterns) :]):
            if not needed:
                grads.append(None)
            elif grad_b is not None:
                grads.append(grad_b[pattern.flat])
            else:  # column sums of gy at the entries: a few strided columns (no transposed copy of gy)
                grads.append(gy2.index_select(1, pattern.flat).sum(0))
        return grad_x, grad_w, grad_b, None, *grads


class EmbeddingRows:
    """Entries of an embedding table grouped by row: a compact table holds only the rows that have entries."""

    def __init__(self, flat: torch.Tensor, num_ids: int, dim: int, padding_idx: int | None = None) -> None:
        flat = flat.long()
        rows, row_pos = torch.unique(torch.div(flat, dim, rounding_mode="floor"), return_inverse=True)
        self.num_rows = rows.numel()  # the compact table has one more row, for ids without entries
        self.row_of_id = torch.full((num_ids,), self.num_rows, dtype=torch.long, device=flat.device)
        self.row_of_id[rows] = torch.arange(self.num_rows, device=flat.device)
        if padding_idx is not None:  # the padding id's output is constant: its entries get no gradient
            self.row_of_id[padding_idx] = self.num_rows
        self.flat_in_table = row_pos * dim + flat % dim


class SampledEmbedding(torch.autograd.Function):
    """``F.embedding(ids, W, padding_idx)`` whose backward gives the entries' gradients (no vocabulary-sized grad)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, row_tables, *values):  # noqa: D102
        ctx.row_tables = row_tables
        ctx.padding_idx = padding_idx
        ctx.num_ids = weight.shape[0]
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (ids,) = ctx.saved_tensors
        gy2 = grad_out.reshape(-1, grad_out.shape[-1])
        flat_ids = ids.reshape(-1)
        padding = -1 if ctx.padding_idx is None else ctx.padding_idx
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.embedding_dense_backward(gy2, flat_ids, ctx.num_ids, padding, False)
        grads = []
        for table, needed in zip(ctx.row_tables, ctx.needs_input_grad[4:]):
            if not needed:
                grads.append(None)
                continue
            # ids without entries (and the padding id) land in the extra last row, which is ignored
            compact = table.row_of_id[flat_ids]
            rows = torch.ops.aten.embedding_dense_backward(gy2, compact, table.num_rows + 1, table.num_rows, False)
            grads.append(rows.reshape(-1)[table.flat_in_table])
        return None, grad_w, None, None, *grads


class EntryTap(torch.autograd.Function):
    """Identity on a (small) tensor; backward hands each adapter the gradient at its entries."""

    @staticmethod
    def forward(ctx, tensor, flats, *values):  # noqa: D102
        ctx.flats = flats
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat_grad = grad.reshape(-1)
        grads = [flat_grad[f] if needed else None for f, needed in zip(ctx.flats, ctx.needs_input_grad[2:])]
        return (grad if ctx.needs_input_grad[0] else None), None, *grads


def tap_entries(tensor: torch.Tensor, flats: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """``tensor`` unchanged, with the gradient of each ``values[i]`` taken at ``tensor.view(-1)[flats[i]]``."""
    return EntryTap.apply(tensor, tuple(flats), *values)
