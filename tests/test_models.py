"""Networks: sizes, official key layout, checkpoint loading, shapes, NSE geometry, configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from spsr_hpc.models import (
    DISCRIMINATORS,
    EDSR,
    GENERATORS,
    NSE,
    CheckpointMismatchError,
    ContextPredictor,
    DiscriminatorConfig,
    GeneratorConfig,
    JigsawClassifier,
    NSEConfig,
    RRDBNet,
    SPSRGenerator,
    SROutput,
    SRResNet,
    StructureDiscriminator,
    VGGDiscriminator,
    build_discriminator,
    build_generator,
    build_nse,
    export_state_dict,
    load_pretrained,
)
from spsr_kernels import gradient_map_ref

TINY = {"nf": 8, "nb": 4, "gc": 4, "taps": (0, 1, 2, 3)}


# ------------------------------------------------------------------------------------------
# An independent, handwritten description of the official SPSR checkpoint (docs/method.md §2).
# ------------------------------------------------------------------------------------------
def _conv(shapes: dict, name: str, cin: int, cout: int, k: int = 3) -> None:
    shapes[f"{name}.weight"] = (cout, cin, k, k)
    shapes[f"{name}.bias"] = (cout,)


def _rrdb(shapes: dict, prefix: str, nc: int, gc: int) -> None:
    for r in (1, 2, 3):
        for m in range(1, 6):
            _conv(shapes, f"{prefix}.RDB{r}.conv{m}.0", nc + (m - 1) * gc, gc if m < 5 else nc)


def official_spsr_shapes(nf=64, nb=23, gc=32, n_taps=4, in_ch=3, out_ch=3) -> dict[str, tuple]:
    """Key -> shape of the public SPSR ×4 checkpoint, written from the key list of docs/method.md §2."""
    s: dict[str, tuple] = {}
    _conv(s, "model.0", in_ch, nf)
    for i in range(nb):
        _rrdb(s, f"model.1.sub.{i}", nf, gc)
    _conv(s, f"model.1.sub.{nb}", nf, nf)
    for i in (3, 6, 8):
        _conv(s, f"model.{i}", nf, nf)
    _conv(s, "HR_conv0_new.0", nf, nf)
    _conv(s, "HR_conv1_new.0", nf, nf)
    s["get_g_nopadding.weight_h"] = (1, 1, 3, 3)
    s["get_g_nopadding.weight_v"] = (1, 1, 3, 3)
    _conv(s, "b_fea_conv.0", in_ch, nf)
    for i in range(1, n_taps + 1):
        _rrdb(s, f"b_block_{i}", 2 * nf, gc)
        _conv(s, f"b_concat_{i}.0", 2 * nf, nf)
    _conv(s, "b_LR_conv.0", nf, nf)
    for i in (1, 4, 6, 8):
        _conv(s, f"b_module.{i}", nf, nf)
    _conv(s, "conv_w.0", nf, out_ch, k=1)
    _rrdb(s, "f_block", 2 * nf, gc)
    _conv(s, "f_concat.0", 2 * nf, nf)
    _conv(s, "f_HR_conv0.0", nf, nf)
    _conv(s, "f_HR_conv1.0", nf, out_ch)
    return s


STENCIL_H = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)
STENCIL_V = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def official_state_dict(shapes: dict[str, tuple], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v, generator=g) * 0.05 for k, v in shapes.items()}
    sd["get_g_nopadding.weight_h"] = STENCIL_H.clone()
    sd["get_g_nopadding.weight_v"] = STENCIL_V.clone()
    sd["HR_conv0_new.0.weight"] = sd["model.8.weight"]  # one module, saved twice
    sd["HR_conv0_new.0.bias"] = sd["model.8.bias"]
    return sd


def esrgan_old_state_dict(nf=8, nb=4, gc=4, seed=2) -> dict[str, torch.Tensor]:
    """ESRGAN's original ×4 layout: model.0, model.1.sub.*, model.3/6/8/10 (model.10: nf→3)."""
    s: dict[str, tuple] = {}
    _conv(s, "model.0", 3, nf)
    for i in range(nb):
        _rrdb(s, f"model.1.sub.{i}", nf, gc)
    _conv(s, f"model.1.sub.{nb}", nf, nf)
    for i in (3, 6, 8):
        _conv(s, f"model.{i}", nf, nf)
    _conv(s, "model.10", nf, 3)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) * 0.05 for k, v in s.items()}


