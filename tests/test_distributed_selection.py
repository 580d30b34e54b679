"""The same SAM mask on one process and on two (torch.distributed, gloo, CPU, spawned here)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _select(batches, method):
    from conftest import tiny_bert
    from peft import get_peft_model

    import peft_sam
    from peft_sam.tuners.sam.mask_functions import find_candidates

    model = get_peft_model(tiny_bert(0), peft_sam.SAMConfig(p=0.05, selection=method, task_type="SEQ_CLS"))
    for m in model.modules():  # no dropout: the two runs draw different random numbers
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout_prob", None), float):  # transformers 4.x SDPA attention reads this float
            m.dropout_prob = 0.0
    peft_sam.select_parameters(model, batches, show_progress=False)
    chosen = {}
    for c in find_candidates(model, "default"):
        found = c.layer.entries("default", c.tensor_name)  # None: no entry (e.g. the key bias, zero gradient)
        chosen[f"{c.name}.{c.tensor_name}"] = torch.empty(0, dtype=torch.long) if found is None else found[0]
    return chosen


def _worker(rank, world, port, out_dir, method):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_batches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches = make_batches(num=6)[rank::world]  # each rank sees its own shard of the calibration data
        torch.save(_select(batches, method), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["sam", "fisher"])
def test_same_mask_on_one_and_two_processes(tmp_path, method):
    from conftest import make_batches

    single = _select(make_batches(num=6), method)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), method), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == single.keys() == rank1.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        assert torch.equal(rank0[name], single[name]), f"2 processes differ from 1 on {name}"
