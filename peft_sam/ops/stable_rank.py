"""Stable rank ``srank(W) = ||W||_F^2 / ||W||_2^2`` in float64 with exact singular values.

CaliSr compares the stable ranks of two weights that differ by a single optimizer step (relative differences
down to 1e-7), so everything here is computed from float64 ``torch.linalg.svdvals`` of a float64 copy, never
in the input precision and never by power iteration. Both norms come from the same singular values
(``||W||_F^2 = sum s_i^2``). The zero matrix has no defined stable rank; we return 0.0 for it (a rank-0 matrix
scoring below any non-zero one). Measurements run without autograd. Inputs with more than two dimensions
(e.g. conv kernels) are read as ``[shape[0], -1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["group_stable_rank", "stable_rank", "stable_rank_batched"]

# Largest number of float64 entries stacked into one batched svdvals call (2**26 entries = 512 MiB).
DEFAULT_MAX_BATCH_NUMEL = 2**26


def _as_matrix(weight: Tensor) -> Tensor:
    if weight.ndim < 2:
        raise ValueError(f"stable rank needs a matrix (>= 2-D tensor), got shape {tuple(weight.shape)}")
    if weight.ndim > 2:
        weight = weight.reshape(weight.shape[0], -1)
    if weight.numel() == 0:
        raise ValueError(f"stable rank of an empty matrix of shape {tuple(weight.shape)} is undefined")
    return weight


def _from_singular_values(s: Tensor) -> Tensor:
    """Stable rank(s) from singular values ``[..., k]`` (descending); 0.0 where all are zero."""
    top = s[..., 0]
    fro2 = (s * s).sum(dim=-1)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(top > 0, fro2 / (safe * safe), torch.zeros_like(fro2))


@torch.no_grad()
def stable_rank(weight: Tensor) -> Tensor:
    """Stable rank of one matrix as a float64 scalar tensor on ``weight``'s device (0.0 for a zero matrix)."""
    s = torch.linalg.svdvals(_as_matrix(weight).detach().to(torch.float64))
    return _from_singular_values(s)


@torch.no_grad()
def stable_rank_batched(weights: Sequence[Tensor], max_batch_numel: int = DEFAULT_MAX_BATCH_NUMEL) -> Tensor:
    """Stable ranks of several matrices, float64 ``[len(weights)]`` in input order.

    Matrices of the same shape, dtype and device are stacked and sent through one batched float64
    ``svdvals`` call (split into chunks of at most ``max_batch_numel`` entries to bound memory). Results are
    equal to `stable_rank` on each matrix. The output lives on the first matrix's device.
    """
    if len(weights) == 0:
        return torch.zeros(0, dtype=torch.float64)
    mats = [_as_matrix(w).detach() for w in weights]
    groups: dict[tuple, list[int]] = {}
    for idx, m in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.device, m.dtype), []).append(idx)
    out = torch.empty(len(mats), dtype=torch.float64, device=mats[0].device)
    for (shape, _, _), indices in groups.items():
        per_chunk = max(1, max_batch_numel // (shape[0] * shape[1]))
        for start in range(0, len(indices), per_chunk):
            chunk = indices[start : start + per_chunk]
            stacked = torch.stack([mats[i].to(torch.float64) for i in chunk])
            values = _from_singular_values(torch.linalg.svdvals(stacked))
            out[torch.tensor(chunk, device=out.device)] = values.to(out.device)
    return out


def group_stable_rank(
    weights: Sequence[Tensor],
    reduction: Literal["sum", "mean"] = "sum",
    max_batch_numel: int = DEFAULT_MAX_BATCH_NUMEL,
) -> Tensor:
    """Aggregate stable rank of a group of matrices (float64 scalar): the ``sum`` (default) or ``mean`` of the
    per-matrix stable ranks, computed with `stable_rank_batched`.

    CaliSr aggregates over a group (e.g. all attention matrices of all layers) before comparing SR(W_LFT)
    with SR(W_FFT); with a fixed group both reductions give the same comparison.
    """
    if len(weights) == 0:
        raise ValueError("group_stable_rank needs at least one matrix")
    values = stable_rank_batched(weights, max_batch_numel=max_batch_numel)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
