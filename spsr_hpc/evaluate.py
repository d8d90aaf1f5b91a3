"""Evaluation on the paper's protocol: a Table-I-style report (LPIPS / PSNR / SSIM).

For every dataset (HR folder, optional LR folder) and every method (a bicubic baseline and
each generator), every image is super-resolved and scored:

- GT mod-cropped to the scale; LR read from the LR folder, or made from the mod-cropped GT
  with MATLAB-style ``imresize(gt, 1/scale)`` and uint8 rounding (as the benchmark LR sets were);
- bicubic baseline: ``imresize(lr, scale)`` (MATLAB style), uint8;
- PSNR/SSIM on MATLAB's rounded Y with ``scale`` pixels shaved (:mod:`spsr_hpc.metrics`);
- LPIPS (AlexNet, v0.1) on the full RGB image. When the AlexNet weights are not on disk (run
  ``python -m spsr_hpc.weights fetch``) LPIPS is None in the rows, an empty cell in the CSVs and
  "n/a" in the Markdown, with the reason in ``lpips_note`` and the CSVs' ``note`` column, unless
  ``require_lpips``.

Images are sharded over ranks when torch.distributed is initialised (``torchrun`` /
``deepspeed``); rank 0 gathers the rows and writes ``report.md``, ``report.csv`` and
``per_image.csv`` (and, optionally, the SR images).

Usage (see docs/evaluation.md):

    python launch/evaluate.py --model SPSR=spsr.pth --data-root datasets --sets Set5 Set14 --out runs/eval
    torchrun --nproc_per_node 8 launch/evaluate.py --model SPSR=spsr.pth --data-root datasets --out runs/eval
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from spsr_hpc import distributed as sdist
from spsr_hpc.data import BadImageError, FolderDataset, imresize, to_uint8
from spsr_hpc.files import OutputWriteError, atomic_output, check_output_folder, write_all_or_none
from spsr_hpc.inference import (
    PRECISIONS,
    add_arch_arguments,
    arch_from_args,
    build_and_load,
    check_precision,
    cli_device,
    sr_images,
    tensor_to_uint8,
)
from spsr_hpc.metrics import LPIPSMetric, psnr, ssim
from spsr_hpc.models import CheckpointMismatchError, GeneratorConfig
from spsr_hpc.weights import BACKBONE_FILES, MissingWeightsError, hub_checkpoint_dir

log = logging.getLogger(__name__)

STANDARD_SETS = ("Set5", "Set14", "BSD100", "General100", "Urban100")
# Sub-folder names tried under <data-root>/<set>/, first match wins: ours, then BasicSR's.
HR_SUBDIRS = ("HR", "GTmod12")


def lr_subdirs(scale: int) -> tuple[str, ...]:
    return (f"LR_bicubic/X{scale}", f"LRbicx{scale}")


BICUBIC = "Bicubic"
_RANDOM_NOTE = (
    "LPIPS computed with a RANDOM AlexNet backbone (test mode): not comparable with published values"
)


class DatasetNotFoundError(FileNotFoundError):
    """No usable benchmark set on disk; the message shows the expected layout."""


class EvalInputError(ValueError):
    """A dataset pair or a checkpoint is unusable; found before any model is built."""


def expected_layout(data_root: str | os.PathLike, sets: Sequence[str], scale: int) -> str:
    root = Path(data_root)
    first = sets[0] if sets else STANDARD_SETS[0]
    lr = lr_subdirs(scale)[0]
    return "\n".join([
        "Expected layout (PNG/JPEG/BMP/TIFF; the LR folder is optional: without it LR is made from HR "
        "with MATLAB-style bicubic, as the benchmark LR sets were):",
        f"  {root}/<set>/{HR_SUBDIRS[0]}/<image>             ground truth, e.g. "
        f"{root / first / HR_SUBDIRS[0] / 'baby.png'}",
        f"  {root}/<set>/{lr}/<image>  LR, same name or <stem>x{scale}.<ext>",
        f"  with <set> one of: {', '.join(sets)}",
        f"BasicSR's folder names are accepted too: <set>/{HR_SUBDIRS[1]} and <set>/{lr_subdirs(scale)[1]}.",
    ])


def find_datasets(
    data_root: str | os.PathLike, sets: Sequence[str] | None = None, scale: int = 4
) -> dict[str, tuple[Path, Path | None]]:
    """Locate benchmark sets under ``data_root``: name -> (hr_dir, lr_dir or None).

    ``sets=None`` takes every standard set that is present (error if none is); explicitly
    named sets must all be present. Errors show the exact expected layout.
    """
    root = Path(data_root)
    wanted = list(sets) if sets else list(STANDARD_SETS)
    found: dict[str, tuple[Path, Path | None]] = {}
    missing = []
    for name in wanted:
        hr = next((root / name / d for d in HR_SUBDIRS if (root / name / d).is_dir()), None)
        if hr is None:
            missing.append(name)
            continue
        lr = next((root / name / d for d in lr_subdirs(scale) if (root / name / d).is_dir()), None)
        found[name] = (hr, lr)
    if (sets and missing) or not found:
        raise DatasetNotFoundError(
            f"benchmark set(s) {', '.join(missing)} not found under {root}. Nothing is downloaded; "
            "get Set5/Set14/BSD100/General100/Urban100 (e.g. the packs BasicSR or EDSR link to) and "
            f"put them in place.\n{expected_layout(root, missing or wanted, scale)}"
        )
    return found


# --- loading pairs ---------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    hr: np.ndarray  # (H, W, 3) uint8, mod-cropped
    lr: np.ndarray  # (H/s, W/s, 3) uint8


def _load_pair(ds: FolderDataset, i: int) -> Pair:
    item = ds[i]
    # FolderDataset's LR is uint8 / 255 in float32, so rounding recovers the uint8 exactly.
    lr = (item["lr"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Pair(item["name"], item["hr"], np.ascontiguousarray(lr))


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(lr, scale, 'bicubic')`` of a uint8 image, uint8 out."""
    return to_uint8(imresize(lr.astype(np.float64) / 255.0, float(scale)))


