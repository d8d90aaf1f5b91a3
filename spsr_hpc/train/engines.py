"""Process group set-up and one DeepSpeed engine per network.

Every network of a run (generator, image D, gradient or structure D; the NSE and its head in
pretraining) gets its own engine from ``deepspeed.initialize`` with a *torch* Adam and a
MultiStepLR (a config ``optimizer`` block would JIT-compile FusedAdam). The per-engine JSON is
built from the run config, optionally on top of a template in configs/deepspeed/.

ZeRO stages with several engines on DeepSpeed 0.19.8 (measured: 2 ranks, gloo, CPU; a GAN step
with D frozen by ``requires_grad_(False)`` during the G step, D called as ``d_engine.module``):
stages 0, 1 and 2 all train and checkpoint correctly and give identical parameters. Stage 3
partitions the parameters themselves, so the frozen discriminators could not be run inside the
generator step: refused at config load.

Freezing parameters (fusion warm-up) must happen *after* ``deepspeed.initialize``: ZeRO 1/2
drop parameters that are frozen at initialisation from their optimizer for good (they silently
never train after the unfreeze). See :func:`set_trainable`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spsr_hpc import distributed as sdist

_STARTED_GROUP = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str = "auto", device: torch.device | None = None) -> str:
    """"auto" -> nccl when the training device is CUDA, else gloo.

    ``device`` is the device the run trains on (``train.device`` resolved); None means this
    rank's default device (:func:`spsr_hpc.distributed.local_device`). A CPU run on a GPU host
    gets gloo: NCCL cannot reduce CPU tensors.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be auto, nccl or gloo, got {backend!r}")
    dev = sdist.local_device() if device is None else torch.device(device)
    if backend == "auto":
        return "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and (dev.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(
            f"deepspeed.backend=nccl needs a CUDA training device, got {dev}; "
            "use deepspeed.backend=gloo (or auto) on CPU"
        )
    return backend


