"""The merged-weight sparse ops: forward = the dense op on W0 + Delta, entries' gradients = the dense gradient there."""

import pytest
import torch
import torch.nn.functional as F

from peft_sam.ops.sparse_delta import (
    EmbeddingRows,
    EntryPattern,
    SampledEmbedding,
    SampledLinear,
    sampled_matmul,
    tap_entries,
)


def _problem(out_f=7, in_f=5, k=6, kb=2, batch=(3, 4), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, in_f, generator=gen, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    b = torch.randn(out_f, generator=gen, dtype=dtype)
    flat = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values
    bflat = torch.randperm(out_f, generator=gen)[:kb].sort().values
    v = torch.randn(k, generator=gen, dtype=dtype)
    vb = torch.randn(kb, generator=gen, dtype=dtype)
    return x, w, b, flat, bflat, v, vb


def _merged(w, flat, v):
    return (w.reshape(-1).index_add(0, flat, v)).view_as(w)


def _sampled_linear(x, w, b, flat, bflat, v, vb, conv1d=False):
    """The op as a SAM layer uses it: the base tensors already hold W0 + Delta."""
    rows, cols = w.shape
    plan = ((EntryPattern(flat, rows, cols),), (EntryPattern(bflat, 1, b.numel()),), conv1d)
    return SampledLinear.apply(x, _merged(w, flat, v.detach()), _merged(b, bflat, vb.detach()), plan, v, vb)


def test_sampled_matmul_equals_the_dense_product_at_the_entries():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 13, generator=gen), torch.randn(13, 6, generator=gen)
    flat = torch.randperm(54, generator=gen)[:11].sort().values
    torch.testing.assert_close(sampled_matmul(EntryPattern(flat, 9, 6), a, b), (a @ b).reshape(-1)[flat])
    # float16/bfloat16 run the product in float32 (torch.sparse.sampled_addmm has no half kernels)
    got = sampled_matmul(EntryPattern(flat, 9, 6), a.bfloat16(), b.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), (a.bfloat16().float() @ b.bfloat16().float()).reshape(-1)[flat],
                               atol=2e-2, rtol=2e-2)  # fmt: skip


def test_linear_forward_and_gradients_equal_dense_autograd():
    x, w, b, flat, bflat, v, vb = _problem(out_f=12, in_f=9, k=20, kb=3)
    x1, v1, vb1 = (t.clone().requires_grad_(True) for t in (x, v, vb))
    y = _sampled_linear(x1, w, b, flat, bflat, v1, vb1)
    y.square().sum().backward()
    x2, v2, vb2 = (t.clone().requires_grad_(True) for t in (x, v, vb))
    ref = F.linear(x2, _merged(w, flat, v2), _merged(b, bflat, vb2))
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in ((x1.grad, x2.grad), (v1.grad, v2.grad), (vb1.grad, vb2.grad)):
        torch.testing.assert_close(got, want)


def test_linear_gradcheck_float64():
    x, w, b, flat, bflat, v, vb = _problem()
    x.requires_grad_(True)
    v.requires_grad_(True)
    vb.requires_grad_(True)

    def fn(x_, v_, vb_):
        # the values enter the forward only through the merged base: gradcheck perturbs them, so rebuild it
        rows, cols = w.shape
        plan = ((EntryPattern(flat, rows, cols),), (EntryPattern(bflat, 1, b.numel()),), False)
        return SampledLinear.apply(x_, _merged(w, flat, v_.detach()), _merged(b, bflat, vb_.detach()), plan, v_, vb_)

    assert torch.autograd.gradcheck(fn, (x, v, vb), eps=1e-6, atol=1e-8)


def test_conv1d_layout_weight_stored_transposed():
    x, w, b, _, bflat, _, vb = _problem(out_f=10, in_f=6, k=1)
    w_stored = w.t().contiguous()  # GPT-2 Conv1D: [in, out]
    gen = torch.Generator().manual_seed(3)
    flat = torch.randperm(w_stored.numel(), generator=gen)[:15].sort().values
    v = torch.randn(15, generator=gen, dtype=w.dtype, requires_grad=True)
    y = _sampled_linear(x, w_stored, b, flat, bflat, v, vb.clone().requires_grad_(True), conv1d=True)
    y.sum().backward()
    v_ref = v.detach().clone().requires_grad_(True)
    ref = x @ _merged(w_stored, flat, v_ref) + _merged(b, bflat, vb)
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(v.grad, v_ref.grad)


def test_no_weight_gradient_gemm_runs_when_the_base_is_frozen():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x, w, b, flat, bflat, v, vb = _problem(dtype=torch.float32)
    x.requires_grad_(True)
    v.requires_grad_(True)
    vb.requires_grad_(True)
    y = _sampled_linear(x, w, b, flat, bflat, v, vb)
    with Ops() as ops:
        y.sum().backward()
    assert ops.names.count("mm.default") == 1  # grad_x only; the entries come from the sampled product
    assert ops.names.count("sparse_sampled_addmm.default") == 1  # weight entries (bias: a few column sums)
    assert w.grad is None and v.grad.shape == v.shape


def test_embedding_entries_gradient_equals_dense_and_padding_rows_get_none():
    gen = torch.Generator().manual_seed(0)
    num_ids, dim, pad = 11, 4, 0
    table = torch.randn(num_ids, dim, generator=gen, dtype=torch.float64)
    flat = torch.tensor([0, 3, 5, 9, 20, 21, 43]).sort().values  # row 0 (padding), rows 2, 5, 10
    v = torch.randn(flat.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 5, 5], [10, 0, 1, 2]])
    rows = EmbeddingRows(flat, num_ids, dim, padding_idx=pad)
    y = SampledEmbedding.apply(ids, _merged(table, flat, v.detach()), pad, (rows,), v)
    weights = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (y * weights).sum().backward()
    v_ref = v.detach().clone().requires_grad_(True)
    ref = F.embedding(ids, _merged(table, flat, v_ref), padding_idx=pad)
    (ref * weights).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(v.grad, v_ref.grad)
    assert torch.all(v.grad[flat < dim] == 0)  # entries in the padding row receive no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tap_hands_each_adapter_the_gradient_at_its_entries(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, generator=gen, dtype=dtype)
    x = torch.randn(3, 16, generator=gen, dtype=dtype)
    flat_a, flat_b = torch.tensor([1, 4, 9]), torch.tensor([4, 15])
    va = torch.zeros(3, dtype=dtype, requires_grad=True)
    vb = torch.zeros(2, dtype=dtype, requires_grad=True)
    out = F.layer_norm(x, (16,), tap_entries(weight, [flat_a, flat_b], [va, vb]))
    out.square().sum().backward()
    w_ref = weight.clone().requires_grad_(True)
    F.layer_norm(x, (16,), w_ref).square().sum().backward()
    torch.testing.assert_close(va.grad, w_ref.grad[flat_a])
    torch.testing.assert_close(vb.grad, w_ref.grad[flat_b])
