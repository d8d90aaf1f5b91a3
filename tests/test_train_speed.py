"""The faster training step keeps the maths: trainer vs a plain eager re-implementation.

The re-implementation is the benchmark baseline (spsr_hpc/bench/train_reference.py): torch
Adam without fused kernels, per-channel convolution gradient maps, no DeepSpeed, separate G and
D forwards, no reuse. Our step (fused Adam, no single-rank all-reduce, D inputs reused from the
G step, optionally channels_last) must give the same losses, parameters and BatchNorm
statistics after a few steps, within fp32 tolerance. Tiny nets, HR 64 patches (batch 4, so that
the discriminators' BatchNorm over their 2x2 final maps does not amplify rounding), one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spsr_hpc.bench.train_reference import PerChannelGradient, ReferenceSPSRStep
from spsr_hpc.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _batches(n: int = STEPS, per_rank: int = 4, lr_size: int = 16, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        hr = torch.rand(per_rank, 3, lr_size * 4, lr_size * 4, generator=g)
        out.append({"lr": torch.nn.functional.avg_pool2d(hr, 4), "hr": hr})
    return out


def _config(tmp_path: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny_spsr_g.yaml",
        [
            f"logging.run_dir={tmp_path}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.image_every=0",
            "checkpoint.every=0",
            "checkpoint.resume=none",
            "train.fusion_warmup_steps=0",
            "train.ema_decay=null",
            "train.device=cpu",
            # Non-constant SR at the start: the image D (BatchNorm) would amplify rounding noise of
            # a constant image into different logits.
            "model.generator.init_scale=1.0",
            *extra,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    from spsr_hpc.train.engines import destroy_distributed

    destroy_distributed()


def _named_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics included), except the LR stencils."""
    state = dict(module.named_parameters())
    state.update({k: v for k, v in module.named_buffers() if "get_g_nopadding" not in k})
    return state


def _compare(tmp_path: Path, *extra: str) -> None:
    from spsr_hpc.train.trainer import Trainer

    batches = _batches()
    trainer = Trainer(_config(tmp_path, *extra), loader=list(batches))
    ref = ReferenceSPSRStep.from_trainer(trainer)
    for i, batch in enumerate(batches):
        ours = trainer.train_step()
        theirs = ref.step(batch["lr"], batch["hr"])
        # First step: the same maths on the same weights. Later steps: Adam's normalised update
        # (about lr per weight whatever the gradient's size) turns fp32 rounding of tiny
        # gradients into small weight differences, so the losses drift apart slightly.
        rel = 2e-5 if i == 0 else 1e-3
        for key, value in theirs.items():
            assert ours[f"loss/{key}"] == pytest.approx(value, rel=rel, abs=1e-9), (i, key)
    pairs = [
        ("generator", trainer.g_engine.module, ref.net_g),
        ("d_image", trainer.d_engines["image"].module, ref.net_d),
        ("d_gradient", trainer.d_engines["gradient"].module, ref.net_d_grad),
    ]
    for name, a, b in pairs:
        sa, sb = _named_state(a), _named_state(b)
        assert sa.keys() == sb.keys(), name
        # Adam moves each weight by ~lr = 1e-4 per step whatever its gradient's size: a wrong
        # update differs by that much on most weights. fp32 rounding of the gradients gives far
        # less (measured: mean ~1e-6 at most), except where a gradient is ~0 and its sign flips
        # (a few weights, at most 2 lr per step).
        diff = torch.cat([(sa[k].detach().float() - sb[k].detach().float()).abs().flatten() for k in sa])
        assert float(diff.mean()) <= 5e-6, (name, float(diff.mean()))
        assert float((diff > 1e-5).float().mean()) <= 0.01, (name, float((diff > 1e-5).float().mean()))
        assert float(diff.max()) <= 2.5e-4 * STEPS, (name, float(diff.max()))
    # The speed-ups are really on.
    assert not trainer.g_engine.enable_backward_allreduce
    assert trainer.g_engine.optimizer.defaults["fused"] is True
    trainer.close()


def test_step_equals_public_structure_reference(tmp_path):
    _compare(tmp_path)


def test_channels_last_step_equals_reference(tmp_path):
    _compare(tmp_path, "train.channels_last=true")


