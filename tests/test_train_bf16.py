"""bf16 training (``train.bf16=true``: bf16 autocast on fp32 DeepSpeed engines, docs/training.md
"Precision"), on this CPU (native bf16: avx512_bf16 / AMX; the tests skip on a CPU without it).

Two subprocesses started once per module (this file doubles as their worker script, reusing
tests/test_train.py's batches and tiny configs):

* ``ws2`` (torchrun, 2 ranks, gloo): tiny SPSR-G in bf16 with channels_last + fused Adam +
  sync_bn + EMA: 4 steps straight vs 2 steps, save, resume, 2 more (bit-exact);
  fp32 export; then ZeRO 2 with grad accumulation and on_nonfinite=skip.
* ``single`` (one process): tiny SPSR-R in bf16, straight vs resumed, export; every method's
  engines walked for the dtype contract; the first step of each method in fp32 and in bf16.

Both failed on the code before bf16 on CPU existed (config refused train.bf16 on CPU; the
DeepSpeed bf16 engine it asked for crashed in the discriminator BatchNorm).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import FixedBatches, _cfg, _losses, _optim_state, _params, method_overrides, run_workers

from spsr_hpc.precision import cpu_bf16_native

STEPS = 4
U_BF16 = 2.0**-8  # bf16 unit roundoff: 8 significand bits (7 stored)
BF16 = ["train.bf16=true"]
SMALL_VGG = ["perceptual.layer=conv2_2"]  # the random VGG19 cut early: cheaper to build and run
SPSR_R = [  # configs/tiny_spsr_r.yaml at test_train's tiny size
    "model.generator.nb=2",
    "model.generator.taps=[0,1]",
    "model.discriminators.structure.nf=4",
    "model.discriminators.structure.input_size=8",
    "model.nse.width=8",
    "train.fusion_warmup_steps=2",
]
# Method -> (config, overrides) of the dtype-contract and first-step comparisons.
CONTRACT_METHODS = ("psnr", "esrgan", "spsr_g", "spsr_g_no_grad_gan", "spsr_r", "spsr_j")


def _method(method: str, nse_path: str) -> tuple[str, list[str]]:
    if method == "spsr_r":
        return "tiny_spsr_r.yaml", [*SPSR_R, *SMALL_VGG]
    name, ovs = method_overrides(method, nse_path)
    return name, [*ovs, *SMALL_VGG]


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


def _resume_pair(name: str, ovs: list[str], out: Path, tag: str, rank: int, world: int) -> dict:
    """Straight STEPS vs STEPS/2 + resume; returns what the tests compare (rank 0 saves tensors)."""
    from safetensors.torch import load_file

    from spsr_hpc.train.trainer import Trainer

    straight = Trainer(_cfg(name, [*ovs, f"train.max_steps={STEPS}"], out / f"{tag}_straight"),
                       loader=FixedBatches(STEPS, 2, rank, world))
    straight.fit()
    straight.close()
    half = Trainer(_cfg(name, [*ovs, f"train.max_steps={STEPS // 2}"], out / f"{tag}_resumed"),
                   loader=FixedBatches(STEPS, 2, rank, world))
    half.fit()
    half.close()
    resumed = Trainer(_cfg(name, [*ovs, f"train.max_steps={STEPS}"], out / f"{tag}_resumed"),
                      loader=FixedBatches(STEPS, 2, rank, world))
    resumed_from = resumed.step
    resumed.fit()
    resumed.close()
    res: dict = {"resumed_from": resumed_from}
    if rank == 0:
        torch.save({
            "straight": _params(straight), "resumed": _params(resumed),
            "straight_opt": _optim_state(straight), "resumed_opt": _optim_state(resumed),
            "straight_ema": straight.ema.shadow, "resumed_ema": resumed.ema.shadow,
        }, out / f"{tag}_resume.pt")  # fmt: skip
        res["straight_losses"] = _losses(out / f"{tag}_straight")
        res["resumed_losses"] = _losses(out / f"{tag}_resumed")
        exported = load_file(str(out / f"{tag}_straight" / "generator.safetensors"))
        live = straight.g_engine.module.state_dict()
        res["export_dtypes"] = sorted({str(v.dtype) for v in exported.values()})
        res["export_equal"] = all(torch.equal(exported[k], live[k]) for k in live)
        ema = load_file(str(out / f"{tag}_straight" / "generator_ema.safetensors"))
        res["ema_export_dtypes"] = sorted({str(v.dtype) for v in ema.values()})
    return res


def worker_ws2(out: Path) -> None:
    from spsr_hpc import distributed as sdist
    from spsr_hpc.train.trainer import Trainer

    rank, world = sdist.get_rank(), sdist.get_world_size()
    name, ovs = _method("spsr_g", "")
    ovs = [*ovs, *BF16, "train.ema_decay=0.9", "train.channels_last=true", "optim.fused=true",
           # Both Ds sync_bn: per-rank BatchNorm statistics are averaged into the checkpoint, so
           # without it a 2-rank resume is not bit-exact in fp32 either.
           "model.discriminators.image.sync_bn=true", "model.discriminators.gradient.sync_bn=true"]
    results = {"spsr_g": _resume_pair(name, ovs, out, "ws2", rank, world)}
    # ZeRO 2 + grad accumulation + skip-on-nonfinite in bf16; batch 1 of 2 poisoned on rank 1.
    def poison(i, batch):
        if i == 1 and rank == 1:
            return {"lr": batch["lr"] * float("nan"), "hr": batch["hr"]}
        return None

    name, ovs = _method("spsr_g", "")
    cfg = _cfg(name, [*ovs, *BF16, "deepspeed.zero_stage=2", "train.grad_accum=2", "train.on_nonfinite=skip",
                      "train.max_steps=2"], out / "z2")
    t = Trainer(cfg, loader=FixedBatches(4, 2, rank, world, hook=poison))
    init = _params(t)
    summary = t.fit()
    t.close()
    after = _params(t)
    if rank == 0:
        results["z2"] = {
            "skipped": summary["skipped_steps"], "step": summary["step"],
            "dtypes": sorted({str(v.dtype) for k, v in after.items() if v.is_floating_point()}),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values() if v.is_floating_point()),
            "moved": any(not torch.equal(init[k], after[k]) for k in init if k.endswith("weight")),
        }  # fmt: skip
        (out / "ws2.json").write_text(json.dumps(results))


def _contract(trainer) -> dict:
    """One bf16 step of ``trainer`` with hooks: what every module computed in, what it holds."""
    from torch import nn

    obj = trainer.objective
    groups = {n: e.module for n, e in trainer.engines.items()}
    if obj.perceptual is not None:
        groups["perceptual"] = obj.perceptual
    if obj.nse is not None:
        groups["nse"] = obj.nse
    out_dtypes: dict[str, set] = {g: set() for g in groups}
    bn_out: set = set()
    grad_dtypes: dict[str, set] = {n: set() for n in trainer.engines}
    layers: set[int] = set()
    out_max = {"d": 0.0, "features": 0.0}
    handles = []
    for g, mod in groups.items():
        for m in mod.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                def hook(m, i, o, g=g):
                    out_dtypes[g].add(str(o.dtype))
                    if o.dtype == torch.bfloat16:
                        layers.add(id(m))
                handles.append(m.register_forward_hook(hook))
            elif isinstance(m, nn.BatchNorm2d):
                handles.append(m.register_forward_hook(lambda m, i, o: bn_out.add(str(o.dtype))))
        key = "d" if g.startswith("d_") else ("features" if g in ("perceptual", "nse") else None)
        if key is not None:
            target = mod.features if g == "perceptual" else mod

            def top(m, i, o, key=key):
                out_max[key] = max(out_max[key], float(o.detach().float().abs().max()))

            handles.append(target.register_forward_hook(top))
    for n, e in trainer.engines.items():
        for p in e.module.parameters():
            if not p.requires_grad:  # the fusion warm-up freezes the generator's trunk
                continue
            handles.append(
                p.register_post_accumulate_grad_hook(lambda p, n=n: grad_dtypes[n].add(str(p.grad.dtype)))
            )
    term_dtypes: dict[str, str] = {}
    check = trainer._check

    def spy(values):
        term_dtypes.update({k: str(v.dtype) for k, v in values.items()})
        return check(values)

    trainer._check = spy
    metrics = trainer.train_step()
    trainer._check = check
    for h in handles:
        h.remove()
    return {
        "metrics": metrics,
        "out_dtypes": {g: sorted(v) for g, v in out_dtypes.items()},
        "bn_out": sorted(bn_out),
        "grad_dtypes": {n: sorted(v) for n, v in grad_dtypes.items()},
        "param_dtypes": {n: sorted({str(p.dtype) for p in e.module.parameters()})
                         for n, e in trainer.engines.items()},
        "buffer_dtypes": {n: sorted({str(b.dtype) for b in e.module.buffers() if b.is_floating_point()})
                          for n, e in trainer.engines.items()},
        "optim_dtypes": sorted({str(v.dtype) for v in _optim_state(trainer).values()
                                if v.is_floating_point()}),
        "frozen_bn_buffers": sorted({str(b.dtype) for g in ("perceptual", "nse") if g in groups
                                     for b in groups[g].buffers() if b.is_floating_point()}),
        "term_dtypes": term_dtypes,
        "ds_bf16": [e.bfloat16_enabled() for e in trainer.engines.values()],
        "ds_autocast": [e.torch_autocast_enabled() for e in trainer.engines.values()],
        "comm_dtype_params": sum(hasattr(p, "comm_dtype") for e in trainer.engines.values()
                                 for p in e.module.parameters()),
        "ema_dtypes": sorted({str(v.dtype) for v in trainer.ema.shadow.values()}) if trainer.ema else [],
        "bf16_layers": len(layers),
        "out_max": out_max,
    }  # fmt: skip


def worker_single(out: Path) -> None:
    from safetensors.torch import save_file

    from spsr_hpc.models import NSEConfig, build_nse
    from spsr_hpc.train.trainer import Trainer

    results: dict = {}
    name, ovs = _method("spsr_r", "")
    results["spsr_r"] = _resume_pair(name, [*ovs, *BF16, "train.ema_decay=0.9"], out, "r", 0, 1)

    nse_path = out / "nse.safetensors"
    nse = build_nse(NSEConfig())
    save_file({k: v.contiguous() for k, v in nse.state_dict().items()}, str(nse_path))
    results["methods"] = {}
    for method in CONTRACT_METHODS:
        name, ovs = _method(method, str(nse_path))
        ovs = [*ovs, "train.max_steps=1", "train.ema_decay=0.9"]
        fp32 = Trainer(_cfg(name, ovs, out / f"c32_{method}"), loader=FixedBatches(1, 2, 0, 1))
        m32 = fp32.train_step()
        fp32.close()
        bf = Trainer(_cfg(name, [*ovs, *BF16], out / f"c16_{method}"), loader=FixedBatches(1, 2, 0, 1))
        res = _contract(bf)
        bf.close()
        res["fp32_metrics"] = m32
        res["weights"] = {t: bf.objective.weights[t] for t in bf.objective.weights}
        results["methods"][method] = res
    (out / "single.json").write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(not cpu_bf16_native() and not torch.cuda.is_available(), reason="no native bf16"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    run_workers(__file__, out, 900)
    return out


def _assert_resume_exact(runs: Path, tag: str, res: dict) -> None:
    assert res["resumed_from"] == STEPS // 2
    state = torch.load(runs / f"{tag}_resume.pt", weights_only=True)
    for part in ("", "_opt", "_ema"):
        a, b = state[f"straight{part}"], state[f"resumed{part}"]
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), f"{tag}: {part or 'params'} differ at {k}"
            if a[k].is_floating_point():
                assert a[k].dtype == torch.float32, f"{tag}: {k} is {a[k].dtype}"
    assert res["straight_losses"][STEPS // 2 :] == res["resumed_losses"][STEPS // 2 :]
    assert len(res["straight_losses"]) == STEPS
    assert res["export_dtypes"] == ["torch.float32"] and res["ema_export_dtypes"] == ["torch.float32"]
    assert res["export_equal"], "the export is not the trained fp32 weights"


def test_two_rank_spsr_g_bf16_resumes_bit_exact_and_exports_fp32(runs):
    _assert_resume_exact(runs, "ws2", json.loads((runs / "ws2.json").read_text())["spsr_g"])


def test_spsr_r_bf16_resumes_bit_exact_and_exports_fp32(runs):
    _assert_resume_exact(runs, "r", json.loads((runs / "single.json").read_text())["spsr_r"])


def test_zero2_accumulation_and_skip_in_bf16(runs):
    z2 = json.loads((runs / "ws2.json").read_text())["z2"]
    # The poisoned micro batch (rank 1, step 1) skips that window on both ranks; step 2 trains.
    assert z2["step"] == 2 and z2["skipped"] == 1
    assert z2["dtypes"] == ["torch.float32"] and z2["finite"] and z2["moved"]


@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_dtype_contract(runs, method):
    """docs/training.md, "Precision": what is bf16 and what stays fp32 under train.bf16=true."""
    res = json.loads((runs / "single.json").read_text())["methods"][method]
    f32, b16 = ["torch.float32"], ["torch.bfloat16"]
    for name in res["param_dtypes"]:
        assert res["param_dtypes"][name] == f32, name  # masters are the fp32 weights
        assert res["grad_dtypes"][name] == f32, name  # grads accumulate (and all-reduce) in fp32
        assert res["buffer_dtypes"][name] in ([], f32), name  # BatchNorm running statistics
        assert res["out_dtypes"][name] == b16, f"{name} did not compute in bf16: {res['out_dtypes'][name]}"
    for frozen in ("perceptual", "nse"):
        if frozen in res["out_dtypes"]:
            assert res["out_dtypes"][frozen] == b16, frozen
    assert res["frozen_bn_buffers"] in ([], f32)
    assert res["optim_dtypes"] == f32 and res["ema_dtypes"] == f32
    assert set(res["term_dtypes"].values()) == {"torch.float32"}, res["term_dtypes"]  # every loss in fp32
    if any(n.startswith("d_") for n in res["param_dtypes"]) or method in ("spsr_r", "spsr_j"):
        assert res["bn_out"], "no BatchNorm ran"
    # fp32 DeepSpeed engines, DeepSpeed's autocast on (so that its forward does not turn a CUDA
    # autocast off), and no parameter marked for bf16 gradient communication.
    assert not any(res["ds_bf16"]) and all(res["ds_autocast"]) and res["comm_dtype_params"] == 0


@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_first_step_losses_bf16_vs_fp32(runs, method):
    """The first step's loss terms in bf16 and fp32 (same weights, same batch) agree within

        |l_bf16 - l_fp32| <= L * u * (|l_fp32| + w * A)

    derived from bf16's unit roundoff u = 2^-8: every bf16 convolution or linear layer rounds
    its input and weight once each (2 x 2^-9) and accumulates in fp32, so to first order it
    adds a relative error u to its output, and L layers in series at most L * u (L = the number
    of distinct layers that ran in bf16 in this step: a bound on the depth of any path). A term
    is w x a mean of an L1, MSE or BCE-with-logits of network outputs (slope <= 1 in outputs
    of magnitude <= A, or 2A for MSE, counted in the factor), so its error is bounded by
    L * u relative to the value plus w * A * L * u absolute; the absolute part covers terms that
    are differences of nearly equal outputs (the random VGG's features, logits at init).
    A = max(1, the largest |D logit| and |feature| seen, 2 x 2^1.5 for the gradient maps).
    The d_real / d_fake logit means are not losses and are not compared.
    """
    res = json.loads((runs / "single.json").read_text())["methods"][method]
    b16, f32 = res["metrics"], res["fp32_metrics"]
    assert b16.keys() == f32.keys()
    lu = res["bf16_layers"] * U_BF16
    amp = max(1.0, 2 * 2**1.5, *res["out_max"].values())
    weights = res["weights"]
    compared = 0
    for k, ref in f32.items():
        if k.endswith("/d_real") or k.endswith("/d_fake"):
            continue
        term = k.split("/")[-1]
        if k.startswith("loss/g/"):
            w = weights[term]
        else:
            w = sum(weights.values()) if k == "loss/g_total" else 1.0
        tol = lu * (abs(ref) + 2 * w * amp)
        assert math.isfinite(b16[k]) and abs(b16[k] - ref) <= tol, f"{k}: bf16 {b16[k]} fp32 {ref} tol {tol}"
        compared += 1
    assert compared >= 2
    # bf16 really ran: at least one term differs from fp32. (Not for psnr: at init the RRDB's
    # output is ~1e-4, so its one term, L1(SR, HR), is mean |HR| to fp32 precision either way;
    # test_dtype_contract shows that its generator computed in bf16.)
    if method != "psnr":
        assert any(b16[k] != f32[k] for k in f32), "bf16 and fp32 losses are identical"


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"ws2": worker_ws2, "single": worker_single}[sys.argv[1]](Path(sys.argv[2]))