# --- the report ------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """What :func:`evaluate` returns (on every rank; only rank 0 writes files).

    summary: one row per (dataset, method): dataset, method, images, lpips (float, or None when
    LPIPS could not be measured; the reason is lpips_note), psnr, ssim (means over the images).
    per_image: one row per (dataset, method, image) with psnr, ssim, lpips and the SR seconds.
    files: written paths by kind.
    """

    summary: list[dict]
    per_image: list[dict]
    markdown: str
    lpips_note: str | None
    files: dict[str, Path] = field(default_factory=dict)

    def value(self, dataset: str, method: str, metric: str) -> float | None:
        for row in self.summary:
            if row["dataset"] == dataset and row["method"] == method:
                return row[metric]
        raise KeyError(f"no row for dataset {dataset!r}, method {method!r}")


def _fmt_unit(v: float | None, digits: int) -> str:
    """.3407 style (the paper drops the leading zero of values in [0, 1]); None -> n/a."""
    if v is None:
        return "n/a"
    s = f"{v:.{digits}f}"
    return s[1:] if s.startswith("0.") else s


def _fmt_psnr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.3f}"


def render_markdown(summary: list[dict], datasets: Sequence[str], methods: Sequence[str], scale: int,
                    lpips_note: str | None) -> str:
    head = "| set | metric | " + " | ".join(methods) + " |"
    sep = "|---|---|" + "---|" * len(methods)
    rows = [f"Table I style, ×{scale}: LPIPS (lower is better) / PSNR (dB) / SSIM, means over images.", "",
            head, sep]
    by = {(r["dataset"], r["method"]): r for r in summary}
    for i, d in enumerate(datasets):
        cells = []
        for m in methods:
            r = by.get((d, m))
            cells.append("—" if r is None else
                         f"{_fmt_unit(r['lpips'], 4)} / {_fmt_psnr(r['psnr'])} / {_fmt_unit(r['ssim'], 4)}")
        metric = "LPIPS / PSNR / SSIM" if i == 0 else ""
        rows.append(f"| {d} | {metric} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(f"PSNR/SSIM: MATLAB Y channel (rounded), {scale} px shaved, SSIM as Wang's ssim.m; "
                "LPIPS: AlexNet v0.1 on full RGB.")
    if lpips_note:
        rows.append(lpips_note)
    return "\n".join(rows) + "\n"


def _csv_text(rows: list[dict], columns: Sequence[str], note: str | None = None) -> str:
    """Numbers with 6 decimals, an empty cell for a value that could not be measured (None), and
    a ``note`` column saying why (empty when everything was measured)."""
    fh = io.StringIO(newline="")
    w = csv.DictWriter(fh, fieldnames=[*columns, "note"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        cells = {k: "" if v is None else f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else v
                 for k, v in r.items()}
        w.writerow({**cells, "note": note or ""})
    return fh.getvalue()


# --- the job ---------------------------------------------------------------------------------


def _prepare_models(
    models: Mapping[str, nn.Module | str | os.PathLike | tuple[GeneratorConfig, str | os.PathLike]],
    arch: GeneratorConfig | None,
    scale: int,
    device: torch.device,
) -> dict[str, nn.Module]:
    out = {}
    for name, spec in models.items():
        if name == BICUBIC:
            raise EvalInputError(
                f"method name {BICUBIC!r} is reserved for the baseline row; rename the model"
            )
        if isinstance(spec, nn.Module):
            model = spec.to(device).eval()
        else:
            if isinstance(spec, tuple):
                cfg, path = spec
            else:
                cfg, path = arch, spec
            if cfg is None:
                raise EvalInputError(
                    f"model {name!r} is a checkpoint path; pass arch=GeneratorConfig(...) to build it"
                )
            if cfg.scale != scale:
                raise EvalInputError(
                    f"model {name!r}: architecture scale {cfg.scale} differs from the evaluation scale"
                    f" {scale}"
                )
            model = build_and_load(path, cfg, device)
        declared = getattr(model, "scale", scale)
        if declared != scale:
            raise EvalInputError(f"model {name!r} up-scales ×{declared} but the evaluation scale is ×{scale}")
        out[name] = model
    return out


def check_inputs(
    models: Mapping[str, object],
    datasets: Mapping[str, tuple[str | os.PathLike, str | os.PathLike | None]],
    scale: int,
) -> dict[str, FolderDataset]:
    """Open every set and check every HR/LR pair (sizes from the headers) and every checkpoint
    path, without building a model. Returns the readers; raises :class:`EvalInputError`."""
    readers = {}
    for name, (hr, lr) in datasets.items():
        try:
            readers[name] = FolderDataset(hr, lr, scale=scale)
            readers[name].check_pairs()
        except ValueError as e:  # BadImageError is a ValueError too
            raise EvalInputError(f"dataset {name!r}: {e}") from e
    for name, spec in models.items():
        path = spec[1] if isinstance(spec, tuple) else spec
        if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
            raise EvalInputError(f"model {name!r}: checkpoint {str(path)!r} does not exist")
    return readers


@contextlib.contextmanager
def _restore_modes(models: Mapping[str, object]) -> Iterator[None]:
    modes = {name: m.training for name, m in models.items() if isinstance(m, nn.Module)}
    try:
        yield
    finally:
        for name, training in modes.items():
            models[name].train(training)


def _build_lpips(weights: str | os.PathLike | None, require: bool, random_backbone: bool,
                 device: torch.device) -> tuple[LPIPSMetric | None, str | None]:
    if random_backbone:
        return LPIPSMetric(random_backbone=True, device=device), _RANDOM_NOTE
    from safetensors import SafetensorError

    try:
        return LPIPSMetric(weights, device=device), None
    except (SafetensorError, ValueError, RuntimeError) as e:  # a damaged file, or another network's
        where = weights or "found by `python -m spsr_hpc.weights status`"
        raise EvalInputError(
            f"LPIPS weights {where} do not load as AlexNet ({' '.join(str(e).split())[:200]}): run "
            "`python -m spsr_hpc.weights fetch --force`, or pass another --lpips-weights"
        ) from e
    except MissingWeightsError:
        if require:
            raise
        file = Path(weights) if weights is not None else hub_checkpoint_dir() / BACKBONE_FILES["alexnet"]
        note = (f"LPIPS not measured: AlexNet weights missing ({file}); run `python -m spsr_hpc.weights "
                "fetch` or pass --lpips-weights")
        if sdist.is_main_process():
            log.warning("%s", note)
        return None, note


def _batches(pairs: list[Pair], batch_size: int) -> list[list[Pair]]:
    """Groups of equal LR size (so that they stack), at most batch_size each, in a stable order."""
    groups: dict[tuple[int, int], list[Pair]] = defaultdict(list)
    for p in pairs:
        groups[p.lr.shape[:2]].append(p)
    out = []
    for group in groups.values():
        out.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return out


def _to_device(imgs: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    arr = np.stack([np.ascontiguousarray(i.transpose(2, 0, 1)) for i in imgs])
    return torch.from_numpy(arr).to(device).float() / 255


def _super_resolve(
    batch: list[Pair], nets: Mapping[str, nn.Module], scale: int, dev: torch.device, *, bicubic: bool,
    precision: str, tile: int | None, overlap: int,
) -> dict[str, tuple[list[np.ndarray], float]]:
    """method -> (uint8 SR images of the batch, seconds for the batch)."""
    outputs: dict[str, tuple[list[np.ndarray], float]] = {}
    if bicubic:
        t0 = time.perf_counter()
        ups = [bicubic_upscale(p.lr, scale) for p in batch]
        outputs[BICUBIC] = (ups, time.perf_counter() - t0)
    lr_t = _to_device([p.lr for p in batch], dev)
    for name, net in nets.items():
        t0 = time.perf_counter()
        sr, _ = sr_images(net, lr_t, precision=precision, tile=tile, overlap=overlap)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        outputs[name] = ([tensor_to_uint8(s) for s in sr], seconds)
    return outputs


def _summarise(rows: list[dict], datasets: list[str], methods: list[str]) -> list[dict]:
    """Means per (dataset, method); LPIPS is None when it was not measured."""
    summary = []
    for d in datasets:
        for m in methods:
            sel = [r for r in rows if r["dataset"] == d and r["method"] == m]
            if not sel:
                continue
            summary.append({
                "dataset": d, "method": m, "images": len(sel),
                "lpips": (None if any(r["lpips"] is None for r in sel)
                          else float(np.mean([r["lpips"] for r in sel]))),
                "psnr": float(np.mean([r["psnr"] for r in sel])),
                "ssim": float(np.mean([r["ssim"] for r in sel])),
                "seconds_per_image": float(np.mean([r["seconds"] for r in sel])),
            })
    return summary


def _save_image(img: np.ndarray, dest: Path, out: Path) -> None:
    kept = f"The SR images written before it are complete; no report was written to {out}"
    with atomic_output(dest, kept) as tmp:
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp, format="PNG")


def _write_report(out: Path, report: EvalReport) -> dict[str, Path]:
    """report.md, report.csv and per_image.csv, all replaced or none (a failed write leaves the
    previous report whole and no .tmp file)."""
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "per_image": out / "per_image.csv"}
    write_all_or_none(
        [
            (files["csv"], _csv_text(report.summary, ["dataset", "method", "images", "lpips", "psnr", "ssim",
                                                      "seconds_per_image"], report.lpips_note)),
            (files["per_image"], _csv_text(report.per_image, ["dataset", "method", "image", "lpips", "psnr",
                                                              "ssim", "seconds"], report.lpips_note)),
            (files["markdown"], report.markdown),
        ],
        kept=f"The report is printed above; the files in {out} are unchanged",
    )
    return files


class ReportWriteError(OutputWriteError):
    """The evaluation finished but its report could not be written: ``report`` holds the scores."""

    def __init__(self, error: OutputWriteError, report: EvalReport) -> None:
        super().__init__(error.path, error.reason, error.kept)
        self.report = report


def evaluate(
    models: Mapping[str, nn.Module | str | os.PathLike | tuple[GeneratorConfig, str | os.PathLike]],
    datasets: Mapping[str, tuple[str | os.PathLike, str | os.PathLike | None]],
    scale: int,
    out_dir: str | os.PathLike,
    *,
    arch: GeneratorConfig | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    batch_size: int = 1,
    tile: int | None = None,
    overlap: int = 32,
    bicubic: bool = True,
    save_images: bool = False,
    lpips_weights: str | os.PathLike | None = None,
    require_lpips: bool = False,
    random_lpips_backbone: bool = False,
    lpips_metric: LPIPSMetric | None = None,
    progress: bool = True,
    lpips: bool = True,
) -> EvalReport:
    """Score generators (and the bicubic baseline) on benchmark sets; write the report.

    Args:
        models: method name -> an ``nn.Module`` (LR (B, 3, h, w) in [0, 1] -> tensor or
            SROutput), a checkpoint path (built with ``arch``), or ``(GeneratorConfig, path)``.
        datasets: set name -> (HR folder, LR folder or None to generate LR with bicubic).
        scale: the up-scaling factor (also the border shaved for PSNR/SSIM).
        out_dir: where ``report.md``, ``report.csv``, ``per_image.csv`` and ``images/`` go.
        arch: architecture for checkpoint paths (name, nf, nb, gc, scale, taps).
        device: default: this rank's device (cuda:LOCAL_RANK or CPU).
        precision: "fp32", "bf16" or "fp16" (CUDA) autocast for the generators.
        batch_size: images of equal LR size per forward pass.
        tile, overlap: tiled inference for large images (``tile=None``: whole images).
        bicubic: include the bicubic baseline row.
        save_images: write SR PNGs to ``out_dir/images/<set>/<method>/<image>.png``.
        lpips_weights: AlexNet checkpoint; None = spsr_hpc.weights' lookup (torch hub cache, then the
            weights converted by ``python -m spsr_hpc.weights fetch``).
        require_lpips: fail instead of reporting LPIPS as n/a when the weights are missing.
        random_lpips_backbone: tests only: LPIPS with a random AlexNet (the report says so).
        lpips_metric: an already built LPIPSMetric to reuse (e.g. across repeated evaluations);
            overrides lpips_weights and random_lpips_backbone.
        progress: tqdm bar on rank 0.
        lpips: False leaves LPIPS out (n/a in the report, saying so; ``--no-lpips``).

    Returns an :class:`EvalReport`. With torch.distributed initialised, images are sharded over
    ranks (round robin) and all ranks return the gathered report.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not datasets:
        raise ValueError("no datasets given")
    if not models and not bicubic:
        raise ValueError("nothing to evaluate: no models and bicubic=False")
    dev = torch.device(device) if device is not None else sdist.local_device()
    check_precision(dev, precision)  # bf16 needs native bf16 (CUDA, or a CPU with avx512_bf16/AMX)
    rank, world = sdist.get_rank(), sdist.get_world_size()
    distributed = sdist.is_initialized() and world > 1
    if not distributed:
        rank, world = 0, 1
    is_main = sdist.is_main_process() or not distributed
    out = Path(out_dir)

    # Every pair and checkpoint is checked before any model is built (minutes for large sets).
    readers = check_inputs(models, datasets, scale)
    # Modules passed in (e.g. mid-training by the demo) get their train/eval mode back at the end.
    with _restore_modes(models):
        nets = _prepare_models(models, arch, scale, dev)
        if not lpips:
            metric, lpips_note = None, "LPIPS not measured (left out: --no-lpips)"
        elif lpips_metric is not None:
            metric = lpips_metric.to(dev)
            random_lpips_backbone = lpips_metric.random_backbone
            lpips_note = _RANDOM_NOTE if random_lpips_backbone else None
        else:
            metric, lpips_note = _build_lpips(lpips_weights, require_lpips, random_lpips_backbone, dev)
        methods = ([BICUBIC] if bicubic else []) + list(nets)

        work = [(d, i) for d, ds in readers.items() for i in range(len(ds))]
        mine = work[rank::world]

        rows: list[dict] = []
        bar = tqdm(total=len(mine), desc=f"eval x{scale}", unit="img", disable=not (progress and is_main))
        by_set: dict[str, list[int]] = defaultdict(list)
        for d, i in mine:
            by_set[d].append(i)
        for d, indices in by_set.items():
            pairs = [_load_pair(readers[d], i) for i in indices]  # one set in memory at a time
            for batch in _batches(pairs, batch_size):
                outputs = _super_resolve(batch, nets, scale, dev, bicubic=bicubic, precision=precision,
                                         tile=tile, overlap=overlap)
                for method, (srs, seconds) in outputs.items():
                    for p, s in zip(batch, srs):
                        if s.shape != p.hr.shape:
                            raise ValueError(
                                f"{method} produced {s.shape} for {d}/{p.name}, expected {p.hr.shape}"
                            )
                    lp: list[float | None]
                    if metric is not None:
                        lp = metric(_to_device(srs, dev), _to_device([p.hr for p in batch], dev)).tolist()
                    else:
                        lp = [None] * len(batch)
                    for p, s, lv in zip(batch, srs, lp):
                        rows.append({
                            "dataset": d, "method": method, "image": p.name,
                            "psnr": psnr(s, p.hr, scale), "ssim": ssim(s, p.hr, scale), "lpips": lv,
                            "seconds": seconds / len(batch),
                        })
                        if save_images:
                            _save_image(s, out / "images" / d / method / f"{p.name}.png", out)
                bar.update(len(batch))
        bar.close()

        if distributed:
            gathered: list[list[dict]] = [[] for _ in range(world)]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        order = {d: i for i, d in enumerate(datasets)}
        morder = {m: i for i, m in enumerate(methods)}
        rows.sort(key=lambda r: (order[r["dataset"]], morder[r["method"]], r["image"]))

        summary = _summarise(rows, list(datasets), methods)
        md = render_markdown(summary, list(datasets), methods, scale,
                             lpips_note if metric is None or random_lpips_backbone else None)
        report = EvalReport(summary=summary, per_image=rows, markdown=md, lpips_note=lpips_note)
        if is_main:
            try:
                report.files = _write_report(out, report)
            except OutputWriteError as exc:
                raise ReportWriteError(exc, report) from exc.__cause__
        return report


