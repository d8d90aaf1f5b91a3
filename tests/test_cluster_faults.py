"""Cluster faults end fast and loud (tiny PSNR runs on CPU/gloo; docs/cluster.md "What happens when").

- A frozen "node" (SIGSTOP of one of two DeepSpeed launchers): the other ends within
  train.collective_timeout_s + grace with one ``error:`` line (step, what it waited for, newest
  checkpoint) and exit status 5.
- A checkpoint write that fails (an injected ENOSPC; EDQUOT inside DeepSpeed's writer on one of
  two ranks; a real file size limit, ``ulimit -f``; a real full tmpfs where mounting is allowed):
  one ``error:`` line naming the path, the OS reason and the newest intact checkpoint, exit
  status 4 on every rank, no ``.tmp`` left; resuming afterwards is bit-exact.
- The run folder filling mid-run (metrics.jsonl on a real full tmpfs): every rank stops at the
  next step with a checkpoint, exit status 4 naming the file; the relaunch resumes.
- SIGUSR1 (SLURM's warning before the time limit): the step finishes, a checkpoint is written,
  exit status 3; the relaunch resumes at the next step and logs no step twice.

This file doubles as the worker script of its in-process runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import REPO, FixedBatches, _cfg, _env, _params, method_overrides

BIN = Path(sys.executable).parent
TRAIN = REPO / "launch" / "train.py"
CONFIG = REPO / "configs" / "tiny_psnr.yaml"
FREEZE_TIMEOUT_S = 20  # train.collective_timeout_s of the frozen-node test (grace: 10 s)

# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


def _fail_writes(marker: str, err: int):
    """Make this process's checkpoint writes (ours and DeepSpeed's) of files whose path contains
    ``marker`` raise OSError(err), as a full disk / quota would."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from spsr_hpc.train import checkpoint as ck

    own, ds = ck._torch_save, TorchCheckpointEngine.save

    def own_save(obj, path):
        if marker in str(path):
            raise OSError(err, os.strerror(err), str(path))
        own(obj, path)

    def ds_save(self, state_dict, path):
        if marker in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return ds(self, state_dict, path)

    ck._torch_save, TorchCheckpointEngine.save = own_save, ds_save

    def undo():
        ck._torch_save, TorchCheckpointEngine.save = own, ds

    return undo


