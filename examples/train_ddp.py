"""QAT of a digits model under DistributedDataParallel, launched with torchrun.

    torchrun --nproc_per_node 2 examples/train_ddp.py [--epochs 2] [--batch-size 32] [--model resnet18]

Every rank trains on its own shard of the training set. `eq.QATModule` reduces
activation ranges and BN batch statistics over all ranks, so after each step every
rank holds the same model; the script checks that at the end of each epoch. Rank 0
writes the checkpoint (resumable with `--resume` on any number of ranks) and the
ONNX file. The backend is NCCL when CUDA is available (one GPU per rank), else gloo.
`--no-sync` turns the cross-rank reductions off, to measure what they cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

import edgequant as eq
from edgequant.demo.data import digits_tensors
from edgequant.demo.training import float_digits_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision model name (default resnet18)")
    parser.add_argument("--scheme", default="int8_pow2")
    parser.add_argument("--epochs", type=int, default=2, help="QAT epochs (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per rank (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--backend", choices=["nccl", "gloo"], help="default: nccl with CUDA, else gloo")
    parser.add_argument("--out", type=Path, default=Path("qat_ddp.onnx"), help="ONNX file written by rank 0")
    parser.add_argument("--checkpoint", type=Path, default=Path("qat_ddp.pt"), help="written by rank 0 each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--no-sync", action="store_true", help="keep ranges and BN statistics per rank")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args()


def setup(backend: str | None) -> torch.device:
    """Join the process group torchrun describes; one GPU per rank with NCCL."""
    if "RANK" not in os.environ:
        raise SystemExit("run this under torchrun, e.g. `torchrun --nproc_per_node 2 examples/train_ddp.py`")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        eq.distributed.init_process_group("nccl", device_id=device)
        return device
    eq.distributed.init_process_group("gloo")  # restart-safe under torchrun --max-restarts
    return torch.device("cpu")


def same_on_all_ranks(qmodel: eq.QATModule) -> bool:
    """Whether every quantizer's scale and zero point are identical on every rank."""
    state = torch.cat([torch.cat([fq.scale, fq.zero_point.float()]) for fq in qmodel.fake_quantizers()])
    low, high = state.clone(), state.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return torch.equal(low, high)


@torch.no_grad()
def accuracy(qmodel: eq.QATModule, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Top-1 in percent over the whole test set, each rank scoring its own slice."""
    rank, world = dist.get_rank(), dist.get_world_size()
    correct = torch.zeros(2, device=device)
    for i in range(rank * 128, len(y), world * 128):
        xb, yb = x[i : i + 128].to(device), y[i : i + 128].to(device)
        correct += torch.stack([(qmodel(xb).argmax(1) == yb).sum(), torch.tensor(len(yb), device=device)])
    dist.all_reduce(correct)
    return float(100 * correct[0] / correct[1])


def main() -> None:
    args = parse_args()
    device = setup(args.backend)
    rank = dist.get_rank()
    # Rank 0 trains (or loads) the cached float model first; the others then read the cache.
    if rank != 0:
        dist.barrier()
    float_model = float_digits_model(args.model, progress=rank == 0 and not args.no_progress)
    if rank == 0:
        dist.barrier()
    x_train, y_train = digits_tensors("train")
    x_test, y_test = digits_tensors("test")

    qmodel = eq.QATModule(
        float_model,
        (x_train[:32],),
        args.scheme,
        eq.QATConfig(eq.FreezeSchedule(args.epochs), sync=not args.no_sync),
    ).to(device)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    start = 0
    if args.resume:
        checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
        qmodel.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = checkpoint["epoch"] + 1
    # Ranges and BN statistics are reduced inside each step: DDP's per-step buffer
    # broadcast would only repeat them (buffers are still copied from rank 0 at init).
    ddp = DistributedDataParallel(qmodel, forward_sync_buffers=False)

    sampler = DistributedSampler(TensorDataset(x_train, y_train), shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, sampler=sampler, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        step_times = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=rank != 0 or args.no_progress)
        for x, y in bar:
            began = time.perf_counter()
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(ddp(x), y).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - began)
        ddp.eval()
        top1 = accuracy(qmodel, x_test, y_test, device)
        same = same_on_all_ranks(qmodel)
        if rank == 0:
            step_ms = 1e3 * statistics.median(step_times[1:] or step_times)
            print(
                f"epoch {epoch + 1}/{args.epochs}: test top-1 {top1:.1f}%, median step {step_ms:.1f} ms, "
                f"BN frozen {qmodel.bn_frozen}, ranges frozen {qmodel.ranges_frozen}, "
                f"ranges identical on all ranks: {same}"
            )
            state = {"model": qmodel.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
            torch.save(state, args.checkpoint)
    if rank == 0:
        print(qmodel.cpu().export(args.out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
