"""The sparse-delta linear op: exact against a dense reference, gradients by gradcheck, both strategies."""

import pytest
import torch

from peft_sam.ops.sparse_delta import sparse_delta_linear


def _problem(out_f=7, in_f=5, k=6, batch=(3, 4), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, in_f, generator=gen, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    b = torch.randn(out_f, generator=gen, dtype=dtype)
    flat = torch.randperm(out_f * in_f, generator=gen)[:k]
    out_idx, in_idx = flat // in_f, flat % in_f
    v = torch.randn(k, generator=gen, dtype=dtype)
    return x, w, b, out_idx, in_idx, v


def _dense_reference(x, w, b, out_idx, in_idx, v):
    delta = torch.zeros_like(w).index_put((out_idx, in_idx), v)
    return torch.nn.functional.linear(x, w + delta, b)


@pytest.mark.parametrize("strategy", ["gather", "dense"])
def test_forward_matches_dense_weight(strategy):
    x, w, b, oi, ii, v = _problem()
    y = sparse_delta_linear(x, w, b, oi, ii, v, strategy=strategy)
    torch.testing.assert_close(y, _dense_reference(x, w, b, oi, ii, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["gather", "dense"])
def test_gradcheck_float64(strategy):
    x, w, b, oi, ii, v = _problem()
    x.requires_grad_(True)
    b.requires_grad_(True)
    v.requires_grad_(True)

    def fn(x_, b_, v_):
        return sparse_delta_linear(x_, w, b_, oi, ii, v_, strategy=strategy)

    assert torch.autograd.gradcheck(fn, (x, b, v), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("strategy", ["gather", "dense"])
def test_gradients_equal_dense_autograd(strategy):
    x, w, b, oi, ii, v = _problem(out_f=12, in_f=9, k=20)
    x1, v1 = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    sparse_delta_linear(x1, w, b, oi, ii, v1, strategy=strategy).square().sum().backward()
    x2, v2 = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    _dense_reference(x2, w, b, oi, ii, v2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(v1.grad, v2.grad)


def test_transposed_weight_view_and_chunking(monkeypatch):
    import peft_sam.ops.sparse_delta as sd

    monkeypatch.setattr(sd, "_CHUNK_ELEMENTS", 8)  # force many chunks
    x, w, b, oi, ii, v = _problem(out_f=10, in_f=6, k=25)
    w_t = w.t().contiguous().t()  # same values, transposed storage like GPT-2's Conv1D
    v.requires_grad_(True)
    y = sparse_delta_linear(x, w_t, b, oi, ii, v, strategy="gather")
    y.sum().backward()
    v_ref = v.detach().clone().requires_grad_(True)
    _dense_reference(x, w, b, oi, ii, v_ref).sum().backward()
    torch.testing.assert_close(y, _dense_reference(x, w, b, oi, ii, v.detach()))
    torch.testing.assert_close(v.grad, v_ref.grad)


def test_no_dense_weight_gradient_is_built():
    x, w, b, oi, ii, v = _problem(dtype=torch.float32)
    v.requires_grad_(True)
    sparse_delta_linear(x, w, b, oi, ii, v).sum().backward()
    assert w.grad is None and v.grad.shape == v.shape


@pytest.mark.parametrize("concentrated", ["rows", "cols"])
def test_restricted_weight_gradient_for_concentrated_masks(concentrated):
    x, w, b, _, _, _ = _problem(out_f=16, in_f=12, k=1)
    gen = torch.Generator().manual_seed(1)
    if concentrated == "rows":  # all entries in 2 output rows: the row-restricted GEMM is used
        out_idx = torch.tensor([3, 3, 3, 9, 9]).long()
        in_idx = torch.tensor([0, 5, 11, 2, 7]).long()
    else:  # all entries in 2 input columns
        out_idx = torch.tensor([0, 4, 15, 2, 7]).long()
        in_idx = torch.tensor([6, 6, 6, 1, 1]).long()
    v = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    sparse_delta_linear(x, w, b, out_idx, in_idx, v, strategy="dense").square().sum().backward()
    v_ref = v.detach().clone().requires_grad_(True)
    _dense_reference(x, w, b, out_idx, in_idx, v_ref).square().sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad)
