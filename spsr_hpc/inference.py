"""Super-resolution of images of any size: overlapping tiles, blended without seams; exports.

The public SPSR code ran out of memory on a 550×700 LR input (24 GB GPU, docs/method.md §10): the whole
image went through the 24.8M-parameter generator at once. :func:`sr_tiled` runs the model on
fixed-size LR tiles, so memory is bounded by the tile size, and blends the tiles' outputs with
a weight window:

- neighbouring tiles share ``overlap`` LR pixels;
- on a side that touches another tile (not the image border), a tile's weight is 0 over the
  outer ``margin`` pixels (those outputs saw zero padding where the neighbour saw real pixels),
  then ramps linearly to 1 over the next ``overlap - 2·margin`` pixels; weights of the tiles
  covering a pixel are normalised to sum to 1.

A model whose receptive-field radius (in LR pixels) is at most ``margin`` gives exactly the
untiled result (up to float rounding); ``margin = overlap // 2`` is plain centre cropping (hard
seams), ``margin = 0`` pure linear cross-fading. For models with a huge receptive field (SPSR:
hundreds of convolutions) the blend hides the small residual differences; docs/evaluation.md
lists the measured tiled-vs-untiled differences.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

import spsr_kernels
from spsr_hpc.data import BadImageError, read_rgb, to_uint8
from spsr_hpc.data.images import IMAGE_EXTENSIONS, list_images
from spsr_hpc.distributed import is_main_process, local_device
from spsr_hpc.files import OutputWriteError, atomic_output, check_output_file, check_output_folder
from spsr_hpc.models import (
    CheckpointMismatchError,
    GeneratorConfig,
    build_generator,
    generator_config_from_export,
    load_pretrained,
)
from spsr_hpc.models.spsr import GradientMapNoPadding

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- tiling ------------------------------------------------------------------------------------


def _tile_starts(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Start offsets along one axis and the tile length there (the image length if it fits)."""
    if length <= tile:
        return [0], length
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends at the border; it may overlap more
    return starts, tile


def _axis_weight(
    start: int, size: int, length: int, margin: int, ramp: int, factor: int, device: torch.device
) -> torch.Tensor:
    """(size·factor,) float32 blend weights of one tile along one axis, in output pixels."""
    n = size * factor
    d = torch.arange(n, dtype=torch.float32, device=device)
    m, r = margin * factor, ramp * factor
    w = torch.ones(n, device=device)
    if start > 0:  # left/top side touches a neighbour
        w = torch.minimum(w, ((d - m + 1) / (r + 1)).clamp(0, 1))
    if start + size < length:  # right/bottom side touches a neighbour
        w = torch.minimum(w, ((n - 1 - d - m + 1) / (r + 1)).clamp(0, 1))
    return w


