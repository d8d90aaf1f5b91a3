"""Resuming with a config that differs from the checkpoint's run.

* Optimizer, LR schedule and EMA settings: the run config wins over the checkpoint (torch's and
  DeepSpeed's loaders restore the saved ones), and each change is printed. Before this, a run
  resumed with a new ``optim.lr_g``, ``optim.betas``, ``optim.milestones`` or
  ``train.ema_decay`` trained with the checkpoint's values, silently (its config.yaml showing the
  new ones).
* ZeRO 0 <-> 1/2, and ZeRO 1/2 on another number of ranks, which DeepSpeed cannot load: one
  error naming the checkpoint, the stage and the fix. Before, DeepSpeed's exception (a missing
  ``zero_pp_rank`` file, ``'NoneType' object has no attribute 'copy'``) came out as "the
  checkpoint is damaged: move this one away".
* From the command line, a checkpoint that cannot be resumed is one ``error:`` line and exit
  status 2, not a traceback (exit status 1 before).

One process on the CPU, tiny SPSR-G (tests/test_train_speed.py's config helpers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train_speed import _batches, _config

from spsr_hpc.config import load_config
from spsr_hpc.train.checkpoint import ResumeError, check_resumable

REPO = Path(__file__).resolve().parents[1]


_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    """The in-process trainers set up a one-rank process group (and its rendezvous variables):
    torn down after the module, and the environment restored, so that later tests' launchers do
    not inherit a port this process still holds."""
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    from spsr_hpc.train.engines import destroy_distributed

    destroy_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _checkpoint(tmp_path: Path, *overrides: str, steps: int = 2) -> Path:
    from spsr_hpc.train.trainer import Trainer

    writer = Trainer(_config(tmp_path / "writer", *overrides), loader=_batches(steps))
    for _ in range(steps):
        writer.train_step()
    path = writer.save()
    writer.close()
    return path


def test_resume_takes_the_run_configs_optimizer_schedule_and_ema_settings(tmp_path, capsys):
    from spsr_hpc.train.trainer import Trainer

    ckpt = _checkpoint(tmp_path, "train.ema_decay=0.9")
    new = ("optim.lr_g=5e-4", "optim.betas=[0.5,0.9]", "optim.milestones=[1,100]", "optim.gamma=0.25",
           "train.ema_decay=0.5")  # fmt: skip
    capsys.readouterr()
    run = Trainer(_config(tmp_path / "resumed", *new, f"checkpoint.resume={ckpt}"), loader=_batches(2))
    said = capsys.readouterr().out
    assert run.step == 2
    # At step 2 the new schedule has passed milestone 1: lr = base x gamma.
    expected_lr = {"generator": 5e-4 * 0.25, "d_image": 1e-4 * 0.25, "d_gradient": 1e-4 * 0.25}
    for name, engine in run.engines.items():
        for g in engine.optimizer.param_groups:
            assert tuple(g["betas"]) == (0.5, 0.9), name
            assert g["lr"] == pytest.approx(expected_lr[name], rel=1e-12), name
        s = engine.lr_scheduler
        assert sorted(s.milestones.elements()) == [1, 100] and s.gamma == 0.25, name
        assert f"engine '{name}' takes the run config's settings" in said
    assert "betas (0.9, 0.999) -> (0.5, 0.9)" in said and "base lr [0.0001] -> [0.0005]" in said
    assert run.ema.decay == 0.5 and "EMA decay 0.9 -> 0.5" in said
    # The next steps follow the new schedule: no milestone until 100.
    run.train_step()
    assert run.g_engine.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.25, rel=1e-12)
    run.close()


def test_resume_with_the_same_settings_changes_nothing(tmp_path, capsys):
    from spsr_hpc.train.trainer import Trainer

    ckpt = _checkpoint(tmp_path, "optim.milestones=[1,100]", "optim.gamma=0.1")
    saved = torch.load(ckpt / "generator" / "mp_rank_00_model_states.pt", weights_only=False)
    capsys.readouterr()
    same = ("optim.milestones=[1,100]", "optim.gamma=0.1", f"checkpoint.resume={ckpt}")
    run = Trainer(_config(tmp_path / "resumed", *same), loader=_batches(2))
    assert "takes the run config's settings" not in capsys.readouterr().out
    # The loaded lr is kept as saved (gamma 0.1 is not exact in binary: no recomputation).
    assert run.g_engine.optimizer.param_groups[0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
    run.close()


class _StatefulBatches(list):
    """Batches with a loader state, as the real loaders have; ``refuse`` makes loading it fail as
    theirs do when a data setting changed (tests/test_data_loaders.py checks which)."""

    refuse = False

    def state_dict(self) -> dict:
        return {"epoch": 0, "batches_consumed": 1, "shuffle_buffer": 8}

    def load_state_dict(self, state: dict) -> None:
        if self.refuse:
            raise ValueError("loader state was saved with shuffle_buffer=8 but this loader has "
                             "shuffle_buffer=4; ... Resume with the same data settings")


def test_a_loader_that_cannot_continue_is_a_resume_error(tmp_path):
    """Before: the loader's ValueError left Trainer() as a traceback (exit status 1); now the
    checkpoint is named in a ResumeError, one error: line with exit status 2."""
    from spsr_hpc.train.trainer import Trainer

    writer = Trainer(_config(tmp_path / "writer"), loader=_StatefulBatches(_batches(1)))
    writer.train_step()
    ckpt = writer.save()
    writer.close()
    again = _StatefulBatches(_batches(1))
    Trainer(_config(tmp_path / "same", f"checkpoint.resume={ckpt}"), loader=again).close()
    again.refuse = True
    with pytest.raises(ResumeError, match=rf"{ckpt}: loader state was saved with shuffle_buffer=8"):
        Trainer(_config(tmp_path / "other", f"checkpoint.resume={ckpt}"), loader=again)


@pytest.mark.parametrize(("saved", "resumed"), [(0, 1), (1, 0)])
def test_resume_across_zero_0_and_1_is_refused_with_the_fix(tmp_path, saved, resumed):
    from spsr_hpc.train.trainer import Trainer

    ckpt = _checkpoint(tmp_path, f"deepspeed.zero_stage={saved}", steps=1)
    cfg = _config(tmp_path / "resumed", f"deepspeed.zero_stage={resumed}", f"checkpoint.resume={ckpt}")
    with pytest.raises(ResumeError, match=rf"ZeRO stage {saved} and this run uses stage {resumed}.*"
                                          rf"deepspeed.zero_stage={saved}") as e:  # fmt: skip
        Trainer(cfg, loader=_batches(1))
    assert "damaged" not in str(e.value)


def test_zero_1_checkpoint_resumes_under_zero_2(tmp_path):
    from spsr_hpc.train.trainer import Trainer

    ckpt = _checkpoint(tmp_path, "deepspeed.zero_stage=1", steps=1)
    cfg = _config(tmp_path / "r", "deepspeed.zero_stage=2", f"checkpoint.resume={ckpt}")
    run = Trainer(cfg, loader=_batches(1))
    assert run.step == 1
    run.train_step()
    run.close()


def _engines(**stages: int) -> dict[str, SimpleNamespace]:
    return {n: SimpleNamespace(zero_optimization_stage=lambda s=s: s) for n, s in stages.items()}


def test_partitioned_state_on_another_number_of_ranks_is_refused():
    meta = {"world_size": 2, "zero_stages": {"generator": 1, "d_image": 1}}
    refused = r"saved by 2 rank\(s\) under ZeRO stage 1.*this run has 1: resume on 2"
    with pytest.raises(ResumeError, match=refused):
        check_resumable("ck", meta, _engines(generator=1, d_image=1), world_size=1)
    check_resumable("ck", meta, _engines(generator=2, d_image=2), world_size=2)  # 1 -> 2, same ranks
    zero0 = {"world_size": 2, "zero_stages": {"generator": 0}}
    check_resumable("ck", zero0, _engines(generator=0), world_size=1)  # ZeRO 0: any number of ranks
    check_resumable("ck", {"world_size": 2}, _engines(generator=1), world_size=1)  # older meta: not checked


def test_cli_unresumable_checkpoint_is_one_error_line(tmp_path, bundled_shards):
    missing = tmp_path / "step_0000009"
    # Not this process's rendezvous (the in-process trainers above set MASTER_PORT).
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    cmd = [
        sys.executable, str(REPO / "launch" / "train.py"),
        "--config", str(REPO / "configs" / "tiny_spsr_g.yaml"),
        f"data.shards={bundled_shards}", f"logging.run_dir={tmp_path / 'run'}", "train.max_steps=1",
        "train.device=cpu", "val.dir=null", "perceptual.random_weights=true",
        f"checkpoint.resume={missing}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-2000:]
    assert "checkpoint.resume" in errors[0] and "Traceback" not in proc.stderr


def test_auto_resume_refuses_when_the_only_checkpoints_are_damaged(tmp_path):
    """resume=auto with damaged checkpoints and none that verifies used to start from step 0
    (exit 0), and its first save pruned the damaged folders, whose engine files were intact:
    the work was lost. Now it is an error naming the checkpoint and the choices."""
    from spsr_hpc.train.checkpoint import resolve_resume

    ckpt = _checkpoint(tmp_path, steps=1)
    (ckpt / "trainer.pt").write_bytes(b"")  # the manifest's size no longer matches
    with pytest.raises(ResumeError, match=r"step_0000001 is damaged .*trainer\.pt.* no older checkpoint .*"
                                          r"checkpoint\.resume=none"):  # fmt: skip
        resolve_resume("auto", ckpt.parent)
    assert ckpt.is_dir()
    assert resolve_resume("none", ckpt.parent) is None


def test_resume_with_another_objective_names_it_before_loading(tmp_path):
    """An ESRGAN config on an SPSR-G run folder: DeepSpeed's "Error(s) in loading state_dict" (some
    KB of keys) came out as "the checkpoint is damaged"; the meta's loss.method is compared first."""
    from spsr_hpc.train.trainer import Trainer

    ckpt = _checkpoint(tmp_path, steps=1)
    cfg = load_config(REPO / "configs" / "tiny_esrgan.yaml", [
        f"logging.run_dir={tmp_path / 'esrgan'}", "logging.progress_bar=false", "logging.tensorboard=false",
        "train.device=cpu", f"checkpoint.resume={ckpt}", "perceptual.random_weights=true", "val.dir=null",
    ])  # fmt: skip
    with pytest.raises(ResumeError, match=r"loss.method=spsr_g run and this config trains esrgan") as e:
        Trainer(cfg, loader=_batches(1))
    assert "damaged" not in str(e.value)


