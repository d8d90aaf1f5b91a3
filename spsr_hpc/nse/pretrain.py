"""Large-batch NSE pretraining: contrastive prediction (NSE-P) or jigsaw (NSE-J).

    deepspeed --num_gpus 8 launch/pretrain_nse.py --config configs/nse_contrastive.yaml
    torchrun --nproc_per_node 2 launch/pretrain_nse.py --config configs/nse_jigsaw.yaml
    python launch/pretrain_nse.py --config configs/tiny_nse_contrastive.yaml train.max_steps=20

One DeepSpeed engine trains the NSE and its head together (torch Adam, MultiStepLR at every
`optim.lr_step_epochs` epochs). Checkpoints, resume, the progress bar, JSONL metrics and
TensorBoard are the SR trainer's (spsr_hpc.train.*). The run writes ``<run_dir>/nse.safetensors``
(the NSE alone, loadable with spsr_hpc.nse.load_nse) at every checkpoint and at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from spsr_hpc import distributed as sdist
from spsr_hpc.config import load_config, to_dict
from spsr_hpc.data.loader import build_train_loader, derive_seed
from spsr_hpc.models import build_nse
from spsr_hpc.models.config import build_context_predictor, build_jigsaw_classifier
from spsr_hpc.nse.config import NSEPretrainConfig, resolve_epoch_length
from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.export import save_nse
from spsr_hpc.nse.jigsaw import JigsawObjective
from spsr_hpc.nse.sampling import num_contexts
from spsr_hpc.precision import autocast, check_bf16
from spsr_hpc.train import checkpoint as ckpt
from spsr_hpc.train.engines import (
    build_engine,
    check_global_batch,
    deepspeed_config,
    destroy_distributed,
    engine_lr,
    init_distributed,
    module_dtype,
    set_collective_timeout,
)
from spsr_hpc.train.faults import (
    EXIT_OK,
    EXIT_STOPPED,
    CollectiveTimeoutError,
    LogWriteError,
    RunFailure,
    Watchdog,
    collective_failure,
    error_line,
    grace_s,
    is_collective_failure,
    leave_after_data_error,
)
from spsr_hpc.train.guards import (
    NonFiniteLossError,
    StopSignal,
    check_skip_rate,
    export_on_rank0,
    first_nonfinite,
    sync_flags,
)
from spsr_hpc.train.logging import open_run_logs

log = logging.getLogger(__name__)

ENGINE_NAME = "nse_objective"
EXPORT_NAME = "nse.safetensors"


def build_objective(cfg: NSEPretrainConfig) -> ContrastiveObjective | JigsawObjective:
    """The NSE (fresh, or cfg.nse.pretrained) with a fresh head for cfg.objective.method."""
    nse = build_nse(cfg.nse)
    obj = cfg.objective
    if obj.method == "contrastive":
        predictors = {s: build_context_predictor(cfg.nse, num_contexts(s)) for s in obj.strategies}
        return ContrastiveObjective(
            nse, predictors, context_distance=obj.context_distance, scale=obj.scale,
            max_anchors_per_image=obj.max_anchors_per_image, loss_backend=obj.loss_backend,
        )  # fmt: skip
    return JigsawObjective(
        nse, build_jigsaw_classifier(cfg.nse), spacing=obj.jigsaw_spacing,
        max_anchors_per_image=obj.max_anchors_per_image,
    )  # fmt: skip


def export_metadata(cfg: NSEPretrainConfig, step: int) -> dict[str, str]:
    """String metadata of the NSE export: method, step and, for contrastive NSEs, the strategies
    (JSON list), so the evaluation can tell which task an NSE was pretrained on."""
    meta = {"method": cfg.objective.method, "step": str(step)}
    if cfg.objective.method == "contrastive":
        meta["strategies"] = json.dumps(list(cfg.objective.strategies))
    return meta


def lr_milestones(steps_per_epoch: int, step_epochs: int, max_decays: int = 64) -> list[int]:
    """Optimizer steps at which the lr decays: every `step_epochs` epochs.

    Independent of the run length on purpose: the scheduler state saved in a checkpoint holds
    the milestones, so a run resumed with a larger train.max_steps must find the same list.
    64 decays take even gamma 0.5 below 1e-19: the list is long enough for any run.
    """
    every = steps_per_epoch * step_epochs
    return [every * k for k in range(1, max_decays + 1)]


def _metric_name(key: str) -> str:
    """Objective outputs -> logged names: loss -> loss/total, loss_c -> loss/c, accuracy -> train/accuracy."""
    if key == "loss":
        return "loss/total"
    if key.startswith("loss_"):
        return "loss/" + key[len("loss_"):]
    return f"{key}" if "/" in key else f"train/{key}"


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return sdist.local_device()
    return torch.device("cpu")


class NSEPretrainer:
    """State of one pretraining run: engine (NSE + head, Adam, scheduler), loader, step.

    Args:
        cfg: the config; data.samples_per_epoch is resolved here (resolve_epoch_length).
            Everything goes to cfg.logging.run_dir (checkpoints under checkpoint.dir relative
            to it). logging.image_every and checkpoint.export_every do
            not apply (no image grids; the NSE is exported with every checkpoint).
    """

    def __init__(self, cfg: NSEPretrainConfig) -> None:
        cfg, self.epoch_note = resolve_epoch_length(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.run_dir)
        ckpt_dir = Path(cfg.checkpoint.dir)
        self.ckpt_dir = ckpt_dir if ckpt_dir.is_absolute() else self.run_dir / ckpt_dir
        self.export_path = self.run_dir / EXPORT_NAME
        self.device = _device(cfg.train.device)  # before the group: it picks DeepSpeed's accelerator
        init_distributed(cfg.deepspeed.backend, device=self.device, timeout_s=cfg.train.init_timeout_s)
        self.rank, self.world = sdist.get_rank(), sdist.get_world_size()
        tc = cfg.train
        if tc.bf16:
            check_bf16(self.device)
        micro = cfg.data.batch_size
        check_global_batch(micro, tc.grad_accum, self.world, tc.global_batch)
        try:  # shards at another scale, a rank without data: one error: line (exit 2), not a traceback
            self.loader = build_train_loader(
                cfg.data, rank=self.rank, world_size=self.world, seed=cfg.data.seed, device=self.device
            )
        except ValueError as e:
            from spsr_hpc.preflight import StartupError

            raise StartupError(f"data: {e}") from e
        self.steps_per_epoch = len(self.loader) // tc.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {len(self.loader)} batches per rank, fewer than train.grad_accum="
                f"{tc.grad_accum}: raise data.batches_per_epoch or lower grad_accum"
            )
        self.total_steps = tc.max_steps or tc.epochs * self.steps_per_epoch
        torch.manual_seed(tc.seed)
        objective = build_objective(cfg)
        self.geometry = (objective.receptive_field, objective.stride, objective.radius)
        objective.to(self.device)
        oc = cfg.optim
        ds = deepspeed_config(
            micro_batch_per_gpu=micro, grad_accum=tc.grad_accum, zero_stage=cfg.deepspeed.zero_stage,
            autocast_bf16=tc.bf16, gradient_clipping=cfg.deepspeed.gradient_clipping,
            template=cfg.deepspeed.json,
        )  # fmt: skip
        self.engine = build_engine(
            objective, ds, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay,
            milestones=lr_milestones(self.steps_per_epoch, oc.lr_step_epochs),
            gamma=oc.lr_gamma,
        )  # fmt: skip
        self.step = 0
        self.micro_step = 0
        self.images_seen = 0  # HR crops used this session, all ranks (the skip rate's denominator)
        self.stopped = False

    @property
    def objective(self) -> nn.Module:
        return self.engine.module

    # ---------------------------------------------------------------- checkpoints
    def save(self, export: bool = True) -> Path:
        """A checkpoint, then (``export``) <run_dir>/nse.safetensors."""
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.step, engines={ENGINE_NAME: self.engine},
            trainer_state={"step": self.step, "micro_step": self.micro_step},
            rank_state={"rng": ckpt.capture_rng_state(), "loader": self.loader.state_dict()},
            meta={"method": self.cfg.objective.method}, keep_last=self.cfg.checkpoint.keep_last,
        )  # fmt: skip
        if export:
            self.export()
        return path

    def export(self) -> Path:
        """Write <run_dir>/nse.safetensors (rank 0)."""
        export_on_rank0(
            "NSE export",
            lambda: save_nse(self.objective.nse, self.cfg.nse, self.export_path,
                             extra=export_metadata(self.cfg, self.step)),
            lambda: ckpt.find_latest(self.ckpt_dir),
        )  # fmt: skip
        return self.export_path

    def maybe_resume(self) -> Path | None:
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        if path is None:
            return None
        log = (lambda m: print(m, flush=True)) if sdist.is_main_process() else None
        method = ("objective.method", self.cfg.objective.method)
        trainer_state, rank_state, _ = ckpt.load_checkpoint(
            path, engines={ENGINE_NAME: self.engine}, log=log, method=method
        )
        self.step = int(trainer_state["step"])
        self.micro_step = int(trainer_state["micro_step"])
        if rank_state:
            ckpt.restore_rng_state(rank_state["rng"])
            ckpt.resume_loader(self.loader, rank_state["loader"], path)
        else:
            # Another world size: data positions cannot be mapped; continue at the epoch start.
            self.loader.set_epoch(self.micro_step // len(self.loader))
        return path

    # ---------------------------------------------------------------- training
    def _data_skips(self) -> dict[str, float]:
        """Collective (at log steps): data samples skipped or lost so far in this session, summed
        over ranks, per reason (``data/skipped/<reason>``; lost samples of an unreadable shard
        count as ``unreadable_tar``, as in the SR trainer's metrics). Raises DataSkipRateError
        (exit status 6) past train.max_skip_rate, as the SR trainer does."""
        counts_fn = getattr(self.loader, "skip_counts", None)
        if counts_fn is None:
            return {}
        local = counts_fn()
        now = sdist.sum_over_ranks(local.sum(0)).tolist()
        out = {"data/skipped": float(sum(now))}
        out.update({f"data/skipped/{r}": float(n) for r, n in zip(self.loader.skip_reasons, now)})
        tc = self.cfg.train
        skipped = {r: int(n) for r, n in zip(self.loader.skip_reasons, now)}
        check_skip_rate(self.step, skipped, self.images_seen, local, self.loader.shards,
                        max_skip_rate=tc.max_skip_rate, min_samples=tc.skip_rate_min_samples)
        return out

    def _batches(self):
        while True:
            yield from self.loader

    def train(self) -> Path:
        """Run to total_steps (resuming when a checkpoint exists); returns the NSE export path."""
        cfg = self.cfg
        resumed = self.maybe_resume()
        timeout = cfg.train.collective_timeout_s
        set_collective_timeout(timeout)
        self._dog = Watchdog(timeout + grace_s(timeout), newest=lambda: ckpt.find_latest(self.ckpt_dir),
                             rank=self.rank)
        logger = open_run_logs(  # config.yaml and the log files; a failed write ends every rank
            self.run_dir, cfg, total_steps=self.total_steps, start_step=self.step,
            tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar, sample_unit="anchor",
            wandb_project=cfg.logging.wandb_project if cfg.logging.wandb else None, wandb_config=to_dict(cfg),
        )  # fmt: skip
        rf, stride, radius = self.geometry
        logger.message(
            f"NSE pretraining ({cfg.objective.method}): R={rf}px stride={stride} radius={radius}; "
            f"{self.world} rank(s), {self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
            + (f"; resumed from {resumed}" if resumed else "")
        )
        oc = cfg.optim
        logger.message(
            f"epoch = {self.epoch_note} -> {self.steps_per_epoch} steps of {cfg.data.batch_size} x "
            f"{cfg.train.grad_accum} x {self.world}; lr x{oc.lr_gamma} every {oc.lr_step_epochs} epochs "
            f"(every {self.steps_per_epoch * oc.lr_step_epochs} steps)"
        )
        dtype = module_dtype(self.objective)  # fp32: train.bf16 autocasts the forward only
        amp = cfg.train.bf16
        last_ckpt: str | None = str(resumed) if resumed else None
        anchors_since = images_since = 0
        t_since = time.perf_counter()
        metrics_acc: dict[str, float] = {}
        n_acc = 0
        try:
            with StopSignal() as stop, self._dog:
                batches = self._batches()
                while self.step < self.total_steps:
                    self._dog.beat(f"step {self.step + 1}: reading its batch or the step's collectives")
                    for _ in range(cfg.train.grad_accum):
                        hr = next(batches)["hr"].to(self.device, dtype=dtype, non_blocking=True)
                        # Anchor/permutation draws are a function of (seed, rank, micro step): resumable.
                        seed = derive_seed(cfg.train.seed, self.rank, self.micro_step)
                        gen = torch.Generator().manual_seed(seed)
                        with autocast(self.device, amp):
                            loss, parts, anchors = self.engine(hr, generator=gen)
                        bad = first_nonfinite({"loss": loss, **parts})
                        if sync_flags(bad is not None)[0]:
                            raise NonFiniteLossError(self.step, bad or "loss (another rank)", last_ckpt)
                        self.engine.backward(loss)
                        self.engine.step()
                        self.micro_step += 1
                        anchors_since += anchors * self.world
                        images_since += hr.shape[0] * self.world
                        self.images_seen += hr.shape[0] * self.world
                        for k, v in {"loss": loss.detach(), **parts}.items():
                            metrics_acc[k] = metrics_acc.get(k, 0.0) + float(v)
                        n_acc += 1
                    self.step += 1
                    if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                        dt = max(time.perf_counter() - t_since, 1e-9)
                        metrics = {_metric_name(k): v / n_acc for k, v in metrics_acc.items()}
                        metrics.update({
                            "lr": engine_lr(self.engine), "epoch": self.step / self.steps_per_epoch,
                            "anchors_per_s": anchors_since / dt, "images_per_s": images_since / dt,
                        })  # fmt: skip
                        metrics.update(self._data_skips())
                        logger.log(self.step, metrics, samples=anchors_since)
                        anchors_since = images_since = n_acc = 0
                        metrics_acc = {}
                        t_since = time.perf_counter()
                    every = cfg.checkpoint.every
                    # rank 0's failed log write stops every rank, as a signal does, with a checkpoint
                    if self.step == self.total_steps:
                        logger.flush()  # the buffered tails: a failure is heard here, not lost in close()
                    stop_now, log_failed = sync_flags(stop.requested, logger.write_error is not None)
                    if (every and self.step % every == 0) or stop_now or log_failed:
                        self._dog.beat(f"step {self.step}: the checkpoint save")
                        last_ckpt = str(self.save(export=not log_failed))  # the re-run exports
                    if log_failed:
                        raise LogWriteError(logger.write_error or f"rank 0's logs in {self.run_dir}",
                                            self.step, last_ckpt)
                    if stop_now:
                        logger.message(f"stopped by signal at step {self.step}; checkpoint {last_ckpt}; "
                                       f"exit status {EXIT_STOPPED}, re-run the same command to resume")
                        self.stopped = True
                        return self.export_path
            if last_ckpt is None or not last_ckpt.endswith(ckpt.checkpoint_name(self.step)):
                self.save()
            logger.message(f"done: {self.total_steps} steps; NSE weights in {self.export_path}")
        except Exception as e:
            self._dog.pause()
            if isinstance(e, RunFailure) or not is_collective_failure(e):
                raise
            raise collective_failure(self._dog.phase, e, timeout, ckpt.find_latest(self.ckpt_dir)) from e
        finally:
            logger.close()
        return self.export_path


def pretrain(cfg: NSEPretrainConfig) -> Path:
    """Build the trainer, run it, tear the process group down. Returns <run_dir>/nse.safetensors."""
    try:
        return NSEPretrainer(cfg).train()
    finally:
        destroy_distributed()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML config (configs/nse_contrastive.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    p.add_argument("--validate", action="store_true", help="load and check the config, print it, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of launch/pretrain_nse.py."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if sdist.is_main_process() else logging.WARNING)
    from spsr_hpc.preflight import StartupError, check_run_inputs, print_errors

    try:
        cfg = load_config(args.config, args.overrides, schema=NSEPretrainConfig, unique_overrides=True)
    except (ValueError, FileNotFoundError) as e:
        return print_errors(e)
    if args.validate:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    try:
        check_run_inputs(cfg, source=args.config)  # shards, manifest, loader package
    except ValueError as e:
        return print_errors(e)
    if args.validate:
        print(f"config {args.config}: OK", file=sys.stderr)
        return 0
    from spsr_hpc.data.loader_state import ShardReadError

    try:
        trainer = NSEPretrainer(cfg)
        path = trainer.train()
    except StartupError as e:  # a checkpoint that cannot be resumed
        destroy_distributed()
        return print_errors(e)
    except ShardReadError as e:  # this rank's DALI loader stopped at bad data (as the SR trainer)
        print(error_line(e, sdist.get_rank()), file=sys.stderr, flush=True)
        code = leave_after_data_error()
        destroy_distributed()
        return code
    except RunFailure as e:
        if e.every_rank or sdist.is_main_process():
            print(error_line(e, sdist.get_rank() if e.every_rank else None), file=sys.stderr, flush=True)
        if isinstance(e, CollectiveTimeoutError):
            sys.stdout.flush()
            os._exit(e.exit_code)  # tearing the group down could wait on the lost peer again
        destroy_distributed()
        return e.exit_code
    except BaseException:
        destroy_distributed()
        raise
    destroy_distributed()
    if sdist.is_main_process():
        print(f"NSE weights: {path}")
    return EXIT_STOPPED if trainer.stopped else EXIT_OK


__all__ = ["NSEPretrainer", "build_objective", "lr_milestones", "main", "pretrain"]

