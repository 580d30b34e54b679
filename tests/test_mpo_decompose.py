"""MPO decomposition core: factorisation, bonds, TT-SVD in mixed-canonical form, contraction."""

import math
from itertools import combinations_with_replacement

import pytest
import torch

from peft_sam.tuners.mpo.decompose import (
    central_from_weight,
    central_index,
    factorize,
    mpo_bond_dims,
    mpo_contract,
    mpo_decompose,
    mpo_num_params,
    mpo_shapes,
    site_count,
)


def _rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return ((approx.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _decompose(weight: torch.Tensor, max_bond: int | None = None) -> list[torch.Tensor]:
    rows, cols = mpo_shapes(*weight.shape)
    return mpo_decompose(weight, rows, cols, max_bond=max_bond)


@pytest.mark.parametrize("n", [1, 2, 7, 97, 384, 768, 1536, 3072, 2304, 50400, 11008])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_factorize_product_and_order(n, k):
    factors = factorize(n, k)
    assert len(factors) == k
    assert math.prod(factors) == n
    assert list(factors) == sorted(factors)
    assert factorize(n, k) == factors


def test_factorize_balanced():
    assert factorize(768) == (3, 4, 4, 4, 4)
    assert factorize(384) == (2, 3, 4, 4, 4)
    assert factorize(1536) == (4, 4, 4, 4, 6)
    assert factorize(3072) == (4, 4, 4, 6, 8)  # MPOP's multiset for 3072
    assert factorize(97) == (1, 1, 1, 1, 97)
    assert factorize(1) == (1, 1, 1, 1, 1)


@pytest.mark.parametrize("n", [384, 1536, 3072, 1000])
def test_factorize_minimises_largest_factor(n):
    """Brute force over all 5-multisets of divisors: no factorisation has a smaller largest factor."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = min(max(c) for c in combinations_with_replacement(divisors, 5) if math.prod(c) == n)
    assert max(factorize(n)) == best


def test_factorize_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        factorize(0)
    with pytest.raises(ValueError, match="num_factors"):
        factorize(8, 0)


def test_bond_dims_mpop_bert():
    assert mpo_bond_dims((3, 4, 4, 4, 4), (4, 4, 4, 4, 3)) == (1, 12, 192, 192, 12, 1)
    assert mpo_bond_dims((4, 4, 8, 6, 4), (3, 4, 4, 4, 4)) == (1, 12, 192, 384, 16, 1)
    assert mpo_bond_dims((3, 4, 4, 4, 4), (4, 4, 4, 4, 3), max_bond=100) == (1, 12, 100, 100, 12, 1)


def test_num_params_formula_and_central_size():
    rows, cols = (3, 4, 4, 4, 4), (4, 4, 4, 4, 3)
    bonds = mpo_bond_dims(rows, cols)
    total = mpo_num_params(rows, cols)
    assert total == sum(bonds[k] * rows[k] * cols[k] * bonds[k + 1] for k in range(5))
    c = central_index(5)
    central = bonds[c] * rows[c] * cols[c] * bonds[c + 1]
    assert central == 768 * 768
    assert 0.08 <= (total - central) / (768 * 768) <= 0.13
    assert mpo_num_params(rows, cols, (1, 2, 2, 2, 2, 1)) == 12 * 2 + 3 * 2 * 16 * 2 + 2 * 12


def test_shapes_default_mpop_768():
    assert mpo_shapes(768, 768) == ((3, 4, 4, 4, 4), (4, 4, 4, 4, 3))


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (3072, 768), (30, 7)])
def test_shapes_auto(shape):
    rows, cols = mpo_shapes(*shape)
    sites = 5 if shape[0] >= 384 else 3  # 30 x 7: 210 entries, log_4 -> 3 sites
    assert len(rows) == len(cols) == sites == site_count(*shape, 5)
    assert math.prod(rows) == shape[0] and math.prod(cols) == shape[1]
    assert sorted(rows) == list(factorize(shape[0], sites)) and sorted(cols) == list(factorize(shape[1], sites))


@pytest.mark.parametrize("shape", [(20, 10), (10, 20), (7, 11), (2, 20), (32, 48), (64, 32), (16, 16), (768, 768)])
def test_no_site_is_a_scalar_and_small_weights_get_fewer_sites(shape):
    rows, cols = mpo_shapes(*shape)
    assert 2 <= len(rows) <= 5
    assert 4 ** len(rows) <= shape[0] * shape[1] or len(rows) == 2
    assert not [k for k, (i, j) in enumerate(zip(rows, cols)) if i == 1 and j == 1], (rows, cols)


def test_shapes_overrides():
    assert mpo_shapes(3072, 768, row_factors=[4, 4, 8, 6, 4], col_factors=[3, 4, 4, 4, 4]) == (
        (4, 4, 8, 6, 4),
        (3, 4, 4, 4, 4),
    )
    rows, cols = mpo_shapes(768, 768, row_factors=(8, 12, 8))  # override length decides the site count
    assert rows == (8, 12, 8) and len(cols) == 3 and math.prod(cols) == 768
    with pytest.raises(ValueError, match="out_features=768"):
        mpo_shapes(768, 768, row_factors=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="in_features=384"):
        mpo_shapes(768, 384, col_factors=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="expected 5"):
        mpo_shapes(768, 768, row_factors=(3, 4, 4, 4, 4), col_factors=(16, 48))


@pytest.mark.parametrize("shape", [(24, 36), (64, 48), (384, 384)])
def test_reconstruction_exact_float32(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    tensors = _decompose(weight)
    assert all(t.dtype == torch.float32 for t in tensors)
    rows, cols = mpo_shapes(*shape)
    assert tuple(t.shape[0] for t in tensors) + (1,) == mpo_bond_dims(rows, cols)
    assert _rel_err(mpo_contract(tensors), weight) < 1e-5


def test_reconstruction_float64_and_bf16():
    torch.manual_seed(1)
    w64 = torch.randn(24, 36, dtype=torch.float64)
    assert _rel_err(mpo_contract(_decompose(w64)), w64) < 1e-12
    wbf = torch.randn(24, 36).to(torch.bfloat16)
    tensors = _decompose(wbf)
    assert all(t.dtype == torch.bfloat16 for t in tensors)
    assert _rel_err(mpo_contract([t.double() for t in tensors]), wbf) < 2e-2


@pytest.mark.parametrize("kind", ["zero", "rank1"])
def test_degenerate_weights_no_nan(kind):
    torch.manual_seed(2)
    if kind == "zero":
        weight = torch.zeros(24, 36)
    else:
        weight = torch.randn(24, 1) @ torch.randn(1, 36)
    rows, cols = mpo_shapes(24, 36)
    tensors = mpo_decompose(weight, rows, cols)
    assert all(torch.isfinite(t).all() for t in tensors)
    assert tuple(t.shape[0] for t in tensors) + (1,) == mpo_bond_dims(rows, cols)  # full size kept
    rebuilt = mpo_contract(tensors)
    assert torch.isfinite(rebuilt).all()
    if kind == "zero":
        assert rebuilt.abs().max().item() == 0.0
    else:
        assert _rel_err(rebuilt, weight) < 1e-5
    _assert_mixed_canonical(tensors)


def _assert_mixed_canonical(tensors: list[torch.Tensor], atol: float = 1e-5) -> None:
    c = central_index(len(tensors))
    for k, t in enumerate(tensors):
        t = t.double()
        if k < c:
            m = t.reshape(-1, t.shape[-1])
            torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1], dtype=torch.float64), atol=atol, rtol=0)
        elif k > c:
            m = t.reshape(t.shape[0], -1)
            torch.testing.assert_close(m @ m.T, torch.eye(m.shape[0], dtype=torch.float64), atol=atol, rtol=0)


@pytest.mark.parametrize("max_bond", [None, 5])
def test_mixed_canonical_orthonormality(max_bond):
    torch.manual_seed(3)
    weight = torch.randn(64, 48)
    tensors = _decompose(weight, max_bond=max_bond)
    _assert_mixed_canonical(tensors)
    # all the weight sits in the central tensor
    c = central_index(len(tensors))
    assert abs(tensors[c].double().norm() - mpo_contract(tensors).double().norm()) < 1e-3


def test_truncation_bonds_and_error_monotone():
    torch.manual_seed(4)
    weight = torch.randn(64, 48)
    rows, cols = mpo_shapes(64, 48)
    errors = []
    for max_bond in (1, 2, 4, 8, 16):
        tensors = mpo_decompose(weight, rows, cols, max_bond=max_bond)
        bonds = [t.shape[0] for t in tensors] + [tensors[-1].shape[-1]]
        assert max(bonds) <= max_bond
        assert tuple(bonds) == mpo_bond_dims(rows, cols, max_bond)
        assert mpo_num_params(rows, cols, bonds) == sum(t.numel() for t in tensors)
        errors.append(_rel_err(mpo_contract(tensors), weight))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5  # 16 is the largest full bond here


@pytest.mark.parametrize("shape", [(24, 36), (64, 48)])
def test_central_from_weight_round_trip(shape):
    torch.manual_seed(5)
    weight = torch.randn(*shape)
    tensors = _decompose(weight)
    c = central_index(len(tensors))
    aux_only = [None if k == c else t for k, t in enumerate(tensors)]
    central = central_from_weight(weight, aux_only, c)
    assert central.shape == tensors[c].shape and central.dtype == tensors[c].dtype
    assert _rel_err(central, tensors[c]) < 1e-5
    assert _rel_err(mpo_contract([central if k == c else t for k, t in enumerate(tensors)]), weight) < 1e-5


def test_decompose_deterministic():
    torch.manual_seed(6)
    weight = torch.randn(64, 48)
    first, second = _decompose(weight), _decompose(weight.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_contract_gradient_reaches_every_tensor():
    torch.manual_seed(7)
    tensors = [t.requires_grad_() for t in _decompose(torch.randn(24, 36))]
    target = torch.randn(24, 36)
    ((mpo_contract(tensors) - target) ** 2).sum().backward()
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_contract_matches_dense_reference():
    """Independent reference: full einsum over the chain, then undo the interleaving."""
    torch.manual_seed(8)
    tensors = [torch.randn(1, 2, 3, 4), torch.randn(4, 3, 2, 5), torch.randn(5, 2, 2, 1)]
    full = torch.einsum("aijb,bklc,cmnd->ikmjln", *tensors).reshape(12, 12)
    torch.testing.assert_close(mpo_contract(tensors), full)


def test_single_site_and_bad_inputs():
    weight = torch.randn(6, 10)
    tensors = mpo_decompose(weight, (6,), (10,))
    assert [t.shape for t in tensors] == [torch.Size([1, 6, 10, 1])]
    torch.testing.assert_close(mpo_contract(tensors), weight)
    with pytest.raises(ValueError, match="do not match"):
        mpo_decompose(weight, (2, 3), (2, 4))
    with pytest.raises(ValueError, match="2-D"):
        mpo_decompose(torch.randn(2, 3, 4), (2,), (3,))
    with pytest.raises(ValueError, match="equal length"):
        mpo_decompose(weight, (2, 3), (10,))