def test_pretrained_file_that_does_not_fit_is_a_startup_error(tmp_path):
    """model.generator.pretrained naming a truncated safetensors file passed --validate and ended
    in a SafetensorError traceback; naming another network's file, in a CheckpointMismatchError
    traceback. The first is now a start-up problem, the second a StartupError naming the key."""
    from safetensors.torch import save_file

    from spsr_hpc.preflight import StartupError, run_input_problems
    from spsr_hpc.train.trainer import Trainer

    foreign = tmp_path / "foreign.safetensors"
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, str(foreign))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(foreign.read_bytes()[:40])
    def weight_problems(cfg):  # (the tiny config's shards are not made here)
        return [p for p in run_input_problems(cfg) if "pretrained" in p]

    problems = weight_problems(_config(tmp_path / "t", f"model.generator.pretrained={truncated}"))
    assert len(problems) == 1 and "truncated.safetensors is not a readable safetensors file" in problems[0]
    cfg = _config(tmp_path / "f", f"model.generator.pretrained={foreign}")
    assert weight_problems(cfg) == []
    with pytest.raises(StartupError, match=r"model.generator.pretrained=.*foreign.safetensors: "):
        Trainer(cfg, loader=_batches(1))


def test_export_on_a_full_disk_is_exit_4_and_the_rerun_exports(tmp_path, monkeypatch):
    """The final generator export failing (ENOSPC inside safetensors' writer) was a traceback,
    exit status 1, with generator.safetensors.tmp left in the run folder. Now it is exit status 4
    with the newest checkpoint named, and re-running the same command resumes and exports."""
    import spsr_hpc.inference
    from spsr_hpc.train.faults import ExportWriteError
    from spsr_hpc.train.trainer import Trainer

    run_dir = tmp_path / "run"
    overrides = ("train.max_steps=2", "checkpoint.every=2", "checkpoint.resume=auto")

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(spsr_hpc.inference, "save_file", full_disk)
    trainer = Trainer(_config(run_dir, *overrides), loader=_batches(2))
    with pytest.raises(ExportWriteError) as e:
        trainer.fit()
    trainer.close()
    msg = str(e.value)
    assert e.value.exit_code == 4
    assert f"generator export {run_dir / 'generator.safetensors'}" in msg, msg
    assert "[Errno 28] No space left on device (ENOSPC)" in msg and "step_0000002" in msg, msg
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "generator.safetensors").exists()

    monkeypatch.undo()
    rerun = Trainer(_config(run_dir, *overrides), loader=_batches(2))
    assert rerun.step == 2
    rerun.fit()
    rerun.close()
    from safetensors.torch import load_file

    exported = load_file(run_dir / "generator.safetensors")
    state = rerun._inference_model(False).state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k].cpu()) for k in state)


