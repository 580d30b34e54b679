"""Stable rank: float64 exactness against numpy, batching, aggregation, degenerate inputs."""

import numpy as np
import pytest
import torch

from peft_sam.ops.stable_rank import group_stable_rank, stable_rank, stable_rank_batched


def _numpy_sr(weight: torch.Tensor) -> float:
    s = np.linalg.svd(weight.detach().to(torch.float64).numpy(), compute_uv=False)
    return float((s**2).sum() / s[0] ** 2)


def _matrices() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    return [
        torch.randn(16, 16, generator=g),
        torch.randn(24, 64, generator=g),
        torch.randn(64, 24, generator=g),
        low_rank,
        torch.randn(32, 48, generator=g).to(torch.bfloat16),
        torch.randn(48, 32, generator=g, dtype=torch.float64),
        torch.randn(16, 16, generator=g) * 1e-3,
        torch.randn(1, 9, generator=g),
    ]


@pytest.mark.parametrize("idx", range(len(_matrices())))
def test_matches_numpy_float64(idx):
    weight = _matrices()[idx]
    value = stable_rank(weight)
    assert value.dtype == torch.float64 and value.ndim == 0
    ref = _numpy_sr(weight)
    assert abs(value.item() - ref) <= 1e-10 * ref


def test_known_values():
    assert stable_rank(torch.eye(7)).item() == pytest.approx(7.0, rel=1e-14)
    assert stable_rank(torch.diag(torch.tensor([2.0, 1.0]))).item() == pytest.approx(1.25, rel=1e-14)
    rank1 = torch.randn(10, 1) @ torch.randn(1, 12)
    assert stable_rank(rank1).item() == pytest.approx(1.0, rel=1e-10)


def test_zero_matrix_is_zero():
    assert stable_rank(torch.zeros(5, 7)).item() == 0.0
    values = stable_rank_batched([torch.zeros(5, 7), torch.eye(5, 7)])
    assert values.tolist() == [0.0, pytest.approx(5.0)]
    assert torch.isfinite(values).all()


def test_batched_equals_unbatched_in_order():
    mats = _matrices()
    mats = mats + [m * 2 + 1 for m in mats[:3]]  # several same-shape matrices to stack
    batched = stable_rank_batched(mats)
    single = torch.stack([stable_rank(m) for m in mats])
    assert batched.dtype == torch.float64 and batched.shape == (len(mats),)
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=0)
    chunked = stable_rank_batched(mats, max_batch_numel=1)  # one matrix per call
    torch.testing.assert_close(chunked, single, rtol=1e-12, atol=0)


def test_group_reductions():
    mats = _matrices()
    per = torch.stack([stable_rank(m) for m in mats])
    torch.testing.assert_close(group_stable_rank(mats), per.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(group_stable_rank(mats, reduction="mean"), per.mean(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        group_stable_rank(mats, reduction="max")
    with pytest.raises(ValueError, match="at least one"):
        group_stable_rank([])


def test_precision_detects_one_step_difference():
    """A 1e-7 relative SR change (CaliSr's regime) must be resolved regardless of input dtype."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 64, generator=g, dtype=torch.float64)
    bumped = base.clone()
    bumped[0, 0] += 1e-5
    assert stable_rank(bumped).item() != stable_rank(base).item()
    diff = stable_rank(bumped).item() - stable_rank(base).item()
    ref = _numpy_sr(bumped) - _numpy_sr(base)
    assert np.sign(diff) == np.sign(ref)


def test_shapes_and_no_grad():
    w = torch.randn(4, 3, 2, 2, requires_grad=True)  # conv kernel: read as [4, 12]
    value = stable_rank(w)
    assert not value.requires_grad
    assert value.item() == pytest.approx(_numpy_sr(w.reshape(4, -1)), rel=1e-10)
    with pytest.raises(ValueError, match="matrix"):
        stable_rank(torch.randn(5))
    assert stable_rank_batched([]).shape == (0,)
