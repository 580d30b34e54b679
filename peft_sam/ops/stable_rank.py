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

__all__ = ["certified_stable_ranks", "group_stable_rank", "stable_rank", "stable_rank_batched"]

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


@torch.no_grad()
def certified_stable_ranks(
    weights: Sequence[Tensor],
    starts: Tensor | None = None,
    rtol: float = 1e-10,
    block: int = 8,
    iters_per_round: int = 4,
    max_rounds: int = 6,
    return_fallbacks: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Stable ranks of same-shape matrices with a certified ``sigma_1^2`` (relative error <= ``rtol``), cheaply.

    The exact backends (``svdvals``, ``eigvalsh``) cost a full decomposition per matrix, and on a GPU a slow,
    synchronising solver call. Here, for the float64 Gram matrix ``G`` of the smaller side:

    1. block subspace iteration (``block`` vectors, warm-started from ``starts`` -- the bases this function
       returned for the same matrices at the previous measurement -- else from a fixed seeded draw) and a
       Rayleigh-Ritz step give ``rho <= lambda_max(G)`` (Courant-Fischer);
    2. a Cholesky factorisation of ``rho (1 + rtol) I - G`` succeeds only if every eigenvalue of ``G`` is below
       ``rho (1 + rtol)``: so ``lambda_max`` lies in ``[rho, rho (1 + rtol)]``;
    3. matrices not certified after ``max_rounds`` rounds of ``iters_per_round`` iterations fall back to
       ``eigvalsh``.

    ``||W||_F^2`` is the trace of ``G``. Rounding in forming ``G`` and in the Cholesky adds ~``n eps`` relative
    (as for the ``gram`` backend), so the stable ranks are within ~``rtol`` of float64 ``svdvals``: 1e-10 against
    the >= 1e-7 relative differences CaliSr resolves. Work per matrix: one Gram product, a few ``G @ V`` products,
    one QR of ``[n, block]`` and one Cholesky, all batched; one host sync per round. Returns ``(stable ranks
    [B] float64, bases [B, n, block])`` on the matrices' device, and with ``return_fallbacks`` also a bool mask of
    the matrices that needed the ``eigvalsh`` fallback.
    """
    mats = torch.stack([_as_matrix(w).detach().to(torch.float64) for w in weights])
    gram = mats.mT @ mats if mats.shape[1] >= mats.shape[2] else mats @ mats.mT
    batch, n = gram.shape[0], gram.shape[-1]
    k = min(block, n)
    fro2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    if starts is not None and tuple(starts.shape) == (batch, n, k):
        basis = starts.to(gram.device, torch.float64)
    else:
        gen = torch.Generator().manual_seed(0)
        basis = torch.randn(n, k, generator=gen, dtype=torch.float64).to(gram.device).expand(batch, n, k)
    top = torch.zeros(batch, dtype=torch.float64, device=gram.device)
    done = fro2 == 0  # the zero matrix: stable rank 0 by convention
    eye = torch.eye(n, dtype=torch.float64, device=gram.device)
    for _ in range(max_rounds):
        todo = (~done).nonzero().flatten()  # the round's one host sync
        if todo.numel() == 0:
            break
        g, v = gram[todo], basis[todo]
        for _ in range(iters_per_round):
            v, _ = torch.linalg.qr(g @ v)
        theta, vecs = torch.linalg.eigh(v.mT @ g @ v)  # Rayleigh-Ritz, ascending
        v = v @ vecs.flip(-1)  # Ritz vectors, largest first: the next warm start
        rho = theta[..., -1]
        _, info = torch.linalg.cholesky_ex((rho * (1 + rtol))[:, None, None] * eye - g)
        certified = info == 0
        basis = basis.index_copy(0, todo, v)
        top = top.index_copy(0, todo, rho)
        done = done.index_copy(0, todo, certified)
    left = (~done).nonzero().flatten()
    if left.numel():
        top = top.index_copy(0, left, torch.linalg.eigvalsh(gram[left])[..., -1])
    safe = torch.where(top > 0, top, torch.ones_like(top))
    values = torch.where(top > 0, fro2 / safe, torch.zeros_like(fro2))
    return (values, basis, ~done) if return_fallbacks else (values, basis)