# --- command line ----------------------------------------------------------------------------


def _parse_model(spec: str) -> tuple[str, str | None, str]:
    """NAME=PATH or NAME:ARCH=PATH -> (name, arch or None, path)."""
    if "=" not in spec:
        raise ValueError(f"--model {spec!r}: expected NAME=PATH or NAME:ARCH=PATH (e.g. SPSR=spsr.pth, "
                         "ESRGAN:rrdbnet=RRDB_ESRGAN_x4.pth)")
    left, path = spec.split("=", 1)
    name, _, arch = left.partition(":")
    if not name or not path:
        raise ValueError(f"--model {spec!r}: empty name or path")
    return name, arch or None, path


def _parse_dataset(spec: str) -> tuple[str, str, str | None]:
    """NAME=HR_DIR or NAME=HR_DIR,LR_DIR."""
    if "=" not in spec:
        raise ValueError(f"--dataset {spec!r}: expected NAME=HR_DIR or NAME=HR_DIR,LR_DIR")
    name, dirs = spec.split("=", 1)
    hr, _, lr = dirs.partition(",")
    return name, hr, lr or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Table-I-style evaluation (LPIPS / PSNR / SSIM on the paper's protocol).",
    )
    p.add_argument("--model", action="append", default=[], metavar="NAME[:ARCH]=PATH",
                   help="a generator checkpoint (repeatable); ARCH overrides --arch for this model")
    add_arch_arguments(p)
    p.add_argument("--data-root", default="datasets",
                   help="folder holding Set5/, Set14/, ... (default datasets)")
    p.add_argument("--sets", nargs="+", default=None, help=f"sets under --data-root (default: those of "
                   f"{', '.join(STANDARD_SETS)} present)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=HR_DIR[,LR_DIR]",
                   help="an extra dataset folder (repeatable); with --dataset only, --data-root is not read")
    p.add_argument("--bundled", action="store_true",
                   help="evaluate on scikit-image's bundled photos (exported under OUT/bundled)")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="autocast dtype for the generator (default fp32; fp16 needs CUDA)")
    p.add_argument("--batch-size", type=int, default=1, help="images of equal size per forward (default 1)")
    p.add_argument("--tile", type=int, default=None, help="LR tile size for tiled inference (default: off)")
    p.add_argument("--overlap", type=int, default=32, help="LR overlap between tiles (default 32)")
    p.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline row")
    p.add_argument("--save-images", action="store_true", help="write the SR images")
    p.add_argument("--lpips-weights", default=None, help="AlexNet weights for LPIPS (default: torchvision's "
                   "alexnet-owt-7be5be79.pth in the torch hub cache, else the file converted by "
                   "`python -m spsr_hpc.weights fetch`)")
    p.add_argument("--require-lpips", action="store_true", help="fail when the AlexNet weights are missing")
    p.add_argument("--no-lpips", action="store_true", help="leave LPIPS out (n/a in the report; faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    return p


def main(argv: Sequence[str] | None = None) -> EvalReport:
    """Entry point of launch/evaluate.py; initialises torch.distributed when launched with
    several processes and tears it down on the way out. User errors (a missing or mismatched
    file, a checkpoint that does not fit) print one ``error:`` line and exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if sdist.is_main_process() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    started = False
    try:
        sdist.export_slurm_env()  # under srun without a launcher: ranks from SLURM_PROCID/SLURM_NTASKS
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if sdist.get_world_size() > 1 and not sdist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(sdist.get_local_rank() % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    try:
        return _run_cli(args)
    except OutputWriteError as exc:  # a full disk: the scores are printed, nothing half-written is left
        if isinstance(exc, ReportWriteError):  # rank 0 writes the report
            print(exc.report.markdown, flush=True)
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:  # an SR image (--save-images), on whichever rank wrote it
            rank = f"rank {sdist.get_rank()}: " if sdist.get_world_size() > 1 else ""
            print(f"error: {rank}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except (EvalInputError, DatasetNotFoundError, CheckpointMismatchError, FileNotFoundError,
            ModuleNotFoundError, BadImageError) as exc:
        if sdist.is_main_process():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if started:
            dist.destroy_process_group()


def _cli_models(args: argparse.Namespace) -> dict[str, tuple[GeneratorConfig, str]]:
    """--model specs -> name: (architecture, path); the architecture comes from each checkpoint's
    metadata, overridden by --arch/--nf/... (a per-model ARCH uses only its metadata and --scale)."""
    models: dict[str, tuple[GeneratorConfig, str]] = {}
    for spec in args.model:
        try:
            name, arch, path = _parse_model(spec)
        except ValueError as e:
            raise EvalInputError(str(e)) from None
        if name in models:
            raise EvalInputError(f"--model name {name!r} given twice")
        if not Path(path).is_file():
            raise EvalInputError(f"model {name!r}: checkpoint {path!r} does not exist")
        try:
            models[name] = (arch_from_args(args, path, arch), path)
        except ValueError as e:
            raise EvalInputError(f"model {name!r}: {e}") from None
    return models


def _check_lpips_args(args: argparse.Namespace) -> None:
    """A --lpips-weights file the user named must be there: LPIPS silently n/a (the fallback when
    the default lookup finds nothing) would hide a typo. --no-lpips leaves it out on purpose."""
    if args.no_lpips and (args.require_lpips or args.lpips_weights):
        given = "--require-lpips" if args.require_lpips else "--lpips-weights"
        raise EvalInputError(f"--no-lpips and {given} contradict each other: pass one of them")
    if args.lpips_weights is not None:
        path = Path(args.lpips_weights)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise EvalInputError(
                f"--lpips-weights {args.lpips_weights}: {what}; pass the AlexNet weights file "
                "(`python -m spsr_hpc.weights fetch` converts one), or --no-lpips to leave LPIPS out"
            )


def _run_cli(args: argparse.Namespace) -> EvalReport:
    from spsr_hpc.data import export_bundled_photos

    try:  # --device, --tile/--overlap and --precision, before any model is built
        check_precision(cli_device(args.device, args.tile, args.overlap), args.precision)
    except ValueError as e:
        raise EvalInputError(str(e)) from None
    try:
        check_output_folder(args.out, "--out")
    except ValueError as e:
        raise EvalInputError(str(e)) from None
    _check_lpips_args(args)
    models = _cli_models(args)
    # The evaluation scale: --scale, else the first model's (from its metadata), else 4.
    scale = args.scale or next((cfg.scale for cfg, _ in models.values()), 4)
    datasets: dict[str, tuple[str | Path, str | Path | None]] = {}
    for spec in args.dataset:
        try:
            name, hr, lr = _parse_dataset(spec)
        except ValueError as e:
            raise EvalInputError(str(e)) from None
        if name in datasets:
            raise EvalInputError(f"--dataset name {name!r} given twice: one would replace the other; "
                                 "give each set its own NAME")
        datasets[name] = (hr, lr)
    if args.bundled:
        bundled = Path(args.out) / "bundled"
        if sdist.is_main_process():
            export_bundled_photos(bundled, holdout=2)
        sdist.barrier()
        datasets["bundled_val"] = (bundled / "val" / "HR", None)  # export_bundled_photos' layout
    if args.sets or not (args.dataset or args.bundled):
        found = find_datasets(args.data_root, args.sets, scale)
        if both := sorted(set(found) & set(datasets)):
            raise EvalInputError(f"{', '.join(both)}: named by --sets and by --dataset; one would replace "
                                 "the other: rename the --dataset one")
        datasets.update(found)
    report = evaluate(
        models, datasets, scale, args.out, device=args.device, precision=args.precision,
        batch_size=args.batch_size, tile=args.tile, overlap=args.overlap, bicubic=not args.no_bicubic,
        save_images=args.save_images, lpips_weights=args.lpips_weights, require_lpips=args.require_lpips,
        progress=not args.no_progress, lpips=not args.no_lpips,
    )
    if sdist.is_main_process():
        print(report.markdown)
        for kind, path in report.files.items():
            print(f"{kind}: {path}")
    return report
