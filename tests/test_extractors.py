"""Structure extractors (model.structure_extractor): torchvision's modules as the reference, the
equal spatial resolution of VGG19 conv5_4 and ResNet18 "Conv4_2" measured on the modules, frozen
eval-mode behaviour, missing weights stopping the run at start, and structure losses that have the
same shapes and gradients as a direct PyTorch computation whichever extractor feeds them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

from spsr_hpc.config import ConfigError, load_config
from spsr_hpc.losses import LossConfig, SRObjective, structure_pixel_loss
from spsr_hpc.models import (
    EXTRACTORS,
    DiscriminatorConfig,
    ImageNetExtractor,
    NSEConfig,
    SROutput,
    build_discriminator,
    build_structure_extractor,
    feature_shape,
)
from spsr_hpc.models.discriminators import structure_stages
from spsr_hpc.weights import BACKBONE_FILES

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IMAGENET = ("vgg19", "vgg16", "resnet18")


def _torchvision_reference(name: str):
    """(state-dict file contents, function computing the named layer's output with torchvision)."""
    net = getattr(torchvision.models, name)(weights=None).eval()
    if name == "resnet18":
        def run(x):
            got = {}
            hook = net.layer3[1].register_forward_hook(lambda m, i, o: got.setdefault("out", o))
            try:
                net((x - MEAN) / STD)
            finally:
                hook.remove()
            return got["out"]
    else:
        end = {"vgg19": 35, "vgg16": 29}[name]
        # features[end - 1] is conv5_4 (conv5_3 for VGG16) and features[end] its ReLU: before ReLU.
        assert isinstance(net.features[end - 1], torch.nn.Conv2d)
        assert isinstance(net.features[end], torch.nn.ReLU)
        assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.features[:end]) == 4
        def run(x):
            return net.features[:end]((x - MEAN) / STD)
    return net.state_dict(), run