def _split_output(out: Any) -> tuple[list[torch.Tensor | None], Callable[[list], Any]]:
    """Fields of a model output (tensor, NamedTuple or tuple) and a function rebuilding it."""
    if isinstance(out, torch.Tensor):
        return [out], lambda fields: fields[0]
    if isinstance(out, tuple):
        if hasattr(out, "_fields"):
            return list(out), lambda fields: type(out)(*fields)
        return list(out), tuple
    raise TypeError(f"the model must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _check_tiling(tile: int, overlap: int, margin: int | None) -> int:
    for name, v in (("tile", tile), ("overlap", overlap)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if tile < 1:
        raise ValueError(f"tile must be ≥ 1 LR pixel, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    if margin is None:
        margin = overlap // 4
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= overlap // 2:
        raise ValueError(
            f"margin must be an int in [0, overlap // 2] = [0, {overlap // 2}], got {margin!r} "
            "(larger margins would leave pixels that no tile covers)"
        )
    return margin


@torch.no_grad()
def sr_tiled(
    model: nn.Module | Callable[[torch.Tensor], Any],
    lr: torch.Tensor,
    tile: int = 128,
    overlap: int = 32,
    *,
    margin: int | None = None,
    tile_batch: int = 1,
    progress: bool = False,
) -> Any:
    """Run ``model`` on overlapping LR tiles and blend the outputs (see the module docstring).

    Args:
        model: maps (n, C, th, tw) float LR tiles to a tensor or a tuple/NamedTuple (e.g.
            ``SROutput``) of tensors, each (n, C', f·th, f·tw) for an integer factor f per field
            (f = scale for ``sr``/``grad_sr``, 1 for ``grad_lr``), or None.
        lr: (B, C, H, W) float LR images, on the model's device.
        tile: LR tile side (pixels); an axis shorter than ``tile`` is one tile.
        overlap: LR pixels shared by neighbouring tiles, in [0, tile).
        margin: LR pixels of a tile's inner sides that get weight 0, in [0, overlap // 2];
            default overlap // 4. Tiled equals untiled when the model's receptive-field radius
            is ≤ margin.
        tile_batch: tiles per forward pass (each holds B images).
        progress: show a tqdm bar over tile batches (rank 0 only).

    Returns:
        The same structure the model returns, each field (B, C', f·H, f·W) float32 on
        ``lr.device``. Peak memory: the model on ``tile_batch·B`` tiles plus the float32
        output accumulators.
    """
    margin = _check_tiling(tile, overlap, margin)
    if not isinstance(lr, torch.Tensor) or lr.ndim != 4 or not lr.is_floating_point():
        raise ValueError(f"lr must be a float (B, C, H, W) tensor, got {getattr(lr, 'shape', type(lr))}")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
        raise ValueError(f"tile_batch must be a positive int, got {tile_batch!r}")
    b, _, h, w = lr.shape
    ramp = overlap - 2 * margin
    ys, th = _tile_starts(h, tile, overlap)
    xs, tw = _tile_starts(w, tile, overlap)
    positions = [(y, x) for y in ys for x in xs]

    accum: list[torch.Tensor | None] | None = None
    wsum: dict[int, torch.Tensor] = {}
    factors: list[int | None] = []
    rebuild = None
    chunks = [positions[i : i + tile_batch] for i in range(0, len(positions), tile_batch)]
    bar = tqdm(chunks, desc="tiles", unit="batch", disable=not (progress and is_main_process()), leave=False)
    for chunk in bar:
        inp = torch.cat([lr[:, :, y : y + th, x : x + tw] for y, x in chunk], dim=0)
        fields, rebuild_fn = _split_output(model(inp))
        if accum is None:
            rebuild = rebuild_fn
            accum = []
            for t in fields:
                if t is None:
                    factors.append(None)
                    accum.append(None)
                    continue
                fy, fx = (t.shape[-2] / th, t.shape[-1] / tw) if t.ndim == 4 else (0.0, 0.0)
                if fy != fx or fy != int(fy) or fy < 1:
                    raise ValueError(
                        f"model output of shape {tuple(t.shape)} for a {th}×{tw} tile is not an integer "
                        "up-scaling of the tile; sr_tiled needs (n, C, f·th, f·tw) outputs"
                    )
                f = int(fy)
                factors.append(f)
                accum.append(torch.zeros(b, t.shape[1], h * f, w * f, dtype=torch.float32, device=lr.device))
                if f not in wsum:
                    wsum[f] = torch.zeros(1, 1, h * f, w * f, dtype=torch.float32, device=lr.device)
        for k, (y, x) in enumerate(chunk):
            for t, acc, f in zip(fields, accum, factors):
                if f is None:
                    continue
                wy = _axis_weight(y, th, h, margin, ramp, f, lr.device)
                wx = _axis_weight(x, tw, w, margin, ramp, f, lr.device)
                wgt = wy[:, None] * wx[None, :]
                sl = (..., slice(y * f, (y + th) * f), slice(x * f, (x + tw) * f))
                acc[sl] += t[k * b : (k + 1) * b].float() * wgt
            for f in wsum:
                wy = _axis_weight(y, th, h, margin, ramp, f, lr.device)
                wx = _axis_weight(x, tw, w, margin, ramp, f, lr.device)
                wsum[f][..., y * f : (y + th) * f, x * f : (x + tw) * f] += wy[:, None] * wx[None, :]
    assert accum is not None and rebuild is not None  # at least one tile always exists
    out = [None if acc is None else acc / wsum[f] for acc, f in zip(accum, factors)]
    return rebuild(out)


# --- running a generator on images -----------------------------------------------------------


def check_precision(device: torch.device, precision: str) -> None:
    """Raise ValueError when ``precision`` cannot run on ``device``: fp16 needs CUDA, bf16 native
    bf16 (a CUDA device with bf16, or a CPU with avx512_bf16/AMX; :mod:`spsr_hpc.precision`)."""
    from spsr_hpc.precision import bf16_unsupported

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    if precision == "bf16":
        reason = bf16_unsupported(device)
        if reason is not None:
            raise ValueError(f"--precision bf16: {reason}; use --precision fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for "fp32" (none), "bf16" (CUDA, or a CPU with native bf16) or "fp16"
    (CUDA only). Outputs are cast back to fp32 by the callers (:func:`sr_images`)."""
    check_precision(device, precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sr_images(
    model: nn.Module,
    lr: torch.Tensor,
    *,
    precision: str = "fp32",
    tile: int | None = None,
    overlap: int = 32,
    margin: int | None = None,
    tile_batch: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Super-resolve a batch: lr (B, 3, h, w) float in [0, 1] on the model's device.

    Returns ``(sr, grad_sr)``: (B, 3, s·h, s·w) float32, sr clamped to [0, 1]; grad_sr is the
    gradient branch's map (unclamped) or None for models without one. ``tile=None`` runs the
    whole image at once.
    """
    with autocast(lr.device, precision):
        if tile is None:
            with torch.no_grad():
                out = model(lr)
        else:
            out = sr_tiled(model, lr, tile, overlap, margin=margin, tile_batch=tile_batch, progress=progress)
    if isinstance(out, torch.Tensor):
        sr, grad_sr = out, None
    elif hasattr(out, "sr"):
        sr, grad_sr = out.sr, getattr(out, "grad_sr", None)
    else:
        raise TypeError(
            f"the generator must return a tensor or an object with an `sr` field (SROutput), "
            f"got {type(out).__name__}"
        )
    sr = sr.float().clamp_(0, 1)
    return sr, None if grad_sr is None else grad_sr.float()


def tiling_error(
    model: nn.Module,
    lr: torch.Tensor,
    tile: int,
    overlap: int,
    *,
    margin: int | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """How far tiled inference is from the whole-image forward, on one batch.

    lr: (B, 3, h, w) float in [0, 1]. Returns max and mean absolute differences of the SR
    images (clamped to [0, 1]), the largest difference in 8-bit levels after rounding, and the
    standard deviation of the untiled output (to judge the differences' scale).
    """
    whole, _ = sr_images(model, lr, precision=precision)
    tiled, _ = sr_images(model, lr, precision=precision, tile=tile, overlap=overlap, margin=margin)
    d = (tiled - whole).abs()
    levels = (to_uint8(tiled).int() - to_uint8(whole).int()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "max_levels": int(levels.max()),
            "sr_std": float(whole.std())}


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, MATLAB im2uint8 rounding."""
    return to_uint8(x.detach().cpu()).permute(1, 2, 0).numpy()


def uint8_to_tensor(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device).float() / 255


# --- loading and exporting generators --------------------------------------------------------


def build_and_load(
    checkpoint: str | os.PathLike, arch: GeneratorConfig, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build the generator ``arch`` describes and load ``checkpoint`` into it, completely.

    Formats: whatever ``spsr_hpc.models.load_pretrained`` reads (public SPSR, ESRGAN old/new
    keys, our safetensors exports). Unlike training, which may start SPSR from an ESRGAN trunk,
    evaluation and inference need every weight: a checkpoint that leaves layers at their random
    initialisation (e.g. an ESRGAN file loaded into ``spsr``) is an error naming them.
    Returns the model in eval mode on ``device``.
    """
    path = Path(checkpoint)
    if path.is_dir():
        hint = (
            "a training checkpoint folder: pass the run's generator export instead "
            "(<run_dir>/generator.safetensors or generator_ema.safetensors)"
            if (path / "meta.json").is_file() or path.name.startswith("step_")
            else "a folder: pass a weights file (.pth or .safetensors)"
        )
        raise FileNotFoundError(f"checkpoint {str(path)!r} is {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    model = build_generator(generator_config_from_export(dataclasses.asdict(arch)))  # no init/loading
    try:
        report = load_pretrained(model, path)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} does not fit the {describe_arch(arch)} generator; "
            f"{implied_arch_hint(path, arch)}. Details: {' '.join(str(e).split())}"
        ) from None
    if report.fresh:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} ({report.format} format) does not provide {len(report.fresh)} "
            f"weights of the {describe_arch(arch)} generator (e.g. {report.fresh[:3]}); "
            f"{implied_arch_hint(path, arch)}"
        )
    log.info("%s", report)
    return model.to(device).eval()


def generator_config_from_metadata(checkpoint: str | os.PathLike) -> GeneratorConfig | None:
    """The GeneratorConfig a trainer export carries in its safetensors metadata, else None.

    The trainer (and ``launch/infer.py --export-safetensors``) writes the generator section as
    JSON under the ``generator`` metadata key; other files (.pth, foreign safetensors) have none.
    Training-time fields (``TRAINING_ONLY_FIELDS``: pretrained, fusion_init, ...) are ignored.
    """
    path = Path(checkpoint)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e})") from e
    if "generator" not in meta:
        return None
    try:
        # Initialisation fields (pretrained, fusion_init, ...) say how training started; they
        # must not decide whether the trained weights load.
        return generator_config_from_export(json.loads(meta["generator"]))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint {str(path)!r}: its 'generator' metadata {meta['generator']!r} is not a valid "
            f"generator config ({e}); pass --arch/--nf/--nb/--gc/--taps explicitly"
        ) from e