def worker_enospc(out: Path) -> None:
    """One process: an uninterrupted run to step 6; a run whose save at step 4 fails with ENOSPC;
    then, the space "freed", a resumed run to step 6."""
    from spsr_hpc.train.checkpoint import CheckpointWriteError
    from spsr_hpc.train.trainer import Trainer

    name, ovs = method_overrides("psnr", "")
    ovs = [*ovs, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=5"]
    res: dict = {}
    t = Trainer(_cfg(name, ovs, out / "ref"), loader=FixedBatches(6, 2, 0, 1))
    t.fit()
    t.close()
    torch.save(_params(t), out / "ref.pt")

    undo = _fail_writes("step_0000004.tmp/rank_", errno.ENOSPC)
    t = Trainer(_cfg(name, ovs, out / "faulty"), loader=FixedBatches(6, 2, 0, 1))
    try:
        t.fit()
        res["error"] = None
    except CheckpointWriteError as e:
        res["error"], res["exit_code"] = str(e), e.exit_code
    finally:
        t.close()
        undo()
    res["left"] = sorted(p.name for p in (out / "faulty" / "checkpoints").iterdir())
    t = Trainer(_cfg(name, ovs, out / "faulty"), loader=FixedBatches(6, 2, 0, 1))
    res["resumed_at"] = t.step
    t.fit()
    t.close()
    torch.save(_params(t), out / "resumed.pt")
    (out / "enospc.json").write_text(json.dumps(res))


def worker_quota2(out: Path) -> None:
    """Two ranks (torchrun), ZeRO 1: rank 1's own optimizer partition, written inside DeepSpeed's
    save, fails with EDQUOT at the step-2 checkpoint. Every rank must stop (no one waits)."""
    from spsr_hpc.train.checkpoint import CheckpointWriteError
    from spsr_hpc.train.trainer import Trainer

    rank = int(os.environ["RANK"])
    if rank == 1:
        _fail_writes("step_0000002.tmp/generator/zero_pp_rank_1", errno.EDQUOT)
    name, ovs = method_overrides("psnr", "")
    cfg = _cfg(name, [*ovs, "train.max_steps=4", "checkpoint.every=1", "deepspeed.zero_stage=1",
                      "train.collective_timeout_s=120"], out / "quota2")
    t = Trainer(cfg, loader=FixedBatches(4, 2, rank, 2))
    res: dict = {"rank": rank}
    try:
        t.fit()
        res["error"] = None
    except CheckpointWriteError as e:
        res["error"], res["exit_code"], res["step"] = str(e), e.exit_code, t.step
    finally:
        t.close()
    (out / f"quota2_rank{rank}.json").write_text(json.dumps(res))


def worker_stuck(out: Path) -> None:
    """Two ranks (torchrun): rank 0 blocks for good while reading batch 3 (a stuck data-loader
    worker, a hung file system); rank 1 waits for it in the step's all-reduce."""
    import threading

    from spsr_hpc.train.faults import RunFailure
    from spsr_hpc.train.trainer import Trainer, _report_failure

    rank = int(os.environ["RANK"])

    def hang(i, batch):
        if rank == 0 and i == 3:
            threading.Event().wait()

    name, ovs = method_overrides("psnr", "")
    cfg = _cfg(name, [*ovs, "train.max_steps=50", "checkpoint.every=2", "train.collective_timeout_s=10"],
               out / "stuck")
    t = Trainer(cfg, loader=FixedBatches(50, 2, rank, 2, hook=hang))
    try:
        t.fit()
    except RunFailure as e:
        _report_failure(e)  # prints the error line and ends the process (status 5)
    sys.exit(0)  # not reached when the run ends as it must


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def shards(noise_shards) -> Path:
    return noise_shards  # tests/conftest.py: read only


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.shards={shards}", "data.batch_size=2", "data.patch_size=8", "data.num_workers=0",
        "model.generator.nf=8", "model.generator.nb=1", "model.generator.gc=4",
        "train.ema_decay=null", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.log_every=1", "logging.image_every=0", "val.dir=null", f"logging.run_dir={run_dir}", *extra,
    ]


def _steps(run_dir: Path) -> list[int]:
    from spsr_hpc.train.logging import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [int(r["step"]) for r in read_jsonl(path) if "loss/g_total" in r]  # a torn last line: left out


def _wait_for(cond, deadline_s: float, what: str, procs=()) -> None:
    """Poll ``cond`` until true; fail after ``deadline_s`` or when a process ends first."""
    end = time.monotonic() + deadline_s
    while not cond():
        for p in procs:
            if p.poll() is not None:
                log = p.communicate()[0]
                pytest.fail(f"{what}: a process ended first (rc {p.returncode}):\n{log[-4000:]}")
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline_s} s")
        time.sleep(0.2)


def _errors(log: str) -> list[str]:
    return [ln[ln.index("error:"):] for ln in log.splitlines() if "error:" in ln]