class _FullAfter:
    """A metrics file whose writes fail with ENOSPC after ``n`` lines, as on a disk that fills."""

    def __init__(self, f, n: int) -> None:
        self.f, self.n, self.name = f, n, f.name

    def write(self, text: str) -> int:
        if self.n <= 0:
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.n -= 1
        return self.f.write(text)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@pytest.mark.parametrize("lines", [2, 5])
def test_a_failed_log_write_stops_with_a_checkpoint_and_exit_4(tmp_path, monkeypatch, capsys, lines):
    """metrics.jsonl failing mid-run (a full disk) was a traceback (exit status 1) that lost every
    step since the last checkpoint. Now the run stops at the next step with a checkpoint, exit
    status 4 naming the file, and the re-run resumes from it. lines=5: the last step's record
    fails, after that step's all-reduce: heard in the check after the loop (a run that ended with
    exit status 0 and a short metrics.jsonl otherwise)."""
    from spsr_hpc.train.faults import LogWriteError
    from spsr_hpc.train.logging import RunLogger
    from spsr_hpc.train.trainer import Trainer

    run_dir = tmp_path / "run"
    overrides = ("train.max_steps=6", "logging.log_every=1", "checkpoint.resume=auto")
    real_init = RunLogger.__init__

    def filling_disk(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._jsonl = _FullAfter(self._jsonl, lines)

    monkeypatch.setattr(RunLogger, "__init__", filling_disk)
    trainer = Trainer(_config(run_dir, *overrides), loader=_batches(6))
    with pytest.raises(LogWriteError) as e:
        trainer.fit()
    trainer.close()
    stopped = trainer.step
    msg = str(e.value)
    assert e.value.exit_code == 4 and (3 <= stopped < 6 if lines == 2 else stopped == 6), msg
    assert f"{run_dir / 'metrics.jsonl'}: [Errno 28] No space left on device (ENOSPC)" in msg, msg
    assert f"Stopped at step {stopped} with checkpoint" in msg and f"step_{stopped:07d}" in msg, msg
    assert "logging to stdout only" in capsys.readouterr().out
    assert not (run_dir / "generator.safetensors").exists()  # the re-run exports

    monkeypatch.undo()
    rerun = Trainer(_config(run_dir, *overrides), loader=_batches(max(1, 6 - stopped)))
    assert rerun.step == stopped
    rerun.fit()
    rerun.close()
    assert rerun.step == 6 and (run_dir / "generator.safetensors").is_file()