def to_new_style(old: dict[str, torch.Tensor], nb: int, flavour: str) -> dict[str, torch.Tensor]:
    """Rename old ESRGAN keys by hand to BasicSR ('basicsr') or xinntao-ESRGAN ('xinntao') names."""
    names = {
        "basicsr": ("conv_first", "body", "rdb", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"),
        "xinntao": (
            "conv_first",
            "RRDB_trunk",
            "RDB",
            "trunk_conv",
            "upconv1",
            "upconv2",
            "HRconv",
            "conv_last",
        ),
    }[flavour]
    first, body, rdb, body_conv, up1, up2, hr, last = names
    single = {
        "model.0": first,
        f"model.1.sub.{nb}": body_conv,
        "model.3": up1,
        "model.6": up2,
        "model.8": hr,
        "model.10": last,
    }
    new = {}
    for k, v in old.items():
        parts = k.split(".")
        if k.startswith("model.1.sub.") and parts[3] != str(nb) and len(parts) > 5:
            # model.1.sub.I.RDBr.convm.0.leaf -> body.I.rdbr.convm.leaf
            new[f"{body}.{parts[3]}.{rdb}{parts[4][3]}.{parts[5]}.{parts[7]}"] = v
        else:
            new[f"{single['.'.join(parts[:-1])]}.{parts[-1]}"] = v
    return new


@pytest.fixture(scope="module")
def full_spsr() -> SPSRGenerator:
    return SPSRGenerator()


# ------------------------------------------------------------------------------------------
# sizes and keys
# ------------------------------------------------------------------------------------------
def test_spsr_default_parameter_counts(full_spsr):
    trainable = sum(p.numel() for p in full_spsr.parameters() if p.requires_grad)
    assert trainable == 24_796_230
    assert full_spsr.parameter_split() == {"trunk": 16_733_184, "branch": 6_456_835, "fusion": 1_606_211}
    # The fixed stencils are in the state dict but are not parameters at all.
    names = {n for n, _ in full_spsr.named_parameters()}
    assert "get_g_nopadding.weight_h" not in names
    assert torch.equal(full_spsr.state_dict()["get_g_nopadding.weight_h"], STENCIL_H)
    assert "24,796,230" in full_spsr.summary()


def test_spsr_state_dict_is_exactly_the_official_layout(full_spsr):
    expected = official_spsr_shapes()
    got = {k: tuple(v.shape) for k, v in full_spsr.state_dict().items()}
    assert set(got) == set(expected), (
        sorted(set(got) - set(expected))[:5],
        sorted(set(expected) - set(got))[:5],
    )
    assert got == expected
    # model.8 and HR_conv0_new.0 are the same module.
    assert full_spsr.model[8] is full_spsr.HR_conv0_new[0]


def test_official_checkpoint_loads_strictly_full_size(full_spsr):
    sd = official_state_dict(official_spsr_shapes())
    report = load_pretrained(full_spsr, sd)
    assert report.format == "spsr"
    assert report.matched == report.total == len(sd)
    assert report.fresh == [] and report.dropped == []
    assert torch.equal(full_spsr.b_block_3.RDB2.conv4[0].weight, sd["b_block_3.RDB2.conv4.0.weight"])
    assert torch.equal(full_spsr.model[1].sub[22].RDB3.conv5[0].bias, sd["model.1.sub.22.RDB3.conv5.0.bias"])


def test_other_parameter_counts():
    assert sum(p.numel() for p in RRDBNet().parameters()) == 16_697_987
    assert sum(p.numel() for p in VGGDiscriminator().parameters()) == 14_502_281
    assert sum(p.numel() for p in VGGDiscriminator(input_size=130).parameters()) == 14_502_281
    # EDSR paper: baseline ≈1.5M, large ≈43M parameters at ×4.
    assert sum(p.numel() for p in EDSR().parameters()) == 1_517_571
    assert sum(p.numel() for p in SRResNet().parameters()) == 1_549_462


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def test_tiny_official_checkpoint_loads_and_runs():
    model = SPSRGenerator(**TINY)
    sd = official_state_dict(official_spsr_shapes(nf=8, nb=4, gc=4))
    report = load_pretrained(model, sd)
    assert report.matched == report.total
    lr = torch.rand(1, 3, 9, 11)
    out = model(lr)
    assert torch.isfinite(out.sr).all()
    torch.testing.assert_close(out.grad_lr, gradient_map_ref(lr, 1))


@pytest.mark.parametrize("damage", ["truncate", "rename", "reshape"])
def test_bad_checkpoint_is_refused_and_nothing_loads(damage):
    model = SPSRGenerator(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = official_state_dict(official_spsr_shapes(nf=8, nb=4, gc=4))
    if damage == "truncate":
        del sd["f_HR_conv1.0.weight"]
        match = r"(?s)1 missing.*f_HR_conv1\.0\.weight"
    elif damage == "rename":
        sd["b_concat_9.0.weight"] = sd.pop("b_concat_2.0.weight")
        match = r"(?s)1 missing.*1 unexpected.*b_concat_9\.0\.weight"
    else:
        sd["conv_w.0.weight"] = torch.zeros(3, 8, 3, 3)
        match = r"(?s)shape mismatches.*conv_w\.0\.weight: checkpoint \(3, 8, 3, 3\) vs model \(3, 8, 1, 1\)"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_pretrained(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_stencil_and_alias_disagreement_are_refused():
    model = SPSRGenerator(**TINY)
    sd = official_state_dict(official_spsr_shapes(nf=8, nb=4, gc=4))
    bad = dict(sd, **{"get_g_nopadding.weight_h": STENCIL_H * 2})
    with pytest.raises(CheckpointMismatchError, match="fixed gradient stencil"):
        load_pretrained(model, bad)
    bad = dict(sd, **{"HR_conv0_new.0.bias": sd["model.8.bias"] + 1})
    with pytest.raises(CheckpointMismatchError, match="one module"):
        load_pretrained(model, bad)


def test_unrelated_checkpoint_is_refused():
    with pytest.raises(CheckpointMismatchError, match="does not fit SPSRGenerator"):
        load_pretrained(SPSRGenerator(**TINY), EDSR(nf=8, nb=2).state_dict())


def _check_trunk_loaded(model: SPSRGenerator, old: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    for k, v in old.items():
        if not k.startswith("model.10."):
            assert torch.equal(sd[k], v), k
    assert torch.equal(sd["HR_conv0_new.0.weight"], old["model.8.weight"])


def test_esrgan_old_initialises_the_spsr_trunk():
    model = SPSRGenerator(**TINY)
    fresh_before = model.f_concat[0].weight.clone()
    old = esrgan_old_state_dict()
    report = load_pretrained(model, old)
    assert report.format == "esrgan-old"
    assert report.dropped == ["model.10.bias", "model.10.weight"]
    trunk_keys = [k for k in model.state_dict() if k.startswith("model.")] + [
        "HR_conv0_new.0.weight",
        "HR_conv0_new.0.bias",
    ]
    assert report.matched == len(trunk_keys)
    assert all(k.startswith(("b_", "f_", "conv_w", "HR_conv1_new")) for k in report.fresh)
    assert "HR_conv1_new.0.weight" in report.fresh and "f_block.RDB1.conv1.0.weight" in report.fresh
    assert "fresh" in str(report) and "model.10" in str(report)
    _check_trunk_loaded(model, old)
    assert torch.equal(model.f_concat[0].weight, fresh_before)


@pytest.mark.parametrize("flavour", ["basicsr", "xinntao"])
def test_esrgan_new_styles_load_into_spsr_trunk_and_rrdbnet(flavour):
    old = esrgan_old_state_dict()
    new = to_new_style(old, nb=4, flavour=flavour)
    model = SPSRGenerator(**TINY)
    report = load_pretrained(model, new)
    assert report.format == "esrgan-new" and report.dropped == ["model.10.bias", "model.10.weight"]
    _check_trunk_loaded(model, old)
    rrdb = RRDBNet(nf=8, nb=4, gc=4)
    report = load_pretrained(rrdb, new)
    assert report.matched == report.total == len(old) and not report.fresh
    for k, v in rrdb.state_dict().items():
        assert torch.equal(v, old[k]), k


def test_truncated_esrgan_is_refused_for_the_trunk():
    old = esrgan_old_state_dict()
    del old["model.1.sub.2.RDB2.conv3.0.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.1\.sub\.2\.RDB2\.conv3\.0\.weight"):
        load_pretrained(SPSRGenerator(**TINY), old)


def test_spsr_trunk_equals_rrdbnet_on_the_same_weights():
    """SPSR's trunk up to HR_conv0_new is ESRGAN's RRDBNet up to its HR conv (independent wiring check)."""
    old = esrgan_old_state_dict()
    spsr, rrdb = SPSRGenerator(**TINY), RRDBNet(nf=8, nb=4, gc=4)
    load_pretrained(spsr, old)
    load_pretrained(rrdb, old)
    feats = {}
    spsr.HR_conv1_new.register_forward_hook(lambda m, i, o: feats.__setitem__("spsr", i[0]))
    rrdb.model[-1].register_forward_hook(lambda m, i, o: feats.__setitem__("rrdb", i[0]))
    lr = torch.rand(1, 3, 6, 7)
    spsr(lr)
    rrdb(lr)
    torch.testing.assert_close(feats["spsr"], feats["rrdb"])


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_own_exports_with_containers_and_prefix(tmp_path, fmt):
    src = SPSRGenerator(**TINY)
    sd = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "g.safetensors"
        save_file({f"module.{k}": v for k, v in export_state_dict(src).items()}, str(path))
    else:
        path = tmp_path / "g.pth"
        torch.save({"params": sd}, path)
    dst = SPSRGenerator(**TINY)
    report = load_pretrained(dst, path)
    assert report.matched == report.total
    assert report.container == (None if fmt == "safetensors" else "params")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_missing_file_and_non_state_dict():
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        load_pretrained(NSE(), "/nonexistent/nowhere.pth")
    with pytest.raises(CheckpointMismatchError, match="not a plain state dict"):
        load_pretrained(NSE(), {"epoch": 3, "weights": {"a": torch.zeros(1)}})


def test_non_strict_reports_fresh_keys():
    nse = NSE()
    sd = {k: v for k, v in NSE().state_dict().items() if not k.startswith("conv6")}
    with pytest.raises(CheckpointMismatchError, match="conv6"):
        load_pretrained(nse, sd)
    report = load_pretrained(nse, sd, strict=False)
    assert report.fresh == ["conv6.weight", "conv6.bias"]


# ------------------------------------------------------------------------------------------
# shapes, dtypes, layouts
# ------------------------------------------------------------------------------------------
TINY_GENERATORS = {
    "spsr": lambda s: SPSRGenerator(scale=s, **TINY),
    "rrdbnet": lambda s: RRDBNet(nf=8, nb=2, gc=4, scale=s),
    "edsr": lambda s: EDSR(nf=8, nb=2, scale=s),
    "srresnet": lambda s: SRResNet(nf=8, nb=2, scale=s),
}


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("name", sorted(TINY_GENERATORS))
def test_generator_shapes_forward_backward(name, scale):
    model = TINY_GENERATORS[name](scale)
    lr = torch.rand(2, 3, 7, 5, requires_grad=True)
    out = model(lr)
    assert isinstance(out, SROutput) and out._fields == ("sr", "grad_sr", "grad_lr")
    assert out.sr.shape == (2, 3, 7 * scale, 5 * scale)
    if name == "spsr":
        assert out.grad_sr.shape == out.sr.shape and out.grad_lr.shape == lr.shape
    else:
        assert out.grad_sr is None and out.grad_lr is None
    loss = out.sr.square().mean() + (out.grad_sr.mean() if out.grad_sr is not None else 0)
    loss.backward()
    assert lr.grad is not None and torch.isfinite(lr.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.summary().startswith(type(model).__name__)


@pytest.mark.parametrize("name", sorted(TINY_GENERATORS))
def test_channels_last_and_bf16_autocast_cpu(name):
    model = TINY_GENERATORS[name](4).eval()
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(lr).sr
        cl = model.to(memory_format=torch.channels_last)(lr.contiguous(memory_format=torch.channels_last)).sr
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(lr)
    assert out.sr.dtype == torch.bfloat16 and torch.isfinite(out.sr.float()).all()


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: NSE(width=16), (2, 3, 32, 32)),
        (lambda: VGGDiscriminator(nf=4, input_size=32), (2, 3, 32, 32)),
        (lambda: StructureDiscriminator(nf=4, input_size=8), (2, 32, 8, 8)),
    ],
)
def test_nse_and_discriminators_channels_last_bf16_cpu(make, shape):
    model = make().eval()
    x = torch.rand(shape)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TINY_GENERATORS))
