"""Matrix product operator (MPO) decomposition of a weight matrix (MPOP, Liu et al., ACL 2021).

A weight ``W`` of shape ``[out, in]`` with ``out = i_0 * ... * i_{n-1}`` and ``in = j_0 * ... * j_{n-1}`` is
viewed as a tensor ``[i_0, ..., i_{n-1}, j_0, ..., j_{n-1}]``, its axes are interleaved to
``[i_0, j_0, i_1, j_1, ...]`` and it is split by sequential SVD (TT-SVD) into ``n`` local tensors
``T_k`` of shape ``[d_k, i_k, j_k, d_{k+1}]`` with ``d_0 = d_n = 1`` (0-based indices throughout this module).

The tensors are returned in *mixed-canonical form* centred on ``c = (n - 1) // 2``: ``T_0 .. T_{c-1}`` are
left-orthonormal (``T_k.reshape(-1, d_{k+1})`` has orthonormal columns), ``T_{c+1} .. T_{n-1}`` are
right-orthonormal (``T_k.reshape(d_k, -1)`` has orthonormal rows) and the central tensor ``T_c`` carries all
the "weight". This is obtained directly, without a gauge sweep: TT-SVD runs left to right for the bonds
``d_1 .. d_c`` (keeping ``U``, passing ``S V^T`` on) and then right to left on the remainder for the bonds
``d_{n-1} .. d_{c+1}`` (keeping ``V^T``, passing ``U S`` on); what is left is the central tensor. Unlike the
reference implementation, no ``1 / sqrt(singular value)`` gauge is applied, so zero or rank-deficient weights
decompose without NaN, and untruncated bonds keep their full size ``min(prod left, prod right)`` even when
singular values vanish, so shapes depend only on the factors (and ``max_bond``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import permutations

import torch
from torch import Tensor

__all__ = [
    "central_from_weight",
    "central_index",
    "factorize",
    "mpo_bond_dims",
    "mpo_contract",
    "mpo_decompose",
    "mpo_num_params",
    "mpo_shapes",
    "site_count",
]

# Above this many (row order, column order) candidates `mpo_shapes` stops searching exhaustively.
_MAX_ARRANGEMENTS = 40_000


def central_index(num_factors: int) -> int:
    """Index of the central tensor of an ``num_factors``-site MPO: ``(n - 1) // 2``."""
    return (num_factors - 1) // 2


def site_count(out_features: int, in_features: int, num_factors: int) -> int:
    """Sites for an ``[out, in]`` weight: ``num_factors``, fewer for a small weight (at least 2).

    At most as many as the prime factors of ``out`` and ``in`` together (so no site is a 1 x 1 scalar that scales
    the whole matrix), and at most ``log_4(out * in)`` (sites of 4 entries on average or more: a chain of tiny
    sites multiplies its updates, and on a 20 x 10 weight five sites diverge at learning rates where LoRA does not).
    BERT-size weights keep 5 sites.
    """
    by_primes = _num_prime_factors(out_features) + _num_prime_factors(in_features)
    by_size = int(math.log(out_features * in_features) / math.log(4) + 1e-9)
    sites = min(num_factors, by_primes, by_size)
    if sites < num_factors and sites > 2 and sites % 2 == 0:
        sites -= 1  # an odd count keeps the central tensor in the middle (no auxiliary as large as the weight)
    return max(2, sites)


