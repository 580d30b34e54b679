"""CaliSr on one process and on two (torch.distributed, gloo, CPU, DDP, spawned here): the same measurements, the
same switch step, identical parameters."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int = 1):
    """CaliSr-S (LoRA) for STEPS steps; every rank sees the same full batches, so DDP's averaged gradient is exactly
    the single-process one and the runs must agree bit for bit."""
    from conftest import make_batches, tiny_bert
    from peft import LoraConfig, get_peft_model

    from peft_sam import CaliSrConfig, CaliSrController
    from peft_sam.tuners.calisr import calisr_param_groups

    model = get_peft_model(
        tiny_bert(0),
        CaliSrConfig(
            adapter=LoraConfig(r=4, target_modules=["query", "key", "value", "dense"]),
            task_type="SEQ_CLS",
            sr_interval=1,
            decide_every=2,
            delta=0.0,
        ),
    )
    model.eval()
    optimizer = torch.optim.AdamW(calisr_param_groups(model, weight_decay=0.1), lr=3e-3)
    wrapped = model
    if world > 1:
        try:
            CaliSrController(torch.nn.parallel.DistributedDataParallel(model), optimizer, steps_per_epoch=2)
        except ValueError as err:
            assert "find_unused_parameters=True" in str(err)
        else:
            raise AssertionError("DDP without find_unused_parameters must be refused")
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    controller = CaliSrController(wrapped, optimizer, steps_per_epoch=2)
    for batch in make_batches(num=STEPS, seed=1):
        wrapped(**batch).loss.backward()
        controller.step()
        optimizer.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"history": controller.history, "switched_at": controller.switched_at, "params": params}


def _worker(rank, world, port, out_dir, job="switch"):
    """One gloo process: runs ``job`` and saves its result as ``{job}{rank}.pt``."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if job == "switch":
            result = _run(world)
        else:  # "traffic"
            result = {key: _traffic_run(*key.split("+")) for key in ("calisr+calisr", "calisr+default", "lora+default")}
        torch.save(result, os.path.join(out_dir, f"{job}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_same_switch_step_and_parameters_on_one_and_two_processes(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the embedding backward's summation order depends on the thread count
    try:
        single = _run(1)
    finally:
        torch.set_num_threads(threads)
    switched = {g: s for g, s in single["switched_at"].items() if s is not None}
    assert switched and len(switched) < 3  # a real SRS decision switched some group, not all
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        run = torch.load(tmp_path / f"switch{rank}.pt", weights_only=False)
        assert run["switched_at"] == single["switched_at"], rank
        assert run["history"] == single["history"], rank  # same SR values, decisions and switch steps
        for name, value in single["params"].items():
            assert torch.equal(run["params"][name], value), (rank, name)


# ---------------------------------------------------------------------------------------------------- DDP traffic
def _counting_allreduce(state, bucket):
    """DDP's default hook (average all-reduce of the whole bucket), counting the elements it sends."""
    buffer = bucket.buffer()
    state.elements += buffer.numel()
    buffer.div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _traffic_run(method: str, hook: str):
    """Per-step all-reduced gradient elements and the final parameters of a 2-process DDP run."""
    from conftest import make_batches, tiny_bert
    from peft import LoraConfig, get_peft_model

    from peft_sam import CaliSrConfig, CaliSrOptimizer, calisr_param_groups
    from peft_sam.tuners.calisr import CaliSrCommState, calisr_comm_hook

    lora = LoraConfig(r=4, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    if method == "calisr":
        model = get_peft_model(tiny_bert(0), CaliSrConfig(adapter=lora, task_type="SEQ_CLS", switch_at=0.5))
        optimizer = CaliSrOptimizer(torch.optim.AdamW(calisr_param_groups(model), lr=3e-3), model, total_steps=STEPS)
    else:
        model = get_peft_model(tiny_bert(0), lora)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.eval()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    state = CaliSrCommState()
    ddp.register_comm_hook(state, calisr_comm_hook if hook == "calisr" else _counting_allreduce)
    counts = []
    for batch in make_batches(num=STEPS, seed=1):
        before = state.elements
        ddp(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(state.elements - before)
    return {"counts": counts, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def test_ddp_comm_hook_sends_only_what_trains_after_the_switch(tmp_path):
    """After the switch (step 3 of 6) the hook all-reduces no more than plain LoRA's DDP does (LoRA + head), the
    default hook still sends every W_extra slot; the parameters are identical with either hook."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), "traffic"), nprocs=2, join=True)
    runs = torch.load(tmp_path / "traffic0.pt", weights_only=False)
    hooked, default, lora = (runs[k]["counts"] for k in ("calisr+calisr", "calisr+default", "lora+default"))
    assert hooked[:3] == default[:3]  # full fine-tuning: everything trains, everything is reduced
    for after, plain in zip(hooked[3:], lora[3:]):
        assert after <= 1.05 * plain
    assert min(default[3:]) > 3 * max(lora[3:])  # without the hook the frozen W_extra slots still travel
    for name, value in runs["calisr+default"]["params"].items():
        assert torch.equal(runs["calisr+calisr"]["params"][name], value), name
