"""SAM calibration on an FSDP2-sharded model (2 gloo processes, CPU, spawned here): each rank scores its own shards
(about half the score memory of one process), both ranks choose the entries one process chooses, and the
calibrated adapter saved by rank 0 loads into an unsharded model with those entries."""

import os
import platform
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux", reason="distributed tests run on Linux only"),
    pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(method: str, scope: str):
    from conftest import tiny_bert
    from peft import get_peft_model

    import peft_sam

    config = peft_sam.SAMConfig(p=0.05, selection=method, scope=scope, task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(0), config)
    for m in model.modules():  # no dropout: one process and two draw different random numbers
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout_prob", None), float):  # transformers 4.x SDPA attention reads this float
            m.dropout_prob = 0.0
    return model


def _entries(model) -> dict[str, torch.Tensor]:
    from peft_sam.tuners.sam.mask_functions import find_candidates

    chosen = {}
    for c in find_candidates(model, "default"):
        found = c.layer.entries("default", c.tensor_name)
        chosen[f"{c.name}.{c.tensor_name}"] = torch.empty(0, dtype=torch.long) if found is None else found[0].cpu()
    return chosen


def _shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def _worker(rank, world, port, out_dir, method, scope, misuse):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_batches

    import peft_sam

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(method, scope)
        if misuse == "blocks_only":  # the root is not sharded: embeddings and head stay whole
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.bert.encoder.layer:
                fully_shard(layer)
        else:
            _shard(model)
        batches = {"other_batches": make_batches(num=6, seed=rank), "fewer_batches": make_batches(num=6 - rank)}
        batches = batches.get(misuse, make_batches(num=6))
        try:
            summary = peft_sam.select_parameters(
                model, batches, show_progress=False, method="magnitude" if misuse == "data_free" else None
            )
        except ValueError as exc:
            torch.save({"error": str(exc)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        result = {"entries": _entries(model), "score_bytes": summary.score_bytes, "selected": summary.num_selected}
        # saving a sharded model: the full state dict (a collective), written by rank 0 (as for any FSDP2 model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=options)
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=full)
        try:  # training stays unsharded: the sharded model says so, and how
            model(**batches[0])
        except RuntimeError as exc:
            result["train_error"] = str(exc)
        if scope == "global":  # FSDP has swapped its own (placeholder) values back in: no state dict is taken of them
            try:
                get_model_state_dict(model, options=options)
            except RuntimeError as exc:
                result["save_error"] = str(exc)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, scope", [("sam", "per_tensor"), ("fisher", "global")])
def test_sharded_calibration_selects_what_one_process_selects(tmp_path, method, scope):
    from conftest import make_batches, tiny_bert
    from peft import PeftModel

    import peft_sam

    single = _model(method, scope)
    summary = peft_sam.select_parameters(single, make_batches(num=6), show_progress=False)
    expected = _entries(single)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), method, scope, None), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert result["entries"].keys() == expected.keys()
        for name, idx in expected.items():
            assert torch.equal(result["entries"][name], idx), name
        assert result["selected"] == summary.num_selected
        # the score accumulators of one rank: its shards, about half of one process's (rows split unevenly: + 1 row)
        assert result["score_bytes"] < 0.5 * summary.score_bytes * 1.05
    assert ranks[0]["score_bytes"] + ranks[1]["score_bytes"] == summary.score_bytes
    assert "FSDP2-sharded" in ranks[0]["train_error"] and "train it unsharded" in ranks[0]["train_error"]
    if scope == "global":
        assert "Nothing was saved" in ranks[0]["save_error"]
    # the calibrated adapter, saved from the sharded model, loads into an unsharded one with the same entries
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "adapter")
    for name, idx in _entries(loaded).items():
        assert torch.equal(idx, expected[name]), name


@pytest.mark.parametrize(
    "misuse, message",
    [
        ("other_batches", "differs between ranks"),  # each rank its own shard of the data (the DDP recipe)
        ("fewer_batches", "ran out of calibration batches at different counts"),  # no rank hangs in a collective
        ("data_free", "before sharding the model"),
        ("blocks_only", "call fully_shard on the root module too"),
    ],
)
def test_sharded_calibration_misuse_gets_a_clear_error_on_every_rank(tmp_path, misuse, message):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), "sam", "per_tensor", misuse), nprocs=2, join=True)
    for r in range(2):
        assert message in torch.load(tmp_path / f"rank{r}.pt")["error"]


def test_fsdp1_model_is_refused_with_the_fix():
    from conftest import make_batches
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import peft_sam

    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = FSDP(_model("sam", "per_tensor"), use_orig_params=True, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
            peft_sam.select_parameters(model, make_batches(num=2), show_progress=False)
    finally:
        dist.destroy_process_group()
