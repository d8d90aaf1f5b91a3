"""The one place that knows about ranks.

Works with every launcher: `deepspeed`, `torchrun` (both set RANK/WORLD_SIZE/LOCAL_RANK),
SLURM's `srun` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, used when the launcher variables are
absent; see :func:`slurm_launch_env`), and plain `python` (one process, no environment needed).
"""

from __future__ import annotations

import itertools
import os
import re

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(_launch_env().get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(_launch_env().get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(_launch_env().get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0: the only rank that prints, logs and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA ordinal of the rank with local rank ``local_rank`` when ``device_count`` are visible.

    Every GPU of the node visible to every rank (``deepspeed``/``torchrun``, ``srun`` with all
    GPUs): ordinal = local rank. One GPU per task (SLURM ``--gpus-per-task=1``, ``--gpu-bind``, a
    per-task CUDA_VISIBLE_DEVICES): each task sees one device, ordinal 0 whatever its local
    rank. Fewer GPUs than local ranks otherwise: ranks share them round-robin.
    """
    if device_count < 1:
        raise ValueError(f"no CUDA device is visible (device count {device_count})")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} is negative")
    return local_rank % device_count


def local_device() -> torch.device:
    """This rank's device: cuda:<:func:`cuda_device_index`> when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_device_index(get_local_rank(), torch.cuda.device_count()))
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


# --- SLURM -------------------------------------------------------------------------------------

DEFAULT_MASTER_PORT_BASE = 29500
_LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_group(group: str, nodelist: str) -> list[str]:
    out = []
    for item in group.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"SLURM node list {nodelist!r}: cannot read the range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"SLURM node list {nodelist!r}: range {item!r} runs backwards")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order.

    ``"node[01-04,07]"`` -> node01 .. node04, node07; ``"a1,b[2-3]"`` -> a1, b2, b3;
    ``"rack[1-2]-n[1-2]"`` -> rack1-n1, rack1-n2, rack2-n1, rack2-n2 (zero padding kept).
    """
    hosts = []
    for expr in _split_top_level(nodelist.strip()):
        pieces = re.split(r"\[([^\]]*)\]", expr)  # text, group, text, group, ..., text
        if any("[" in p or "]" in p for p in pieces[::2]):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets in {expr!r}")
        choices = [[p] if i % 2 == 0 else _expand_group(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def _in_slurm_step(env: os._Environ[str] | dict[str, str]) -> bool:
    """Inside an ``srun`` step (not the batch script itself, which also has SLURM_PROCID=0)."""
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env or env["SLURM_PROCID"] != "0"


def slurm_launch_env(env: os._Environ[str] | dict[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for an ``srun`` task; {} outside one.

    Used only when the launcher variables (RANK, WORLD_SIZE, LOCAL_RANK) are absent:
    rank = SLURM_PROCID, world size = SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), local rank =
    SLURM_LOCALID. The master address is MASTER_ADDR when set, else the first host of
    SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST; the port is MASTER_PORT when
    set, else 29500 + SLURM_JOB_ID % 10000 (so two jobs sharing a node do not collide).
    """
    env = os.environ if env is None else env
    if not _in_slurm_step(env):
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
    m = re.match(r"(\d+)", tasks_per_node)
    if m:
        out["LOCAL_WORLD_SIZE"] = m.group(1)
    nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if env.get(k)), None)
    if env.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    elif nodelist:
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    elif int(out["WORLD_SIZE"]) == 1:
        out["MASTER_ADDR"] = "127.0.0.1"
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(
        DEFAULT_MASTER_PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % 10000
    )
    return out


def _launch_env() -> dict[str, str] | os._Environ[str]:
    """The launcher's variables when set, else the ones derived from SLURM (else empty)."""
    if any(k in os.environ for k in _LAUNCHER_KEYS):
        return os.environ
    return slurm_launch_env()


def check_launch_env(env: os._Environ[str] | dict[str, str] | None = None) -> None:
    """Refuse (ValueError) a launch in which several tasks would all believe they are rank 0.

    That happens under ``srun -n N`` (N > 1) when every task carries the same launcher
    variables (e.g. ``RANK=0 WORLD_SIZE=1`` exported in the batch script, or one standalone
    ``torchrun`` per task): a world smaller than the number of srun tasks cannot give each task
    its own rank.
    """
    env = os.environ if env is None else env
    if not _in_slurm_step(env) or not any(k in env for k in _LAUNCHER_KEYS):
        return
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
    world = int(env.get("WORLD_SIZE", "1"))
    if tasks > 1 and world < tasks:
        raise ValueError(
            f"this srun step has {tasks} tasks but the launcher variables say WORLD_SIZE={world} "
            f"(RANK={env.get('RANK', 'unset')}): several tasks would all be rank 0 and write the same "
            "files. Unset RANK/WORLD_SIZE/LOCAL_RANK so that ranks come from SLURM_PROCID/SLURM_NTASKS, "
            "or start one launcher per node (srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES ...)"
        )


def export_slurm_env() -> dict[str, str]:
    """Check the launch, then copy :func:`slurm_launch_env` into os.environ (env:// rendezvous).

    Called before the process group starts; a no-op outside srun or when a launcher already set
    RANK/WORLD_SIZE/LOCAL_RANK. Returns what was set.
    """
    check_launch_env()
    if any(k in os.environ for k in _LAUNCHER_KEYS):
        return {}
    derived = slurm_launch_env()
    if derived and "MASTER_ADDR" not in derived:
        raise ValueError(
            "running under srun with several tasks but no node list (SLURM_STEP_NODELIST/SLURM_JOB_NODELIST) "
            "to take the master address from: set MASTER_ADDR to the first node's hostname"
        )
    os.environ.update(derived)
    return derived
