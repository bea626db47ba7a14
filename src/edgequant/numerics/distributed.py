"""Cross-rank reductions for QAT under DistributedDataParallel.

DDP keeps parameters equal on every rank by averaging gradients, but QAT also
has state that each rank would otherwise compute from its own shard: activation
ranges and BN batch statistics. The functions here reduce those over all ranks of
the default process group, so that every rank computes what one process would on
the concatenated batch. Outside `torch.distributed` (or with one rank) they fall
back to the plain single-process computation, unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

aten = torch.ops.aten


def is_active() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_process_group(backend: str, **kwargs: object) -> None:
    """`torch.distributed.init_process_group` from torchrun's environment, safe across its restarts.

    With `--max-restarts`, torchrun restarts every rank when one dies, but its store
    still holds the previous attempt's addresses under the same keys: the new ranks
    read those and fail with "Connection refused". A key prefix per restart attempt
    keeps the attempts apart. Outside torchrun this is the plain call.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        dist.init_process_group(backend, **kwargs)
        return
    agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)
    store = dist.PrefixStore(f"edgequant/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", agent_store)
    dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), **kwargs)


def reduce_extremes(batch_min: torch.Tensor, batch_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (min, max) over all ranks' batch extremes, in one all_reduce."""
    if not is_active():
        return batch_min, batch_max
    # min(a) == -max(-a) exactly, so one MAX reduction gives both extremes.
    both = torch.cat([-batch_min.reshape(-1), batch_max.reshape(-1)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = batch_min.numel()
    return -both[:n].reshape(batch_min.shape), both[n:].reshape(batch_max.shape)


class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode BN whose mean and variance span the batches of all ranks.

    Like nn.SyncBatchNorm: one all_reduce of per-channel statistics in forward and
    one of the gradient sums in backward, so gradients equal those of one process
    on the concatenated batch. The heavy passes are aten's own fused kernels.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        channels = x.shape[1]
        n = x.numel() // channels
        # Sums around the running mean (equal on every rank) keep E[x²] - E[x]² accurate.
        shift = running_mean.to(x.dtype) if running_mean is not None else x.new_zeros(channels)
        centred = x - shift.reshape([1, channels] + [1] * (x.dim() - 2))
        # (N, C, L): reducing L first, then N, is several times faster on CPU than one reduction.
        centred = centred.flatten(2) if x.dim() > 2 else centred.unsqueeze(2)
        stats = torch.cat([centred.sum(2).sum(0), centred.square().sum(2).sum(0), x.new_full((1,), n)])
        del centred
        dist.all_reduce(stats)
        count = stats[-1]
        mean_c = stats[:channels] / count
        var = torch.clamp(stats[channels:-1] / count - mean_c.square(), min=0.0)
        mean = mean_c + shift
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            unbiased = var * count / torch.clamp(count - 1, min=1.0)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        invstd = torch.rsqrt(var + eps)
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        x, weight, mean, var, count = ctx.saved_tensors
        channels = x.shape[1]
        # Per channel: sum(dy) and sum(dy * x_hat) on this rank, from BN's fused eval backward.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True]
        )
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total)
        g_dy, g_dy_xhat = total[:channels] / count, total[channels:] / count
        invstd = torch.rsqrt(var + ctx.eps)
        a = invstd if weight is None else invstd * weight
        # dx = a * (dy - mean(dy) - x_hat * mean(dy * x_hat)) = a * dy + b * x + c, per channel
        b = -a * invstd * g_dy_xhat
        c = -a * g_dy - b * mean
        shape = [1, channels] + [1] * (x.dim() - 2)
        grad_x = torch.addcmul(c.reshape(shape), b.reshape(shape), x).addcmul_(a.reshape(shape), grad_out)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> torch.Tensor:
    """Drop-in for `aten.batch_norm` whose training-mode statistics span all ranks."""
    if not (training and is_active()):
        return aten.batch_norm.default(
            x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled
        )
    return _GlobalBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)[0]


def native_batch_norm_legit(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for `aten._native_batch_norm_legit` (the fused conv+BN form), synchronized likewise."""
    if not (training and is_active()):
        legit = aten._native_batch_norm_legit.default
        return legit(x, weight, bias, running_mean, running_var, training, momentum, eps)
    return _GlobalBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)