@pytest.mark.parametrize("name", IMAGENET)
def test_features_equal_torchvision_module_output(name, tmp_path):
    torch.manual_seed(1)
    sd, reference = _torchvision_reference(name)
    path = tmp_path / BACKBONE_FILES[name]
    torch.save(sd, path)
    ext = ImageNetExtractor(name, path)
    assert str(path) in ext.source
    x = torch.rand(2, 3, 48, 64, requires_grad=True)
    got = ext(x)
    want = reference(x)
    assert got.shape == want.shape == (2, ext.out_channels, 3, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (gx_ref,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", IMAGENET)
def test_frozen_and_always_eval(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = ImageNetExtractor(name, random_weights=True)
    assert "RANDOM" in ext.source
    ext.train()
    assert not ext.training and not any(m.training for m in ext.modules())
    assert not any(p.requires_grad for p in ext.parameters())
    before = {k: v.clone() for k, v in ext.state_dict().items()}
    ext(torch.rand(2, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in ext.state_dict().items())  # BN statistics fixed
    assert not ext.state_dict().keys() & {"mean", "std"}  # normalisation is not a weight


def test_vgg19_conv5_4_and_resnet18_conv4_2_have_the_same_resolution():
    """Measured on the modules (torchvision's own resnet18 / vgg19), not assumed: 8×8 for 128."""
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        vgg = torchvision.models.vgg19(weights=None).features[:35](x)
        res = torchvision.models.resnet18(weights=None)
        got = {}
        res.layer3[1].register_forward_hook(lambda m, i, o: got.setdefault("out", o))
        res(x)
    assert vgg.shape[-2:] == got["out"].shape[-2:] == (8, 8)
    assert (vgg.shape[1], got["out"].shape[1]) == (512, 256)
    # resnet18's layer4 would be 4×4 and layer2 16×16: layer3[1] is the only stage matching conv5_4.


@pytest.mark.parametrize("size", [64, 100, 130])
@pytest.mark.parametrize("name", EXTRACTORS)
def test_feature_shape_matches_the_modules(name, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = build_structure_extractor(name, NSEConfig(random_init=True), random_weights=name != "nse")
    with torch.no_grad():
        out = ext(torch.rand(1, 3, size, size + 4))
    assert tuple(out.shape[1:]) == feature_shape(name, size, size + 4)


def _extractor(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_structure_extractor(name, NSEConfig(random_init=True, width=16),
                                         random_weights=name != "nse")


@pytest.mark.parametrize("distance", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("name", EXTRACTORS)
def test_structure_pixel_loss_matches_a_direct_computation(name, distance):
    torch.manual_seed(2)
    ext = _extractor(name).requires_grad_(False).eval()
    sr = torch.rand(2, 3, 64, 64, requires_grad=True)
    hr = torch.rand(2, 3, 64, 64)
    loss = structure_pixel_loss(ext, sr, hr, distance)
    fake, real = ext(sr), ext(hr).detach()
    if distance == "l1":
        want = (fake - real).abs().mean()
    elif distance == "l2":
        want = ((fake - real) ** 2).mean()
    else:
        want = (1 - (fake * real).sum(1) / (fake.norm(dim=1) * real.norm(dim=1)).clamp_min(1e-8)).mean()
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(loss, sr)
    (g_ref,) = torch.autograd.grad(want, sr)
    assert g.shape == sr.shape and g.abs().sum() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", EXTRACTORS)
def test_objective_structure_terms_whichever_extractor(name):
    """SRObjective's structure pixel + structure RaGAN terms, with a structure D sized from the
    extractor's output, equal the formulas computed here (values and d/dSR)."""
    torch.manual_seed(3)
    ext = _extractor(name)
    hr_size = 64
    c, h, w = feature_shape(name, hr_size, hr_size, nse_out_dim=32)
    d = build_discriminator(DiscriminatorConfig(name="structure", nf=4, in_ch=c, input_size=h)).eval()
    assert d.stages == structure_stages(h) and d.final_size == (4 if h >= 8 else h // 2)
    d.requires_grad_(False)
    cfg = LossConfig(method="spsr_p", no_gradient_branch=True, perceptual_weight=0.0)
    obj = SRObjective(cfg, nse=ext)
    assert obj.terms == ("pixel", "structure_pixel", "structure_gan")
    assert not obj.nse.training and not any(p.requires_grad for p in obj.nse.parameters())
    sr = torch.rand(2, 3, hr_size, hr_size, requires_grad=True)
    hr = torch.rand(2, 3, hr_size, hr_size)
    d_inputs: dict = {}
    total, terms = obj.generator_loss(SROutput(sr), hr, {"structure": d}, d_inputs=d_inputs)
    fake, real = ext(sr), ext(hr).detach()
    assert fake.shape == (2, c, h, w) and d_inputs["structure"][0].shape == (2, c, h, w)
    fl, rl = d(fake), d(real)
    bce = F.binary_cross_entropy_with_logits
    gan = (bce(rl - fl.mean(), torch.zeros_like(rl)) + bce(fl - rl.mean(), torch.ones_like(fl))) / 2
    want = 1e-2 * (sr - hr).abs().mean() + 1e-2 * (fake - real).abs().mean() + 5e-3 * gan
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(terms["structure_gan"], (5e-3 * gan).detach(), rtol=1e-5, atol=1e-9)
    (g,) = torch.autograd.grad(total, sr)
    (g_ref,) = torch.autograd.grad(want, sr)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-10)


def test_structure_d_sized_for_every_extractor_at_128():
    for name in EXTRACTORS:
        c, h, _ = feature_shape(name, 128, 128)
        d = build_discriminator(DiscriminatorConfig(name="structure", nf=8, in_ch=c, input_size=h))
        assert d.final_size == 4
        assert d(torch.rand(2, c, h, h)).shape == (2, 1)
    # The NSE's default D is unchanged: 32→16→8→4, 2,175,689 parameters.
    d = build_discriminator(DiscriminatorConfig(name="structure"))
    assert d.stages == 3 and sum(p.numel() for p in d.parameters()) == 2_175_689


# --- config and start-up --------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("config", "overrides", "key", "fragment"),
    [
        ("spsr_vgg.yaml", ["model.discriminators.structure.input_size=32"],
         "model.discriminators.structure.input_size", "gives 512×8×8 features"),
        ("spsr_resnet.yaml", ["model.discriminators.structure.in_ch=512"],
         "model.discriminators.structure.in_ch", "set it to 256"),
        ("spsr_g.yaml", ["model.structure_extractor=vgg19"], "model.structure_extractor", "no effect"),
        ("spsr_vgg.yaml", ["model.nse.pretrained=x.safetensors"], "model.nse.pretrained",
         "does not use the NSE"),
        ("spsr_p.yaml", ["model.structure_random_weights=true"], "model.structure_random_weights",
         "not structure_extractor=nse"),
        ("spsr_vgg.yaml", ["model.structure_extractor=alexnet"], "model.structure_extractor",
         "expected one of"),
    ],
)
def test_extractor_config_errors_name_the_key(config, overrides, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        load_config(REPO / "configs" / config, overrides)
    assert e.value.key == key


@pytest.mark.parametrize(("config", "backbone"),
                         [("spsr_resnet.yaml", "resnet18"), ("spsr_vgg.yaml", "vgg19")])
def test_missing_extractor_weights_stop_the_run_at_start(config, backbone, tmp_path, monkeypatch, capsys,
                                                         bundled_shards):
    """No torchvision file in the (empty) torch hub cache: one error line naming the file and where
    to put it, exit status 2, before any model is built; no silent fallback to random weights."""
    from spsr_hpc.models import extractors
    from spsr_hpc.train.trainer import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SPSR_WEIGHTS_DIR", str(tmp_path / "weights"))
    built = []
    monkeypatch.setattr(extractors.ImageNetExtractor, "__init__", lambda *a, **k: built.append(a))
    stand_in = tmp_path / "g.pth"
    stand_in.write_bytes(b"")
    ovs = [f"data.shards={bundled_shards}", f"model.generator.pretrained={stand_in}",
           "perceptual.random_weights=true"]
    for validate in (["--validate"], []):
        assert main(["--config", str(REPO / "configs" / config), *validate, *ovs]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1, err
        assert f"model.structure_extractor={backbone}" in err[0] and BACKBONE_FILES[backbone] in err[0]
        assert str(tmp_path / "torch" / "hub" / "checkpoints") in err[0]
    assert not built and not torch.distributed.is_initialized()
    if backbone == "vgg19":
        assert "model.structure_extractor=vgg16" in err[0]


def _has_weights(backbone: str) -> bool:
    from spsr_hpc.weights import MissingWeightsError, resolve_backbone_weights

    try:
        resolve_backbone_weights(backbone)
    except MissingWeightsError:
        return False
    return True


@pytest.mark.skipif(not _has_weights("vgg16"),
                    reason="no VGG16 ImageNet weights (python -m spsr_hpc.weights fetch)")
def test_vgg16_extractor_reads_the_same_weights_as_the_perceptual_loss():
    """Through the offline lookup (torch hub file, else the converted VGG16): the same features as
    the perceptual loss's VGG16 conv5_3, a second implementation of the same layer."""
    from spsr_hpc.losses import PerceptualLoss

    ext = build_structure_extractor("vgg16", NSEConfig())
    ref = PerceptualLoss(backbone="vgg16")
    assert ext.source == ref.source and "RANDOM" not in ext.source
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ext(x), ref.extract(x), rtol=0, atol=0)


def test_table_vi_vii_configs_are_what_the_tables_train():
    from spsr_hpc.config import to_dict

    def cfg(name):
        return load_config(REPO / "configs" / f"{name}.yaml")

    p = cfg("spsr_p")
    for name, extractor in (("spsr_vgg", "vgg19"), ("spsr_resnet", "resnet18")):
        c = cfg(name)
        assert c.model.structure_extractor == extractor and c.model.generator == p.model.generator
        assert to_dict(c.loss) == to_dict(p.loss) and c.model.nse.pretrained is None
        d = c.model.discriminator("structure")
        assert (d.name, d.in_ch, d.input_size) == ("structure", None, None)  # sized from the extractor
    for bb in ("edsr", "srresnet"):
        psnr = cfg(f"{bb}_psnr")
        assert (psnr.model.generator.name, psnr.loss.method, psnr.loss.weight("pixel")) == (bb, "psnr", 1.0)
        assert psnr.model.generator.resolved() == (64, 16)
        assert psnr.optim.milestones == [50_000, 100_000, 200_000, 300_000]
        # The exported file of the PSNR run (its run dir, no EMA) starts the GAN, -G and -P runs.
        export = f"{psnr.logging.run_dir}/generator.safetensors"
        assert psnr.train.ema_decay is None
        for row, method in (("gan", "esrgan"), ("g", "spsr_g"), ("p", "spsr_p")):
            c = cfg(f"{bb}_{row}")
            g = c.model.generator
            assert (g.name, g.pretrained, c.loss.method) == (bb, export, method)
        assert cfg(f"{bb}_gan").loss.discriminator_names() == ("image",)
