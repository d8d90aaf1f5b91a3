"""Trainer integration tests: 2 ranks vs 1, exact resume, every method, checkpoints, failures.

The heavy work runs in two subprocesses started once per module (this file doubles as their
worker script): a 2-rank gloo job (torchrun) and a 1-process job. The tests only read what
they wrote. Sizes are tiny (HR 32x32 patches, 8-channel nets).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STEPS = 4

# ---------------------------------------------------------------------------------------------
# worker side (runs in the subprocesses)
# ---------------------------------------------------------------------------------------------


class FixedBatches:
    """Deterministic batches; rank r of w gets samples [r*B, (r+1)*B) of each global batch.

    ``hook(i)`` runs before batch i is yielded (used to send a signal or poison a batch).
    """

    def __init__(
        self,
        n: int,
        per_rank: int,
        rank: int,
        world: int,
        lr_size: int = 8,
        scale: int = 4,
        seed: int = 123,
        hook=None,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        total = per_rank * world
        self.batches = []
        for _ in range(n):
            hr = torch.rand(total, 3, lr_size * scale, lr_size * scale, generator=g)
            lr = torch.nn.functional.avg_pool2d(hr, scale)
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            self.batches.append({"lr": lr[sl].contiguous(), "hr": hr[sl].contiguous()})
        self.i = 0
        self.hook = hook

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        while self.i < len(self.batches):
            i = self.i
            self.i += 1
            batch = self.batches[i]
            if self.hook is not None:
                batch = self.hook(i, batch) or batch
            yield batch
        self.i = 0

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


class HalfBatches:
    """Each batch of ``inner`` as two micro batches (first half, second half)."""

    def __init__(self, inner: FixedBatches) -> None:
        self.inner = inner

    def __iter__(self):
        for batch in self.inner:
            n = batch["lr"].shape[0] // 2
            yield {k: v[:n] for k, v in batch.items()}
            yield {k: v[n:] for k, v in batch.items()}


TINY = [
    "model.generator.nf=8",
    "model.generator.gc=4",
    "data.patch_size=8",
    "data.batch_size=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every=1",
    "logging.image_every=0",
    "val.dir=null",
    "checkpoint.every=0",
    "train.ema_decay=null",
]
D32 = ["model.discriminators.{}.nf=4", "model.discriminators.{}.input_size=32"]


def method_overrides(method: str, nse_path: str) -> tuple[str, list[str]]:
    """(config file, overrides) for a tiny run of `method`."""
    spsr = ["model.generator.nb=2", "model.generator.taps=[0,1]"]
    if method == "psnr":
        return "tiny_psnr.yaml", ["model.generator.nb=1"]
    if method == "esrgan":
        return "esrgan.yaml", [
            "model.generator.pretrained=null",
            "model.generator.nb=1",
            "perceptual.random_weights=true",
            *(o.format("image") for o in D32),
        ]
    if method in ("spsr_g", "spsr_g_no_grad_gan"):
        ovs = [
            "model.generator.pretrained=null",
            *spsr,
            "perceptual.random_weights=true",
            "train.fusion_warmup_steps=2",
            *(o.format("image") for o in D32),
        ]
        if method == "spsr_g":
            return "spsr_g.yaml", ovs + [o.format("gradient") for o in D32]
        return "spsr_g_no_grad_gan.yaml", ovs
    if method in ("spsr_p", "spsr_j"):
        return f"{method}.yaml", [
            "model.generator.pretrained=null",
            *spsr,
            "perceptual.random_weights=true",
            f"model.nse.pretrained={nse_path}",
            "model.discriminators.structure.nf=4",
            "model.discriminators.structure.input_size=8",
            "train.fusion_warmup_steps=0",
        ]
    if method == "edsr_g":
        return "edsr_g.yaml", [
            "model.generator.pretrained=null",  # the config starts from the PSNR EDSR export
            "model.generator.nb=1",
            "perceptual.random_weights=true",
            *(o.format("image") for o in D32),
            *(o.format("gradient") for o in D32),
        ]
    raise ValueError(method)


def _cfg(name: str, overrides: list[str], run_dir: Path):
    from spsr_hpc.config import load_config

    return load_config(CONFIGS / name, [*TINY, *overrides, f"logging.run_dir={run_dir}"])


def _params(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for ename, e in trainer.engines.items():
        for k, v in e.module.state_dict().items():
            out[f"{ename}.{k}"] = v.detach().clone()
    return out


def _optim_state(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for ename, e in trainer.engines.items():
        sd = e.optimizer.state_dict()
        state = sd.get("state", sd.get("base_optimizer_state", {}).get("state", {}))
        for pid, st in state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"{ename}.{pid}.{k}"] = v.detach().clone()
    return out


def _losses(run_dir: Path) -> list[dict]:
    from spsr_hpc.train.logging import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "loss/g_total" in r]


def worker_ws2(out: Path) -> None:
    """2 ranks: tiny PSNR RRDB on fixed batches under ZeRO 0, 1, 2."""
    from spsr_hpc import distributed as sdist
    from spsr_hpc.train.trainer import Trainer

    rank, world = sdist.get_rank(), sdist.get_world_size()
    for stage in (0, 1, 2):
        cfg = _cfg(
            "tiny_psnr.yaml",
            [
                "model.generator.nb=1",
                f"deepspeed.zero_stage={stage}",
                f"train.max_steps={STEPS}",
                "data.batch_size=2",
            ],
            out / f"ws2_z{stage}",
        )
        t = Trainer(cfg, loader=FixedBatches(STEPS, 2, rank, world))
        t.fit()
        t.close()
        if rank == 0:
            torch.save(_params(t), out / f"ws2_z{stage}.pt")
            if stage == 0:  # ZeRO 1/2 keep flat, partitioned optimizer states
                torch.save(_optim_state(t), out / "ws2_z0_opt.pt")
    # GAN + fusion warm-up under ZeRO 0 and 2 (parameters frozen after deepspeed.initialize).
    name, ovs = method_overrides("spsr_g", "")
    for stage in (0, 2):
        cfg = _cfg(name, [*ovs, f"deepspeed.zero_stage={stage}", "train.max_steps=3"], out / f"warm_z{stage}")
        t = Trainer(cfg, loader=FixedBatches(3, 2, rank, world))
        snaps = [_params(t)]
        for _ in range(3):
            t.train_step()
            snaps.append(_params(t))
        t.close()
        if rank == 0:
            torch.save({"init": snaps[0], "warm": snaps[2], "after": snaps[3]}, out / f"warm_z{stage}.pt")


def worker_single(out: Path) -> None:
    """1 process: the reference for ws2, exact resume, every method, half-written checkpoints,
    signals and non-finite losses."""
    import dataclasses

    from safetensors.torch import save_file

    from spsr_hpc.models import NSEConfig, build_generator, build_nse, load_pretrained
    from spsr_hpc.train.guards import NonFiniteLossError
    from spsr_hpc.train.logging import read_jsonl
    from spsr_hpc.train.trainer import Trainer

    results: dict = {}
    # Reference for the 2-rank run: one rank, twice the batch, the same samples.
    cfg = _cfg(
        "tiny_psnr.yaml",
        ["model.generator.nb=1", f"train.max_steps={STEPS}", "data.batch_size=4"],
        out / "ws1",
    )
    t = Trainer(cfg, loader=FixedBatches(STEPS, 4, 0, 1))
    torch.save(_params(t), out / "ws1_init.pt")
    t.fit()
    t.close()
    torch.save(_params(t), out / "ws1.pt")
    torch.save(_optim_state(t), out / "ws1_opt.pt")

    # Gradient accumulation: 2 micro batches of 2 == 1 batch of 4 (same samples).
    cfg = _cfg(
        "tiny_psnr.yaml",
        ["model.generator.nb=1", f"train.max_steps={STEPS}", "data.batch_size=2", "train.grad_accum=2"],
        out / "accum",
    )
    t = Trainer(cfg, loader=HalfBatches(FixedBatches(STEPS, 4, 0, 1)))
    t.fit()
    t.close()
    torch.save(_params(t), out / "accum.pt")
    torch.save(_optim_state(t), out / "accum_opt.pt")

    # Exact resume: SPSR-G (G + 2 D engines, EMA, fusion warm-up ending at step 2).
    name, ovs = method_overrides("spsr_g", "")
    ovs = [*ovs, "train.ema_decay=0.9", f"train.max_steps={STEPS}"]
    straight = Trainer(_cfg(name, ovs, out / "straight"), loader=FixedBatches(STEPS, 2, 0, 1))
    straight.fit()
    straight.close()
    half = Trainer(
        _cfg(name, [*ovs, f"train.max_steps={STEPS // 2}"], out / "resumed"),
        loader=FixedBatches(STEPS, 2, 0, 1),
    )
    half.fit()
    half.close()
    resumed = Trainer(_cfg(name, ovs, out / "resumed"), loader=FixedBatches(STEPS, 2, 0, 1))
    results["resumed_from_step"] = resumed.step
    resumed.fit()
    resumed.close()
    torch.save(
        {
            "straight": _params(straight),
            "resumed": _params(resumed),
            "straight_opt": _optim_state(straight),
            "resumed_opt": _optim_state(resumed),
            "straight_ema": straight.ema.shadow,
            "resumed_ema": resumed.ema.shadow,
        },
        out / "resume.pt",
    )
    results["straight_losses"] = _losses(out / "straight")
    results["resumed_losses"] = _losses(out / "resumed")
    results["straight_lr"] = [e.optimizer.param_groups[0]["lr"] for e in straight.engines.values()]
    results["resumed_lr"] = [e.optimizer.param_groups[0]["lr"] for e in resumed.engines.values()]

    # Export loads into a fresh generator.
    fresh = build_generator(dataclasses.replace(straight.cfg.model.generator, pretrained=None))
    report = load_pretrained(fresh, out / "straight" / "generator.safetensors")
    exported = {k: v for k, v in fresh.state_dict().items()}
    live = straight.g_engine.module.state_dict()
    results["export_matches"] = all(torch.equal(exported[k], live[k].float()) for k in live)
    results["export_report"] = str(report)

    # Half-written newest checkpoint: a .tmp folder and a folder without meta.json.
    ck = out / "resumed" / "checkpoints"
    for bad in ("step_0000009.tmp", "step_0000010"):
        (ck / bad / "generator").mkdir(parents=True)
        (ck / bad / "trainer.pt").write_bytes(b"garbage")
    again = Trainer(
        _cfg(name, [*ovs, f"train.max_steps={STEPS + 1}"], out / "resumed"),
        loader=FixedBatches(STEPS + 1, 2, 0, 1),
    )
    results["after_partial_resumed_from"] = again.step
    again.close()

    # Every method: a few steps, each term finite in metrics.jsonl.
    nse = build_nse(NSEConfig())
    nse_path = out / "nse.safetensors"
    save_file({k: v.contiguous() for k, v in nse.state_dict().items()}, str(nse_path))
    results["methods"] = {}

    val_dir = write_val_images(out / "val")
    for method in ("psnr", "esrgan", "spsr_g_no_grad_gan", "spsr_p", "spsr_j", "edsr_g"):
        name, m_ovs = method_overrides(method, str(nse_path))
        run_dir = out / f"m_{method}"
        extra = [f"val.dir={val_dir}", "val.every=2", "val.max_size=32"] if method == "psnr" else []
        tr = Trainer(
            _cfg(name, [*m_ovs, "train.max_steps=2", "logging.image_every=2", *extra], run_dir),
            loader=FixedBatches(2, 2, 0, 1),
        )
        tr.fit()
        tr.close()
        results["methods"][method] = {
            "terms": list(tr.objective.terms),
            "d": list(tr.objective.discriminator_names),
            "records": _losses(run_dir),
            "val": [
                {k: v for k, v in r.items() if k.startswith("val/")}
                for r in read_jsonl(run_dir / "metrics.jsonl")
                if "val/psnr" in r
            ],
            "images": sorted(p.name for p in (run_dir / "images").iterdir()),
        }

    # SIGTERM during step 2: the step finishes, a checkpoint is written, the run returns.
    def send_term(i, batch):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    name, m_ovs = method_overrides("psnr", "")
    tr = Trainer(
        _cfg(name, [*m_ovs, "train.max_steps=50"], out / "signal"),
        loader=FixedBatches(5, 2, 0, 1, hook=send_term),
    )
    summary = tr.fit()
    tr.close()
    results["signal"] = {
        "step": summary["step"],
        "stopped_by": summary["stopped_by"],
        "checkpoint": summary["checkpoint"],
    }

    # Non-finite loss at step 3: stop (naming step, term, last good checkpoint) or skip.
    def poison(i, batch):
        if i == 2:
            return {"lr": batch["lr"] * float("nan"), "hr": batch["hr"]}

    for mode in ("stop", "skip"):
        tr = Trainer(
            _cfg(
                name,
                [*m_ovs, "train.max_steps=4", "checkpoint.every=1", f"train.on_nonfinite={mode}"],
                out / f"nan_{mode}",
            ),
            loader=FixedBatches(4, 2, 0, 1, hook=poison),
        )
        try:
            summary = tr.fit()
            results[f"nan_{mode}"] = {"finished": summary["step"], "skipped": tr.skipped_total}
        except NonFiniteLossError as e:
            results[f"nan_{mode}"] = {
                "error": str(e),
                "step": e.step,
                "term": e.term,
                "last": e.last_checkpoint,
            }
        finally:
            tr.close()
    (out / "single.json").write_text(json.dumps(results, default=str))


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRITON_INTERPRET="1")
    return env


def write_val_images(val_dir: Path) -> Path:
    """Two random RGB validation images (40x52 and 36x36, img0.png / img1.png) in a new folder."""
    from PIL import Image

    val_dir.mkdir()
    g = torch.Generator().manual_seed(5)
    for i, (h, w) in enumerate([(40, 52), (36, 36)]):
        img = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(val_dir / f"img{i}.png")
    return val_dir


def run_workers(script: str, out: Path, timeout: float, *, keep_logs: tuple[str, ...] = ()) -> None:
    """Run a test file's two worker sides at once: ``ws2`` under torchrun (2 ranks, gloo) and
    ``single`` (one process), each as ``<script> <side> <out>``; fail naming the side and its log
    tail when one exits non-zero. ``keep_logs``: sides whose output is saved as ``<out>/<side>.log``
    (before the check, so it is there for a failing run too)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = {
        "ws2": [str(torchrun), "--standalone", "--nproc_per_node", "2", script, "ws2", str(out)],
        "single": [sys.executable, script, "single", str(out)],
    }
    procs = {
        k: subprocess.Popen(a, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
        for k, a in argv.items()
    }
    logs = {k: p.communicate(timeout=timeout)[0] for k, p in procs.items()}
    for k in keep_logs:
        (out / f"{k}.log").write_text(logs[k])
    for k, p in procs.items():
        if p.returncode != 0:
            pytest.fail(f"{k} worker failed (rc {p.returncode}):\n{logs[k][-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    run_workers(__file__, out, 900)
    return out


pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_ranks_match_one_rank_with_twice_the_batch(runs):
    ref = torch.load(runs / "ws1.pt", weights_only=True)
    for stage in (0, 1, 2):
        got = torch.load(runs / f"ws2_z{stage}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(
                got[k], ref[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k, s=stage: f"ZeRO {s} {k}: {m}"
            )
    _assert_same_adam_moments(runs / "ws2_z0_opt.pt", runs / "ws1_opt.pt")
    # The run must have moved the weights, or the comparison proves nothing.
    init = torch.load(runs / "ws1_init.pt", weights_only=True)
    assert all(not torch.equal(init[k], ref[k]) for k in ref if k.endswith("weight"))


def test_gradient_accumulation_matches_one_big_batch(runs):
    ref = torch.load(runs / "ws1.pt", weights_only=True)
    got = torch.load(runs / "accum.pt", weights_only=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)
    _assert_same_adam_moments(runs / "accum_opt.pt", runs / "ws1_opt.pt")


def _assert_same_adam_moments(a: Path, b: Path) -> None:
    # Adam's update hides a wrong gradient scale (m / sqrt(v)); its moments do not.
    got, ref = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    moments = [k for k in ref if k.endswith("exp_avg") or k.endswith("exp_avg_sq")]
    assert moments and got.keys() == ref.keys()
    for k in moments:
        torch.testing.assert_close(got[k], ref[k], atol=1e-12, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("stage", [0, 2])
def test_fusion_warmup_trains_only_fusion_then_everything(runs, stage):
    snaps = torch.load(runs / f"warm_z{stage}.pt", weights_only=True)
    init, warm, after = snaps["init"], snaps["warm"], snaps["after"]
    g_params = [k for k in init if k.startswith("generator.") and k.endswith(".weight")]
    fusion = [k for k in g_params if k.startswith("generator.f_")]
    others = [k for k in g_params if not k.startswith("generator.f_") and "get_g_nopadding" not in k]
    assert fusion and others
    assert all(not torch.equal(init[k], warm[k]) for k in fusion)
    assert all(torch.equal(init[k], warm[k]) for k in others), "non-fusion weights moved during warm-up"
    assert all(not torch.equal(warm[k], after[k]) for k in others), "weights frozen after the warm-up"
    d_keys = [k for k in init if k.startswith("d_") and k.endswith(".weight")]
    assert all(not torch.equal(init[k], warm[k]) for k in d_keys)


def test_resume_is_exact(runs):
    res = json.loads((runs / "single.json").read_text())
    assert res["resumed_from_step"] == STEPS // 2
    state = torch.load(runs / "resume.pt", weights_only=True)
    for part in ("", "_opt", "_ema"):
        a, b = state[f"straight{part}"], state[f"resumed{part}"]
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part or 'params'} differ at {k}"
    assert res["straight_losses"][STEPS // 2 :] == res["resumed_losses"][STEPS // 2 :]
    assert res["straight_lr"] == res["resumed_lr"]
    assert res["export_matches"], res["export_report"]


def test_half_written_newest_checkpoint_is_ignored(runs):
    res = json.loads((runs / "single.json").read_text())
    assert res["after_partial_resumed_from"] == STEPS


EXPECTED_TERMS = {
    "psnr": (["pixel"], []),
    "esrgan": (["pixel", "perceptual", "image_gan"], ["image"]),
    "spsr_g_no_grad_gan": (["pixel", "perceptual", "image_gan", "gradient_pixel", "branch_pixel"], ["image"]),
    "spsr_p": (["pixel", "perceptual", "branch_pixel", "structure_pixel", "structure_gan"], ["structure"]),
    "spsr_j": (["pixel", "perceptual", "branch_pixel", "structure_pixel", "structure_gan"], ["structure"]),
    "edsr_g": (["pixel", "perceptual", "image_gan", "gradient_pixel", "gradient_gan"], ["image", "gradient"]),
}


@pytest.mark.parametrize("method", sorted(EXPECTED_TERMS))
def test_each_method_logs_every_term_finite(runs, method):
    res = json.loads((runs / "single.json").read_text())["methods"][method]
    terms, ds = EXPECTED_TERMS[method]
    assert res["terms"] == terms and res["d"] == ds
    assert len(res["records"]) == 2
    for rec in res["records"]:
        expected = {
            "loss/g_total",
            *(f"loss/g/{t}" for t in terms),
            *(f"loss/d_{d}/{k}" for d in ds for k in ("d_loss", "d_real", "d_fake")),
        }
        assert set(rec) == expected
        assert all(isinstance(v, float) and abs(v) < float("inf") for v in rec.values()), rec
        total = sum(rec[f"loss/g/{t}"] for t in terms)
        assert abs(total - rec["loss/g_total"]) <= 1e-5 * max(1.0, abs(total))
    assert res["images"] == ["lr_sr_hr_step_0000002.png"]


def test_validation_psnr_ssim_match_an_independent_computation(runs):
    import numpy as np
    from PIL import Image

    from spsr_hpc.data import imresize, to_uint8
    from spsr_hpc.metrics import psnr, ssim
    from spsr_hpc.models import GeneratorConfig, build_generator, load_pretrained

    val = json.loads((runs / "single.json").read_text())["methods"]["psnr"]["val"]
    assert len(val) == 1
    model = build_generator(GeneratorConfig(name="rrdbnet", nf=8, nb=1, gc=4)).eval()
    load_pretrained(model, runs / "m_psnr" / "generator.safetensors")  # the weights at step 2
    ps, ss = [], []
    for name in ("img0.png", "img1.png"):
        hr = np.asarray(Image.open(runs / "val" / name))
        hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
        lr = to_uint8(imresize(hr.astype(np.float64) / 255.0, 0.25))
        h, w = min(lr.shape[0], 8), min(lr.shape[1], 8)  # val.max_size=32 -> 8 LR pixels, centred
        y, x = (lr.shape[0] - h) // 2, (lr.shape[1] - w) // 2
        lr, hr = lr[y : y + h, x : x + w], hr[4 * y : 4 * (y + h), 4 * x : 4 * (x + w)]
        with torch.no_grad():
            sr = model(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255).sr[0]
        sr = to_uint8(sr.clamp(0, 1).permute(1, 2, 0).numpy())
        ps.append(psnr(sr, hr, 4))
        ss.append(ssim(sr, hr, 4))
    assert val[0]["val/psnr"] == pytest.approx(float(np.mean(ps)), abs=1e-6)
    assert val[0]["val/ssim"] == pytest.approx(float(np.mean(ss)), abs=1e-6)


def test_resume_run_covers_both_discriminators(runs):
    res = json.loads((runs / "single.json").read_text())
    rec = res["straight_losses"][0]
    assert {
        "loss/g/gradient_gan",
        "loss/g/image_gan",
        "loss/d_gradient/d_loss",
        "loss/d_image/d_loss",
    } <= set(rec)


def test_sigterm_checkpoints_at_the_next_step_boundary(runs):
    res = json.loads((runs / "single.json").read_text())["signal"]
    assert res["stopped_by"] == "SIGTERM"
    assert res["step"] == 2
    assert res["checkpoint"].endswith("step_0000002")
    assert (Path(res["checkpoint"]) / "meta.json").is_file()


def test_nonfinite_loss_stops_naming_step_term_and_checkpoint(runs):
    res = json.loads((runs / "single.json").read_text())
    stop = res["nan_stop"]
    assert stop["step"] == 3 and stop["term"] == "generator/g_total"
    assert stop["last"].endswith("step_0000002")
    assert "step 3" in stop["error"] and "step_0000002" in stop["error"]
    assert res["nan_skip"] == {"finished": 4, "skipped": 1}


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"ws2": worker_ws2, "single": worker_single}[sys.argv[1]](Path(sys.argv[2]))