def describe_arch(cfg: GeneratorConfig) -> str:
    """``spsr (nf=64, nb=23, gc=32, taps=[4, 9, 14, 19], x4)``-style description."""
    nf, nb = cfg.resolved()
    parts = [f"nf={nf}", f"nb={nb}"]
    if cfg.name in ("spsr", "rrdbnet"):
        parts.append(f"gc={cfg.gc}")
    if cfg.name == "spsr":
        parts.append(f"taps={list(cfg.taps)}")
    return f"{cfg.name} ({', '.join(parts)}, x{cfg.scale})"


def _count_blocks(sd: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def implied_architecture(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The generator family and sizes a state dict's tensors imply (None when unrecognised).

    Returns e.g. ``{"arch": "spsr", "nf": 64, "nb": 23, "gc": 32}``: the number of blocks is
    counted from the keys, widths come from the first conv's and the first dense conv's shapes.
    """
    def out_ch(key: str) -> int | None:
        t = sd.get(key)
        return int(t.shape[0]) if t is not None and t.ndim >= 1 else None

    if "model.0.weight" in sd and any(k.startswith("model.1.sub.") for k in sd):  # RRDB trunk
        arch = "spsr" if any(k.startswith(("b_", "f_")) for k in sd) else "rrdbnet"
        return {"arch": arch, "nf": out_ch("model.0.weight"),
                "nb": _count_blocks(sd, r"model\.1\.sub\.(\d+)\.RDB1\."),
                "gc": out_ch("model.1.sub.0.RDB1.conv1.0.weight")}
    if "conv_first.weight" in sd:  # ESRGAN, new key style
        return {"arch": "rrdbnet", "nf": out_ch("conv_first.weight"),
                "nb": _count_blocks(sd, r"(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)1\."),
                "gc": out_ch("body.0.rdb1.conv1.weight") or out_ch("RRDB_trunk.0.RDB1.conv1.weight")}
    if "head.weight" in sd:
        return {"arch": "edsr", "nf": out_ch("head.weight"), "nb": _count_blocks(sd, r"body\.(\d+)\.body\.")}
    if "head.0.weight" in sd:
        return {"arch": "srresnet", "nf": out_ch("head.0.weight"),
                "nb": _count_blocks(sd, r"body\.(\d+)\.body\.")}
    return None


def _implied_scale(sd: dict[str, torch.Tensor], found: dict[str, Any], base: GeneratorConfig) -> int | None:
    """The up-scaling factor whose generator (``base`` with ``found``'s family and sizes) has
    exactly ``sd``'s tensor names and shapes; built on the meta device (no memory, no init)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    sizes = {k: v for k, v in found.items() if k in ("nf", "nb", "gc") and v is not None}
    for scale in (4, 2, 3, 8, 1):
        try:
            cfg = dataclasses.replace(base, name=found["arch"], scale=scale, **sizes)
            with torch.device("meta"):
                model = build_generator(generator_config_from_export(dataclasses.asdict(cfg)))
        except (TypeError, ValueError):
            continue
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return scale
    return None


def implied_arch_hint(checkpoint: str | os.PathLike, base: GeneratorConfig | None = None) -> str:
    """One clause for error messages: what the checkpoint's tensors imply and the flags to pass
    (with ``base``, the generator that did not fit, also the up-scaling factor when it differs)."""
    from spsr_hpc.models.loading import read_state_dict

    try:
        sd, _, _ = read_state_dict(checkpoint)
    except (OSError, TypeError, ValueError):
        return "its tensors could not be read"
    found = implied_architecture(sd)
    if found is None:
        return "its tensors match none of spsr, rrdbnet, edsr, srresnet"
    if base is not None:
        scale = _implied_scale(sd, found, base)
        if scale is not None and scale != base.scale:
            found["scale"] = scale
    flags = " ".join(f"--{k} {v}" for k, v in found.items() if v is not None)
    sizes = ", ".join(f"{k}={v}" for k, v in found.items() if k not in ("arch", "scale") and v is not None)
    at = f" x{found['scale']}" if "scale" in found else ""
    return f"its tensors imply {found['arch']}{at} ({sizes}): pass {flags}"


def resolve_arch(
    checkpoint: str | os.PathLike | None,
    *,
    arch: str | None = None,
    nf: int | None = None,
    nb: int | None = None,
    gc: int | None = None,
    taps: Sequence[int] | None = None,
    scale: int | None = None,
) -> GeneratorConfig:
    """The generator to build for ``checkpoint``: its metadata, then the explicit values on top.

    Without metadata (or when ``arch`` names another family than the metadata's) the base is the
    published configuration of ``arch`` (default "spsr"). Values left None keep the base's.
    """
    meta = generator_config_from_metadata(checkpoint) if checkpoint is not None else None
    if meta is not None and arch is not None and arch != meta.name:
        meta = None  # another family: its sizes do not transfer
    base = meta if meta is not None else GeneratorConfig(name=arch or "spsr")
    explicit: dict[str, Any] = {"nf": nf, "nb": nb, "gc": gc, "scale": scale,
                                "taps": list(taps) if taps else None}
    changes = {k: v for k, v in explicit.items() if v is not None}
    return generator_config_from_export({**dataclasses.asdict(base), **changes})


def export_generator(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write the generator's state dict as safetensors (loadable by ``load_pretrained``).

    Tensors are cloned to CPU so that modules saved under two names (SPSR's ``model.8`` ==
    ``HR_conv0_new.0``) become two plain tensors, which safetensors requires. The file is
    written to a temporary name and renamed, so a crash never leaves a truncated export.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "spsr_hpc.generator", "class": type(model).__name__}
    meta.update(metadata or {})
    with atomic_output(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=meta)
    return path


class _TorchGradientMap(nn.Module):
    """Same-size gradient map through plain PyTorch ops (exportable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spsr_kernels.gradient_map(x, 1, backend="torch")


def _use_torch_gradient_maps(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GradientMapNoPadding):
                setattr(parent, name, _TorchGradientMap())


class _SROnly(nn.Module):
    """Wraps a generator so that ONNX export sees a single SR output (and grad_sr if asked)."""

    def __init__(self, model: nn.Module, with_grad: bool) -> None:
        super().__init__()
        self.model, self.with_grad = model, with_grad

    def forward(self, lr: torch.Tensor):
        out = self.model(lr)
        if isinstance(out, torch.Tensor):
            return out
        return (out.sr, out.grad_sr) if self.with_grad and out.grad_sr is not None else out.sr


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_hw: tuple[int, int] = (32, 32),
    opset: int = 17,
    with_grad: bool = False,
) -> Path:
    """Export the generator to ONNX with dynamic batch, height and width.

    Inputs ``lr`` (B, 3, h, w) float32 in [0, 1]; outputs ``sr`` (and ``grad_sr`` when
    ``with_grad``). Needs the ``onnx`` package (torch's exporter imports it).
    """
    if importlib.util.find_spec("onnx") is None:
        raise ModuleNotFoundError(
            "ONNX export needs the `onnx` package, which is not installed; install it (pip install onnx) "
            "or leave out --onnx"
        )
    path = Path(path)
    # Export a CPU fp32 copy whose gradient maps use plain PyTorch ops: the fused kernel is a
    # custom op (Triton on CUDA) that ONNX has no translation for.
    export_model = copy.deepcopy(model).cpu().float().eval()
    _use_torch_gradient_maps(export_model)
    wrapper = _SROnly(export_model, with_grad).eval()
    example = torch.rand(1, 3, *example_hw)
    outputs = ["sr", "grad_sr"] if with_grad else ["sr"]
    dyn = {"lr": {0: "batch", 2: "height", 3: "width"}}
    dyn.update({name: {0: "batch", 2: "out_height", 3: "out_width"} for name in outputs})
    with atomic_output(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=["lr"], output_names=outputs,
            dynamic_axes=dyn, opset_version=opset, dynamo=False,
        )
    return path


# --- the inference job -----------------------------------------------------------------------


def _input_files(inp: Path) -> list[Path]:
    if inp.is_dir():
        files = list_images(inp)
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {str(inp)!r}")
        return files
    if inp.is_file():
        return [inp]
    raise FileNotFoundError(f"input {str(inp)!r} is neither an image file nor a folder")


def _save_png(img: np.ndarray, path: Path, kept: str = "") -> None:
    with atomic_output(path, kept) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp, format="PNG")


def infer(
    inputs: str | os.PathLike,
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    tile: int | None = 128,
    overlap: int = 32,
    margin: int | None = None,
    tile_batch: int = 1,
    save_grad: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Super-resolve an image file or every image of a folder; write ``<stem>_SR.png``.

    Args:
        inputs: an image file or a folder of images (not recursive).
        model: a generator (eval mode) on the device to run on.
        out_dir: output folder (created).
        precision: "fp32", "bf16" or "fp16" (CUDA).
        tile, overlap, margin, tile_batch: see :func:`sr_tiled`; ``tile=None`` runs whole images.
        save_grad: also write the gradient branch's HR map as ``<stem>_grad.png`` (clipped to
            [0, 1]); an error for models without a gradient branch.
        progress: tqdm bar over images (rank 0).

    Returns the written SR paths. Unreadable images raise ``spsr_hpc.data.BadImageError``
    naming the file, before any output is written.
    """
    files = _input_files(Path(inputs))
    out = Path(out_dir)
    _check_outputs(files, out)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # Decode everything first so that a bad file fails the run before hours of GPU work.
    images = []
    for f in files:
        img, note = read_rgb(f)
        if note:
            log.info("%s: %s", f, note)
        images.append(img)
    written = []
    show = progress and is_main_process()
    bar = tqdm(list(zip(files, images)), desc="infer", unit="img", disable=not show)
    for f, img in bar:
        sr, grad = sr_images(
            model, uint8_to_tensor(img, device), precision=precision, tile=tile, overlap=overlap,
            margin=margin, tile_batch=tile_batch,
        )
        if save_grad and grad is None:  # found at the first image, before anything is written
            raise ValueError(
                f"--save-grad: the model {type(model).__name__} has no gradient branch (only spsr "
                "generators have one): leave out --save-grad"
            )
        dest = out / f"{f.stem}_SR.png"
        done = f"{len(written)} of {len(files)} SR images are complete in {out}"
        _save_png(tensor_to_uint8(sr[0]), dest, done)
        written.append(dest)
        if save_grad:
            _save_png(tensor_to_uint8(grad[0].clamp(0, 1)), out / f"{f.stem}_grad.png",
                      f"{len(written)} of {len(files)} SR images are complete in {out}, the gradient maps "
                      "of the ones before")
    return written




def cli_device(
    spec: str | None, tile: int | None = None, overlap: int = 0, margin: int | None = None
) -> torch.device:
    """``--device`` (default: this rank's CUDA device, else the CPU) and ``--tile/--overlap/--margin``
    checked before any model is built; ValueError naming the value and the fix."""
    if spec is None:
        device = local_device()
    else:
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ValueError(f"--device {spec!r} is not a device: use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA device is visible; use --device cpu")
    if tile:  # 0 / None: whole images
        _check_tiling(tile, overlap, margin)
    return device


def _check_outputs(files: list[Path], out: Path) -> None:
    """ValueError before any work when the output folder is a file, or when two inputs would
    write the same ``<stem>_SR.png`` (``a.png`` and ``a.jpg``): one result would overwrite the other."""
    check_output_folder(out, "--out")
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise ValueError(
                f"--input: {by_stem[f.stem].name} and {f.name} would both be written as {f.stem}_SR.png "
                "in --out: rename one of them, or super-resolve them into different --out folders"
            )
        by_stem[f.stem] = f


# --- command line ----------------------------------------------------------------------------


def _user_error(exc: BaseException) -> int:
    """Print ``error: <message>`` on stderr (rank 0) for a user error; exit status 2."""
    import sys

    if is_main_process():
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def add_arch_arguments(p: argparse.ArgumentParser) -> None:
    """The generator-architecture options shared by launch/infer.py and launch/evaluate.py.

    Every option defaults to None: the architecture comes from the checkpoint's metadata
    (exports of the trainer carry it), and an option given on the command line overrides it.
    """
    g = p.add_argument_group(
        "generator architecture",
        "read from the checkpoint's metadata when it has some (trainer exports do); options given "
        "here override it. Without metadata: the published spsr x4 model.",
    )
    g.add_argument("--arch", default=None, choices=["spsr", "rrdbnet", "edsr", "srresnet"],
                   help="generator architecture (default: metadata, else spsr)")
    g.add_argument("--nf", type=int, default=None,
                   help="feature width (default: metadata, else the published one)")
    g.add_argument("--nb", type=int, default=None,
                   help="number of blocks (default: metadata, else the published one)")
    g.add_argument("--gc", type=int, default=None,
                   help="dense-block growth channels (default: metadata, else 32)")
    g.add_argument("--taps", type=int, nargs="+", default=None,
                   help="spsr: trunk RRDB indices feeding the branch (default: metadata, else 4 9 14 19)")
    g.add_argument("--scale", type=int, default=None, help="up-scaling factor (default: metadata, else 4)")


def arch_from_args(args: argparse.Namespace, checkpoint: str | os.PathLike | None = None,
                   arch: str | None = None) -> GeneratorConfig:
    """The GeneratorConfig for ``checkpoint``: its metadata overridden by add_arch_arguments' options.

    ``arch`` (evaluate's per-model ``NAME:ARCH=PATH``) replaces ``--arch``; the size options
    then apply only when that model's family equals ``--arch``'s.
    """
    if arch is not None and arch != (args.arch or arch):
        return resolve_arch(checkpoint, arch=arch, scale=args.scale)
    return resolve_arch(checkpoint, arch=arch or args.arch, nf=args.nf, nb=args.nb, gc=args.gc,
                        taps=args.taps, scale=args.scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Super-resolve images of any size with a generator checkpoint (tiled).",
    )
    p.add_argument("--input", help="an image file or a folder of images")
    p.add_argument("--checkpoint", required=True,
                   help="generator weights (SPSR/ESRGAN .pth or our .safetensors)")
    add_arch_arguments(p)
    p.add_argument("--out", default="runs/infer", help="output folder (default runs/infer)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="autocast dtype for the generator (default fp32; fp16 needs CUDA)")
    p.add_argument("--tile", type=int, default=128, help="LR tile size (default 128); 0 runs whole images")
    p.add_argument("--overlap", type=int, default=32,
                   help="LR pixels shared by neighbouring tiles (default 32)")
    p.add_argument("--margin", type=int, default=None,
                   help="LR pixels of each inner tile side given weight 0 (default overlap // 4)")
    p.add_argument("--tile-batch", type=int, default=1, help="tiles per forward pass (default 1)")
    p.add_argument("--save-grad", action="store_true", help="also write the gradient branch's map")
    p.add_argument("--check-tiling", action="store_true",
                   help="also run each image whole and print the tiled-vs-untiled difference")
    p.add_argument("--export-safetensors", default=None, metavar="PATH",
                   help="write the loaded generator's weights as safetensors")
    p.add_argument("--onnx", default=None, metavar="PATH", help="export the generator to ONNX (needs `onnx`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Entry point of launch/infer.py."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.input is None and args.export_safetensors is None and args.onnx is None:
        raise SystemExit("nothing to do: give --input (and/or --export-safetensors / --onnx)")
    try:
        device = cli_device(args.device, args.tile, args.overlap, args.margin)
        check_precision(device, args.precision)  # before the model is built
        cfg = arch_from_args(args, args.checkpoint)
        if args.input is not None:  # a wrong --input or --out fails before the model is built
            _check_outputs(_input_files(Path(args.input)), Path(args.out))
        if args.save_grad and cfg.name != "spsr":
            raise ValueError(f"--save-grad: a {cfg.name} generator has no gradient branch (only spsr "
                             "generators have one): leave out --save-grad")
        if args.check_tiling and not (args.tile and args.input):
            raise ValueError("--check-tiling compares tiled with whole-image SR: it needs --input and "
                             "--tile > 0")
        if args.export_safetensors:
            check_output_file(args.export_safetensors, "--export-safetensors", "generator.safetensors")
        if args.onnx:
            check_output_file(args.onnx, "--onnx", "generator.onnx")
        model = build_and_load(args.checkpoint, cfg, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(_user_error(e)) from None
    try:
        return _run_main(args, model, cfg, device)
    except OutputWriteError as e:  # a full disk: one line, no .tmp left, what is complete named
        _user_error(e)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C: every file written is whole (each goes through a .tmp)
        import sys

        print(f"infer: interrupted; the images written to {args.out} so far are complete (no .tmp is "
              "left); re-run to do them all", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def _run_main(args: argparse.Namespace, model: nn.Module, cfg: GeneratorConfig,
              device: torch.device) -> list[Path]:
    log.info("generator: %s", describe_arch(cfg))
    if args.export_safetensors:
        meta = {"arch": cfg.name, "generator": json.dumps(dataclasses.asdict(cfg))}
        path = export_generator(model, args.export_safetensors, metadata=meta)
        print(f"safetensors: {path}")
    if args.onnx:
        print(f"onnx: {export_onnx(model, args.onnx, with_grad=args.save_grad)}")
    if args.input is None:
        return []
    try:
        written = infer(
            args.input, model, args.out, precision=args.precision, tile=args.tile or None,
            overlap=args.overlap, margin=args.margin, tile_batch=args.tile_batch, save_grad=args.save_grad,
            progress=not args.no_progress,
        )
    except (BadImageError, ValueError) as e:  # an unreadable image (before any output), --save-grad
        raise SystemExit(_user_error(e)) from None
    for path in written:
        print(path)
    if args.check_tiling:
        for f in _input_files(Path(args.input)):
            img, _ = read_rgb(f)
            stats = tiling_error(model, uint8_to_tensor(img, device), args.tile, args.overlap,
                                 margin=args.margin, precision=args.precision)
            margin = args.overlap // 4 if args.margin is None else args.margin
            print(f"{f.name}: tiled vs untiled (tile {args.tile}, overlap {args.overlap}, margin {margin}): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    return written


__all__: Sequence[str] = [
    "autocast",
    "build_and_load",
    "check_precision",
    "cli_device",
    "describe_arch",
    "export_generator",
    "export_onnx",
    "generator_config_from_metadata",
    "implied_architecture",
    "infer",
    "main",
    "resolve_arch",
    "sr_images",
    "sr_tiled",
    "tensor_to_uint8",
    "tiling_error",
    "uint8_to_tensor",
]