def ds_accelerator_name(device: torch.device) -> str:
    """DeepSpeed's accelerator for a training device: "cuda" for CUDA devices, else "cpu"."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def select_ds_accelerator(device: torch.device) -> str:
    """Make DeepSpeed use the accelerator of ``device``, not the one it would detect by itself.

    DeepSpeed 0.19 picks CUDA whenever a GPU is visible (deepspeed/accelerator/
    real_accelerator.py, unless DS_ACCELERATOR says otherwise) and then moves every engine's
    module to ``cuda:LOCAL_RANK``, a ``train.device=cpu`` run included. So DS_ACCELERATOR is set
    before deepspeed is imported; when deepspeed has already chosen another accelerator in this
    process, it is replaced (``set_accelerator``). A DS_ACCELERATOR set by the user that
    contradicts ``device`` is refused. Returns the accelerator's name.
    """
    want = ds_accelerator_name(device)
    have = os.environ.get("DS_ACCELERATOR")
    if have is not None and have != want and not os.environ.get("_SPSR_DS_ACCELERATOR_SET"):
        raise ValueError(
            f"DS_ACCELERATOR={have} but the run trains on {torch.device(device)}; "
            f"unset DS_ACCELERATOR (it is set from train.device) or set train.device to match"
        )
    os.environ["DS_ACCELERATOR"] = want
    os.environ["_SPSR_DS_ACCELERATOR_SET"] = "1"
    import sys

    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    if real is not None and real.ds_accelerator is not None and real.ds_accelerator.device_name() != want:
        if want == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accel
        else:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accel
        real.set_accelerator(Accel())
    return want


def align_local_rank(device: torch.device) -> dict[str, str]:
    """Make LOCAL_RANK the CUDA ordinal of ``device`` when DeepSpeed will read it as one.

    DeepSpeed uses LOCAL_RANK as a device ordinal (``set_device(LOCAL_RANK)`` in the engine,
    ``device_id=cuda:LOCAL_RANK`` for the process group, ZeRO's buffers). With one GPU per task
    (SLURM ``--gpus-per-task=1``/``--gpu-bind``, or two ranks sharing one GPU) LOCAL_RANK 1 sees
    one device, so that ordinal does not exist ("invalid device ordinal"). Here LOCAL_RANK
    becomes ``device.index`` (:func:`spsr_hpc.distributed.cuda_device_index`); the launcher's
    value is kept in SPSR_LAUNCHER_LOCAL_RANK. Nothing changes on CPU or when they agree.
    Returns what was set.
    """
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return {}
    launcher = os.environ.get("LOCAL_RANK", "0")
    if launcher == str(device.index):
        return {}
    out = {"SPSR_LAUNCHER_LOCAL_RANK": launcher, "LOCAL_RANK": str(device.index)}
    os.environ.update(out)
    return out


def init_distributed(
    backend: str = "auto", device: torch.device | None = None, *, timeout_s: float | None = None
) -> None:
    """Start the process group under deepspeed, torchrun, or plain python.

    The launchers set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under ``srun`` without
    a launcher they come from SLURM (:func:`spsr_hpc.distributed.export_slurm_env`); under plain
    python none is set and a one-process group on a free local port is created. Idempotent.

    ``device`` is the training device (``train.device`` resolved; None: this rank's default).
    It decides DeepSpeed's accelerator (:func:`select_ds_accelerator`), the backend for "auto"
    (:func:`resolve_backend`) and, on CUDA, the current device and LOCAL_RANK
    (:func:`align_local_rank`), all before deepspeed is imported.

    ``timeout_s``: the process group's timeout for the rendezvous and every collective until
    :func:`set_collective_timeout` shortens it (None: torch's default); see :func:`_timeout_kwargs`.
    """
    global _STARTED_GROUP
    if sdist.is_initialized():
        return
    sdist.export_slurm_env()  # under srun without a launcher: ranks from SLURM_PROCID/SLURM_NTASKS
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        )
    device = sdist.local_device() if device is None else torch.device(device)
    dist_backend = resolve_backend(backend, device)
    select_ds_accelerator(device)
    if device.type == "cuda":
        align_local_rank(device)
        torch.cuda.set_device(device)
    import deepspeed

    _skip_inference_shm_op()
    deepspeed.init_distributed(dist_backend=dist_backend, verbose=False, **_timeout_kwargs(timeout_s))
    _STARTED_GROUP = True


def _skip_inference_shm_op() -> None:
    """Keep DeepSpeed's torch backend from building its shared-memory all-reduce op.

    On a CPU accelerator, every ``deepspeed.init_distributed`` JIT-compiles that C++ extension
    (about 30 s on the 2-core CPU, in every process of a fresh environment; a cached build still
    runs the extension loader). Only ``inference_all_reduce`` (DeepSpeed-Inference's tensor
    parallelism) calls it; training's all-reduce goes to ``torch.distributed`` whether it is built
    or not. Where DeepSpeed no longer has the hook, nothing is changed.
    """
    import importlib

    # By module path: the package attribute deepspeed.comm.torch is the torch package itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_torch, "build_shm_op", None)):
        ds_torch.build_shm_op = lambda: None


def _timeout_kwargs(timeout_s: float | None) -> dict[str, Any]:
    """``timeout=`` for the process group, plus the NCCL watchdog variables a user has not set
    (spsr_hpc.train.faults.set_nccl_env_defaults), which must exist before the group starts."""
    if timeout_s is None:
        return {}
    from spsr_hpc.train.faults import set_nccl_env_defaults, timedelta

    set_nccl_env_defaults(timeout_s)
    return {"timeout": timedelta(timeout_s)}


def set_collective_timeout(timeout_s: float) -> int:
    """Give every existing process group (the world and the ones DeepSpeed created for its
    engines) the timeout ``timeout_s`` for the collectives from now on; returns how many groups
    took it (0 where this torch lacks the private setter: then the watchdog still ends a hang).
    torch's private ``_set_pg_timeout``, its deprecation warning silenced: with the public
    ``torch.distributed.set_timeout`` instead, 1 in 10 runs of tests/test_train_faults.py aborted
    at process exit ("terminate called without an active exception"; 0 in 12 with this one)."""
    if not sdist.is_initialized():
        return 0
    import torch.distributed.distributed_c10d as c10d

    from spsr_hpc.train.faults import timedelta

    setter = getattr(c10d, "_set_pg_timeout", None)
    world = getattr(c10d, "_world", None)
    if setter is None or world is None:
        return 0
    n = 0
    for group in list(getattr(world, "pg_map", {})):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                setter(timedelta(timeout_s), group)
            n += 1
        except (RuntimeError, ValueError, AttributeError):
            pass
    return n


def destroy_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    DeepSpeed keeps its clone of the world group (``deepspeed.utils.groups._WORLD_GROUP``) across
    that; the next engine of the process (a new group from :func:`init_distributed`, e.g. a second
    run in a notebook or a sweep) would broadcast over the destroyed one ("Group ... is not
    registered"). So its cached groups are dropped too, and DeepSpeed makes new ones.
    """
    global _STARTED_GROUP
    if _STARTED_GROUP and sdist.is_initialized():
        torch.distributed.destroy_process_group()
        groups = sys.modules.get("deepspeed.utils.groups")
        for name, value in list(vars(groups).items()) if groups is not None else ():
            if name.endswith("_GROUP") and name.isupper() and name.startswith("_"):
                setattr(groups, name, {} if isinstance(value, dict) else None)
    _STARTED_GROUP = False


def check_global_batch(micro_batch_per_gpu: int, grad_accum: int, world_size: int,
                       global_batch: int | None) -> int:
    """Global batch = micro x grad_accum x world size; raises when it differs from the requested one."""
    total = micro_batch_per_gpu * grad_accum * world_size
    if global_batch is not None and total != global_batch:
        raise ValueError(
            f"data.batch_size={micro_batch_per_gpu} (per rank) x train.grad_accum={grad_accum} x world size "
            f"{world_size} = {total}, but train.global_batch={global_batch}; change data.batch_size or "
            "train.grad_accum, or set train.global_batch=null"
        )
    return total


def deepspeed_config(
    *,
    micro_batch_per_gpu: int,
    grad_accum: int = 1,
    zero_stage: int = 0,
    autocast_bf16: bool = False,
    gradient_clipping: float = 0.0,
    template: str | Path | None = None,
) -> dict[str, Any]:
    """The JSON dict handed to ``deepspeed.initialize`` for one engine.

    A template (configs/deepspeed/*.json) supplies everything else (communication buckets,
    logging); the batch keys always come from the run config, and a template whose ZeRO stage
    disagrees with the run config is refused rather than silently overridden. The engines are
    always fp32 (``bf16.enabled=false``, so gradients accumulate and all-reduce in fp32): mixed
    precision is bf16 autocast around the forward passes (docs/training.md, "Precision"), and a
    template that turns on DeepSpeed's bf16/fp16 engine (or sets ``torch_autocast``) is refused.

    ``autocast_bf16`` (train.bf16) sets DeepSpeed's ``torch_autocast`` section: without it the
    engine's forward turns an outer CUDA autocast *off* (DeepSpeed 0.19.8,
    ``autocast_if_enabled``), so the network would silently run fp32 on a GPU. Its
    ``lower_precision_safe_modules`` list is empty, so no parameter gets a bf16 ``comm_dtype``:
    gradients are still reduced in fp32.
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"deepspeed.zero_stage={zero_stage} is not supported with several engines; use 0-2")
    cfg: dict[str, Any] = {}
    if template is not None:
        with open(template) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"DeepSpeed template {template} must hold a JSON object")
        t_stage = cfg.get("zero_optimization", {}).get("stage", zero_stage)
        if t_stage != zero_stage:
            raise ValueError(
                f"DeepSpeed template {template} has zero_optimization.stage={t_stage} but "
                f"deepspeed.zero_stage={zero_stage}; make them agree"
            )
        if "torch_autocast" in cfg:
            raise ValueError(
                f"DeepSpeed template {template} has a torch_autocast block; remove it: train.bf16 sets it"
            )
        for low in ("bf16", "fp16"):
            if (cfg.get(low) or {}).get("enabled"):
                raise ValueError(
                    f"DeepSpeed template {template} has {low}.enabled=true; the engines stay fp32 and "
                    f"train.bf16=true runs bf16 autocast (docs/training.md): remove the {low} block"
                )
        if "optimizer" in cfg or "scheduler" in cfg:
            raise ValueError(
                f"DeepSpeed template {template} defines optimizer/scheduler; remove them: the trainer "
                "passes torch Adam + MultiStepLR (a DeepSpeed optimizer block JIT-compiles FusedAdam)"
            )
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_per_gpu)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = zero_stage
    cfg["zero_optimization"] = zero
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": False}  # autocast, not DeepSpeed's bf16 engine
    if autocast_bf16:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    cfg["gradient_clipping"] = float(gradient_clipping)  # the run config is authoritative (0 = off)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def build_engine(
    module: nn.Module,
    ds_config: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    milestones: Iterable[int] = (50_000, 100_000, 200_000, 300_000),
    gamma: float = 0.5,
    params: Iterable[nn.Parameter] | None = None,
    fused: bool = False,
) -> Any:
    """``deepspeed.initialize`` with torch Adam + MultiStepLR; returns the engine.

    The scheduler is stepped by the engine at each optimizer step (after accumulation), so its
    milestones count optimizer steps. ``params`` defaults to all parameters of ``module``; pass
    every parameter that will ever train (freeze later with :func:`set_trainable`). ``fused``
    selects torch's fused Adam kernel (CPU and CUDA; the same update as the per-tensor loop).
    With one process and ZeRO 0 the engine skips its gradient all-reduce
    (:func:`skip_single_rank_allreduce`).
    """
    import deepspeed

    plist = list(params) if params is not None else list(module.parameters())
    opt = torch.optim.Adam(
        plist, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True if fused else None
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    skip_single_rank_allreduce(engine)
    return engine


def skip_single_rank_allreduce(engine: Any) -> bool:
    """Turn off an engine's post-backward gradient all-reduce when it has nothing to reduce.

    With one process an all-reduce is the identity, but DeepSpeed still flattens every gradient
    into buckets, calls the backend and copies the result back (~0.07 s per SPSR-G step on the
    2-core CPU). Only under ZeRO 0: ZeRO 1/2 move gradients into their partitioned buffers in
    that same call. Returns True when the all-reduce was turned off.
    """
    if sdist.get_world_size() != 1 or engine.zero_optimization_stage() != 0:
        return False
    engine.enable_backward_allreduce = False
    return True


@contextlib.contextmanager
def batchnorm_counted_twice(module: nn.Module) -> Iterator[None]:
    """One training forward of ``module`` moves its BatchNorm running averages as two forwards of
    the same batch would (outputs and gradients are untouched: training mode normalises with the
    batch's own statistics).

    For a forward whose output stands for two identical ones, e.g. D(real), which the public code
    runs in the G step and again in the D step: with momentum m two updates by the same batch
    statistic s give (1-m)^2·r + (1-(1-m)^2)·s, one update with momentum 1-(1-m)^2 (with
    momentum None, the cumulative average over n batches, 2/(n+2)); ``num_batches_tracked``
    counts two batches. Restores the momenta on exit.
    """
    bns = _training_batchnorms(module)
    saved = [m.momentum for m in bns]
    for m in bns:
        if m.momentum is None:
            m.momentum = 2.0 / (int(m.num_batches_tracked) + 2)
        else:
            m.momentum = 1.0 - (1.0 - m.momentum) ** 2
    try:
        yield
        with torch.no_grad():
            for m in bns:
                m.num_batches_tracked.add_(1)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def _training_batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


def _update_factor(m: nn.modules.batchnorm._BatchNorm, momentum: float | None) -> float:
    """The weight of the next batch in ``m``'s running averages (``num_batches_tracked`` counted
    already): momentum, or 1/n for the cumulative average (momentum None)."""
    return 1.0 / int(m.num_batches_tracked) if momentum is None else float(momentum)


@contextlib.contextmanager
def batchnorm_replayable(module: nn.Module) -> Iterator[Callable[[], None]]:
    """One training forward of ``module`` that moves its BatchNorm running averages as usual and
    keeps the batch's statistics; yields ``replay``, which moves them once more by that batch,
    later, as a second forward of the same batch would at that point.

    For a forward whose output stands for two identical ones that the public code runs at
    different times, e.g. D(fake): once in the G step, before D(real), and again at the end of
    the D step. Inside, every momentum is 1 (the running averages become the batch's mean and
    unbiased variance, computed by BatchNorm itself); on exit they are set to what the normal
    update gives, in float64 as BatchNorm's CPU kernel does, and the momenta are restored.
    Outputs and gradients are untouched (training mode normalises with the batch's own statistics).
    """
    bns = _training_batchnorms(module)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []

    def move(m: nn.modules.batchnorm._BatchNorm, momentum: float | None,
             stats: tuple[torch.Tensor, torch.Tensor], old: tuple[torch.Tensor, torch.Tensor]) -> None:
        """running = f·batch + (1-f)·old, for the running mean and variance. Through .data: the
        forward's graph saved these buffers (BatchNorm's backward takes them as arguments); an
        in-place write would fail its version check, as BatchNorm's own update in the kernel
        does not."""
        f = _update_factor(m, momentum)
        for running, stat, prev in zip((m.running_mean.data, m.running_var.data), stats, old):
            running.copy_(stat.double() * f + prev.double() * (1.0 - f))

    @torch.no_grad()
    def replay() -> None:
        if len(batch) != len(bns):
            raise RuntimeError("batchnorm_replayable: replay() before the recorded forward finished")
        for m, (momentum, *_), stats in zip(bns, saved, batch):
            m.num_batches_tracked.add_(1)
            move(m, momentum, stats, (m.running_mean, m.running_var))

    for m in bns:
        m.momentum = 1.0
    try:
        yield replay
        with torch.no_grad():
            for m, (momentum, mean0, var0, _) in zip(bns, saved):
                batch.append((m.running_mean.clone(), m.running_var.clone()))
                move(m, momentum, batch[-1], (mean0, var0))
    except BaseException:
        with torch.no_grad():  # a failed forward leaves the running averages as they were
            for m, (_, mean0, var0, count) in zip(bns, saved):
                m.running_mean.data.copy_(mean0)
                m.running_var.data.copy_(var0)
                m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, (momentum, *_) in zip(bns, saved):
            m.momentum = momentum


def set_trainable(module: nn.Module, predicate: Callable[[str], bool] | bool) -> int:
    """``requires_grad_`` per parameter name; returns how many parameters are now trainable.

    Call on ``engine.module`` after the engine exists. Under ZeRO 1/2 a frozen parameter keeps
    receiving a zero gradient inside DeepSpeed's flat buffers, so it does not move, but its Adam
    step count advances (under ZeRO 0 it does not): bias correction after an unfreeze differs
    slightly between stages.
    """
    n = 0
    for name, p in module.named_parameters():
        flag = predicate if isinstance(predicate, bool) else bool(predicate(name))
        p.requires_grad_(flag)
        n += int(flag)
    return n


def engine_lr(engine: Any) -> float:
    """Current learning rate of an engine's first parameter group."""
    return float(engine.optimizer.param_groups[0]["lr"])


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of a module's first floating parameter (fp32 for every engine; bf16 is autocast)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def discard_accumulated_gradients(engine: Any, micro_steps: int) -> None:
    """Drop the gradients an engine accumulated since its micro step ``micro_steps`` (no update).

    What DeepSpeed's ZeRO 1/2 optimizer does itself when it skips an overflowing step (zero the
    gradients, including the partitioned ones, restart its micro-step count), plus rewinding the
    engine's micro-step counter so that its accumulation boundary stays where it was: the next
    ``grad_accum`` micro steps form the next window. Under ZeRO 0 the gradients live in
    ``param.grad`` and are simply cleared. Call on every rank (it is local, no collective), only
    between micro steps (after ``step()``, before the next ``backward``).
    """
    opt = engine.optimizer
    if engine.zero_optimization():
        # Mirrors DeepSpeed 0.19.8's overflow path in DeepSpeedZeroOptimizer.step(); ZeRO 2 keeps
        # the reduced gradients of earlier micro steps in all_grad_tensors between boundaries.
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        if getattr(opt, "cpu_offload", False):
            opt.reset_cpu_buffers()
        for buffers in (getattr(opt, "averaged_gradients", {}), getattr(opt, "all_grad_tensors", {})):
            for k in buffers:
                buffers[k] = None
        if hasattr(opt, "micro_step_id"):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            opt.micro_step_id = INITIAL_MICRO_STEP_ID
    else:
        engine.zero_grad()
        opt.zero_grad(set_to_none=True)
    engine.micro_steps = int(micro_steps)
