"""Figures for run folders: loss curves, validation curves, labelled side-by-side comparisons.

    python launch/report.py RUN_DIR [RUN_DIR ...] [--out DIR]

A RUN_DIR is a training run (it holds ``metrics.jsonl``), an evaluation folder (``per_image.csv``
and ``images/`` from ``launch/evaluate.py --save-images``), or a folder holding several of them
(the demo's ``runs/demo``). Every figure labels its columns.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spsr_hpc.files import OutputWriteError, atomic_output, check_output_folder
from spsr_hpc.labels import HEADER_PX, label_columns, tile_row

log = logging.getLogger(__name__)

# --- training runs ----------------------------------------------------------------------------


# Each validation metric has its own colour, marker, line style and legend entry; the second one
# drawn goes on a twin right axis (their scales differ), so neither hides the other.
VAL_STYLES = {
    "val/lpips": {"color": "C0", "marker": "o", "linestyle": "-", "name": "LPIPS ↓"},
    "val/psnr": {"color": "C3", "marker": "s", "linestyle": "--", "mfc": "none",
                 "name": "PSNR dB ↑"},
}


def validation_panel(ax: Any, rows: Sequence[dict[str, Any]], title: str) -> list[Any]:
    """Draw a run's val/lpips and val/psnr records against the step: the first on `ax` (left axis),
    the second on a twin right axis; one legend for both, each axis label and its ticks in its
    curve's colour. Returns the drawn lines (matplotlib Line2D)."""
    lines, axes = [], []
    for key, style in VAL_STYLES.items():
        pts = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
        if not pts:
            continue
        target = ax if not axes else ax.twinx()
        side = "left" if not axes else "right"
        kw = {k: v for k, v in style.items() if k != "name"}
        (line,) = target.plot(*zip(*pts), markersize=4, label=f"{style['name']} ({side} axis)", **kw)
        target.set_ylabel(key, color=style["color"])
        target.tick_params(axis="y", colors=style["color"])
        lines.append(line)
        axes.append(target)
    if lines:  # above the plot, under the title: it covers no point of either curve
        axes[-1].legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower center",
                        bbox_to_anchor=(0.5, 1.0), ncol=len(lines), frameon=False)
    ax.set_title(title, pad=20 if lines else 6)
    ax.set_xlabel("step")
    return lines