def _num_prime_factors(n: int) -> int:
    """Prime factors of ``n`` counted with multiplicity (12 -> 3)."""
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n //= p
            count += 1
        p += 1
    return count + (n > 1)


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def _balanced(n: int, k: int, cap: int) -> tuple[int, ...] | None:
    """Lexicographically smallest non-increasing ``k``-tuple with product ``n`` and entries ``<= cap``.

    Depth-first with candidates in ascending order, so the first hit minimises the largest factor, then
    the second largest given the first, and so on.
    """
    if k == 1:
        return (n,) if n <= cap else None
    for d in _divisors(n):
        if d > cap:
            break
        if d**k < n:  # d must be the largest of k factors multiplying to n
            continue
        rest = _balanced(n // d, k - 1, d)
        if rest is not None:
            return (d, *rest)
    return None


@lru_cache(maxsize=256)
def factorize(n: int, num_factors: int = 5) -> tuple[int, ...]:
    """Balanced factorisation of ``n`` into ``num_factors`` integers whose product is ``n``.

    The largest factor is as small as possible, then the second largest, and so on (so ``768 -> (3, 4, 4,
    4, 4)``, ``3072 -> (4, 4, 4, 6, 8)``, ``384 -> (2, 3, 4, 4, 4)``). Factors are 1 when ``n`` has fewer
    than ``num_factors`` prime factors (a prime ``p`` gives ``(1, ..., 1, p)``). Returned in ascending order;
    `mpo_shapes` chooses the order in which they are used.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"factorize: n must be a positive integer, got {n!r}")
    if not isinstance(num_factors, int) or isinstance(num_factors, bool) or num_factors < 1:
        raise ValueError(f"factorize: num_factors must be a positive integer, got {num_factors!r}")
    found = _balanced(n, num_factors, n)
    assert found is not None  # (n, 1, ..., 1) always qualifies
    return tuple(sorted(found))


def mpo_bond_dims(
    row_factors: Sequence[int], col_factors: Sequence[int], max_bond: int | None = None
) -> tuple[int, ...]:
    """Bond dimensions ``(d_0, ..., d_n)`` of the decomposition: ``d_k = min(prod_{m<k} i_m j_m,
    prod_{m>=k} i_m j_m, max_bond)`` and ``d_0 = d_n = 1``.

    These are exactly the bonds `mpo_decompose` produces (untruncated: the full ranks, so the reconstruction
    is exact). E.g. rows (3, 4, 4, 4, 4) x cols (4, 4, 4, 4, 3) give (1, 12, 192, 192, 12, 1).
    """
    _check_factor_lists(row_factors, col_factors)
    if max_bond is not None and max_bond < 1:
        raise ValueError(f"max_bond must be a positive integer or None, got {max_bond!r}")
    pairs = [int(i) * int(j) for i, j in zip(row_factors, col_factors)]
    total = math.prod(pairs)
    bonds = [1]
    left = 1
    for k in range(1, len(pairs)):
        left *= pairs[k - 1]
        bond = min(left, total // left)
        if max_bond is not None:
            bond = min(bond, max_bond)
        bonds.append(bond)
    bonds.append(1)
    return tuple(bonds)


def mpo_num_params(
    row_factors: Sequence[int], col_factors: Sequence[int], bonds: Sequence[int] | None = None
) -> int:
    """Entry count ``sum_k d_k i_k j_k d_{k+1}`` of all local tensors (default ``bonds``: untruncated)."""
    if bonds is None:
        bonds = mpo_bond_dims(row_factors, col_factors)
    _check_factor_lists(row_factors, col_factors)
    if len(bonds) != len(row_factors) + 1:
        raise ValueError(f"expected {len(row_factors) + 1} bond dims, got {len(bonds)}: {tuple(bonds)}")
    return sum(
        int(bonds[k]) * int(i) * int(j) * int(bonds[k + 1])
        for k, (i, j) in enumerate(zip(row_factors, col_factors))
    )


def _check_factor_lists(row_factors: Sequence[int], col_factors: Sequence[int]) -> None:
    if len(row_factors) != len(col_factors) or len(row_factors) == 0:
        raise ValueError(
            f"row and column factor lists must be non-empty and of equal length, got {tuple(row_factors)} "
            f"and {tuple(col_factors)}"
        )
    for f in (*row_factors, *col_factors):
        if int(f) != f or f < 1:
            raise ValueError(
                f"MPO factors must be positive integers, got {tuple(row_factors)} x {tuple(col_factors)}"
            )


def _validate_override(name: str, factors: Sequence[int], dim: int, num_factors: int) -> tuple[int, ...]:
    factors = tuple(int(f) for f in factors)
    if len(factors) != num_factors:
        raise ValueError(f"{name}={factors} has {len(factors)} factors, expected {num_factors}")
    if any(f < 1 for f in factors):
        raise ValueError(f"{name}={factors} must contain positive integers only")
    if math.prod(factors) != dim:
        raise ValueError(
            f"{name}={factors} multiply to {math.prod(factors)}, but the dimension they must factor is {dim}"
        )
    return factors


@lru_cache(maxsize=256)
def _arrange(
    rows: tuple[int, ...], cols: tuple[int, ...], fix_rows: bool, fix_cols: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Order the factors to minimise the untruncated parameter count (ties: lexicographically smallest)."""
    row_orders = [rows] if fix_rows else sorted(set(permutations(rows)))
    col_orders = [cols] if fix_cols else sorted(set(permutations(cols)))
    if len(row_orders) * len(col_orders) > _MAX_ARRANGEMENTS:
        # Too many orders to search: rows ascending, columns descending (pairs small with large factors).
        return (
            rows if fix_rows else tuple(sorted(rows)),
            cols if fix_cols else tuple(sorted(cols, reverse=True)),
        )
    best = None
    for r in row_orders:
        for c in col_orders:
            # a site with i_k = j_k = 1 is a scalar that scales the whole matrix: avoided whenever possible
            scalar_sites = sum(i == 1 and j == 1 for i, j in zip(r, c))
            key = (scalar_sites, mpo_num_params(r, c), r, c)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[2], best[3]


def mpo_shapes(
    out_features: int,
    in_features: int,
    num_factors: int = 5,
    row_factors: Sequence[int] | None = None,
    col_factors: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row (output) and column (input) factors for an ``[out_features, in_features]`` weight.

    Overrides are validated (length ``num_factors``, product equal to the dimension) and used as given.
    Missing ones come from `factorize`, and their order is chosen (searching all distinct orders) to minimise
    the untruncated parameter count ``sum_k d_k i_k j_k d_{k+1}``, ties broken by the lexicographically
    smallest (rows, cols). For 768 x 768 this gives MPOP's rows (3, 4, 4, 4, 4) x cols (4, 4, 4, 4, 3).
    """
    if row_factors is not None:  # a per-module override decides the number of sites
        num_factors = len(tuple(row_factors))
    elif col_factors is not None:
        num_factors = len(tuple(col_factors))
    else:
        num_factors = site_count(int(out_features), int(in_features), num_factors)
    if row_factors is not None:
        rows = _validate_override(
            f"row_factors (out_features={out_features})", row_factors, out_features, num_factors
        )
    else:
        rows = factorize(int(out_features), num_factors)
    if col_factors is not None:
        cols = _validate_override(
            f"col_factors (in_features={in_features})", col_factors, in_features, num_factors
        )
    else:
        cols = factorize(int(in_features), num_factors)
    return _arrange(rows, cols, row_factors is not None, col_factors is not None)


def _svd_split(mat: Tensor, keep: int, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD keeping ``keep`` triplets; singular values ``<= floor`` become exactly zero (not cut)."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    s = torch.where(s > floor, s, torch.zeros_like(s))
    return u[:, :keep], s[:keep], vh[:keep]


def mpo_decompose(
    weight: Tensor,
    row_factors: Sequence[int],
    col_factors: Sequence[int],
    max_bond: int | None = None,
    eps: float = 1e-12,
) -> list[Tensor]:
    """Decompose ``weight [out, in]`` into MPO local tensors ``[d_k, i_k, j_k, d_{k+1}]`` (mixed-canonical).

    Computed in float64 on ``weight``'s device and cast back to ``weight.dtype``. Untruncated (``max_bond``
    None) the bonds are `mpo_bond_dims` and ``mpo_contract`` reproduces ``weight`` to float tolerance;
    ``max_bond`` keeps the top singular values inside the TT-SVD. ``eps``: singular values ``<= eps *
    ||W||_F`` are set to exactly zero (rounding noise of rank-deficient weights; bonds keep their size and the
    orthonormal factors stay orthonormal, so nothing is ever divided). See the module docstring for the gauge.
    """
    if weight.ndim != 2:
        raise ValueError(f"mpo_decompose expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows = tuple(int(f) for f in row_factors)
    cols = tuple(int(f) for f in col_factors)
    _check_factor_lists(rows, cols)
    out_features, in_features = weight.shape
    if math.prod(rows) != out_features or math.prod(cols) != in_features:
        raise ValueError(
            f"factors {rows} x {cols} (products {math.prod(rows)} x {math.prod(cols)}) do not match the "
            f"weight shape {out_features} x {in_features}"
        )
    bonds = mpo_bond_dims(rows, cols, max_bond)
    n = len(rows)
    c = central_index(n)
    pairs = [i * j for i, j in zip(rows, cols)]

    w = weight.detach().to(torch.float64)
    # [i_0..i_{n-1}, j_0..j_{n-1}] -> [i_0, j_0, i_1, j_1, ...]
    perm = [ax for k in range(n) for ax in (k, n + k)]
    rest = w.reshape(*rows, *cols).permute(perm).contiguous()
    floor = eps * torch.linalg.vector_norm(w)

    tensors: list[Tensor | None] = [None] * n
    # Left-to-right sweep: bonds d_1 .. d_c, left-orthonormal T_0 .. T_{c-1}.
    for k in range(c):
        mat = rest.reshape(bonds[k] * pairs[k], -1)
        u, s, vh = _svd_split(mat, bonds[k + 1], floor)
        tensors[k] = u.reshape(bonds[k], rows[k], cols[k], bonds[k + 1])
        rest = s[:, None] * vh
    # Right-to-left sweep on the remainder: bonds d_{n-1} .. d_{c+1}, right-orthonormal T_{n-1} .. T_{c+1}.
    for k in range(n - 1, c, -1):
        mat = rest.reshape(-1, pairs[k] * bonds[k + 1])
        u, s, vh = _svd_split(mat, bonds[k], floor)
        tensors[k] = vh.reshape(bonds[k], rows[k], cols[k], bonds[k + 1])
        rest = u * s[None, :]
    tensors[c] = rest.reshape(bonds[c], rows[c], cols[c], bonds[c + 1])
    return [t.to(weight.dtype).contiguous() for t in tensors]  # type: ignore[union-attr]


def mpo_contract(tensors: Sequence[Tensor]) -> Tensor:
    """Contract local tensors ``[d_k, i_k, j_k, d_{k+1}]`` back to the matrix ``[prod i, prod j]``.

    Left to right, one matmul per site on a running ``[rows so far, cols so far, bond]`` tensor, so no
    intermediate exceeds the output size; differentiable with respect to every tensor.
    """
    if len(tensors) == 0:
        raise ValueError("mpo_contract needs at least one tensor")
    first = tensors[0]
    if first.ndim != 4 or first.shape[0] != 1 or tensors[-1].shape[-1] != 1:
        raise ValueError("MPO tensors must be 4-D [d_k, i_k, j_k, d_k+1] with d_0 = d_n = 1")
    out_rows, out_cols = first.shape[1], first.shape[2]
    acc = first.reshape(out_rows, out_cols, first.shape[3])
    for t in tensors[1:]:
        bond, i, j, nxt = t.shape
        if acc.shape[-1] != bond:
            raise ValueError(f"MPO bond mismatch: {acc.shape[-1]} vs {bond} (tensor shape {tuple(t.shape)})")
        step = acc.reshape(-1, bond) @ t.reshape(bond, -1)  # [R*C, i*j*nxt]
        acc = step.reshape(out_rows, out_cols, i, j, nxt).permute(0, 2, 1, 3, 4)
        out_rows, out_cols = out_rows * i, out_cols * j
        acc = acc.reshape(out_rows, out_cols, nxt)
    return acc.reshape(out_rows, out_cols)


def central_from_weight(
    weight: Tensor, tensors: Sequence[Tensor | None], center_index: int | None = None
) -> Tensor:
    """Recover the central tensor from ``weight`` and the orthonormal auxiliary tensors.

    With left auxiliaries ``L`` (``[prod_{k<c} i_k j_k, d_c]``, orthonormal columns) and right ones ``R``
    (``[d_{c+1}, prod_{k>c} i_k j_k]``, orthonormal rows), ``C = L^T W R^T`` (``W`` in interleaved layout):
    exactly the decomposed central tensor when the auxiliaries came from ``weight``, else the least-squares
    fit. ``tensors[center_index]`` is ignored (may be None). Computed in float64, returned in the dtype of the
    auxiliary tensors (``weight``'s dtype when there are none).
    """
    n = len(tensors)
    c = central_index(n) if center_index is None else int(center_index)
    if not 0 <= c < n:
        raise ValueError(f"center_index {c} out of range for {n} tensors")
    if weight.ndim != 2:
        raise ValueError(f"central_from_weight expects a 2-D weight, got shape {tuple(weight.shape)}")
    aux = [t for k, t in enumerate(tensors) if k != c]
    if any(t is None for t in aux):
        raise ValueError("only the central tensor may be None")
    dtype = aux[0].dtype if aux else weight.dtype  # type: ignore[union-attr]
    out_features, in_features = weight.shape
    other_rows = math.prod(int(t.shape[1]) for t in aux)  # type: ignore[union-attr]
    other_cols = math.prod(int(t.shape[2]) for t in aux)  # type: ignore[union-attr]
    if out_features % other_rows or in_features % other_cols:
        raise ValueError(
            f"auxiliary tensors (row factors product {other_rows}, column {other_cols}) do not fit a weight "
            f"of shape {tuple(weight.shape)}"
        )
    i_c, j_c = out_features // other_rows, in_features // other_cols
    rows = [int(t.shape[1]) if k != c else i_c for k, t in enumerate(tensors)]  # type: ignore[union-attr]
    cols = [int(t.shape[2]) if k != c else j_c for k, t in enumerate(tensors)]  # type: ignore[union-attr]

    w = weight.detach().to(torch.float64)
    perm = [ax for k in range(n) for ax in (k, n + k)]
    w = w.reshape(*rows, *cols).permute(perm)
    left = torch.ones(1, 1, dtype=torch.float64, device=w.device)  # [prod left pairs, bond]
    for k in range(c):
        t = tensors[k].detach().to(torch.float64)  # type: ignore[union-attr]
        left = (left @ t.reshape(t.shape[0], -1)).reshape(-1, t.shape[3])
    right = torch.ones(1, 1, dtype=torch.float64, device=w.device)  # [bond, prod right pairs]
    for k in range(n - 1, c, -1):
        t = tensors[k].detach().to(torch.float64)  # type: ignore[union-attr]
        right = (t.reshape(-1, t.shape[3]) @ right).reshape(t.shape[0], -1)
    central = left.T @ w.reshape(left.shape[0], -1)  # [d_c, i_c j_c * prod right pairs]
    central = central.reshape(-1, right.shape[1]) @ right.T  # [d_c * i_c j_c, d_{c+1}]
    return central.reshape(left.shape[1], rows[c], cols[c], right.shape[0]).to(dtype)