def _moments(engine) -> dict[str, torch.Tensor]:
    """An engine's per-parameter optimizer tensors (Adam's moments), by parameter name."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {
        f"{names[id(p)]}.{k}": v
        for p, st in engine.optimizer.state.items()
        for k, v in st.items()
        if torch.is_tensor(v) and v.dim()
    }


@pytest.mark.parametrize("saved_channels_last", [False, True])
def test_resume_in_the_other_layout_steps_as_the_same_layout(tmp_path, saved_channels_last):
    """A checkpoint written with one train.channels_last, resumed with the other (e.g. an fp32
    NCHW run continued in bf16 with channels_last): every Adam moment takes its parameter's
    layout with its values unchanged, and the resumed step equals a resume in the saved layout.

    Fails on the code before match_state_layouts: the moments kept the saved layout and torch's
    fused CPU Adam, which reads parameter and moments as raw memory of one layout, moved the
    weights with other weights' moments (mean error ~lr on every engine).
    """
    from spsr_hpc.train.trainer import Trainer

    batches = _batches(3)
    saved = "true" if saved_channels_last else "false"
    writer = Trainer(_config(tmp_path / "w", f"train.channels_last={saved}"), loader=list(batches[:2]))
    writer.train_step()
    writer.train_step()
    ckpt = writer.save()
    writer.close()

    def resume(channels_last: str) -> Trainer:
        overrides = (f"train.channels_last={channels_last}", f"checkpoint.resume={ckpt}")
        cfg = _config(tmp_path / f"r_{channels_last}", *overrides)
        return Trainer(cfg, loader=list(batches[2:]))

    other, same = resume("false" if saved_channels_last else "true"), resume(saved)
    assert other.g_engine.optimizer.defaults["fused"] is True
    for name, engine in other.engines.items():
        params = dict(engine.module.named_parameters())
        moments, reference = _moments(engine), _moments(same.engines[name])
        assert moments.keys() == reference.keys() and len(moments) >= 2 * len(params), name
        for key, m in moments.items():
            p = params[key.rsplit(".", 1)[0]]
            assert m.stride() == p.stride(), (name, key, m.stride(), p.stride())
            assert torch.equal(m, reference[key]), (name, key)  # values unchanged
    other.train_step()
    same.train_step()
    for name, engine in other.engines.items():
        sa, sb = _named_state(engine.module), _named_state(same.engines[name].module)
        # As in _compare: the two layouts round fp32 gradients differently (mean ~1e-6, sign
        # flips of ~0 gradients on a few weights); a wrong pairing moves most weights by ~lr.
        diff = torch.cat([(sa[k].detach() - sb[k].detach()).abs().flatten() for k in sa])
        assert float(diff.mean()) <= 5e-6, (name, float(diff.mean()))
        assert float((diff > 1e-5).float().mean()) <= 0.01, (name, float((diff > 1e-5).float().mean()))
    other.close()
    same.close()


def test_per_channel_gradient_matches_fused_map():
    import spsr_kernels

    x = torch.rand(2, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    for padding in (1, 2):
        ref = spsr_kernels.gradient_map_ref(x, padding=padding)
        got = PerChannelGradient(padding).double()(x)
        torch.testing.assert_close(got, ref)
        g = torch.randn_like(ref)
        (ga,) = torch.autograd.grad(got, x, g)
        (gb,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(ga, gb)


def test_discriminator_inputs_reused_from_generator_step():
    """discriminator_loss(inputs=<recorded by generator_loss>) equals recomputing them."""
    from spsr_hpc.losses import LossConfig, PerceptualLoss, SRObjective
    from spsr_hpc.models import SROutput
    from spsr_hpc.models.discriminators import VGGDiscriminator

    with pytest.warns(UserWarning, match="RANDOM"):
        perceptual = PerceptualLoss(random_weights=True, end=4)
    obj = SRObjective(LossConfig(method="spsr_g"), perceptual=perceptual)
    ds = {"image": VGGDiscriminator(nf=4, input_size=32), "gradient": VGGDiscriminator(nf=4, input_size=34)}
    for d in ds.values():
        d.eval()  # no BatchNorm statistics updates: repeated calls see identical weights
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = SROutput(sr=sr, grad_sr=torch.rand(2, 3, 32, 32))
    hr = torch.rand(2, 3, 32, 32)
    recorded: dict = {}
    obj.generator_loss(out, hr, ds, d_inputs=recorded)
    assert set(recorded) == {"image", "gradient"}
    assert recorded["gradient"][1].shape == (2, 3, 34, 34) and not recorded["gradient"][1].requires_grad
    for name, d in ds.items():
        fresh, fresh_terms = obj.discriminator_loss(name, out, hr, d)
        reused, reused_terms = obj.discriminator_loss(name, out, hr, d, inputs=recorded[name])
        torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
        for k in fresh_terms:
            torch.testing.assert_close(reused_terms[k], fresh_terms[k], rtol=0, atol=0)


def _tiny_d(seed: int):
    from spsr_hpc.models.discriminators import VGGDiscriminator

    torch.manual_seed(seed)
    return VGGDiscriminator(nf=4, input_size=32)


@pytest.mark.parametrize("once", ["real", "real+fake"])
def test_logits_computed_once_for_both_steps(once):
    """generator_loss(d_real=...) runs D(real) once, through the trainable D, and the D step
    reuses it; with d_fake=... D(fake) too (on a detached copy of the fake input, G's gradient
    through it taken inside generator_loss). The G loss, the gradient into SR, the D loss and D's
    gradients are those of the public code's separate forwards (frozen ones in the G step,
    trainable ones in the D step), with one or two D calls fewer per discriminator."""
    from spsr_hpc.losses import DInputs, LossConfig, PerceptualLoss, SRObjective
    from spsr_hpc.models import SROutput

    with pytest.warns(UserWarning, match="RANDOM"):
        perceptual = PerceptualLoss(random_weights=True, end=4)
    obj = SRObjective(LossConfig(method="spsr_g"), perceptual=perceptual)
    g = torch.Generator().manual_seed(0)
    sr0, hr = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)

    def run(reuse: str) -> dict:
        ds = {"image": _tiny_d(1), "gradient": _tiny_d(2)}  # training mode: BatchNorm on batch stats
        calls = {n: 0 for n in ds}

        def frozen(name):
            def f(x):
                calls[name] += 1
                for p in ds[name].parameters():
                    p.requires_grad_(False)
                try:
                    return ds[name](x)
                finally:
                    for p in ds[name].parameters():
                        p.requires_grad_(True)
            return f

        def trainable(name):
            def f(x):
                calls[name] += 1
                return ds[name](x)
            return f

        sr = sr0.clone().requires_grad_(True)
        out = SROutput(sr=sr, grad_sr=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        recorded: dict = {}
        total, terms = obj.generator_loss(
            out, hr, {n: frozen(n) for n in ds}, d_inputs=recorded,
            d_real={n: trainable(n) for n in ds} if "real" in reuse else None,
            d_fake={n: trainable(n) for n in ds} if "fake" in reuse else None,
        )
        assert all(p.grad is None for d in ds.values() for p in d.parameters())  # G's step leaves D alone
        (sr_grad,) = torch.autograd.grad(total, sr)
        res = {"g_total": total.detach(), "sr_grad": sr_grad, "calls": calls, "terms": terms}
        for name, d in ds.items():
            assert isinstance(recorded[name], DInputs)
            assert (recorded[name].real_logits is not None) == ("real" in reuse)
            assert (recorded[name].fake_logits is not None) == ("fake" in reuse)
            loss, _ = obj.discriminator_loss(name, out, hr, trainable(name), inputs=recorded[name])
            loss.backward()
            res[f"d_{name}"] = loss.detach()
            res[f"d_{name}_grads"] = [p.grad.clone() for p in d.parameters()]
        return res

    separate, reused = run(""), run(once)
    fewer = 1 if once == "real" else 2
    assert separate["calls"] == {"image": 4, "gradient": 4}
    assert reused["calls"] == {"image": 4 - fewer, "gradient": 4 - fewer}
    for k in ("g_total", "d_image", "d_gradient"):
        torch.testing.assert_close(reused[k], separate[k], rtol=0, atol=0, msg=k)
    for k, v in separate["terms"].items():
        torch.testing.assert_close(reused["terms"][k], v, rtol=0, atol=0, msg=k)
    # With d_fake the adversarial gradients reach SR through a surrogate term: the same values,
    # added to the other terms' in another order (fp32 rounding of the sum).
    exact = {"rtol": 0, "atol": 0} if once == "real" else {"rtol": 1e-5, "atol": 1e-9}
    torch.testing.assert_close(reused["sr_grad"], separate["sr_grad"], **exact)
    for name in ("image", "gradient"):
        for a, b in zip(reused[f"d_{name}_grads"], separate[f"d_{name}_grads"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for arg in ("d_real", "d_fake"):
        with pytest.raises(ValueError, match=f"{arg} needs d_inputs"):
            obj.generator_loss(SROutput(sr=sr0, grad_sr=sr0), hr,
                               {"image": _tiny_d(1), "gradient": _tiny_d(2)}, **{arg: {"image": _tiny_d(1)}})


def _bn_net(momentum):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=momentum),
                            torch.nn.ReLU(), torch.nn.BatchNorm2d(4, momentum=momentum))
    m(torch.randn(4, 3, 8, 8))  # some history first (num_batches_tracked 1)
    return m


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batchnorm_replayable_equals_forwards_in_the_public_order(momentum):
    """D(fake) once for both steps: its forward under batchnorm_replayable, then D(real) counted
    twice, then the replay leave the running statistics (and the batch count) of the public
    code's four forwards, fake, real, real, fake; the outputs are the same, the fake forward's
    graph still backpropagates after the replay, the momenta are restored."""
    from spsr_hpc.train.engines import batchnorm_counted_twice, batchnorm_replayable

    g = torch.Generator().manual_seed(3)
    xf, xr = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g) + 1.0
    four, ours = _bn_net(momentum), _bn_net(momentum)
    yf_ref = four(xf)
    four(xr)
    four(xr)
    four(xf)
    leaf = xf.clone().requires_grad_(True)
    with batchnorm_replayable(ours) as replay:
        yf = ours(leaf)
    with batchnorm_counted_twice(ours):
        ours(xr)
    replay()
    torch.testing.assert_close(yf, yf_ref, rtol=0, atol=0)
    for (name, a), (_, b) in zip(ours.named_buffers(), four.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert all(m.momentum == momentum for m in ours if isinstance(m, torch.nn.BatchNorm2d))
    (gx,) = torch.autograd.grad(yf.square().sum(), leaf)  # the saved buffers passed the version check
    (gx_ref,) = torch.autograd.grad(four(leaf).square().sum(), leaf)
    torch.testing.assert_close(gx, gx_ref)


def test_batchnorm_replayable_leaves_eval_mode_and_failed_forwards_alone():
    from spsr_hpc.train.engines import batchnorm_replayable

    net = _bn_net(0.1)
    x = torch.randn(4, 3, 8, 8)
    before = {k: v.clone() for k, v in net.named_buffers()}
    with pytest.raises(RuntimeError, match="before the recorded forward"), \
            batchnorm_replayable(net) as replay:
        replay()
    # A forward that fails after the first BatchNorm ran (with momentum 1 there) leaves the
    # running averages as they were.
    def fail(*_):
        raise RuntimeError("the forward failed")

    handle = net[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="forward failed"), batchnorm_replayable(net):
        net(x)
    handle.remove()
    net.eval()
    with batchnorm_replayable(net) as replay:
        net(x)
    replay()
    for k, v in net.named_buffers():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert all(m.momentum == 0.1 for m in net if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batchnorm_counted_twice_equals_two_forwards(momentum):
    """One forward under batchnorm_counted_twice leaves the running statistics (and the batch
    count) of two forwards of the same batch, gives the same output, and restores the momenta."""
    from spsr_hpc.train.engines import batchnorm_counted_twice

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    twice, once = _bn_net(momentum), _bn_net(momentum)
    twice(x)
    y_ref = twice(x)
    with batchnorm_counted_twice(once):
        y = once(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for (name, a), (_, b) in zip(once.named_buffers(), twice.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert all(m.momentum == momentum for m in once if isinstance(m, torch.nn.BatchNorm2d))
    # Eval mode: nothing moves, nothing is counted.
    once.eval()
    before = {k: v.clone() for k, v in once.named_buffers()}
    with batchnorm_counted_twice(once):
        once(x)
    for k, v in once.named_buffers():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("config", ["tiny_spsr_g.yaml", "tiny_spsr_r.yaml"])
def test_channels_last_every_convolution_reads_its_weights_format(tmp_path, config):
    """With train.channels_last every convolution of a step (G, each D, and the frozen VGG19 and
    NSE inside the objective) gets a channels_last input *and* channels_last weights: a mixed
    pair makes oneDNN reorder the weights at every call. The objective's extractors were left
    contiguous before (32 VGG19 calls per bf16 SPSR-G step at the paper's size)."""
    from spsr_hpc.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / config,
        [f"logging.run_dir={tmp_path}", "logging.progress_bar=false", "logging.tensorboard=false",
         "logging.image_every=0", "checkpoint.every=0", "checkpoint.resume=none", "train.device=cpu",
         "train.ema_decay=null", "train.channels_last=true", "perceptual.layer=conv2_2"],
    )
    trainer = Trainer(cfg, loader=_batches(1))
    seen: list[tuple[str, bool, bool]] = []
    roots = {"generator": trainer.g_engine.module, "objective": trainer.objective,
             **{f"d_{n}": d.module for n, d in trainer.d_engines.items()}}
    handles = []
    for root, module in roots.items():
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args, key=f"{root}.{name}": seen.append((
                        key,
                        args[0].is_contiguous(memory_format=torch.channels_last),
                        mod.weight.is_contiguous(memory_format=torch.channels_last),
                    ))
                ))
    trainer.train_step()
    for h in handles:
        h.remove()
    trainer.close()
    assert {k.split(".")[0] for k, _, _ in seen} == set(roots)
    assert any(k.startswith("objective.") for k, _, _ in seen)
    mixed = sorted({k for k, x_cl, w_cl in seen if not (x_cl and w_cl)})
    assert not mixed, mixed