def loss_curves(runs: dict[str, Path], out_png: Path) -> Path:
    """One panel per run: every ``loss/*`` series of its metrics.jsonl (log scale), and a second
    row with the validation curves (:func:`validation_panel`) where the run logged them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spsr_hpc.train.logging import read_jsonl  # torch comes with it: only when curves are drawn

    data = {name: read_jsonl(Path(d) / "metrics.jsonl") for name, d in runs.items()}
    has_val = any(any(k.startswith("val/") for r in rows for k in r) for rows in data.values())
    nrows = 2 if has_val else 1
    fig, axes = plt.subplots(nrows, len(runs), figsize=(6 * len(runs), 4 * nrows), squeeze=False)
    for col, (name, rows) in enumerate(data.items()):
        ax = axes[0][col]
        # d_real / d_fake are mean logits (signed), not losses: they do not belong on a log axis.
        keys = sorted(
            {k for r in rows for k in r if k.startswith("loss/") and not k.endswith(("d_real", "d_fake"))}
        )
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and r[k] > 0]
            if pts:
                ax.plot(*zip(*pts), label=k[len("loss/") :])
        ax.set_title(f"{name}: training losses")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if keys:
            ax.legend(fontsize=7)
        if has_val:
            validation_panel(axes[1][col], rows, f"{name}: validation")
    fig.tight_layout()
    try:
        with atomic_output(out_png) as tmp:
            out_png.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return out_png


# --- evaluation folders -----------------------------------------------------------------------


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _eval_layout(eval_dir: Path) -> tuple[list[str], list[str], dict[tuple[str, str, str], dict]]:
    """Datasets, methods (in report order) and per-image rows of an evaluation folder."""
    with open(eval_dir / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return datasets, methods, {(r["dataset"], r["method"], r["image"]): r for r in rows}


def comparison_figure(
    eval_dir: Path,
    hr_dirs: dict[str, Path] | None,
    out_png: Path,
    *,
    crop: int = 128,
    methods: Sequence[str] | None = None,
    max_images: int = 4,
) -> Path:
    """Centre crops of every method's SR (and HR, where `hr_dirs` gives the dataset's HR folder)
    for the first images of each dataset; each column labelled in full, on three lines: the method,
    its LPIPS and its PSNR on that image (HR: the image's name)."""
    datasets, all_methods, rows = _eval_layout(eval_dir)
    methods = list(methods or all_methods)
    blocks = []
    for d in datasets:
        names = sorted({img for (ds, _, img) in rows if ds == d})[:max_images]
        for name in names:
            tiles, labels = [], []
            for m in methods:
                p = eval_dir / "images" / d / m / f"{name}.png"
                if not p.is_file():
                    raise FileNotFoundError(f"{p} is missing: evaluate with save_images=True (--save-images)")
                sr = _read_rgb(p)
                h, w = sr.shape[:2]
                y, x = max(0, h // 2 - crop // 2), max(0, w // 2 - crop // 2)
                tiles.append(sr[y : y + crop, x : x + crop])
                r = rows[(d, m, name)]
                lp = f"{float(r['lpips']):.4f}" if r.get("lpips") else "n/a"
                labels.append(f"{m}\nLPIPS {lp}\nPSNR {float(r['psnr']):.2f} dB")
            if hr_dirs and d in hr_dirs:
                hr_path = next(iter(sorted(Path(hr_dirs[d]).glob(f"{name}.*"))), None)
                if hr_path is not None:
                    hr = _read_rgb(hr_path)
                    tiles.append(hr[y : y + crop, x : x + crop])
                    labels.append(f"HR\n{name}")
            row, widths = tile_row(tiles)
            blocks.append(label_columns(row, labels, widths))
    if not blocks:
        raise ValueError(f"{eval_dir} has no evaluated images")
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    with atomic_output(out_png) as tmp:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(blocks, axis=0)).save(tmp, format="PNG")
    return out_png


# --- any folder -------------------------------------------------------------------------------


def find_runs(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """Training runs (folders with metrics.jsonl) and evaluation folders (per_image.csv) at or
    one level below `root`."""
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    runs = {(p.name if p != root else root.name): p for p in candidates if (p / "metrics.jsonl").is_file()}
    evals = [p for p in candidates if (p / "per_image.csv").is_file()]
    return runs, evals


def report_figures(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    hr_dirs: dict[str, Path] | None = None,
    methods: Sequence[str] | None = None,
) -> list[Path]:
    """Draw loss curves for every training run and comparisons for every evaluation folder found
    in `run_dirs`; write them into `out` (default: the first folder). Returns the written paths."""
    roots = [Path(p) for p in run_dirs]
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"{r} is not a folder")
    runs: dict[str, Path] = {}
    evals: list[Path] = []
    for r in roots:
        found_runs, found_evals = find_runs(r)
        runs.update(found_runs)
        evals.extend(found_evals)
    if not runs and not evals:
        raise FileNotFoundError(
            f"no run found in {', '.join(map(str, roots))}: expected metrics.jsonl (a training run) or "
            "per_image.csv (an evaluation folder) there or one level below"
        )
    dest = Path(out) if out is not None else roots[0]
    check_output_folder(dest, "--out")
    _check_hr_dirs(hr_dirs or {}, evals)
    drawable = [e for e in evals if (e / "images").is_dir()]
    for e in evals:
        if e not in drawable:
            log.warning("%s: no images/ folder, so no comparison figure (evaluate with --save-images "
                        "to draw one)", e)
    if not runs and not drawable:
        raise FileNotFoundError(
            f"nothing to draw in {', '.join(map(str, roots))}: the evaluation folder(s) "
            f"{', '.join(map(str, evals))} have no images/ (evaluate with --save-images) and there is no "
            "training run (metrics.jsonl)"
        )
    written = []
    if runs:
        written.append(loss_curves(runs, dest / "loss_curves.png"))
    for i, e in enumerate(drawable):
        name = "comparison.png" if len(evals) == 1 else f"comparison_{e.name}_{i}.png"
        written.append(comparison_figure(e, hr_dirs, dest / name, methods=methods))
    return written


def _check_hr_dirs(hr_dirs: dict[str, Path], evals: Sequence[Path]) -> None:
    """Each --hr DATASET=DIR names an evaluated dataset and an existing folder (ValueError)."""
    known = list(dict.fromkeys(d for e in evals for d in _eval_layout(e)[0]))
    for name, folder in hr_dirs.items():
        if name not in known:
            raise ValueError(f"--hr {name}={folder}: no evaluated dataset is called {name!r}; the "
                             f"evaluation folders have {', '.join(known) or 'none'}")
        if not Path(folder).is_dir():
            raise ValueError(f"--hr {name}={folder}: {folder} is not a folder; give the HR folder of "
                             f"{name} (the one passed to launch/evaluate.py)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="training run, evaluation folder, or a folder of them")
    p.add_argument("--out", default=None, help="where the figures go (default: the first RUN_DIR)")
    p.add_argument(
        "--hr",
        action="append",
        default=[],
        metavar="DATASET=DIR",
        help="HR folder of an evaluated dataset, to add an HR column (repeatable)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    hr = {}
    for item in a.hr:
        if "=" not in item:
            p.error(f"--hr {item!r}: expected DATASET=DIR")
        k, v = item.split("=", 1)
        hr[k] = Path(v)
    try:
        paths = report_figures(a.run_dirs, a.out, hr_dirs=hr)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:  # a full disk: no half-written figure is left
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for path in paths:
        print(path)
    return 0


# label_columns, tile_row and HEADER_PX live in spsr_hpc.labels (below the training layer, whose
# image grids use them too); they stay importable from here.
__all__ = [
    "HEADER_PX",
    "comparison_figure",
    "find_runs",
    "label_columns",
    "loss_curves",
    "main",
    "report_figures",
    "tile_row",
    "validation_panel",
]
