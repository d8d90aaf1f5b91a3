"""Fast checks of the fault plumbing: config keys, NCCL environment defaults, the watchdog, the
words for a failed write, the exit statuses the docs list, and (in a one-process gloo group) the
collective timeout setter."""

from __future__ import annotations

import errno
import re
import threading
from pathlib import Path

import pytest

from spsr_hpc.config import load_config
from spsr_hpc.train import faults
from spsr_hpc.train.checkpoint import describe_write_error

REPO = Path(__file__).resolve().parents[1]


def test_timeouts_are_config_keys_with_defaults_and_checks():
    cfg = load_config(REPO / "configs" / "tiny_psnr.yaml")
    assert (cfg.train.collective_timeout_s, cfg.train.init_timeout_s) == (600.0, 1800.0)
    assert cfg.data.verify_shards == "size"
    cfg = load_config(REPO / "configs" / "tiny_psnr.yaml",
                      ["train.collective_timeout_s=30", "data.verify_shards=off"])
    assert cfg.train.collective_timeout_s == 30 and cfg.data.verify_shards == "off"
    with pytest.raises(ValueError, match=r"collective_timeout_s"):
        load_config(REPO / "configs" / "tiny_psnr.yaml", ["train.collective_timeout_s=0"])
    with pytest.raises(ValueError, match=r"verify_shards"):
        load_config(REPO / "configs" / "tiny_psnr.yaml", ["data.verify_shards=md5"])


def test_nccl_env_defaults_never_override_the_user(monkeypatch):
    names = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING",
             "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC")
    for k in names:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "999")
    done = faults.set_nccl_env_defaults(600)
    assert done == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    import os

    assert os.environ["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "999"
    monkeypatch.delenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC")
    assert faults.set_nccl_env_defaults(600) == {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "660"}  # 600 + 60


def test_grace_is_ten_percent_between_10_and_60_s():
    assert [faults.grace_s(t) for t in (20, 300, 600, 3600)] == [10.0, 30.0, 60.0, 60.0]


def test_watchdog_ends_a_rank_without_progress_naming_phase_and_checkpoint(capsys):
    ended = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        ended.set()

    dog = faults.Watchdog(0.2, newest=lambda: "/ck/step_0000004", rank=3, exit=fake_exit, poll_s=0.02)
    with dog:
        dog.beat("step 5: reading its batch")
        assert ended.wait(timeout=30), "the watchdog did not fire"
    assert codes == [faults.EXIT_COLLECTIVE]
    err = capsys.readouterr().err
    assert err.startswith("error: rank 3: no progress for") and err.count("\n") == 1
    assert "step 5: reading its batch" in err and "/ck/step_0000004" in err


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "No space left on device (ENOSPC)"),
    (errno.EDQUOT, "Disk quota exceeded (EDQUOT)"),
    (errno.EFBIG, "File too large (EFBIG)"),
    (errno.EIO, "Input/output error (EIO)"),
])
def test_write_errors_in_words(code, words):
    import os

    text = describe_write_error(OSError(code, os.strerror(code), "/ck/x.pt"))
    assert words in text and "/ck/x.pt" in text


def test_torch_short_write_is_explained():
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2044352 vs 2044240")
    text = describe_write_error(exc)
    assert "not written in full" in text and "quota" in text and "ulimit -f" in text


def test_every_exit_status_is_in_the_docs_table():
    doc = (REPO / "docs" / "cluster.md").read_text()
    rows = dict(re.findall(r"^\| (\d) \| (.+?) \|$", doc, re.MULTILINE))
    assert sorted(int(k) for k in rows) == sorted(faults.EXIT_CODES)


@pytest.mark.parametrize("message, timed_out", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 20000ms for recv", True),
    ("Application timeout caused pair closure", True),  # gloo, a SIGSTOPped peer inside a barrier
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1", False),
    ("Connection reset by peer", False),
])
def test_gloo_failures_are_collective_failures(message, timed_out):
    """Every message gloo raises for a frozen or lost peer is recognised and reported as such (the
    pair-closure one, raised when the peer froze inside the checkpoint barrier, used to escape as
    a raw traceback with exit status 1)."""
    from spsr_hpc.train import faults

    exc = RuntimeError(message)
    assert faults.is_collective_failure(exc)
    err = faults.collective_failure("step 4: checkpoint barrier", exc, 20, "ckpt/step_0000002")
    assert ("did not complete within" in str(err)) is timed_out
    assert "step_0000002" in str(err) and str(faults.EXIT_COLLECTIVE) in str(err)
    assert not faults.is_collective_failure(RuntimeError("CUDA out of memory"))


def test_collective_timeout_reaches_every_group_without_a_deprecation_warning(tmp_path):
    """set_collective_timeout reaches the group without printing torch's FutureWarning for the
    private _set_pg_timeout into every training run (this test, with warnings as errors, failed on
    the code before)."""
    import warnings

    import torch
    import torch.distributed as dist

    from spsr_hpc.train.engines import set_collective_timeout

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            n = set_collective_timeout(7.0)
        if hasattr(dist.distributed_c10d, "_set_pg_timeout"):
            assert n >= 1
        dist.all_reduce(torch.ones(1))  # the group still works under the new timeout
    finally:
        if started:
            dist.destroy_process_group()
