"""Training state under faults and scale (GAN trainer, tiny sizes, CPU/gloo).

- SPSR-G with sync_bn and the global RaGAN mean: 2 ranks x b == 1 rank x 2b (parameters and
  logged losses), BatchNorm buffers equal on every rank.
- sync_bn off: per-rank BatchNorm buffers differ, and a checkpoint averages them (every rank and
  the checkpoint hold the same statistics).
- on_nonfinite=skip with grad_accum 2 and a NaN on one rank: the whole window is skipped on every
  engine and rank (ZeRO 0/1/2); optimizer/micro step counts and parameters equal a run without
  that window.
- Logged losses are global-batch means; data skips summed over ranks in metrics.jsonl.
- Resume: damaged newest checkpoints (truncated engine file, missing engine folder, missing rank
  file) are reported and passed over; damaged and stale .tmp folders are pruned; metrics.jsonl
  is truncated to the resumed step after a SIGKILL.
- The data skip rate stops a run naming the shards.

The multi-process work runs in subprocesses started once per module (this file doubles as their
worker script, reusing tests/test_train.py's helpers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import FixedBatches, _cfg, _env, _losses, _params, method_overrides, run_workers

SPSR_STEPS = 3
# Adam with eps 1 updates by ~lr * grad for small gradients: with the default eps 1e-8 the first
# update is lr * sign(grad), and the sign of a gradient that is zero up to rounding flips
# between two correct runs that sum in another order (2 * lr apart). Large steps keep the test
# sensitive (the parameters move by ~1e-3 and more).
EXACT_ADAM = ["optim.eps=1.0", "optim.lr_g=0.1", "optim.lr_d=0.1"]
# With the public init scale 0.1 a tiny untrained G outputs nearly the same SR for every sample:
# the D's BatchNorm then divides by a near-zero variance at every layer (gradients ~1e8), and
# rounding differences blow up within a step. init_scale 1 gives diverse SR (gradients ~1).
WELL_CONDITIONED = [*EXACT_ADAM, "model.generator.init_scale=1.0", "train.fusion_warmup_steps=0"]
SYNC_BN = ["model.discriminators.image.sync_bn=true", "model.discriminators.gradient.sync_bn=true"]
ACCUM_WINDOWS = 4  # optimizer steps of the faulty run (one of them skipped)
POISON = 3  # micro batch (window 1, second micro batch) made NaN on rank 1
GAN_SMALL = [  # ESRGAN without the VGG perceptual term: G + image D, cheap
    "model.generator.pretrained=null",
    "model.generator.nb=1",
    "loss.perceptual_weight=0",
    "model.discriminators.image.nf=4",
    "model.discriminators.image.input_size=32",
]

# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


class Dropping:
    """The batches of ``inner`` without the indices in ``drop``."""

    def __init__(self, inner: FixedBatches, drop: set[int]) -> None:
        self.inner, self.drop = inner, drop

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if i not in self.drop:
                yield b


class SkipReporting(FixedBatches):
    """FixedBatches that reports data-loader skips like WebDatasetLoader.skip_counts."""

    skip_reasons = ("unreadable_tar", "bad_image")
    shards = ("/data/a.tar", "/data/b.tar")

    def __init__(self, *a, skips: list[list[int]], **kw) -> None:
        super().__init__(*a, **kw)
        self._skips = torch.tensor(skips, dtype=torch.int64)

    def skip_counts(self) -> torch.Tensor:
        return self._skips.clone()


def _bn_buffers(trainer) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.detach().clone()
        for n, e in trainer.engines.items()
        for k, v in e.module.state_dict().items()
        if "running_" in k
    }


def _first_step(trainer) -> dict:
    """One train_step by hand: its global-batch losses, Adam's first moments (0.1 x the gradient
    every engine applied), parameters and BatchNorm buffers (every rank's) right after it."""
    from test_train import _optim_state

    init = _params(trainer)
    losses = trainer.train_step()
    return {
        "init": init,
        "losses": losses,
        "exp_avg": {k: v for k, v in _optim_state(trainer).items() if k.endswith(".exp_avg")},
        "params": _params(trainer),
        "buffers": _gather(_bn_buffers(trainer)) if trainer.world > 1 else [_bn_buffers(trainer)],
    }


def _counts(trainer) -> dict[str, list[int]]:
    return {n: [e.global_steps, e.micro_steps] for n, e in trainer.engines.items()}


def _gather(obj):
    import torch.distributed as dist

    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def worker_ws2(out: Path) -> None:
    from spsr_hpc import distributed as sdist
    from spsr_hpc.train.trainer import Trainer

    rank, world = sdist.get_rank(), sdist.get_world_size()
    name, ovs = method_overrides("spsr_g", "")
    # SPSR-G with sync_bn on 2 ranks x 2 samples.
    t = Trainer(
        _cfg(name, [*ovs, *WELL_CONDITIONED, *SYNC_BN, f"train.max_steps={SPSR_STEPS}"], out / "spsr_ws2"),
        loader=FixedBatches(SPSR_STEPS, 2, rank, world),
    )
    got = _first_step(t)
    t.fit()
    t.close()
    got["buffers_end"] = _gather(_bn_buffers(t))
    if rank == 0:
        torch.save(got, out / "spsr_ws2.pt")

    # sync_bn off (the default): per-rank statistics; the checkpoint averages the running buffers. The loader
    # reports skips (rank r: r + 1 bad images in shard b) to check that they are summed.
    t = Trainer(
        _cfg(name, [*ovs, "train.max_steps=2", "model.discriminators.image.sync_bn=false",
                    "model.discriminators.gradient.sync_bn=false", "train.max_skip_rate=null"],
             out / "nosync"),
        loader=SkipReporting(2, 2, rank, world, skips=[[0, 0], [0, rank + 1]]),
    )
    t.fit()  # no save before the end: the buffers have drifted apart by then
    after = _gather(_bn_buffers(t))
    t.close()
    if rank == 0:
        torch.save({"after": after, "checkpoint": str(t.last_checkpoint)}, out / "nosync.pt")
    t = Trainer(
        _cfg(name, [*ovs, "train.max_steps=2", "model.discriminators.image.sync_bn=false",
                    "model.discriminators.gradient.sync_bn=false", "checkpoint.resume=none"],
             out / "nosync_pre"),
        loader=FixedBatches(2, 2, rank, world),
    )
    for _ in range(2):
        t.train_step()
    before = _gather(_bn_buffers(t))
    t.close()
    if rank == 0:
        torch.save(before, out / "nosync_before.pt")

    # Non-finite skip with grad_accum 2, NaN on rank 1 only, vs the run without that window.
    def poison(i, batch):
        if i == POISON and rank == 1:
            return {"lr": batch["lr"] * float("nan"), "hr": batch["hr"]}

    base = [*GAN_SMALL, "train.grad_accum=2", "train.on_nonfinite=skip"]
    name = "esrgan.yaml"
    result = {}
    for stage in (0, 1, 2):
        micro = 2 * ACCUM_WINDOWS
        window = {POISON - POISON % 2, POISON - POISON % 2 + 1}
        runs = {
            "skip": (ACCUM_WINDOWS, FixedBatches(micro, 2, rank, world, hook=poison)),
            "ref": (ACCUM_WINDOWS - 1, Dropping(FixedBatches(micro, 2, rank, world), window)),
        }
        for kind, (steps, loader) in runs.items():
            t = Trainer(
                _cfg(name, [*base, f"deepspeed.zero_stage={stage}", f"train.max_steps={steps}"],
                     out / f"nan_{kind}_z{stage}"),
                loader=loader,
            )
            summary = t.fit()
            t.close()
            grads = {n: [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in e.module.parameters()]
                     for n, e in t.engines.items()}
            result[f"{kind}_z{stage}"] = {
                "counts": _gather(_counts(t)),
                "skipped": t.skipped_total,
                "summary_skipped": summary["skipped_steps"],
                "leftover_grads": any(any(v) for v in grads.values()),
                "records": _losses(out / f"nan_{kind}_z{stage}") if rank == 0 else None,
            }
            if rank == 0:
                torch.save(_params(t), out / f"nan_{kind}_z{stage}.pt")
    if rank == 0:
        (out / "nan.json").write_text(json.dumps(result))


def worker_killed(out: Path) -> None:
    """Tiny PSNR run that SIGKILLs itself right after step 7 (checkpoint every 5)."""
    from spsr_hpc.train.trainer import Trainer

    def kill(i, batch):
        if i == 7:  # batch 7 is read for step 8: step 7 is logged and done
            os.kill(os.getpid(), signal.SIGKILL)

    name, ovs = method_overrides("psnr", "")
    Trainer(
        _cfg(name, [*ovs, "train.max_steps=10", "checkpoint.every=5"], out / "killed"),
        loader=FixedBatches(10, 2, 0, 1, hook=kill),
    ).fit()


def worker_single(out: Path) -> None:
    from spsr_hpc.train.guards import DataSkipRateError
    from spsr_hpc.train.trainer import Trainer

    res: dict = {}
    # Reference for the 2-rank SPSR-G run: one rank, twice the batch, the same samples.
    name, ovs = method_overrides("spsr_g", "")
    t = Trainer(
        _cfg(name, [*ovs, *WELL_CONDITIONED, *SYNC_BN, f"train.max_steps={SPSR_STEPS}", "data.batch_size=4"],
             out / "spsr_ws1"),
        loader=FixedBatches(SPSR_STEPS, 4, 0, 1),
    )
    got = _first_step(t)
    t.fit()
    t.close()
    torch.save(got, out / "spsr_ws1.pt")

    # SIGKILL after step 7, resume from step 5, run to 10 (the child must not inherit this
    # process's one-rank group environment).
    rc = subprocess.run([sys.executable, __file__, "killed", str(out)], env=_env()).returncode
    res["killed_rc"] = rc
    name, ovs = method_overrides("psnr", "")
    t = Trainer(
        _cfg(name, [*ovs, "train.max_steps=10", "checkpoint.every=5"], out / "killed"),
        loader=FixedBatches(10, 2, 0, 1),
    )
    res["killed_resumed_from"] = t.step
    t.fit()
    t.close()

    # Checkpoints at steps 1..4 (kept), then a damaged newest one, a stale .tmp: auto resume
    # falls back to step 3 and says so; the next save prunes the damaged and the stale folders.
    ck_run = out / "ckpts"
    t = Trainer(
        _cfg(name, [*ovs, "train.max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=10"], ck_run),
        loader=FixedBatches(4, 2, 0, 1),
    )
    t.fit()
    t.close()
    shutil.copytree(ck_run / "checkpoints", out / "pristine")  # for the unit tests below
    newest = ck_run / "checkpoints" / "step_0000004"
    victim = max((newest / "generator").rglob("*model_states.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (ck_run / "checkpoints" / "step_0000009.tmp").mkdir()
    t = Trainer(
        _cfg(name, [*ovs, "train.max_steps=5", "checkpoint.every=0", "checkpoint.keep_last=2"], ck_run),
        loader=FixedBatches(5, 2, 0, 1),
    )
    res["fallback_step"] = t.step
    t.fit()
    t.close()
    res["after_prune"] = sorted(p.name for p in (ck_run / "checkpoints").iterdir())

    # Data skip rate above the threshold: the run stops naming the shards.
    t = Trainer(
        _cfg(name, [*ovs, "train.max_steps=5", "train.max_skip_rate=0.2", "train.skip_rate_min_samples=4"],
             out / "skiprate"),
        loader=SkipReporting(5, 2, 0, 1, skips=[[3, 0], [0, 1]]),
    )
    try:
        t.fit()
        res["skiprate"] = "finished"
    except DataSkipRateError as e:
        res["skiprate"] = str(e)
    finally:
        t.close()
    (out / "single.json").write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    run_workers(__file__, out, 1500, keep_logs=("single",))
    return out


pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_spsr_g_two_ranks_equal_one_rank_with_twice_the_batch(runs):
    """sync_bn + global RaGAN mean: the SPSR-G config (G + image D + gradient D) trains alike."""
    ref = torch.load(runs / "spsr_ws1.pt", weights_only=True)
    got = torch.load(runs / "spsr_ws2.pt", weights_only=True)
    # The gradient every engine applied in step 1 (Adam first moment = 0.1 x gradient).
    assert got["exp_avg"].keys() == ref["exp_avg"].keys()
    assert len(ref["exp_avg"]) > 250  # every tensor of G and of both Ds
    for engine in ("generator", "d_image", "d_gradient"):
        keys = [k for k in ref["exp_avg"] if k.startswith(engine + ".")]
        scale = max(float(ref["exp_avg"][k].norm()) for k in keys)
        for k in keys:  # zero-gradient tensors (conv biases before BatchNorm) are rounding noise
            a, b = got["exp_avg"][k], ref["exp_avg"][k]
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6 * scale, (k, (a - b).norm(), b.norm())
    for k in ref["params"]:
        torch.testing.assert_close(got["params"][k], ref["params"][k], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
    moved = [k for k in ref["params"] if (ref["params"][k] - ref["init"][k]).abs().max() > 1e-4]
    assert len(moved) > len(ref["params"]) // 2, "step 1 hardly moved anything: the test proves little"
    for rank_bufs in got["buffers"]:  # the running statistics of the whole batch on every rank
        for k, v in ref["buffers"][0].items():
            torch.testing.assert_close(rank_bufs[k], v, atol=1e-6, rtol=1e-5)
    r0, r1 = got["buffers_end"]
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "sync_bn buffers differ between ranks"
    # Logged losses are global-batch values: rank 0's equal the 1-rank ones (step 1 from
    # train_step, steps 2-3 from metrics.jsonl).
    ws1, ws2 = [ref["losses"], *_losses(runs / "spsr_ws1")], [got["losses"], *_losses(runs / "spsr_ws2")]
    assert len(ws1) == len(ws2) == SPSR_STEPS
    for a, b in zip(ws2, ws1):
        assert a.keys() == b.keys() and "loss/d_gradient/d_loss" in a
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_per_rank_batchnorm_buffers_are_averaged_into_the_checkpoint(runs):
    before = torch.load(runs / "nosync_before.pt", weights_only=True)
    assert any(not torch.equal(before[0][k], before[1][k]) for k in before[0]), "buffers never diverged"
    got = torch.load(runs / "nosync.pt", weights_only=True)
    r0, r1 = got["after"]
    ckpt = Path(got["checkpoint"])
    for engine in ("d_image", "d_gradient"):
        states = list((ckpt / engine).rglob("*model_states.pt"))
        assert len(states) == 1
        module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
        for k, v in module.items():
            if "running_" in k:
                key = f"{engine}.{k}"
                assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
                assert torch.equal(v, r0[key]), f"{key}: checkpoint holds another value"
                # the rank mean of the statistics the same steps produce before any save
                torch.testing.assert_close(v, (before[0][key] + before[1][key]) / 2)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nonfinite_on_one_rank_skips_the_whole_accumulation_window(runs, stage):
    res = json.loads((runs / "nan.json").read_text())
    skip, ref = res[f"skip_z{stage}"], res[f"ref_z{stage}"]
    assert skip["skipped"] == skip["summary_skipped"] == 1 and ref["skipped"] == 0
    # optimizer and micro steps of every engine on every rank: those of the run without the window
    assert skip["counts"] == ref["counts"]
    assert skip["counts"][0]["generator"] == [ACCUM_WINDOWS - 1, 2 * (ACCUM_WINDOWS - 1)]
    assert not skip["leftover_grads"] and not ref["leftover_grads"]
    a = torch.load(runs / f"nan_skip_z{stage}.pt", weights_only=True)
    b = torch.load(runs / f"nan_ref_z{stage}.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=lambda m, k=k: f"ZeRO {stage} {k}: {m}")
    # the skipped window logs no loss values; the others log those of the reference
    recs_skip, recs_ref = skip["records"], ref["records"]
    assert len(recs_skip) == ACCUM_WINDOWS - 1 and recs_skip == recs_ref


def test_data_skips_are_summed_over_ranks_in_metrics(runs):
    from spsr_hpc.train.logging import read_jsonl

    recs = [r for r in read_jsonl(runs / "nosync" / "metrics.jsonl") if "loss/g_total" in r]
    assert recs and all(r["data/skipped/bad_image"] == 3.0 and r["data/skipped"] == 3.0 for r in recs)
    assert all(r["data/skipped/unreadable_tar"] == 0.0 and r["train/skipped_steps"] == 0.0 for r in recs)


def test_data_skip_rate_stops_the_run_naming_shards(runs):
    msg = json.loads((runs / "single.json").read_text())["skiprate"]
    assert "max_skip_rate=0.2" in msg and "/data/a.tar (3)" in msg and "/data/b.tar (1)" in msg
    assert "unreadable_tar 3" in msg and "bad_image 1" in msg


def test_metrics_jsonl_has_every_step_once_after_sigkill_and_resume(runs):
    from spsr_hpc.train.logging import read_jsonl

    res = json.loads((runs / "single.json").read_text())
    assert res["killed_rc"] == -signal.SIGKILL and res["killed_resumed_from"] == 5
    steps = [r["step"] for r in read_jsonl(runs / "killed" / "metrics.jsonl") if "loss/g_total" in r]
    assert steps == list(range(1, 11))
    dropped = [r["step"] for r in read_jsonl(runs / "killed" / "metrics.discarded.jsonl")]
    assert dropped == [6, 7]


def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_prunes(runs):
    res = json.loads((runs / "single.json").read_text())
    assert res["fallback_step"] == 3
    log = (runs / "single.log").read_text()
    assert "step_0000004 is damaged" in log and "falling back to" in log and "truncated" in log
    # keep_last=2 keeps the two newest that verify; the damaged step 4 and the stale .tmp are gone
    assert res["after_prune"] == ["step_0000003", "step_0000005"]


def _damaged_copy(runs: Path, tmp_path: Path, damage) -> Path:
    d = tmp_path / "checkpoints"
    shutil.copytree(runs / "pristine", d)
    damage(d / "step_0000004")
    return d


def _truncate_engine_file(p: Path) -> None:
    f = max((p / "generator").rglob("*.pt"), key=lambda q: q.stat().st_size)
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size - 100)


DAMAGE = {
    "truncated engine file": (_truncate_engine_file, "bytes, the manifest says"),
    "missing engine folder": (lambda p: shutil.rmtree(p / "generator"), "missing folder generator/"),
    "missing rank file": (lambda p: (p / "rank_00000.pt").unlink(), "missing file rank_00000.pt"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_and_passed_over(runs, tmp_path, case):
    from spsr_hpc.train.checkpoint import resolve_resume, verify_checkpoint

    damage, expected = DAMAGE[case]
    d = _damaged_copy(runs, tmp_path, damage)
    assert verify_checkpoint(d / "step_0000003") == []
    problems = verify_checkpoint(d / "step_0000004")
    assert any(expected in p for p in problems), problems
    said: list[str] = []
    assert resolve_resume("auto", d, log=said.append) == d / "step_0000003"
    assert len(said) == 1 and str(d / "step_0000004") in said[0] and expected in said[0]
    assert f"falling back to {d / 'step_0000003'}" in said[0]
    with pytest.raises(ValueError, match="is damaged: .*" + expected.split(",")[0]):
        resolve_resume(str(d / "step_0000004"), d)


def test_prune_removes_damaged_and_stale_tmp_keeps_newest_good(runs, tmp_path):
    from spsr_hpc.train.checkpoint import prune_checkpoints

    d = _damaged_copy(runs, tmp_path, lambda p: (p / "rank_00000.pt").unlink())
    (d / "step_0000007.tmp").mkdir()
    (d / "unrelated").mkdir()
    prune_checkpoints(d, keep_last=2)
    assert sorted(p.name for p in d.iterdir()) == ["step_0000002", "step_0000003", "unrelated"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"ws2": worker_ws2, "single": worker_single, "killed": worker_killed}[sys.argv[1]](Path(sys.argv[2]))
