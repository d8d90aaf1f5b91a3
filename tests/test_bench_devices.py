"""Benchmarks time the device they were given: CUDA events on that device's stream, kernels
launched with that device current (``--device cuda:1`` used to time cuda:0's idle stream).

No GPU is needed: torch.cuda's device context, streams, events and synchronize are replaced by
fakes that record which device each event was recorded on and which device was current when the
timed function ran.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from spsr_hpc.bench import common
from spsr_hpc.bench import info_nce as bench_info_nce


class _FakeCuda:
    def __init__(self) -> None:
        self.current = 0
        self.recorded_on: list[int] = []
        self.fn_ran_on: list[int] = []

    def install(self, mp: pytest.MonkeyPatch) -> None:
        fake = self

        @contextlib.contextmanager
        def device(dev):
            idx = torch.device(dev).index if not isinstance(dev, int) else dev
            before = fake.current
            fake.current = before if idx is None else idx
            try:
                yield
            finally:
                fake.current = before

        class Stream:
            def __init__(self, idx: int) -> None:
                self.device_index = idx

        def current_stream(dev=None):
            idx = fake.current if dev is None else torch.device(dev).index
            return Stream(fake.current if idx is None else idx)

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.device = None

            def record(self, stream=None) -> None:
                # torch records on the current device's current stream when none is given.
                self.device = fake.current if stream is None else stream.device_index
                fake.recorded_on.append(self.device)

            def elapsed_time(self, other: Event) -> float:
                if self.device != other.device:
                    raise RuntimeError("events recorded on different devices")
                return 1.0

        real_empty = torch.empty

        def empty(*size, device=None, **kw):  # the L2 flush buffer: on the CPU here
            return real_empty(*size, **kw)

        mp.setattr(torch.cuda, "device", device)
        mp.setattr(torch.cuda, "current_stream", current_stream)
        mp.setattr(torch.cuda, "Event", Event)
        mp.setattr(torch.cuda, "synchronize", lambda dev=None: None)
        mp.setattr(torch, "empty", empty)

    def fn(self) -> None:
        self.fn_ran_on.append(self.current)


def test_time_quantiles_records_on_the_given_device(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    out = common.time_quantiles(fake.fn, torch.device("cuda", 1), warmup=2, rep=4)
    assert out == [1.0, 1.0, 1.0]
    assert fake.recorded_on and set(fake.recorded_on) == {1}
    assert fake.fn_ran_on == [1] * 6  # warm-up calls included: compilation on the right device


def test_info_nce_backward_timing_records_on_the_given_device(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    w = torch.ones(3, requires_grad=True)

    def fwd() -> torch.Tensor:
        fake.fn()
        return (w * 2).sum()

    out = bench_info_nce._time_backward(fwd, torch.device("cuda", 1), warmup=1, rep=3)
    assert out == [1.0, 1.0, 1.0]
    assert fake.recorded_on and set(fake.recorded_on) == {1}
    assert set(fake.fn_ran_on) == {1}


def test_cuda_elapsed_ms_default_device_follows_current(monkeypatch):
    """``cuda`` without an index: the current device (torch's own meaning), not always 0."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    fake.current = 2
    assert common.cuda_elapsed_ms(fake.fn, torch.device("cuda")) == 1.0
    assert set(fake.recorded_on) == {2} and fake.fn_ran_on == [2]


def test_gradient_map_bench_writes_each_row_when_measured(monkeypatch, tmp_path):
    """A time limit or crash after the first measurement keeps that figure in the CSV (the
    benchmark used to write every row at the very end)."""
    import csv

    from spsr_hpc.bench import gradient_map as bench_gm

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # eager providers only: nothing interpreted
    real = common.time_quantiles
    calls = []

    def dies_on_second(fn, device, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a SIGINT from `timeout -s INT` raises
        return real(fn, device, **kw)

    monkeypatch.setattr(common, "time_quantiles", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        bench_gm.main(["--device", "cpu", "--providers", "eager_conv", "--passes", "fwd,bwd",
                       "--shapes", "1,1,8,8,1", "--rep", "2"])
    with (tmp_path / bench_gm.CSV_NAME).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["provider"], r["pass"], r["shape"]) for r in rows] == [("eager_conv", "fwd", "1x1x8x8")]
    assert float(rows[0]["p50_ms"]) > 0
