"""The one place that knows about ranks (STYLE.md rule 4).

Works with every launcher: `deepspeed`, `torchrun` (both set RANK/WORLD_SIZE/LOCAL_RANK),
and plain `python` (one process, no environment needed).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0: the only rank that prints, logs and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum of the gradients over ranks.

    Every rank's loss depends on the same total, so d(sum_r loss_r)/d(local input) is the sum of
    every rank's gradient at the total.
    """

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over all ranks (``t`` itself without a group or with one rank).

    Collective: every rank must call it in the same order, and run backward through it in the
    same order (the backward is one more all-reduce).
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    return _AllReduceSum.apply(t)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the global batch: every element on every rank (0-dim fp32 tensor).

    The other ranks' values enter as constants; the gradient reaches the local elements only, but
    scaled by the sum over ranks of the gradient at the mean, so that a data-parallel run whose
    gradients are averaged over ranks (DeepSpeed, DDP) gets exactly the gradient of one process
    holding the whole batch. One all-reduce of two numbers forward, one of one number backward.
    """
    x = x.float()
    if not is_initialized() or dist.get_world_size() == 1:
        return x.mean()
    count = torch.full((1,), float(x.numel()), device=x.device)  # a fill, no host-to-device copy
    total = all_reduce_sum(torch.cat([x.sum().reshape(1), count]))
    return total[0] / total[1]


def average_buffers(module: torch.nn.Module) -> int:
    """Replace every floating buffer of ``module`` (BatchNorm running statistics) by its mean over
    ranks; integer buffers (``num_batches_tracked``) are equal on every rank and left alone.

    Collective. Checkpoints store rank 0's module only; after this every rank holds, and the
    checkpoint stores, the same statistics. Returns the number of buffers averaged.
    """
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs or not is_initialized() or dist.get_world_size() == 1:
        return 0
    flat = torch.cat([b.detach().float().reshape(-1) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    i = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[i : i + b.numel()].view_as(b))
            i += b.numel()
    return len(bufs)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor on t's device; ``t`` itself without a group).

    Collective. Works for CPU tensors under nccl too (they travel through this rank's GPU).
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    dev = local_device() if dist.get_backend() == "nccl" else t.device
    out = t.detach().to(dev, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (picklable objects; the object itself without a group)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
