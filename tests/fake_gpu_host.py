"""Run one start-up scenario as if on a GPU host, on a machine without a GPU (a test helper).

    python tests/fake_gpu_host.py SCENARIO DEVICE_COUNT [RUN_DIR]

torch.cuda is made to report DEVICE_COUNT devices before anything imports deepspeed: is_available,
device_count, current_device and set_device are replaced (set_device raises torch's "invalid
device ordinal" for an ordinal past the count, as the real one does), and torch's optimizers skip
their CUDA-graph stream check. Nothing can be moved to a fake device, so the scenarios stop
before any CUDA memory is touched. Prints one JSON line.

Scenarios:
  cpu_trainer        train.device=cpu on the GPU host: a tiny SPSR-G Trainer and one step.
  cpu_trainer_after_import   the same after deepspeed was imported and chose CUDA.
  one_gpu_per_task   LOCAL_RANK=1 with one visible device (SLURM --gpus-per-task=1):
                     init_distributed on this rank's CUDA device, then DeepSpeed's own engine
                     code that reads LOCAL_RANK (_configure_with_arguments, _set_distributed_vars).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SET_DEVICE_CALLS: list[int] = []


def fake_cuda(count: int) -> None:
    state = {"current": 0}

    def set_device(device: object) -> None:
        idx = device if isinstance(device, int) else torch.device(device).index
        idx = 0 if idx is None else int(idx)
        SET_DEVICE_CALLS.append(idx)
        if not 0 <= idx < count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        state["current"] = idx

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: count
    torch.cuda.current_device = lambda: state["current"]
    torch.cuda.set_device = set_device
    # torch's optimizers ask the (fake) current CUDA stream whether it is capturing a graph.
    torch.optim.Optimizer._accelerator_graph_capture_health_check = lambda self: None


def cpu_trainer(run_dir: str) -> dict:
    from spsr_hpc import distributed as sdist
    from spsr_hpc.config import load_config
    from spsr_hpc.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "tiny_spsr_g.yaml",
        [f"logging.run_dir={run_dir}", "logging.progress_bar=false", "logging.tensorboard=false",
         "logging.image_every=0", "checkpoint.every=0", "checkpoint.resume=none",
         "train.fusion_warmup_steps=0", "train.ema_decay=null", "train.device=cpu"],
    )
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=g)
    batch = {"lr": torch.nn.functional.avg_pool2d(hr, 4), "hr": hr}
    trainer = Trainer(cfg, loader=[batch])
    trainer.train_step()
    from deepspeed.accelerator import get_accelerator

    devices = sorted({str(p.device) for e in trainer.engines.values() for p in e.module.parameters()})
    out = {
        "accelerator": get_accelerator().device_name(),
        "backend": torch.distributed.get_backend(),
        "param_devices": devices,
        "engine_devices": sorted({str(e.device) for e in trainer.engines.values()}),
        "rank_device": str(sdist.local_device()),
    }
    trainer.close()
    return out


def one_gpu_per_task() -> dict:
    from spsr_hpc import distributed as sdist
    from spsr_hpc.train.engines import init_distributed

    device = sdist.local_device()
    # The default device (train.device=auto/cuda); gloo: torch's NCCL needs a real GPU.
    init_distributed("gloo")
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine

    engine = object.__new__(DeepSpeedEngine)  # only the start-up code that reads LOCAL_RANK
    error = None
    try:
        DeepSpeedEngine._configure_with_arguments(engine, None, None)
        DeepSpeedEngine._set_distributed_vars(engine, None)
    except RuntimeError as e:
        error = str(e)
    return {
        "accelerator": get_accelerator().device_name(),
        "rank_device": str(device),
        "set_device_calls": SET_DEVICE_CALLS,
        "engine_device": str(getattr(engine, "device", None)),
        "error": error,
        "local_rank": os.environ.get("LOCAL_RANK"),
        "launcher_local_rank": os.environ.get("SPSR_LAUNCHER_LOCAL_RANK"),
    }


def main() -> int:
    scenario, count = sys.argv[1], int(sys.argv[2])
    fake_cuda(count)
    if scenario == "cpu_trainer":
        out = cpu_trainer(sys.argv[3])
    elif scenario == "cpu_trainer_after_import":
        # deepspeed imported (and its accelerator chosen: CUDA here) before the trainer starts.
        from deepspeed.accelerator import get_accelerator

        out = {"accelerator_before": get_accelerator().device_name(), **cpu_trainer(sys.argv[3])}
    elif scenario == "one_gpu_per_task":
        out = one_gpu_per_task()
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    out["set_device_calls"] = SET_DEVICE_CALLS
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
