"""Losses: RaGAN against hand computation, gradient/structure losses against references, objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spsr_kernels
from spsr_hpc.losses import (
    TERMS,
    LossConfig,
    PerceptualLoss,
    SRObjective,
    branch_pixel_loss,
    gradient_pixel_loss,
    pixel_loss,
    ragan_d_loss,
    ragan_g_loss,
    structure_distance,
    structure_pixel_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from spsr_hpc.losses.structure import freeze_
from spsr_hpc.models import NSE, RRDBNet, SPSRGenerator, SROutput, StructureDiscriminator, VGGDiscriminator
from spsr_hpc.weights import MissingWeightsError
from spsr_kernels import gradient_map_ref


@pytest.fixture
def torch_gradient_map(monkeypatch):
    """Run spsr_kernels.gradient_map on its PyTorch path in the composition tests.

    Under TRITON_INTERPRET each kernel call costs ~0.5 s on 2 busy cores and these tests make
    dozens; the kernel path itself is compared with the reference in
    test_gradient_losses_match_reference_formulation (and in the kernel's own tests).
    """
    kernel = spsr_kernels.gradient_map
    monkeypatch.setattr(
        spsr_kernels, "gradient_map", lambda x, padding=1, **_: kernel(x, padding, backend="torch")
    )


# ------------------------------------------------------------------------------------------
# GAN losses
# ------------------------------------------------------------------------------------------
def _bce_by_hand(logits: list[float], target: float) -> float:
    total = 0.0
    for x in logits:
        p = 1 / (1 + math.exp(-x))
        total += -(target * math.log(p) + (1 - target) * math.log(1 - p))
    return total / len(logits)


REAL = [1.5, -0.25, 0.75, 2.0]
FAKE = [-1.0, 0.5, -0.3, 0.1]


def test_ragan_matches_hand_computation():
    mr, mf = sum(REAL) / 4, sum(FAKE) / 4
    d = (_bce_by_hand([r - mf for r in REAL], 1) + _bce_by_hand([f - mr for f in FAKE], 0)) / 2
    g = (_bce_by_hand([r - mf for r in REAL], 0) + _bce_by_hand([f - mr for f in FAKE], 1)) / 2
    real, fake = torch.tensor(REAL).view(4, 1), torch.tensor(FAKE).view(4, 1)
    assert ragan_d_loss(real, fake).item() == pytest.approx(d, rel=1e-6)
    assert ragan_g_loss(real, fake).item() == pytest.approx(g, rel=1e-6)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        (_bce_by_hand(REAL, 1) + _bce_by_hand(FAKE, 0)) / 2, rel=1e-6
    )
    assert vanilla_g_loss(None, fake).item() == pytest.approx(_bce_by_hand(FAKE, 1), rel=1e-6)


def test_ragan_gradients():
    real = torch.tensor(REAL, dtype=torch.float64).view(4, 1).requires_grad_()
    fake = torch.tensor(FAKE, dtype=torch.float64).view(4, 1).requires_grad_()
    # fp64 in -> the fp32 cast inside would break gradcheck; check against finite differences by hand.
    for fn in (ragan_d_loss, ragan_g_loss):
        loss = fn(real, fake)
        gr, gf = torch.autograd.grad(loss, (real, fake))
        eps = 1e-3
        for t, g in ((real, gr), (fake, gf)):
            for i in range(4):
                with torch.no_grad():
                    t[i, 0] += eps
                    up = fn(real, fake).item()
                    t[i, 0] -= 2 * eps
                    down = fn(real, fake).item()
                    t[i, 0] += eps
                assert g[i, 0].item() == pytest.approx((up - down) / (2 * eps), abs=1e-4)


# ------------------------------------------------------------------------------------------
# pixel, gradient, structure
# ------------------------------------------------------------------------------------------
def test_pixel_loss():
    a, b = torch.rand(2, 3, 5, 4), torch.rand(2, 3, 5, 4)
    assert pixel_loss(a, b).item() == pytest.approx((a - b).abs().mean().item(), rel=1e-6)
    assert pixel_loss(a, b, "l2").item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="criterion"):
        pixel_loss(a, b, "huber")


def test_gradient_losses_match_reference_formulation():
    sr = torch.rand(2, 3, 12, 10, requires_grad=True)
    hr = torch.rand(2, 3, 12, 10)
    loss = gradient_pixel_loss(sr, hr)
    sr_ref = sr.detach().clone().requires_grad_()
    ref = ((gradient_map_ref(sr_ref, 2) - gradient_map_ref(hr, 2)) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(sr.grad, sr_ref.grad)

    branch = torch.rand(2, 3, 12, 10, requires_grad=True)
    b = branch_pixel_loss(branch, hr)
    torch.testing.assert_close(b, (branch - gradient_map_ref(hr, 1)).abs().mean())
    b.backward()
    torch.testing.assert_close(
        branch.grad, torch.sign(branch - gradient_map_ref(hr, 1)).detach() / branch.numel()
    )


def test_structure_loss_frozen_nse_passes_gradient_to_sr_only():
    nse = freeze_(NSE())
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)
    hr = torch.rand(2, 3, 32, 32)
    loss = structure_pixel_loss(nse, sr, hr)
    with torch.no_grad():
        ref = (nse(sr) - nse(hr)).abs().mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in nse.parameters())
    a, b = torch.rand(2, 32, 4, 4), torch.rand(2, 32, 4, 4)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(structure_distance(a, b, "cosine"), (1 - cos).mean())
    torch.testing.assert_close(structure_distance(a, b, "l2"), ((a - b) ** 2).mean())


# ------------------------------------------------------------------------------------------
# perceptual
# ------------------------------------------------------------------------------------------
def test_perceptual_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"vgg19-dcbb9e9d\.pth"):
        PerceptualLoss()
    with pytest.warns(UserWarning, match="RANDOM"):
        PerceptualLoss(random_weights=True)


def _vgg19_features_by_hand() -> nn.Sequential:
    """VGG19 `features` as published (conv3-64 ×2, M, 128 ×2, M, 256 ×4, M, 512 ×4, M, 512 ×4, M)."""
    layers: list[nn.Module] = []
    prev = 3
    for ch, n in [(64, 2), (128, 2), (256, 4), (512, 4), (512, 4)]:
        for _ in range(n):
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.ReLU(inplace=True)]
            prev = ch
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


def test_perceptual_matches_vgg19_conv5_4(tmp_path):
    features = _vgg19_features_by_hand()
    assert isinstance(features[34], nn.Conv2d) and isinstance(features[35], nn.ReLU)  # conv5_4, then ReLU
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(sd, path)
    loss_fn = PerceptualLoss(path)
    loss_fn.train()
    assert not loss_fn.training and not any(p.requires_grad for p in loss_fn.parameters())
    sr = torch.rand(1, 3, 32, 32, requires_grad=True)
    hr = torch.rand(1, 3, 32, 32)
    feats = features[:35].eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = F.l1_loss(feats((sr - mean) / std), feats((hr - mean) / std))
    got = loss_fn(sr, hr)
    torch.testing.assert_close(got, expected)
    (g_ref,) = torch.autograd.grad(expected, sr)
    (g,) = torch.autograd.grad(got, sr)
    torch.testing.assert_close(g, g_ref)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        PerceptualLoss(path)


# ------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------
def _tiny_setup(method: str, generator: str = "spsr", **switches):
    torch.manual_seed(0)
    cfg = LossConfig(method=method, **switches)
    if generator == "spsr":
        g = SPSRGenerator(nf=8, nb=2, gc=4, taps=(0, 1))
    else:
        g = RRDBNet(nf=8, nb=1, gc=4)
    perceptual = PerceptualLoss(random_weights=True, end=4) if cfg.needs_perceptual() else None
    nse = NSE(width=16) if cfg.needs_nse() else None
    ds = {
        "image": VGGDiscriminator(nf=4, input_size=32),
        "gradient": VGGDiscriminator(nf=4, input_size=34),
        "structure": StructureDiscriminator(nf=4, input_size=8),
    }
    for d in ds.values():
        d.requires_grad_(False)
    obj = SRObjective(cfg, perceptual=perceptual, nse=nse)
    # 8×8 LR -> 32×32 HR keeps CI fast; the Ds are built for it (final map 1×1).
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    return cfg, g, obj, {n: ds[n] for n in obj.discriminator_names}, lr, hr


G_TERMS = ("pixel", "perceptual", "image_gan", "gradient_pixel", "gradient_gan", "branch_pixel")
P_TERMS = ("pixel", "perceptual", "branch_pixel", "structure_pixel", "structure_gan")
CASES = [
    ("psnr", {}, ("pixel",), ()),
    ("esrgan", {}, ("pixel", "perceptual", "image_gan"), ("image",)),
    ("spsr_g", {}, G_TERMS, ("image", "gradient")),
    ("spsr_g", {"no_gradient_loss": True}, ("pixel", "perceptual", "image_gan", "branch_pixel"), ("image",)),
    ("spsr_g", {"no_gradient_gan": True}, tuple(t for t in G_TERMS if t != "gradient_gan"), ("image",)),
    (
        "spsr_g",
        {"no_gradient_pixel": True},
        tuple(t for t in G_TERMS if t != "gradient_pixel"),
        ("image", "gradient"),
    ),
    (
        "spsr_g",
        {"no_gradient_branch": True},
        tuple(t for t in G_TERMS if t != "branch_pixel"),
        ("image", "gradient"),
    ),
    ("spsr_p", {}, P_TERMS, ("structure",)),
    ("spsr_j", {}, P_TERMS, ("structure",)),
    ("spsr_p", {"no_structure_gan": True}, tuple(t for t in P_TERMS if t != "structure_gan"), ()),
    (
        "spsr_j",
        {"no_structure_pixel": True},
        tuple(t for t in P_TERMS if t != "structure_pixel"),
        ("structure",),
    ),
    ("spsr_p", {"no_structure_loss": True}, ("pixel", "perceptual", "branch_pixel"), ()),
    (
        "spsr_p",
        {"no_gradient_branch": True},
        ("pixel", "perceptual", "structure_pixel", "structure_gan"),
        ("structure",),
    ),
]


@pytest.mark.parametrize(("method", "switches", "terms", "d_names"), CASES)
def test_objective_term_sets(method, switches, terms, d_names):
    cfg = LossConfig(method=method, **switches)
    assert cfg.active_terms() == terms
    assert cfg.discriminator_names() == d_names
    assert set(terms) <= set(TERMS)


RUN_CASES = [  # (method, switches, generator)
    ("psnr", {}, "rrdbnet"),
    ("esrgan", {}, "rrdbnet"),
    ("spsr_g", {}, "spsr"),
    ("spsr_g", {"no_gradient_loss": True}, "spsr"),
    ("spsr_g", {"no_gradient_branch": True}, "rrdbnet"),
    ("spsr_p", {}, "spsr"),
    ("spsr_j", {"no_gradient_branch": True, "no_structure_pixel": True}, "rrdbnet"),
]


@pytest.mark.filterwarnings("ignore:PerceptualLoss uses RANDOM")
@pytest.mark.parametrize(("method", "switches", "generator"), RUN_CASES)
def test_objective_runs_and_terms_are_finite(method, switches, generator, torch_gradient_map):
    cfg, g, obj, ds, lr, hr = _tiny_setup(method, generator, **switches)
    terms = cfg.active_terms()
    out = g(lr)
    total, values = obj.generator_loss(out, hr, ds)
    assert tuple(values) == terms
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in values.values())
    torch.testing.assert_close(total.detach(), sum(values.values()))
    total.backward()
    assert all(p.grad is not None for p in g.parameters() if p.requires_grad)
    for d in ds.values():
        assert all(p.grad is None for p in d.parameters())
    if obj.nse is not None:
        assert all(p.grad is None for p in obj.nse.parameters())
    for name, d in ds.items():
        d.requires_grad_(True)
        g.zero_grad()
        loss, dterms = obj.discriminator_loss(name, g(lr), hr, d)
        loss.backward()
        assert set(dterms) == {"d_loss", "d_real", "d_fake"} and torch.isfinite(loss)
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in g.parameters())  # SR detached
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


@pytest.mark.filterwarnings("ignore:PerceptualLoss uses RANDOM")
def test_objective_gan_terms_match_manual_formulas(torch_gradient_map):
    _, g, obj, ds, lr, hr = _tiny_setup("spsr_g")
    for d in ds.values():
        d.eval()  # BatchNorm on running stats: the same logits however often D is called
    out = g(lr)
    _, terms = obj.generator_loss(out, hr, ds)
    sr = out.sr.detach()
    with torch.no_grad():
        img = ragan_g_loss(ds["image"](hr), ds["image"](sr))
        grd = ragan_g_loss(ds["gradient"](gradient_map_ref(hr, 2)), ds["gradient"](gradient_map_ref(sr, 2)))
        gpx = ((gradient_map_ref(sr, 2) - gradient_map_ref(hr, 2)) ** 2).mean()
    torch.testing.assert_close(terms["image_gan"], 5e-3 * img)
    torch.testing.assert_close(terms["gradient_gan"], 5e-3 * grd, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["gradient_pixel"], 1e-2 * gpx, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(terms["pixel"], 1e-2 * (sr - hr).abs().mean())
    loss, dterms = obj.discriminator_loss("gradient", out, hr, ds["gradient"])
    with torch.no_grad():
        real, fake = ds["gradient"](gradient_map_ref(hr, 2)), ds["gradient"](gradient_map_ref(sr, 2))
    torch.testing.assert_close(loss.detach(), ragan_d_loss(real, fake), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dterms["d_real"], real.mean(), rtol=1e-4, atol=1e-6)


def test_psnr_pixel_weight_is_one_and_weights_are_configurable():
    assert LossConfig(method="psnr").weight("pixel") == 1.0
    assert LossConfig(method="spsr_g").weight("pixel") == 1e-2
    assert LossConfig(method="esrgan", pixel_weight=0.5).weight("pixel") == 0.5
    cfg = LossConfig(method="spsr_g", gradient_gan_weight=0.0)
    assert "gradient_gan" not in cfg.active_terms() and cfg.discriminator_names() == ("image",)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "psnr", "no_gradient_gan": True}, "no_gradient_gan"),
        ({"method": "esrgan", "no_gradient_branch": True}, "no_gradient_branch"),
        ({"method": "spsr_g", "no_structure_gan": True}, "no_structure_gan"),
        ({"method": "spsr_p", "no_gradient_loss": True}, "no_gradient_loss"),
        ({"method": "spsr_x"}, "loss.method"),
        ({"perceptual_weight": -1.0}, "loss.perceptual_weight"),
        ({"gan_type": "wgan"}, "loss.gan_type"),
    ],
)
def test_impossible_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_objective_requires_its_dependencies(torch_gradient_map):
    with pytest.raises(ValueError, match="perceptual"):
        SRObjective(LossConfig(method="esrgan"))
    with pytest.raises(ValueError, match="nse"):
        SRObjective(LossConfig(method="spsr_p", perceptual_weight=0.0))
    obj = SRObjective(LossConfig(method="spsr_g", perceptual_weight=0.0))
    out = SROutput(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match="needs discriminators"):
        obj.generator_loss(out, torch.rand(1, 3, 128, 128), {})
    ds = {"image": VGGDiscriminator(nf=4), "gradient": VGGDiscriminator(nf=4, input_size=130)}
    with pytest.raises(ValueError, match="gradient branch"):
        obj.generator_loss(out, torch.rand(1, 3, 128, 128), ds)
    with pytest.raises(ValueError, match="structure"):
        obj.discriminator_loss("structure", out, torch.rand(1, 3, 128, 128), nn.Identity())


@pytest.mark.parametrize("backbone", ["vgg16", "vgg19"])
def test_perceptual_layer_names_match_torchvision(backbone):
    """conv_layer_end against torchvision's own feature stack: block = MaxPools seen + 1."""
    import torchvision

    from spsr_hpc.losses.perceptual import conv_layer_end

    features = getattr(torchvision.models, backbone)().features
    block, k = 1, 0
    for i, m in enumerate(features):
        if isinstance(m, torch.nn.MaxPool2d):
            block, k = block + 1, 0
        elif isinstance(m, torch.nn.Conv2d):
            k += 1
            assert conv_layer_end(backbone, f"conv{block}_{k}") == i + 1
    assert conv_layer_end("vgg19", "conv5_4") == 35 and conv_layer_end("vgg16", "conv5_3") == 29
    with pytest.raises(ValueError, match="has no layer 'conv5_4'"):
        conv_layer_end("vgg16", "conv5_4")
    loss = PerceptualLoss(random_weights=True, backbone=backbone, layer="conv2_2")
    assert len(loss.features) == 8 and loss.layer == "conv2_2"