def _run_worker(kind: str, out: Path, timeout: int = 600) -> str:
    r = subprocess.run([sys.executable, __file__, kind, str(out)], cwd=REPO, env=_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-6000:]
    return r.stdout


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_frozen_or_killed_node_ends_the_other_node_with_an_error_line(shards, tmp_path, sig):
    """SIGSTOP (a frozen node) or SIGKILL (a lost node) every process of "node 1": node 0 ends
    within the collective timeout + grace (SIGKILL: at once), rc 5, one error line naming the
    step, the collective and the newest checkpoint."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(_free_port())
    run = tmp_path / "run"
    ovs = _overrides(shards, run, "train.max_steps=100000", "checkpoint.every=2",
                     f"train.collective_timeout_s={FREEZE_TIMEOUT_S}", "train.init_timeout_s=300")
    nodes = [
        subprocess.Popen(
            [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
             "--master_addr", "127.0.0.1", "--master_port", port, str(TRAIN), "--config", str(CONFIG), *ovs],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: node 1's launcher and rank together
        )
        for n in (0, 1)
    ]
    try:
        # Any intact checkpoint, not step_0000002 itself: with checkpoint.every=2, keep_last prunes
        # it a few steps later, and a poll that missed that window waited for ever.
        _wait_for(lambda: len(_steps(run)) >= 3 and any(
            d.is_dir() and not d.name.endswith(".tmp") for d in (run / "checkpoints").glob("step_*")),
                  600, "three logged steps and a checkpoint", nodes)
        os.killpg(nodes[1].pid, getattr(signal, sig))
        stopped_at = time.monotonic()
        # Generous against a loaded machine; the unfixed code waits 30 min (gloo's default).
        log = nodes[0].communicate(timeout=FREEZE_TIMEOUT_S + 10 + 120)[0]
        waited = time.monotonic() - stopped_at
    finally:
        for p in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
    assert nodes[0].returncode == 5, log[-4000:]
    errors = _errors(log)
    assert len(errors) == 1, log[-4000:]
    line = errors[0]
    assert re.search(r"step \d+", line) and "step_00000" in line, line
    # what it waited for: the step's all-reduce, or the save's barriers and all-gathers, depending
    # on where the signal caught the run
    assert any(w in line for w in ("collective", "all-reduce", "barrier", "all-gather")), line
    assert "Newest intact checkpoint" in line or "newest intact checkpoint" in line.lower(), line
    if sig == "SIGSTOP":
        assert f"did not complete within train.collective_timeout_s={FREEZE_TIMEOUT_S}" in line, line
    print(f"node 0 ended {waited:.1f} s after {sig}: {line}")


def test_rank_stuck_outside_a_collective_is_ended_by_the_watchdog(tmp_path):
    """Rank 0 blocks in its data loader: rank 1's all-reduce times out (error line, status 5),
    and rank 0 itself, waiting on nothing that has a timeout, is ended by the watchdog."""
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__, "stuck",
                        str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    log = r.stdout
    assert r.returncode != 0, log[-4000:]
    errors = _errors(log)
    by_rank = {int(m.group(1)): ln for ln in errors if (m := re.match(r"error: rank (\d): ", ln))}
    assert set(by_rank) == {0, 1}, log[-4000:]
    assert "no progress for" in by_rank[0] and "step 4" in by_rank[0], by_rank[0]
    assert "did not complete within train.collective_timeout_s=10" in by_rank[1], by_rank[1]
    for line in by_rank.values():
        assert "Newest intact checkpoint: " in line and "step_0000002" in line, line
    assert re.search(r"exitcode\s*:\s*5", log), log[-4000:]  # torchrun's summary of the first failure


def test_enospc_during_a_save_stops_cleanly_and_resume_is_bit_exact(tmp_path):
    _run_worker("enospc", tmp_path)
    res = json.loads((tmp_path / "enospc.json").read_text())
    assert res["error"] is not None and res["exit_code"] == 4
    err = res["error"]
    assert "step_0000004" in err and "No space left on device" in err and "ENOSPC" in err, err
    assert str(tmp_path / "faulty" / "checkpoints" / "step_0000002") in err, err
    assert res["left"] == ["step_0000002"], res["left"]  # no .tmp
    assert res["resumed_at"] == 2
    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "resumed.pt")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert _steps(tmp_path / "faulty") == [1, 2, 3, 4, 5, 6]


def test_quota_on_one_rank_inside_deepspeeds_writer_stops_every_rank(tmp_path):
    torchrun = BIN / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "quota2",
                        str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"quota2_rank{rank}.json").read_text())
        assert res["error"] is not None and res["exit_code"] == 4, res
        assert res["step"] == 2, res
        assert "Disk quota exceeded" in res["error"] and "rank 1" in res["error"], res["error"]
        assert "step_0000001" in res["error"].split("Newest intact checkpoint:")[1], res["error"]
    left = sorted(p.name for p in (tmp_path / "quota2" / "checkpoints").iterdir())
    assert left == ["step_0000001"], left


def test_free_space_check_warns_then_refuses(tmp_path, monkeypatch, capsys):
    from spsr_hpc.train import checkpoint as ck

    step = tmp_path / "step_0000005"
    step.mkdir()
    (step / "a.pt").write_bytes(b"x" * 1000)
    (step / ck.META_NAME).write_text(json.dumps({"complete": True, "files": {"a.pt": 1000}}))
    free = {"n": 10_000}
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: type("U", (), {"free": free["n"]})())
    msgs: list[str] = []
    assert ck.check_free_space(tmp_path, log=msgs.append) is None and msgs == []
    free["n"] = 1100  # fits, but barely
    assert ck.check_free_space(tmp_path, log=msgs.append) is None
    assert len(msgs) == 1 and "may not fit" in msgs[0]
    free["n"] = 999
    reason = ck.check_free_space(tmp_path, log=msgs.append)
    assert reason is not None and "ENOSPC" in reason and "step_0000005" in reason


def _cli(shards: Path, run: Path, *extra: str, prefix: str = "") -> subprocess.CompletedProcess:
    cmd = " ".join([prefix, "exec", sys.executable, str(TRAIN), "--config", str(CONFIG),
                    *(f"'{o}'" for o in _overrides(shards, run, *extra))])
    return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_file_size_limit_efbig_is_one_error_line(shards, tmp_path):
    run = tmp_path / "run"
    r = _cli(shards, run, "train.max_steps=3", "checkpoint.every=1", prefix="ulimit -f 100;")
    assert r.returncode == 4, r.stdout[-4000:]
    errors = _errors(r.stdout)
    assert len(errors) == 1, r.stdout[-4000:]
    assert "step_0000001" in errors[0] and "Newest intact checkpoint: none" in errors[0], errors[0]
    assert "File too large" in errors[0] or "file size limit" in errors[0], errors[0]
    assert "Traceback" not in r.stdout
    assert not list((run / "checkpoints").glob("*.tmp"))
    print(errors[0])


@pytest.mark.parametrize("size", ["128k", "256k"])
def test_full_tmpfs_is_one_error_line(shards, tmp_path, size):
    """128k: the first checkpoint (~0.2 MiB) fails inside the writer; 256k: the first fits, the
    free-space check refuses the second before writing."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({m.stderr.strip() or m.returncode}); the injected "
                    "ENOSPC test runs everywhere")
    try:
        run = tmp_path / "run"
        r = _cli(shards, run, "train.max_steps=3", "checkpoint.every=1", f"checkpoint.dir={mnt}")
        assert r.returncode == 4, r.stdout[-4000:]
        errors = _errors(r.stdout)
        assert len(errors) == 1, r.stdout[-4000:]
        assert "No space left on device" in errors[0] or "not written in full" in errors[0], errors[0]
        first = "step_0000001" in errors[0].split(":")[1]
        assert first == (size == "128k"), errors[0]
        assert ("checked before writing" in errors[0]) == (size == "256k"), errors[0]
        print(errors[0])
        assert not list(mnt.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_run_dir_stops_with_a_checkpoint_and_the_relaunch_resumes(shards, tmp_path, small_tmpfs):
    """logging.run_dir on a disk that fills mid-run (checkpoints elsewhere). Before: a traceback
    from metrics.jsonl's flush, exit status 1, every step since the last checkpoint lost."""
    mnt = small_tmpfs("12k")  # config.yaml and ~20 metrics lines fit
    ck = tmp_path / "ck"
    r = _cli(shards, mnt / "run", "train.max_steps=400", "checkpoint.every=200", f"checkpoint.dir={ck}")
    assert r.returncode == 4, r.stdout[-4000:]
    errors = _errors(r.stdout)
    assert len(errors) == 1, r.stdout[-4000:]
    assert f"{mnt / 'run' / 'metrics.jsonl'}: [Errno 28] No space left on device" in errors[0], errors[0]
    m = re.search(r"Stopped at step (\d+) with checkpoint (\S+);", errors[0])
    assert m and Path(m.group(2)).name == f"step_{int(m.group(1)):07d}", errors[0]
    stopped = int(m.group(1))
    assert sorted(p.name for p in ck.iterdir()) == [f"step_{stopped:07d}"]
    assert not (mnt / "run" / "generator.safetensors").exists() and not list(mnt.rglob("*.tmp"))
    r = _cli(shards, tmp_path / "run2", f"train.max_steps={stopped + 2}", f"checkpoint.dir={ck}")
    assert r.returncode == 0 and f"start step {stopped}" in r.stdout, r.stdout[-4000:]


_TB_FULL = """
import contextlib, sys
from pathlib import Path
from spsr_hpc.train.logging import RunLogger
mnt, outside = Path(sys.argv[1]), Path(sys.argv[2])
logger = RunLogger(mnt / "run", total_steps=1000, tensorboard=True, progress_bar=False,
                   jsonl_name=str(outside / "metrics.jsonl"))  # only the events on the tmpfs
with contextlib.suppress(OSError), (mnt / "filler").open("wb") as f:
    f.write(bytes(8192))  # what the event file's first page leaves
for step in range(1, 1000):
    logger.log(step, {f"loss/term{i}": 0.5 for i in range(8)})
    if logger.write_error:
        break
logger.flush()
logger.close()
print("write_error:", logger.write_error)
"""


def test_tensorboard_writer_thread_failure_is_one_line(tmp_path, small_tmpfs):
    """TensorBoard writes its events from a thread of its own. Before: on a full disk that thread
    printed a traceback ("Exception in thread ...", threading.excepthook) next to RunLogger's one
    line. Run as its own process: pytest replaces threading.excepthook inside tests."""
    mnt = small_tmpfs("8k")
    r = subprocess.run([sys.executable, "-c", _TB_FULL, str(mnt), str(tmp_path)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tb = mnt / "run" / "tb"
    assert f"write_error: {tb}: [Errno 28] No space left on device (ENOSPC)" in r.stdout, r.stdout[-3000:]
    assert r.stdout.count("could not write") == 1, r.stdout[-3000:]
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr[-3000:]


@pytest.mark.distributed
def test_full_run_dir_on_two_ranks_ends_both_with_status_4(shards, tmp_path, small_tmpfs):
    """torchrun, 2 ranks: rank 0's failed metrics write travels in the step's all-reduce, so both
    ranks stop at the same step, write one checkpoint together and exit 4; rank 1 is not left
    waiting for rank 0 (no "a peer rank is gone", no timeout)."""
    mnt = small_tmpfs("12k")
    ck = tmp_path / "ck"
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in _env().items() if k not in drop}
    r = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(TRAIN), "--config", str(CONFIG),
         *_overrides(shards, mnt / "run", "train.max_steps=400", "checkpoint.every=200",
                     f"checkpoint.dir={ck}", "train.collective_timeout_s=300")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    out = r.stdout + r.stderr
    errors = _errors(out)
    assert r.returncode != 0 and len(errors) == 1, out[-4000:]
    assert "metrics.jsonl: [Errno 28] No space left on device" in errors[0], errors[0]
    stopped = [p.name for p in ck.iterdir()]
    assert len(stopped) == 1 and f"with checkpoint {ck / stopped[0]};" in errors[0], (stopped, errors[0])
    assert "exitcode  : 4" in out and "peer rank is gone" not in out, out[-3000:]


def test_sigusr1_checkpoints_exits_3_and_the_relaunch_resumes_without_duplicates(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG),
           *_overrides(shards, run, "train.max_steps=100000", "checkpoint.every=0")]
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        _wait_for(lambda: len(_steps(run)) >= 2, 600, "two logged steps", [p])
        p.send_signal(signal.SIGUSR1)
        log = p.communicate(timeout=300)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 3, log[-4000:]
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp")
    k = int(ckpts[0].name.split("_")[1])
    assert _steps(run) == list(range(1, k + 1)), (_steps(run), k)
    assert f"stopped by SIGUSR1 at step {k}" in log
    again = [*cmd[:4], *_overrides(shards, run, f"train.max_steps={k + 2}", "checkpoint.every=0")]
    r = subprocess.run(again, cwd=REPO, env=_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:]
    assert f"start step {k}" in r.stdout
    assert _steps(run) == list(range(1, k + 3)), _steps(run)


def test_sbatch_script_asks_for_the_warning_signal_and_requeues():
    text = (REPO / "launch" / "slurm_train.sbatch").read_text()
    directives = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE)
    )
    assert re.fullmatch(r"B:USR1@\d+", directives.get("signal", "")), directives
    assert "requeue" in directives and "no-requeue" not in directives
    assert directives.get("open-mode") == "append"
    assert re.search(r"trap .*USR1", text) and "scontrol requeue" in text
    assert re.search(r"kill -USR1", text)


