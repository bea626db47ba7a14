"""QAT under DistributedDataParallel: two gloo ranks on localhost against one process.

The workers run in spawned processes and write what they saw to files; every
assertion is made here, in the pytest process, so failures read like any other.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import onnx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import edgequant as eq
from edgequant.graph.batchnorm import fuse_conv_bn_for_qat, set_graph_training
from edgequant.graph.capture import capture
from edgequant.graph.ops import BN_OP, ENGINE_BN_OP, FUSED_BN_OP
from edgequant.numerics import distributed

from ..helpers import run_qat_resume_script

WORLD = 2
SHARD = 8  # samples per rank per step; the single process sees WORLD * SHARD
EPOCHS, STEPS = 4, 2  # FreezeSchedule(4): BN statistics freeze at epoch 2, ranges at epoch 3
LR = 0.05  # large enough that missing cross-rank terms would show in the weights
TIMEOUT_S = 100

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class TinyNet(nn.Module):
    """conv+BN+ReLU twice (the fused QAT form), pooling and a linear layer.

    No BN outside a conv+BN pair: torchao's convert then skips its own conv+BN
    pattern search, which would make each export several times slower. The plain
    BN op is covered by the function-level and graph-level tests below.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _snapshot(qmodel: eq.QATModule) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in qmodel.state_dict().items()}


