"""The SR GAN trainer: PSNR RRDB, ESRGAN, SPSR-G/-P/-J, their ablations, EDSR/SRResNet variants.

Launch (launch/train.py is a thin wrapper around :func:`main`)::

    deepspeed --num_gpus 8 launch/train.py --config configs/spsr_g.yaml            # one node
    deepspeed --hostfile hosts launch/train.py --config configs/spsr_g.yaml        # many nodes
    torchrun --nproc_per_node 2 launch/train.py --config configs/spsr_g.yaml
    python launch/train.py --config configs/tiny_spsr_g.yaml train.max_steps=20    # one process
    python launch/train.py --config configs/spsr_g.yaml --validate                 # check only

One optimizer step (per micro batch, ``train.grad_accum`` of them per step):
  1. G forward: discriminators frozen (``requires_grad_(False)``) and called as ``engine.module``
     for D(fake), so no DeepSpeed bookkeeping or gradient of theirs is touched. RaGAN's D(real)
     runs once, through the trainable D's engine: step 1 reads it as a constant, step 2 reuses it
     with its graph (the public code runs it twice; BatchNorm running averages are kept equal).
  2. each D forward ("image", then "gradient" or "structure"): on the detached SR of step 1, real
     and fake terms summed into one loss. Its inputs (padded gradient maps, NSE features) are the
     detached tensors step 1 computed, not recomputed.
  3. one all-reduce of every term and the stop flag: global-batch values for the log, and every
     rank agrees on a stop or a non-finite skip (of the whole accumulation window) before
     anything is applied.
  4. backward + step of G, then of each D (one backward per engine).
RaGAN's relativistic mean and the discriminators' BatchNorm (``sync_bn``) use the global batch,
so N ranks x b train like one process with N·b. The NSE of SPSR-P/-J is frozen inside the
objective (eval mode, no grads). Every network has its own DeepSpeed engine (torch Adam +
MultiStepLR, docs/method.md §5).

``train.bf16``: the forwards of steps 1-2 run under bf16 autocast (:mod:`spsr_hpc.precision`);
the engines, BatchNorm statistics, losses, gradients, EMA and exports stay fp32
(docs/training.md, "Precision").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spsr_hpc import distributed as sdist
from spsr_hpc.config import load_config, to_dict
from spsr_hpc.precision import autocast, cast_frozen_weights_, check_bf16
from spsr_hpc.preflight import StartupError
from spsr_hpc.train.checkpoint import (
    ResumeError,
    capture_rng_state,
    find_latest,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    resume_loader,
    save_checkpoint,
)
from spsr_hpc.train.ema import EMA
from spsr_hpc.train.engines import (
    batchnorm_counted_twice,
    batchnorm_replayable,
    build_engine,
    check_global_batch,
    deepspeed_config,
    destroy_distributed,
    discard_accumulated_gradients,
    engine_lr,
    init_distributed,
    set_collective_timeout,
    set_trainable,
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
    reduce_step_values,
    sync_flags,
)
from spsr_hpc.train.logging import RunLogger, image_grid, open_run_logs

GENERATOR = "generator"


def _borrow_local_cores(device: torch.device) -> int:
    """On CPU, let rank 0 use the intra-op threads of every rank on its node (they wait in a gloo
    barrier, which sleeps rather than spins) for rank-0-only work such as validation; returns the
    thread count to restore with torch.set_num_threads."""
    threads = torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu" and local > 1:
        torch.set_num_threads(max(threads, min(threads * local, cores)))
    return threads


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return sdist.local_device()


class Trainer:
    """State: engines (module + optimizer + scheduler each), EMA, step, RNG, data position.

    Args:
        cfg: a RunConfig (see :func:`spsr_hpc.config.load_config`).
        source: where cfg came from, named in error messages.
        loader: test hook: any iterable of ``{"lr": (B,3,p,p), "hr": (B,3,sp,sp)}`` float batches
            (optionally with state_dict/load_state_dict); default: spsr_hpc.data's loader.
    """

    def __init__(self, cfg: Any, *, source: str = "<config>", loader: Iterable[dict] | None = None) -> None:
        from spsr_hpc.losses import PerceptualLoss, SRObjective
        from spsr_hpc.models import build_discriminator, build_generator, build_structure_extractor

        self.cfg, self.source = cfg, source
        tc = cfg.train
        # Rank and world size come from the launcher's environment (1 process without one), so
        # missing files (pretrained G, NSE, VGG19) fail before any process group exists.
        self.rank, self.world = sdist.get_rank(), sdist.get_world_size()
        self.device = _pick_device(tc.device)
        if tc.bf16:
            try:
                check_bf16(self.device)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from e
        self.bf16 = bool(tc.bf16)
        # The validation forward's autocast ("auto": the training's precision; an explicit bf16 is
        # checked against the device with the config, as train.bf16 is).
        vp = cfg.val.precision
        self.val_precision = ("bf16" if self.bf16 else "fp32") if vp == "auto" else vp
        self.micro_batch = cfg.data.batch_size
        try:
            self.global_batch = check_global_batch(
                self.micro_batch, tc.grad_accum, self.world, tc.global_batch
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        self.run_dir = Path(cfg.logging.run_dir)
        ckpt = Path(cfg.checkpoint.dir)
        self.ckpt_dir = ckpt if ckpt.is_absolute() else self.run_dir / ckpt

        # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's).
        _seed_all(tc.seed)
        g_file = cfg.model.generator.pretrained
        generator = _built(g_file and f"{source}: model.generator.pretrained={g_file}", build_generator,
                           cfg.model.generator)
        nse = None  # the structure extractor: the NSE, or ImageNet VGG/ResNet features (Table VI)
        mc = cfg.model
        if cfg.loss.needs_nse():
            if mc.structure_extractor == "nse" and not (mc.nse.pretrained or mc.nse.random_init):
                raise ValueError(
                    f"{source}: loss.method={cfg.loss.method} uses structure losses and needs a pretrained "
                    "NSE: set model.nse.pretrained (launch/pretrain_nse.py writes one), "
                    "model.nse.random_init=true (SPSR-R) or loss.no_structure_loss=true"
                )
            own_nse = mc.structure_extractor == "nse" and not mc.nse.random_init
            nse_file = mc.nse.pretrained if own_nse else None
            nse = _built(nse_file and f"{source}: model.nse.pretrained={nse_file}", build_structure_extractor,
                         mc.structure_extractor, mc.nse, mc.structure_weights,
                         random_weights=mc.structure_random_weights)
            if sdist.is_main_process() and mc.structure_extractor != "nse":
                print(f"[spsr] structure extractor: {nse.summary()}", flush=True)
        perceptual = None
        if cfg.loss.needs_perceptual():
            pc = cfg.perceptual
            perceptual = PerceptualLoss(pc.weights, random_weights=pc.random_weights, backbone=pc.backbone,
                                        layer=pc.layer)
            if sdist.is_main_process():
                print(f"[spsr] perceptual loss: {perceptual.layer} of {perceptual.source}", flush=True)
        self.objective = SRObjective(cfg.loss, perceptual=perceptual, nse=nse).to(self.device)
        if self.bf16:
            # Frozen extractors: their conv weights rounded once, as autocast would per call.
            for frozen in (self.objective.perceptual, self.objective.nse):
                if frozen is not None:
                    cast_frozen_weights_(frozen)

        init_distributed(cfg.deepspeed.backend, device=self.device, timeout_s=tc.init_timeout_s)
        if (sdist.get_rank(), sdist.get_world_size()) != (self.rank, self.world):
            raise RuntimeError("rank/world size changed when the process group started")
        ds = deepspeed_config(
            micro_batch_per_gpu=self.micro_batch,
            grad_accum=tc.grad_accum,
            zero_stage=cfg.deepspeed.zero_stage,
            autocast_bf16=tc.bf16,
            gradient_clipping=cfg.deepspeed.gradient_clipping,
            template=cfg.deepspeed.json,
        )
        self.ds_config = ds
        o = cfg.optim
        opt_kw = {
            "betas": tuple(o.betas),
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "milestones": o.milestones,
            "gamma": o.gamma,
            "fused": o.fused,
        }
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.g_engine = build_engine(generator, ds, lr=o.lr_g, **opt_kw)
        self.d_engines: dict[str, Any] = {}
        for name in self.objective.discriminator_names:
            d_cfg = cfg.model.discriminator(name)
            if name == "structure":
                d_cfg = self._structure_d_config(d_cfg, nse)
            d = build_discriminator(d_cfg)
            self.d_engines[name] = build_engine(d, ds, lr=o.lr_d, **opt_kw)
        if tc.channels_last:
            # After deepspeed.initialize (its parameter broadcast needs contiguous tensors); the
            # Parameter objects stay the same, so the optimizers keep them. The frozen extractors
            # inside the objective (VGG19, the NSE) too: a channels_last input with contiguous
            # weights makes oneDNN reorder the weights at every call (2 % of the bf16 SPSR-G step
            # on the 2-core CPU, docs/training.md).
            for engine in (self.g_engine, *self.d_engines.values()):
                engine.module.to(memory_format=torch.channels_last)
            self.objective.to(memory_format=torch.channels_last)
        if tc.compile:
            self._compile_networks(tc.compile_mode)
        self.engines = {GENERATOR: self.g_engine, **{f"d_{n}": e for n, e in self.d_engines.items()}}
        self.ema = EMA(self.g_engine.module, tc.ema_decay) if tc.ema_decay else None
        self.fusion_params = [
            n for n, _ in self.g_engine.module.named_parameters() if n.startswith(tc.fusion_prefix)
        ]
        self.fusion_active: bool | None = None

        # Different data-augmentation / dropout streams per rank from here on.
        _seed_all(tc.seed * 1000 + self.rank + 1)
        if loader is None:
            from spsr_hpc.data.loader import build_train_loader

            loader = _built("data", build_train_loader, cfg.data, rank=self.rank, world_size=self.world,
                            device=self.device)
        self.loader = loader
        self._iter: Iterator[dict] | None = None
        self.step = 0
        self.samples_seen = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.data_skipped_base: dict[str, int] = {}  # skipped samples per reason before this session
        self.data_skipped: dict[str, int] = {}  # ... including this session (all ranks)
        self.last_checkpoint: Path | None = None
        self._stop_requested = False
        self._log_write_failed = False  # a rank 0 log write failed: every rank stops with a checkpoint
        self._signal: StopSignal | None = None
        self._eval_model: nn.Module | None = None
        self._lpips: Any = False  # built on first validation (False: not tried yet)
        self._last_vis: tuple[torch.Tensor, ...] | None = None
        self.logger: RunLogger | None = None

        resume = self._resolve_resume()
        if resume is not None:
            self.load(resume)
        self._apply_fusion_warmup()
        # Start-up (rendezvous, engines, resume) ran under train.init_timeout_s; from here on
        # every collective of every group gets train.collective_timeout_s.
        set_collective_timeout(tc.collective_timeout_s)

    # ---------------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank-0 shared state (engines are saved by DeepSpeed next to it)."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_total": self.skipped_total,
            "data_skipped": dict(self.data_skipped),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state.get("samples_seen", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.data_skipped_base = {k: int(v) for k, v in state.get("data_skipped", {}).items()}
        self.data_skipped = dict(self.data_skipped_base)
        if self.ema is not None:
            if state.get("ema") is None:
                raise ResumeError("checkpoint has no EMA state but train.ema_decay is set; set it to null")
            saved = self.ema.load_state_dict(state["ema"])
            if saved != self.ema.decay and sdist.is_main_process():
                print(f"[spsr] resume: EMA decay {saved} -> {self.ema.decay} (train.ema_decay)", flush=True)

    def rank_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": capture_rng_state()}
        if hasattr(self.loader, "state_dict"):
            state["loader"] = self.loader.state_dict()
        return state

    def save(self) -> Path:
        """Collective: checkpoint every engine + trainer + per-rank state at the current step.

        Module buffers (BatchNorm running statistics; per rank with sync_bn off) are first
        averaged over ranks, so the checkpoint (rank 0's module) holds what every rank holds.
        """
        for engine in self.engines.values():
            sdist.average_buffers(engine.module)
        self._count_data_skips()
        meta = {
            "config_source": self.source,
            "method": self.cfg.loss.method,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "global_batch": self.global_batch,
        }
        path = save_checkpoint(
            self.ckpt_dir,
            self.step,
            engines=self.engines,
            trainer_state=self.state_dict(),
            rank_state=self.rank_state(),
            meta=meta,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.last_checkpoint = path
        return path

    def _resolve_resume(self) -> Path | None:
        """checkpoint.resume -> the checkpoint to load. Rank 0 verifies and decides, every rank
        takes its answer (a rank that saw the files differently would otherwise load another
        checkpoint or hang); a damaged explicit path raises on every rank."""
        answer: tuple[str | None, str | None] = (None, None)
        if sdist.is_main_process():
            try:
                found = resolve_resume(
                    self.cfg.checkpoint.resume, self.ckpt_dir, log=lambda m: print(m, flush=True)
                )
                answer = (str(found) if found is not None else None, None)
            except ValueError as e:
                answer = (None, f"{self.source}: {e}")
        path, error = sdist.broadcast_object(answer)  # type: ignore[misc]
        if error is not None:
            raise ResumeError(error)
        return Path(path) if path is not None else None

    def load(self, path: str | Path) -> None:
        log = (lambda m: print(m, flush=True)) if sdist.is_main_process() else None
        trainer_state, rank_state, meta = load_checkpoint(
            path, engines=self.engines, log=log, method=("loss.method", self.cfg.loss.method)
        )
        self.load_state_dict(trainer_state)
        if rank_state:
            restore_rng_state(rank_state["rng"])
            if "loader" in rank_state and hasattr(self.loader, "load_state_dict"):
                resume_loader(self.loader, rank_state["loader"], path)
        elif sdist.is_main_process():
            print(
                f"[spsr] resumed {path} written by {meta.get('world_size')} ranks on {self.world}: "
                "RNG streams and data positions start fresh",
                flush=True,
            )
        self.last_checkpoint = Path(path)

    # ---------------------------------------------------------------------------------------
    # one step
    # ---------------------------------------------------------------------------------------
    def _apply_fusion_warmup(self) -> None:
        """Before train.fusion_warmup_steps only the fusion (``f_``) parameters train (docs/method.md §5)."""
        warm = bool(self.fusion_params) and self.step < self.cfg.train.fusion_warmup_steps
        if warm == self.fusion_active:
            return
        prefix = self.cfg.train.fusion_prefix
        set_trainable(self.g_engine.module, (lambda n: n.startswith(prefix)) if warm else True)
        if self.fusion_active is not None and self.logger is not None:
            self.logger.message(f"step {self.step}: fusion warm-up over, training all generator parameters")
        self.fusion_active = warm

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)  # the loader moves on to its next epoch by itself
            return next(self._iter)

    def _compile_networks(self, mode: str) -> None:
        """``torch.compile`` every network in place (``nn.Module.compile``: same object, same
        state-dict keys, so engines, checkpoints and exports do not change). The fused gradient
        map is a registered custom op, so it stays one opaque node in the graph."""
        for engine in (self.g_engine, *self.d_engines.values()):
            engine.module.compile(mode=mode)

    def _amp(self) -> Any:
        """bf16 autocast with train.bf16, else a no-op context."""
        return autocast(self.device, self.bf16)

    def _d_call(self, d: Any) -> Any:
        """D as a loss callable: its forward under autocast, fp32 logits for the loss.

        In the D step each call is its own autocast region on purpose: one region around D(real)
        and D(fake) would share one bf16 cast of each weight, and autograd would add the two
        weight gradients in bf16 before the cast back; separate regions give two fp32 gradients.
        """

        def call(x: torch.Tensor) -> torch.Tensor:
            with self._amp():
                return d(x).float()

        return call

    def _d_real_call(self, d: Any) -> Any:
        """D(real) once for both steps (``SRObjective.generator_loss(d_real=...)``): the G step's
        RaGAN term reads it detached, the D step reuses it with its graph, instead of a frozen
        forward in the G step and a second one in the D step. D is trainable for this call (and
        runs through its engine, as in the D step); its BatchNorm running averages move as by
        the two forwards (:func:`batchnorm_counted_twice`), so every state equals the public
        code's step (tests/test_train_speed.py)."""
        return self._once_call(d, d, batchnorm_counted_twice)

    def _d_fake_call(self, d: Any, replays: list[Any]) -> Any:
        """D(fake) once for both steps (``SRObjective.generator_loss(d_fake=...)``), with D
        trainable. The public code runs it first in the G step (frozen, before D(real)) and again
        last in the D step: its BatchNorm running averages move by the fake batch now and once
        more when the trainer calls the replay appended to ``replays`` after the D losses
        (:func:`batchnorm_replayable`), in the public code's order.

        Through ``d.module``, not the engine: G's gradient is taken through these logits by
        ``torch.autograd.grad`` in the G step, and DeepSpeed's hooks on an engine's outputs would
        count that as a (refused, or 1/grad_accum-scaled) D backward. ``d.backward`` scales the
        D loss as a whole, these logits included."""
        return self._once_call(d, d.module, batchnorm_replayable, keep=replays)

    def _once_call(self, d: Any, target: Any, bn_context: Any, keep: list[Any] | None = None) -> Any:
        """A call of ``target`` (D's engine or module) whose logits stand for two forwards: D
        trainable for it, its BatchNorm bookkeeping by ``bn_context(d.module)``, whose yielded
        value (if any) is appended to ``keep``."""
        call = self._d_call(target)

        def once(x: torch.Tensor) -> torch.Tensor:
            set_trainable(d.module, True)
            try:
                with bn_context(d.module) as kept:
                    logits = call(x)
                if keep is not None:
                    keep.append(kept)
                return logits
            finally:
                set_trainable(d.module, False)

        return once

    def _check(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, float], str | None]:
        """Global-batch host floats of the terms and the first non-finite one (None: all finite).

        One all-reduce per micro step carries the terms (mean over ranks) and the stop flag, so
        every rank sees the same values and agrees on a stop or a skip.
        """
        names = list(values)
        local = torch.stack([values[k].detach().float().reshape(()) for k in names])
        log_failed = self.logger is not None and self.logger.write_error is not None  # rank 0's logs
        floats, (stop, log_failed) = reduce_step_values(
            local, self._signal.requested if self._signal else False, log_failed
        )
        self._stop_requested |= stop or log_failed
        self._log_write_failed |= log_failed
        out = dict(zip(names, floats))
        return out, next((k for k, v in out.items() if not np.isfinite(v)), None)

    def _on_nonfinite(self, term: str) -> None:
        """A window had a non-finite term: raise (stop, or too many skips in a row) or count it."""
        if self.cfg.train.on_nonfinite == "stop":
            last = str(self.last_checkpoint or find_latest(self.ckpt_dir) or "") or None
            raise NonFiniteLossError(self.step + 1, term, last)
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.logger is not None:
            self.logger.message(
                f"step {self.step + 1}: non-finite {term} (global batch), accumulation window skipped "
                f"on every engine and rank ({self.skipped_total} skipped so far)"
            )
        if self.skipped_in_a_row > self.cfg.train.max_skipped_steps:
            raise NonFiniteLossError(
                self.step + 1,
                f"{term} ({self.skipped_in_a_row} skips in a row)",
                str(self.last_checkpoint) if self.last_checkpoint else None,
            )

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], str | None]:
        """Forward every loss, check them all (one reduction over ranks), then backward + step.

        The D losses are computed before G's backward (on the detached SR, with D parameters that
        G's step does not touch), so nothing is applied when any term of the micro step is
        non-finite. Returns (global-batch metrics, first non-finite term or None).
        """
        from spsr_hpc.losses import DInputs
        from spsr_hpc.models import SROutput

        fmt = self.memory_format
        lr = batch["lr"].to(self.device, non_blocking=True).float().contiguous(memory_format=fmt)
        hr = batch["hr"].to(self.device, non_blocking=True).float().contiguous(memory_format=fmt)

        for d in self.d_engines.values():
            set_trainable(d.module, False)
        with self._amp():
            raw = self.g_engine(lr)
        # The loss boundary: fp32 images; the extractors inside the objective (VGG19, the NSE,
        # each D) autocast their own forwards again, every loss reads .float() inputs.
        out = SROutput(*[t.float() if t is not None else None for t in raw])
        d_fns = {n: self._d_call(d.module) for n, d in self.d_engines.items()}
        d_real = {n: self._d_real_call(d) for n, d in self.d_engines.items()}
        replays: list[Any] = []
        # Not with train.compile: D(fake) once backpropagates D's graph twice (G's gradient with
        # retain_graph, then the D step), and inductor's compiled backward gives wrong D
        # gradients on the second pass (measured on the CPU with torch 2.14: 50-700 % off;
        # aot_eager is exact). Compiled runs take the public code's two D(fake) forwards.
        d_fake = None if self.cfg.train.compile else {
            n: self._d_fake_call(d, replays) for n, d in self.d_engines.items()
        }
        d_inputs: dict[str, DInputs] = {}  # reused by the D step (D(real) and D(fake) included)
        with self._amp():
            g_total, g_terms = self.objective.generator_loss(
                out, hr, d_fns, d_inputs=d_inputs, d_real=d_real, d_fake=d_fake
            )
        for d in self.d_engines.values():
            set_trainable(d.module, True)
        fake = SROutput(*[t.detach() if t is not None else None for t in out])
        terms = {"g_total": g_total, **{f"g/{k}": v for k, v in g_terms.items()}}
        d_totals = {}
        for name, d in self.d_engines.items():
            d_totals[name], d_terms = self.objective.discriminator_loss(
                name, fake, hr, self._d_call(d), inputs=d_inputs.get(name)
            )
            terms.update({f"d_{name}/{k}": v for k, v in d_terms.items()})
        for replay in replays:  # D(fake)'s second BatchNorm update, last as in the public code
            replay()
        vals, bad = self._check(terms)
        if bad is None:
            self.g_engine.backward(g_total)
            self.g_engine.step()
            for name, d in self.d_engines.items():
                d.backward(d_totals[name])
                d.step()
        self._last_vis = (lr.detach(), fake.sr, hr.detach(), fake.grad_sr)
        if bad is not None and not bad.startswith("d_"):
            bad = f"generator/{bad}"  # e.g. generator/g_total, d_image/d_loss
        return {f"loss/{k}": v for k, v in vals.items()}, bad

    def _window_start(self) -> dict[str, Any]:
        """What a skipped window restores: each engine's micro step and every module buffer
        (BatchNorm running statistics move in every training forward)."""
        return {
            "micro": {n: e.micro_steps for n, e in self.engines.items()},
            "buffers": {n: [b.detach().clone() for b in e.module.buffers()] for n, e in self.engines.items()},
        }

    def _discard_window(self, start: dict[str, Any]) -> None:
        for name, engine in self.engines.items():
            discard_accumulated_gradients(engine, start["micro"][name])
            with torch.no_grad():
                for b, saved in zip(engine.module.buffers(), start["buffers"][name]):
                    b.copy_(saved)

    def _count_data_skips(self) -> torch.Tensor | None:
        """Collective: update ``data_skipped`` (per reason, all ranks, since the run began) from the
        loader's counters; returns this session's local (shard, reason) counts, or None when the
        loader keeps none (the DALI loader fails on bad data instead of skipping)."""
        counts_fn = getattr(self.loader, "skip_counts", None)
        if counts_fn is None:
            return None
        local = counts_fn()
        now = sdist.sum_over_ranks(local.sum(0)).tolist()
        self.data_skipped = {
            r: self.data_skipped_base.get(r, 0) + int(n) for r, n in zip(self.loader.skip_reasons, now)
        }
        return local

    def _health_record(self) -> dict[str, float]:
        """Collective, at log steps: skipped steps and skipped data samples (per reason, summed over
        ranks) for metrics.jsonl; stops the run when the data skip rate passes train.max_skip_rate."""
        rec = {"train/skipped_steps": float(self.skipped_total)}
        local = self._count_data_skips()
        if local is None:
            return rec
        total = sum(self.data_skipped.values())
        rec["data/skipped"] = float(total)
        rec.update({f"data/skipped/{r}": float(n) for r, n in self.data_skipped.items()})
        tc = self.cfg.train
        check_skip_rate(self.step, self.data_skipped, self.samples_seen, local, self.loader.shards,
                        max_skip_rate=tc.max_skip_rate, min_samples=tc.skip_rate_min_samples)
        return rec

    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro batches) of G and every D; returns mean metrics.

        A non-finite term in any micro batch, on any rank, skips the whole accumulation window on
        every engine and rank (with ``train.on_nonfinite=skip``): its remaining micro batches are
        read and dropped, the accumulated gradients are zeroed, the engines' micro-step counters
        and the module buffers are restored, nothing is applied. The step counter (and the data
        position) still advance; the skip is counted in ``skipped_total``; returns {} then.
        """
        sums: dict[str, float] = defaultdict(float)
        accum = self.cfg.train.grad_accum
        start = self._window_start() if self.cfg.train.on_nonfinite == "skip" else None
        skipped = False
        for i in range(accum):
            metrics, bad = self._micro_step(self._next_batch())
            if bad is not None:
                self._on_nonfinite(bad)
                for _ in range(accum - i - 1):
                    self._next_batch()
                assert start is not None
                self._discard_window(start)
                skipped = True
                break
            for k, v in metrics.items():
                sums[k] += v / accum
        self.step += 1
        self.samples_seen += self.global_batch
        if not skipped:
            self.skipped_in_a_row = 0
            if self.ema is not None:
                self.ema.update(self.g_engine.module)
        self._apply_fusion_warmup()
        return {} if skipped else dict(sums)

    # ---------------------------------------------------------------------------------------
    # validation, images, export
    # ---------------------------------------------------------------------------------------
    def _inference_model(self, use_ema: bool) -> nn.Module:
        """fp32 copy of G (EMA weights when asked and available) for validation and export."""
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.g_engine.module).float().eval()
            for p in self._eval_model.parameters():
                p.requires_grad_(False)
        if use_ema and self.ema is not None:
            self.ema.copy_to(self._eval_model)
        else:
            self._eval_model.load_state_dict(
                {k: v.float() for k, v in self.g_engine.module.state_dict().items()}
            )
        return self._eval_model

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Rank 0: PSNR/SSIM (Y channel, docs/method.md §8) and LPIPS on val.dir; other ranks return {}
        after a barrier. The forward runs in ``val.precision`` (by default the training's)."""
        vc = self.cfg.val
        result: dict[str, float] = {}
        if vc.dir and sdist.is_main_process():
            threads = _borrow_local_cores(self.device)  # the other local ranks wait in the barrier
            from spsr_hpc.data import FolderDataset, to_uint8
            from spsr_hpc.inference import sr_images
            from spsr_hpc.metrics import psnr, ssim

            scale = self.cfg.model.generator.scale
            model = self._inference_model(vc.use_ema)
            data = FolderDataset(vc.dir, scale=scale)
            lpips_metric = self._val_lpips() if vc.lpips else None
            ps, ss, lp = [], [], []
            for i in range(min(len(data), vc.max_images)):
                item = data[i]
                lr, hr = item["lr"], item["hr"]  # (3, h, w) float in [0, 1]; (H, W, 3) uint8
                if vc.max_size is not None:
                    # Crop on the LR grid so that LR and HR stay aligned.
                    h, w = lr.shape[1:]
                    ch, cw = min(h, vc.max_size // scale), min(w, vc.max_size // scale)
                    y, x = (h - ch) // 2, (w - cw) // 2
                    lr = lr[:, y : y + ch, x : x + cw]
                    hr = hr[y * scale : (y + ch) * scale, x * scale : (x + cw) * scale]
                sr, _ = sr_images(model, lr[None].to(self.device), precision=self.val_precision)
                sr_u8 = to_uint8(sr[0].permute(1, 2, 0).cpu().numpy())
                ps.append(psnr(sr_u8, hr, vc.crop_border))
                ss.append(ssim(sr_u8, hr, vc.crop_border))
                if lpips_metric is not None:
                    lp.append(lpips_metric.from_uint8(sr_u8, hr))
            result = {"val/psnr": float(np.mean(ps)), "val/ssim": float(np.mean(ss))}
            if lp:
                result["val/lpips"] = float(np.mean(lp))
            torch.set_num_threads(threads)
        sdist.barrier()
        return result

    def _val_lpips(self) -> Any:
        """LPIPS-AlexNet for validation, built once; None (warned once) without its weights."""
        if self._lpips is False:
            from spsr_hpc.metrics import LPIPSMetric
            from spsr_hpc.weights import MissingWeightsError

            try:
                self._lpips = LPIPSMetric(device=self.device)
            except MissingWeightsError as e:
                print(f"[spsr] validation without LPIPS: {e}", flush=True)
                self._lpips = None
        return self._lpips

    def _structure_d_config(self, d_cfg: Any, extractor: nn.Module) -> Any:
        """The structure D sized from the extractor's actual output on an HR training patch
        (channels and spatial size); explicit config values must agree with it."""
        import dataclasses

        hr = self.cfg.data.patch_size * self.cfg.data.scale
        # Under the run's precision: with train.bf16 a frozen extractor's weights are bf16 already.
        with torch.no_grad(), autocast(self.device, self.cfg.train.bf16):
            c, h, w = extractor(torch.zeros(1, 3, hr, hr, device=self.device)).shape[1:]
        for key, got, want in (("in_ch", d_cfg.in_ch, c), ("input_size", d_cfg.input_size, h)):
            if got is not None and got != want:
                raise ValueError(
                    f"{self.source}: model.discriminators.structure.{key}={got}, but the "
                    f"{self.cfg.model.structure_extractor} features of {hr}×{hr} patches are {c}×{h}×{w}; "
                    f"set it to {want} or null"
                )
        return dataclasses.replace(d_cfg, in_ch=int(c), input_size=int(h))

    def export(self, path: str | Path | None = None) -> list[Path]:
        """Rank 0: generator (and EMA) as safetensors, loadable by spsr_hpc.models.load_pretrained.
        Every rank calls it (a failed write ends every rank: one flag all-reduce)."""
        from spsr_hpc.inference import export_generator

        meta = {
            "step": str(self.step),
            "method": self.cfg.loss.method,
            "generator": json.dumps(to_dict(self.cfg.model.generator)),
        }
        base = Path(path) if path else self.run_dir / "generator.safetensors"

        def write() -> list[Path]:
            paths = [export_generator(self._inference_model(False), base, metadata=meta)]
            if self.ema is not None:
                ema_path = base.with_name(base.stem + "_ema" + base.suffix)
                paths.append(export_generator(self._inference_model(True), ema_path, metadata=meta))
            return paths

        return export_on_rank0("generator export", write, self._newest_checkpoint) or []

    def _log_images(self) -> None:
        if self.logger is None or self._last_vis is None or not sdist.is_main_process():
            return
        from spsr_hpc.losses import same_gradient

        lr, sr, hr, grad_sr = self._last_vis
        extra = [same_gradient(sr), same_gradient(hr)]
        labels = ["LR", "SR", "HR", "grad(SR)", "grad(HR)"]
        if grad_sr is not None:
            extra.insert(0, grad_sr)
            labels.insert(3, "branch grad")
        grid = image_grid(lr, sr.clamp(0, 1), hr, extra, labels=labels)
        self.logger.log_images(self.step, "lr_sr_hr", grid)

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to train.max_steps (or until a signal); returns a summary dict."""
        cfg, lc = self.cfg, self.cfg.logging
        self.logger = open_run_logs(
            self.run_dir,
            cfg,
            total_steps=cfg.train.max_steps,
            start_step=self.step,
            tensorboard=lc.tensorboard,
            progress_bar=lc.progress_bar,
            wandb_project=lc.wandb_project if lc.wandb else None,
            wandb_config=to_dict(cfg),
        )
        self.logger.message(
            f"[spsr] {cfg.loss.method}: {self.world} rank(s) on {self.device}, "
            f"{'bf16 autocast (fp32 weights)' if self.bf16 else 'fp32'}, global batch {self.global_batch}, "
            f"ZeRO {cfg.deepspeed.zero_stage}, engines {list(self.engines)}, start step {self.step}"
            + (f", fusion warm-up until step {cfg.train.fusion_warmup_steps}" if self.fusion_active else "")
        )
        saved_at = self.step if self.last_checkpoint is not None else -1
        stopped_by = None
        timeout = cfg.train.collective_timeout_s
        dog = Watchdog(timeout + grace_s(timeout), newest=self._newest_checkpoint, rank=self.rank)
        try:
            with dog:
                stopped_by, saved_at, last_record = self._loop(dog, saved_at)
                # Writes after the last step's all-reduce (its log line, validation, image grids,
                # buffered tails) fail here, on rank 0: every rank hears of it.
                dog.beat(f"step {self.step}: the flag of rank 0's log writes")
                self.logger.flush()
                self._log_write_failed |= sync_flags(self.logger.write_error is not None)[0]
                if saved_at != self.step:
                    dog.beat(f"step {self.step}: the final checkpoint save")
                    self.save()
                exports = []
                if not self._log_write_failed:  # else most likely the same full disk: the re-run exports
                    dog.beat(f"step {self.step}: the export")
                    exports = self.export()
        except Exception as e:
            dog.pause()
            if isinstance(e, RunFailure) or not is_collective_failure(e):
                raise
            raise collective_failure(dog.phase, e, timeout, self._newest_checkpoint()) from e
        if self._log_write_failed:  # every rank: the checkpoint and export above are written
            reason = self.logger.write_error or "rank 0's logs in " + str(self.run_dir)
            raise LogWriteError(reason, self.step, self.last_checkpoint)
        if stopped_by:
            self.logger.message(
                f"[spsr] stopped by {stopped_by} at step {self.step}; checkpoint {self.last_checkpoint}; "
                f"exit status {EXIT_STOPPED}, re-run the same command to resume"
            )
        if self.skipped_total or any(self.data_skipped.values()):
            self.logger.message(
                f"[spsr] {self.skipped_total} step(s) skipped (non-finite); data samples skipped or lost: "
                + (", ".join(f"{r} {n}" for r, n in self.data_skipped.items() if n) or "none")
            )
        return {
            "step": self.step,
            "checkpoint": str(self.last_checkpoint),
            "exports": [str(p) for p in exports],
            "stopped_by": stopped_by,
            "skipped_steps": self.skipped_total,
            "data_skipped": dict(self.data_skipped),
            "last_metrics": last_record,
            "run_dir": str(self.run_dir),
        }

    def _newest_checkpoint(self) -> str | None:
        """The newest checkpoint that verifies (reads meta.json files and stats only)."""
        found = find_latest(self.ckpt_dir)
        return str(found) if found is not None else None

    def _loop(self, dog: Watchdog, saved_at: int) -> tuple[str | None, int, dict[str, Any]]:
        """The steps of :meth:`fit`; returns (stopped_by, step of the last save, last record)."""
        cfg, lc, cc = self.cfg, self.cfg.logging, self.cfg.checkpoint
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)  # a skipped window contributes no loss values
        samples_since, last_record = 0, {}
        stopped_by = None
        with StopSignal() as sig:
            self._signal = sig
            while self.step < cfg.train.max_steps:
                dog.beat(f"step {self.step + 1}: reading its batch or the step's collectives (the all-reduce "
                         "of the losses and stop flag, the gradient all-reduce)")
                metrics = self.train_step()
                for k, v in metrics.items():
                    sums[k] += v
                    counts[k] += 1
                samples_since += self.global_batch
                step = self.step
                self.logger.progress(step, metrics)  # the bar shows this step's losses
                if step % lc.log_every == 0 or step == cfg.train.max_steps or self._stop_requested:
                    dog.beat(f"step {step}: the all-reduce of the data-skip counts (logging)")
                    record = {k: v / counts[k] for k, v in sums.items()}
                    record.update({f"lr/{n}": engine_lr(e) for n, e in self.engines.items()})
                    record.update(self._health_record())
                    last_record = self.logger.log(step, record, samples=samples_since)
                    sums, counts, samples_since = defaultdict(float), defaultdict(int), 0
                if lc.image_every and step % lc.image_every == 0:
                    self._log_images()
                if cfg.val.every and cfg.val.dir and step % cfg.val.every == 0:
                    dog.beat(f"step {step}: validation (rank 0 validates, the others wait in a barrier)")
                    val = self.validate()
                    if val:
                        self.logger.log(step, val)
                        self.logger.message(
                            f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                        )
                if cc.every and step % cc.every == 0:
                    dog.beat(f"step {step}: the checkpoint save (its barriers and all-gathers)")
                    self.save()
                    saved_at = step
                if cc.export_every and step % cc.export_every == 0 and not self._log_write_failed:
                    dog.beat(f"step {step}: the export")
                    self.export()
                if self._stop_requested:
                    stopped_by = sig.signal_name or (
                        "a failed log write" if self._log_write_failed else "signal on another rank"
                    )
                    break
            self._signal = None
        return stopped_by, saved_at, last_record

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


def _built(what: str | None, build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)``. With ``what`` (a pretrained file's config key and path), a file
    that does not fit (another network, a foreign or damaged file) becomes a :class:`StartupError`
    naming it: one ``error:`` line, exit status 2, instead of a traceback."""
    try:
        return build(*args, **kwargs)
    except (ValueError, FileNotFoundError, OSError) as e:
        if not what:
            raise
        raise StartupError(f"{what}: {e}") from e


def run(cfg: Any, *, source: str = "<config>", loader: Iterable[dict] | None = None) -> dict[str, Any]:
    """Build a Trainer, train, close it. The process group is left up (see :func:`main`)."""
    trainer = Trainer(cfg, source=source, loader=loader)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an SR GAN (SPSR-G/-P/-J, ESRGAN, RRDB, ablations).")
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    p.add_argument("--validate", action="store_true", help="load and check the config, print it, and exit")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry: config errors fail here, before any process group or engine exists."""
    from spsr_hpc.data.loader_state import ShardReadError
    from spsr_hpc.preflight import check_run_inputs, print_errors

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, unique_overrides=True)
    except (ValueError, FileNotFoundError) as e:
        return print_errors(e)
    if args.validate:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    try:
        # Shards, manifest, loader package, weight files: before any model or engine exists.
        check_run_inputs(cfg, source=args.config)
    except ValueError as e:
        return print_errors(e)
    if args.validate:
        print(f"config {args.config}: OK", file=sys.stderr)
        return 0
    if os.environ.get("SPSR_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["SPSR_TORCH_THREADS"]))
    t0 = time.time()
    try:
        summary = run(cfg, source=args.config)
    except StartupError as e:  # a pretrained file that does not fit, a checkpoint that cannot be resumed
        return print_errors(e)
    except RunFailure as e:
        return _report_failure(e)
    except ShardReadError as e:  # this rank's (DALI) loader stopped at bad data
        print(error_line(e, sdist.get_rank()), file=sys.stderr, flush=True)
        return leave_after_data_error()
    finally:
        destroy_distributed()
    if sdist.is_main_process():
        print(json.dumps({**summary, "wall_s": round(time.time() - t0, 1)}, default=str), flush=True)
    return EXIT_STOPPED if summary.get("stopped_by") else EXIT_OK


def _report_failure(e: RunFailure) -> int:
    """One ``error:`` line (rank 0; every rank for a lost peer, where rank 0 may be the one
    lost) and the exit status of :mod:`spsr_hpc.train.faults`. After a lost peer the process
    ends at once: tearing the process group down could wait on the peer again."""
    if e.every_rank or sdist.is_main_process():
        print(error_line(e, sdist.get_rank() if e.every_rank else None), file=sys.stderr, flush=True)
    if isinstance(e, CollectiveTimeoutError):
        sys.stdout.flush()
        os._exit(e.exit_code)
    return e.exit_code


__all__ = ["Trainer", "build_parser", "main", "run"]