def test_channels_last_and_bf16_autocast_cuda(name):
    model = TINY_GENERATORS[name](4).cuda().to(memory_format=torch.channels_last)
    lr = torch.rand(2, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(lr)
        loss = out.sr.float().mean()
    loss.backward()
    assert torch.isfinite(out.sr.float()).all()
    d = VGGDiscriminator(nf=8).cuda().to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert d(torch.rand(2, 3, 128, 128, device="cuda")).shape == (2, 1)


def test_discriminator_sizes():
    d = VGGDiscriminator(nf=4)
    assert d(torch.rand(2, 3, 128, 128)).shape == (2, 1)
    assert d(torch.rand(2, 3, 130, 130)).shape == (2, 1)  # 130→65→32→16→8→4
    with pytest.raises(ValueError, match=r"input 96×96 .*expects 4×4.*input_size=96"):
        d(torch.rand(1, 3, 96, 96))
    s = StructureDiscriminator(nf=4)
    assert s(torch.rand(2, 32, 32, 32)).shape == (2, 1)
    with pytest.raises(ValueError, match="expected shape"):
        s(torch.rand(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------
# NSE
# ------------------------------------------------------------------------------------------
def _empirical_receptive_field(nse: NSE, size: int = 96) -> tuple[int, int]:
    """(support width of d out[c, c] / d input, shift of that support between neighbours)."""
    with torch.no_grad():  # all-positive weights: every ReLU is active, no cancellation
        for m in nse.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_().add_(1e-3)
                m.bias.fill_(0.1)
    x = torch.rand(1, 3, size, size, requires_grad=True)
    z = nse(x)
    c = z.shape[-1] // 2
    supports = []
    for col in (c, c + 1):
        (g,) = torch.autograd.grad(z[0, :, c, col].sum(), x, retain_graph=True)
        cols = (g[0].abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
        rows = (g[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
        assert rows.numel() == cols.numel()
        supports.append((int(cols[0]), int(cols[-1] - cols[0] + 1)))
    return supports[0][1], supports[1][0] - supports[0][0]


def test_nse_receptive_field_matches_measurement():
    nse = NSE()
    assert nse(torch.rand(2, 3, 128, 128)).shape == (2, 32, 32, 32)
    width, shift = _empirical_receptive_field(nse)
    assert width == nse.receptive_field()
    assert shift == nse.stride == 4
    assert 16 <= nse.receptive_field() <= 40
    assert "receptive field" in nse.summary()


def test_nse_heads():
    assert ContextPredictor(num_context=4, hidden=16, layers=2)(torch.rand(5, 7, 4, 32)).shape == (5, 7, 32)
    assert ContextPredictor(num_context=2)(torch.rand(6, 64)).shape == (6, 32)
    clf = JigsawClassifier(hidden=16)
    assert sum(isinstance(m, nn.Linear) for m in clf.modules()) == 3
    assert clf(torch.rand(3, 4, 32)).shape == (3, 24)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 32\)"):
        clf(torch.rand(3, 100))


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def test_registries():
    expected_g = {"spsr": SPSRGenerator, "rrdbnet": RRDBNet, "edsr": EDSR, "srresnet": SRResNet}
    assert expected_g == GENERATORS
    assert {"vgg128": VGGDiscriminator, "structure": StructureDiscriminator} == DISCRIMINATORS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "unet"}, "generator.name"),
        ({"nb": 0}, "generator.nb"),
        ({"scale": 5}, "generator.scale"),
        ({"nb": 4}, "generator.taps"),  # default taps reach RRDB 19
        ({"taps": [3, 2]}, "generator.taps"),
        ({"name": "edsr", "res_scale": 0}, "generator.res_scale"),
    ],
)
def test_generator_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        GeneratorConfig(**kwargs)


def test_builders(tmp_path):
    g = build_generator(GeneratorConfig(name="spsr", nf=8, nb=4, gc=4, taps=[0, 1, 2, 3], scale=2))
    assert isinstance(g, SPSRGenerator) and g.scale == 2 and g.taps == (0, 1, 2, 3)
    e = build_generator(GeneratorConfig(name="edsr", nf=8, nb=2, res_scale=0.1))
    assert isinstance(e, EDSR) and e.res_scale == 0.1
    assert GeneratorConfig(name="srresnet").resolved() == (64, 16)
    assert GeneratorConfig().resolved() == (64, 23)
    torch.save(esrgan_old_state_dict(), tmp_path / "esrgan.pth")
    g = build_generator(
        GeneratorConfig(nf=8, nb=4, gc=4, taps=[0, 1, 2, 3], pretrained=str(tmp_path / "esrgan.pth"))
    )
    assert torch.equal(g.model[0].weight, esrgan_old_state_dict()["model.0.weight"])
    d = build_discriminator(DiscriminatorConfig(name="structure", nf=4))
    assert isinstance(d, StructureDiscriminator) and d.in_ch == 32 and d.input_size == 32
    with pytest.raises(ValueError, match=r"discriminator\.name"):
        DiscriminatorConfig(name="patchgan")
    with pytest.raises(ValueError, match=r"nse\.out_dim"):
        NSEConfig(out_dim=0)
    # An NSE saved from its pretraining objective (keys prefixed "nse.") loads strictly.
    src = NSE()
    torch.save({"state_dict": {f"nse.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "nse.pth")
    nse = build_nse(NSEConfig(pretrained=str(tmp_path / "nse.pth")))
    assert torch.equal(nse.conv6.weight, src.conv6.weight)


def test_spsr_fusion_passthrough_starts_at_the_rrdb_output(tmp_path):
    """fusion_init=passthrough: SPSR's SR equals the RRDBNet it was initialised from; the branch
    still reaches the output through f_concat."""
    torch.manual_seed(0)
    rrdb = build_generator(GeneratorConfig(name="rrdbnet", nf=8, nb=2, gc=4, init_scale=1.0)).eval()
    path = tmp_path / "rrdb.pth"
    torch.save(rrdb.state_dict(), path)
    cfg = GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1], init_scale=1.0, pretrained=str(path),
                          fusion_init="passthrough")
    spsr = build_generator(cfg).eval()
    lr = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        want, got = rrdb(lr).sr, spsr(lr).sr
        assert (rrdb.model[:-1](lr) < 0).any()  # negative last features survive the fusion's LeakyReLU
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    spsr(lr).sr.square().sum().backward()
    concat = spsr.f_concat[0].weight.grad
    assert concat[:, : spsr.nf].abs().sum() > 0  # the zeroed branch half trains
    with pytest.raises(ValueError, match="fusion_init=passthrough needs"):
        GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1], fusion_init="passthrough")
    spsr_ckpt = tmp_path / "spsr.pth"
    torch.save(spsr.state_dict(), spsr_ckpt)
    with pytest.raises(ValueError, match=r"has no RGB conv model\.10\.weight"):
        build_generator(GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1], pretrained=str(spsr_ckpt),
                                        fusion_init="passthrough"))