def test_sbatch_script_requeues_after_the_warning_signal(shards, tmp_path):
    """The batch script with stand-in srun (runs the task) and scontrol (records its arguments):
    SIGUSR1 to the batch shell -> the trainer checkpoints and exits 3 -> ``scontrol requeue``."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nshift  # --kill-on-bad-exit=1\nexec "$@"\n')
    (fake / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    run = tmp_path / "run"
    env = {**_env(), "PATH": f"{fake}:{os.environ['PATH']}", "SPSR_VENV": str(BIN.parent),
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "1"}
    ovs = _overrides(shards, run, "train.max_steps=100000", "checkpoint.every=0")
    p = subprocess.Popen(["bash", str(REPO / "launch" / "slurm_train.sbatch"), str(CONFIG), *ovs], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # the script and its task: one group to clean up
    try:
        _wait_for(lambda: len(_steps(run)) >= 2, 600, "two logged steps", [p])
        p.send_signal(signal.SIGUSR1)
        log = p.communicate(timeout=300)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # a task the script left behind (the unfixed script did)
        p.wait(timeout=60)
    assert p.returncode == 0, log[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], log[-4000:]
    assert "stopped by SIGUSR1" in log
    assert len(list((run / "checkpoints").glob("step_*[0-9]"))) == 1


if __name__ == "__main__":
    {"enospc": worker_enospc, "quota2": worker_quota2, "stuck": worker_stuck}[sys.argv[1]](Path(sys.argv[2]))


def test_shards_of_another_scale_without_a_manifest_are_one_error_line(shards, tmp_path):
    """A list of .tar files (copied without their make_shards manifest, so preflight cannot read
    the scale) at data.scale=2: the loader refuses them when built. Before this session the
    WebDataset loader stopped after 101 skipped samples; the loader's ValueError then left
    Trainer() as a traceback. Now one error: line naming the shard and the scale, exit 2."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(shards.glob("*.tar")) + sorted(shards.glob("*.idx")):
        shutil.copy(f, bare / f.name)
    r = _cli(bare / "*.tar", tmp_path / "run", "data.scale=2", "model.generator.scale=2", "train.max_steps=2")
    errors = _errors(r.stdout)
    assert r.returncode == 2 and len(errors) == 1, r.stdout[-3000:]
    assert "data: data.scale=2 does not fit the shards:" in errors[0] and "(made at scale 4)" in errors[0]
    assert "Traceback" not in r.stdout