def test_allreduce_kept_under_zero1(tmp_path):
    from spsr_hpc.train.trainer import Trainer

    trainer = Trainer(_config(tmp_path, "deepspeed.zero_stage=1"), loader=_batches(1))
    assert trainer.g_engine.enable_backward_allreduce  # ZeRO 1 moves gradients in that call
    trainer.close()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.compile_mode=reduce-overhead"], "train.compile_mode"),
        (["train.channels_last=true", "deepspeed.zero_stage=2"], "train.channels_last"),
        (["train.compile=maybe"], "train.compile"),
    ],
)
def test_speed_config_errors(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(tmp_path, *overrides)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bf16")
def test_vs_reference_runs_with_its_bf16_row():
    """launch/bench_train.py --vs-reference at a tiny size, one round: a row per side, the bf16 one
    with its precision and overrides (the timing itself is for an idle machine)."""
    from spsr_hpc.bench.train_vs_reference import OURS, OURS_BF16, REFERENCE, run_vs_reference

    tiny = ["model.generator.nf=8", "model.generator.nb=1", "model.generator.gc=4",
            "model.generator.taps=[0]", "data.patch_size=8",
            *(f"model.discriminators.{d}.{k}" for d in ("image", "gradient")
              for k in ("nf=4", "input_size=32"))]
    rows = run_vs_reference(overrides=tiny, rounds=1, warmup=1, write=False)
    by_side = {r["side"]: r for r in rows}
    assert set(by_side) == {OURS, OURS_BF16, REFERENCE}
    assert by_side[OURS_BF16]["precision"] == "bf16" and "train.bf16=true" in by_side[OURS_BF16]["overrides"]
    assert by_side[OURS]["precision"] == by_side[REFERENCE]["precision"] == "fp32"
    assert by_side[REFERENCE]["speedup_vs_reference_median"] == 1.0
    assert all(r["median_s"] > 0 and r["loadavg_1m_start"] >= 0 for r in rows)


def test_process_group_start_builds_no_inference_shm_op():
    """DeepSpeed's torch backend would JIT-build its shared-memory op for inference_all_reduce in
    every CPU process (~30 s per fresh environment); training never calls it, so init_distributed
    keeps it from being built. Fails on the code before: the backend holds the loaded op."""
    import subprocess
    import sys

    code = (
        "import torch, deepspeed.comm.comm as c\n"
        "from spsr_hpc.train.engines import destroy_distributed, init_distributed\n"
        "init_distributed('gloo', torch.device('cpu'))\n"
        "print('SHM', c.cdb.shm_comm_op, flush=True)\n"
        "t = torch.ones(3); c.all_reduce(t); assert t.tolist() == [1.0, 1.0, 1.0]\n"
        "destroy_distributed()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SHM None" in out.stdout, out.stdout
    assert "shm_comm" not in out.stdout + out.stderr


def test_a_second_run_after_the_process_group_was_destroyed(tmp_path):
    """Two runs one after the other in one process (a notebook, a sweep, this test session):
    after destroy_distributed the next Trainer starts a new group and its engines broadcast over
    it. Failed before: DeepSpeed kept its clone of the destroyed world group ("Group ... is not
    registered")."""
    from spsr_hpc.train.engines import destroy_distributed
    from spsr_hpc.train.trainer import Trainer

    for i in range(2):
        trainer = Trainer(_config(tmp_path / str(i)), loader=_batches(1))
        assert trainer.train_step()["loss/g_total"] > 0
        trainer.close()
        destroy_distributed()
