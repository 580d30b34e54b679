"""benchmarks/cost.py counts what it claims: a known op sequence gives known counts (kernels, syncs, FLOPs, bytes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _cost():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_cost", BENCH / "cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cost = _cost()


def test_kernels_metadata_host_ops_and_syncs_are_told_apart():
    a = torch.randn(4, 6)
    step = torch.tensor(3.0)  # an optimizer step counter: host work even when training on a GPU
    with cost.OpCounter(host_tensors=[step]) as ops:
        b = a + 1  # kernel
        c = b.view(6, 4).t()  # views: view, t
        d = c.clone()  # kernel
        step.add_(1)  # host
        float(step)  # host .item(): no device sync
        n = int((d > 0).sum())  # gt, sum, item: 3 kernels, 1 sync
        picked = d[d > 0]  # gt + boolean index: 2 kernels, 1 sync
        torch.nonzero(d)  # 1 kernel, 1 sync
        torch.promote_types(torch.float32, torch.bfloat16)  # no tensor: metadata
    assert picked.numel() == n
    assert ops.num_kernels == 8, ops.kernels
    assert ops.num_syncs == 3, ops.syncs
    assert sum(ops.host.values()) == 2, ops.host
    assert {name.split(".")[1] for name in ops.metadata} >= {"t", "view"}
    assert ops.syncs["aten._local_scalar_dense.default"] == 1
    assert ops.syncs["aten.nonzero.default"] == 1


def test_flops_of_mm_and_of_the_sampled_product():
    from peft_sam.ops.sparse_delta import EntryPattern, sampled_matmul

    a, b = torch.randn(8, 5), torch.randn(5, 7)
    flat = torch.tensor([0, 3, 9, 40, 55])
    with cost.flop_counter() as flops:
        a @ b
        sampled_matmul(EntryPattern(flat, 8, 7), a, b)
    assert flops.get_total_flops() == 2 * 8 * 5 * 7 + 2 * 5 * 5  # dense GEMM + 2 * nnz * inner


def test_peak_memory_follows_allocations_and_frees():
    with cost.PeakMemory() as memory:
        x = torch.ones(1000)  # 4000 bytes
        y = x * 2  # 4000 more: peak 8000
        y.add_(1)  # in place: nothing new
        del x
        z = torch.zeros(500)  # 2000: current 6000, peak stays 8000
    assert memory.peak == 8000
    assert memory.current == 6000
    del y, z


def test_saved_for_backward_counts_each_storage_once_and_tells_activations_apart():
    w = torch.nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    saved = cost.SavedBytes(exclude=[w])
    with saved.hooks():
        y = torch.nn.functional.linear(x, w)  # saves x and w
        (y * y).sum()  # saves y (twice: one storage)
    assert saved.total == (4 * 8 + 16 * 8 + 4 * 16) * 4
    assert saved.activations == (4 * 8 + 4 * 16) * 4


def test_saved_views_of_one_storage_count_the_bytes_they_cover():
    flat = torch.randn(100)  # two weights as views of one flat buffer (SAM's arenas), 40 elements unused
    a, b = flat[:20].view(4, 5), flat[60:100].view(8, 5)
    x = torch.randn(3, 5, requires_grad=True)
    saved = cost.SavedBytes(exclude=[a, b])
    with saved.hooks():
        torch.nn.functional.linear(x, a)  # saves a (the grad of x needs the weight only)
        torch.nn.functional.linear(x, b)  # saves b
        torch.nn.functional.linear(x, flat[:20].view(4, 5))  # a's range once more
        x * x  # saves x
    assert saved.total == (3 * 5 + 20 + 40) * 4
    assert saved.activations == 3 * 5 * 4