def _train(module: nn.Module, qmodel: eq.QATModule, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """EPOCHS epochs of STEPS SGD steps through `module` (the QATModule or its DDP wrapper)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    snapshots = []
    for epoch in range(EPOCHS):
        module.train()
        for x, y in batches[epoch * STEPS : (epoch + 1) * STEPS]:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
            snapshots.append(_snapshot(qmodel))
        module.eval()
    return snapshots


def _bn_case(rank: int | None) -> list[dict[str, torch.Tensor]]:
    """Training-mode BN forward and backward, on one rank's shard or (rank None) on the whole batch."""
    results = []
    for shape in [(2 * WORLD, 6, 5, 5), (4 * WORLD, 6)]:
        g = torch.Generator().manual_seed(len(shape))
        x = torch.randn(shape, generator=g) * 3 + 2  # an offset mean, as after a conv
        coeff = torch.randn(shape, generator=g)
        weight, bias = torch.randn(6, generator=g), torch.randn(6, generator=g)
        if rank is not None:
            part = slice(rank * shape[0] // WORLD, (rank + 1) * shape[0] // WORLD)
            x, coeff = x[part], coeff[part]
        x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
        mean, var = torch.zeros(6), torch.ones(6)
        if len(shape) == 4:
            fn = distributed.native_batch_norm_legit if rank is not None else torch.ops.aten._native_batch_norm_legit
            out = fn(x, weight, bias, mean, var, True, 0.1, 1e-5)[0]
        else:
            fn = distributed.batch_norm if rank is not None else torch.ops.aten.batch_norm
            out = fn(x, weight, bias, mean, var, True, 0.1, 1e-5, False)
        (out * coeff).sum().backward()
        results.append(
            {"out": out.detach(), "x": x.grad, "weight": weight.grad, "bias": bias.grad, "mean": mean, "var": var}
        )
    return results


def _worker(rank: int, port: int, workdir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    root = Path(workdir)
    inputs = torch.load(root / "inputs.pt", weights_only=False)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        shard = slice(rank * SHARD, (rank + 1) * SHARD)
        batches = [(x[shard], y[shard]) for x, y in inputs["batches"]]
        qmodel = eq.QATModule(inputs["float_model"], inputs["example"], config=eq.QATConfig(eq.FreezeSchedule(EPOCHS)))
        pristine = copy.deepcopy(qmodel)
        ddp = DistributedDataParallel(qmodel, forward_sync_buffers=False)
        result = {"bn": _bn_case(rank), "snapshots": _train(ddp, qmodel, batches)}
        with torch.no_grad():
            result["eval"] = qmodel(inputs["test"])
        qmodel.export(root / f"rank{rank}.onnx")
        if rank == 0:
            torch.save(ddp.state_dict(), root / "ddp_checkpoint.pt")

        # Resume on two ranks from the single process's checkpoint, and train on.
        resumed = copy.deepcopy(pristine)
        resumed.load_state_dict(torch.load(root / "single_checkpoint.pt", weights_only=True))
        resumed_ddp = DistributedDataParallel(resumed, forward_sync_buffers=False)
        with torch.no_grad():
            result["resumed_eval"] = resumed(inputs["test"])
        optimizer = torch.optim.SGD(resumed_ddp.parameters(), lr=LR)
        resumed_ddp.train()
        nn.functional.cross_entropy(resumed_ddp(batches[0][0]), batches[0][1]).backward()
        optimizer.step()
        result["resumed_step"] = _snapshot(resumed)

        # Control: without sync the ranks' ranges drift apart on their different shards.
        unsynced = eq.QATModule(
            inputs["float_model"], inputs["example"], config=eq.QATConfig(eq.FreezeSchedule(EPOCHS), sync=False)
        )
        unsynced_ddp = DistributedDataParallel(unsynced, forward_sync_buffers=False)
        result["unsynced"] = _train(unsynced_ddp, unsynced, batches[:1])
        torch.save(result, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path) -> None:
    """Run the workers to completion; on failure or timeout, no process is left behind."""
    context = mp.start_processes(
        _worker, args=(_free_port(), str(workdir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_train, digits_test):
    """The single-process reference run, then the two-rank run, with everything they recorded."""
    workdir = tmp_path_factory.mktemp("ddp")
    x, y = digits_train
    torch.manual_seed(0)
    float_model = TinyNet().train()
    with torch.no_grad():
        float_model(x[:256])  # BN statistics from real data, as after float training
    float_model.eval()
    n = WORLD * SHARD
    batches = [(x[i * n : (i + 1) * n].clone(), y[i * n : (i + 1) * n].clone()) for i in range(EPOCHS * STEPS)]
    inputs = {"float_model": float_model, "example": (x[:8].clone(),), "batches": batches, "test": digits_test[0][:32]}
    torch.save(inputs, workdir / "inputs.pt")

    single = eq.QATModule(float_model, inputs["example"], config=eq.QATConfig(eq.FreezeSchedule(EPOCHS)))
    pristine = copy.deepcopy(single)
    reference = {"bn": _bn_case(None), "snapshots": _train(single, single, batches)}
    with torch.no_grad():
        reference["eval"] = single(inputs["test"])
    torch.save(single.state_dict(), workdir / "single_checkpoint.pt")

    _launch(workdir)
    ranks = [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"dir": workdir, "inputs": inputs, "reference": reference, "ranks": ranks, "pristine": pristine}


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in a if not torch.equal(a[name], b[name])]


def test_every_rank_holds_identical_state_after_each_step(runs):
    rank0, rank1 = (r["snapshots"] for r in runs["ranks"])
    assert len(rank0) == len(rank1) == EPOCHS * STEPS
    for step, (a, b) in enumerate(zip(rank0, rank1, strict=True)):
        # Scales, zero points, min/max, frozen flags, BN statistics and weights: all bitwise.
        assert _differing(a, b) == [], f"ranks differ after step {step}"
    last = rank0[-1]
    frozen = [name for name in last if name.endswith(".frozen")]
    assert frozen and all(int(last[name]) == 1 for name in frozen)
    # Ranges froze at the start of the last epoch, on both ranks alike (checked above), and stayed put.
    before_freeze, after = rank0[-STEPS - 1], rank0[-STEPS:]
    assert all(int(before_freeze[name]) == 0 for name in frozen)
    scales = [name for name in last if name.endswith((".scale", ".min_val", ".max_val"))]
    assert all(torch.equal(after[0][name], after[-1][name]) for name in scales)


def test_without_sync_ranks_drift_apart(runs):
    """The control: the shards differ, so equal ranges above come from the reduction."""
    rank0, rank1 = (r["unsynced"][0] for r in runs["ranks"])
    drifted = _differing(rank0, rank1)
    pristine = runs["pristine"]
    quantizers = [id(fq) for fq in pristine.activation_quantizers()]
    ranges = {f"{name}.activation_post_process.max_val" for name, m in pristine.named_modules() if id(m) in quantizers}
    assert ranges & set(drifted)
    assert any(name.endswith("running_var") for name in drifted)
    # Weights stay equal without any help: DDP averages gradients.
    params = [name for name, _ in runs["pristine"].named_parameters()]
    assert not set(params) & set(drifted)


def test_matches_one_process_on_the_concatenated_batch(runs):
    reference = runs["reference"]["snapshots"]
    distributed_run = runs["ranks"][0]["snapshots"]
    for step, (ref, got) in enumerate(zip(reference, distributed_run, strict=True)):
        for name, value in ref.items():
            if name.endswith((".scale", ".zero_point", ".frozen", "qat_state", "updates", "num_batches_tracked")):
                assert torch.equal(got[name], value), f"{name} differs from one process after step {step}"
            elif name.endswith((".min_val", ".max_val")):
                # Global min / max, then the same moving average, of activations computed with weights that
                # agree to 1e-3 (below): one upstream value may land one fine grid step away (seen: 2**-14 at 0.149).
                torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-5, msg=f"{name} after step {step}")
            else:
                # Weights and BN statistics: summation order differs, and SGD carries it forward.
                torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-3, msg=f"{name} after step {step}")
    # BN statistics moved while BN trained and stood still once frozen (epoch 2 on).
    var = next(name for name in reference[0] if name.endswith("running_var"))
    assert not torch.equal(distributed_run[0][var], distributed_run[STEPS][var])
    assert torch.equal(distributed_run[2 * STEPS][var], distributed_run[-1][var])


def test_sync_batch_norm_equals_batch_norm_on_the_whole_batch(runs):
    reference = runs["reference"]["bn"]
    shards = [r["bn"] for r in runs["ranks"]]
    for case, ref in enumerate(reference):
        parts = [s[case] for s in shards]
        close = {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(torch.cat([p["out"] for p in parts]), ref["out"], **close)
        torch.testing.assert_close(torch.cat([p["x"] for p in parts]), ref["x"], **close)
        # Parameter gradients are per-rank partial sums; DDP adds them up.
        torch.testing.assert_close(sum(p["weight"] for p in parts), ref["weight"], **close)
        torch.testing.assert_close(sum(p["bias"] for p in parts), ref["bias"], **close)
        for p in parts:
            torch.testing.assert_close(p["mean"], ref["mean"], **close)
            torch.testing.assert_close(p["var"], ref["var"], **close)


def test_export_from_either_rank_gives_the_same_bytes(runs):
    first, second = ((runs["dir"] / f"rank{r}.onnx").read_bytes() for r in range(WORLD))
    assert first == second
    ops = {node.op_type for node in onnx.load_from_string(first).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # a quantized model, not two empty files


def test_checkpoints_resume_on_another_world_size(runs):
    # Written by rank 0 (DDP's "module." keys), loaded by one process.
    single = copy.deepcopy(runs["pristine"])
    single.load_state_dict(torch.load(runs["dir"] / "ddp_checkpoint.pt", weights_only=True))
    single.eval()
    with torch.no_grad():
        assert torch.equal(single(runs["inputs"]["test"]), runs["ranks"][0]["eval"])
    assert single.epoch == EPOCHS - 1 and single.ranges_frozen
    # Written by one process, loaded by both ranks, which then train on in step.
    for rank in runs["ranks"]:
        assert torch.equal(rank["resumed_eval"], runs["reference"]["eval"])
    assert _differing(*(r["resumed_step"] for r in runs["ranks"])) == []


def test_sync_bn_is_swapped_in_for_training_only_and_is_plain_bn_in_one_process():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(144)).eval()
    x = torch.randn(4, 3, 8, 8)
    gm = capture(model, (x,))
    fuse_conv_bn_for_qat(gm)
    local = copy.deepcopy(gm)
    sync = {distributed.batch_norm, distributed.native_batch_norm_legit}

    def bn_targets(graph_module: torch.fx.GraphModule) -> set:
        return {n.target for n in graph_module.graph.nodes if n.target in {BN_OP, FUSED_BN_OP, ENGINE_BN_OP, *sync}}

    set_graph_training(gm, dropout=True, batchnorm=True, sync_bn=True)
    set_graph_training(local, dropout=True, batchnorm=True)
    assert bn_targets(gm) == sync and bn_targets(local) == {BN_OP, FUSED_BN_OP}
    # Without a process group they run aten's BN: outputs and running statistics are bitwise the same.
    assert torch.equal(gm(x), local(x))
    assert all(torch.equal(a, b) for a, b in zip(gm.buffers(), local.buffers(), strict=True))
    set_graph_training(gm, dropout=False, batchnorm=False, sync_bn=True)
    assert bn_targets(gm) == {ENGINE_BN_OP, FUSED_BN_OP}  # eval: the standalone BN with onnxruntime's roundings


@pytest.mark.slow
def test_a_killed_rank_restarted_by_torchrun_resumes_to_a_byte_identical_export(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    log = run_qat_resume_script(whole, ranks=2)
    assert "[exit 0]" in log, log
    # Rank 1 is killed in epoch 2; torchrun (--max-restarts 1) restarts both ranks, which resume.
    log = run_qat_resume_script(resumed, "--kill", "2:1", "--kill-rank", "1", ranks=2)
    assert "[exit 0]" in log and "rank 1: SIGKILL at epoch 2 step 1" in log, log
    assert "rank 0: resumed at epoch 2" in log and "rank 1: resumed at epoch 2" in log, log
    assert (resumed / "final.onnx").read_bytes() == (whole / "final.onnx").read_bytes()
