"""A user's QAT loop that checkpoints every epoch, for the kill-and-resume tests.

    python tests/qat_resume_script.py OUT_DIR [--kill EPOCH:STEP] [--kill-rank R]
    torchrun --nproc_per_node 2 --max-restarts 1 tests/qat_resume_script.py OUT_DIR ...

Each epoch ends with `qmodel.save(OUT_DIR/ckpt.pt, optimizer=...)` on rank 0; a start
finds that checkpoint and continues from `qmodel.next_epoch`. `--kill` SIGKILLs the
process (rank R under torchrun) at that step, once: a marker file remembers it, so the
restarted run goes through. The data order depends on the epoch only, so an interrupted
and resumed run sees what an uninterrupted one does. The last line exports
OUT_DIR/final.onnx.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import edgequant as eq

EPOCHS, BATCH, SAMPLES = 4, 8, 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill", default=None, help="EPOCH:STEP at which to SIGKILL, once")
    parser.add_argument("--kill-rank", type=int, default=0)
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        eq.distributed.init_process_group("gloo")  # torch's own fails to reconnect after a restart
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(SAMPLES, 3, 8, 8, generator=data), torch.randint(0, 4, (SAMPLES,), generator=data)
    qmodel = eq.QATModule(model, (x[:BATCH],), "int8_pow2", eq.QATConfig(eq.FreezeSchedule(EPOCHS)))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    checkpoint = args.out / "ckpt.pt"
    if checkpoint.exists():
        qmodel.load(checkpoint, optimizer=optimizer)
        print(f"rank {rank}: resumed at epoch {qmodel.next_epoch}", flush=True)
    net = DistributedDataParallel(qmodel) if distributed else qmodel
    kill = tuple(map(int, args.kill.split(":"))) if args.kill else None
    marker = args.out / "killed"

    for epoch in range(qmodel.next_epoch, EPOCHS):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(epoch))[rank::world]
        net.train()
        for step in range(len(order) // BATCH):
            if (epoch, step) == kill and rank == args.kill_rank and not marker.exists():
                marker.touch()
                print(f"rank {rank}: SIGKILL at epoch {epoch} step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            batch = order[step * BATCH : (step + 1) * BATCH]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
        net.eval()
        if rank == 0:
            qmodel.save(checkpoint, optimizer=optimizer)
            print(f"saved epoch {epoch}", flush=True)
        if distributed:
            dist.barrier()  # the checkpoint is complete before any rank goes on
    if rank == 0:
        qmodel.export(args.out / "final.onnx")
        print("exported", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
