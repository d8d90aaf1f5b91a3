"""NSE evaluation, the paper's protocol (docs/method.md §6; paper 5.2, Appendix B.2, Fig. 14/15).

For each NSE (every given ``nse.safetensors`` and a randomly initialised NSE as the baseline row):

1. freeze it; fit a fresh context predictor per strategy (h, v, c; InfoNCE as in pretraining)
   and a fresh jigsaw classifier on random HR crops of the *training* shards, for the same
   number of steps with the same data order for every NSE. Every NSE is thus scored on both
   tasks: a contrastive NSE's jigsaw accuracy and a jigsaw NSE's top-1 are the paper's
   cross-validation;
2. cut every held-out image of every dataset folder into dense, non-overlapping
   ``patch``×``patch`` patches; on each, draw random anchors and report contrastive top-1
   accuracy (the prediction's cosine to the positive beats ``num_negatives`` (~2,000) valid
   negatives drawn per anchor; spsr_hpc.nse.metrics) and jigsaw accuracy, as mean ± standard
   deviation over ``repeats`` (10) independent draws of anchors, negatives and permutations.

Output: one table per dataset folder (rows: NSEs; columns: top-1 per strategy and jigsaw), as
Markdown (``report.md``), ``report.csv`` (one row per NSE × dataset × metric) and
``report.json`` (everything, with per-repeat values and the heads' fitting losses).

    python launch/evaluate_nse.py --nse runs/nse_contrastive/nse.safetensors \
        --nse runs/nse_jigsaw/nse.safetensors --train-shards data/div2k_shards \
        --heldout Set14=data/benchmark/Set14/HR --heldout BSD100=data/benchmark/BSD100/HR \
        --out runs/nse_eval
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spsr_hpc.data.config import DataConfig
from spsr_hpc.data.images import list_images, read_rgb
from spsr_hpc.data.loader import build_train_loader
from spsr_hpc.device import device_name
from spsr_hpc.files import OutputWriteError, check_output_folder, write_all_or_none
from spsr_hpc.models import NSEConfig, build_nse
from spsr_hpc.models.config import build_context_predictor, build_jigsaw_classifier
from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.export import load_nse, read_nse_metadata
from spsr_hpc.nse.jigsaw import JigsawObjective
from spsr_hpc.nse.metrics import contrastive_top1, jigsaw_accuracy
from spsr_hpc.nse.sampling import STRATEGY_DIRECTIONS, num_contexts

RANDOM_NAME = "random-init"
JIGSAW = "jigsaw"


@dataclass
class EvalSettings:
    """How the heads are fitted and the held-out accuracies drawn (CLI flags of evaluate_nse)."""

    strategies: list[str] = field(default_factory=lambda: ["h", "v", "c"])
    """Contrastive strategies scored (one fresh predictor each)."""
    patch: int = 256
    """Side of the fitting crops and of the dense held-out patches (multiple of 4; 256 -> 64×64
    maps, enough keys for 2,000 negatives per anchor)."""
    fit_steps: int = 300
    fit_batch: int = 16
    """Crops per fitting step; also the held-out patches scored per forward."""
    fit_lr: float = 1e-3
    fit_max_anchors: int | None = 256
    """Anchors (jigsaw grids) per crop per fitting step; None = all."""
    num_negatives: int = 2000
    """Negatives drawn per held-out anchor among its valid ones (paper: ~2,000)."""
    anchors_per_patch: int = 256
    """Random held-out anchors (jigsaw grids) per dense patch and repeat (all when larger)."""
    max_patches_per_image: int | None = None
    """Cap on the dense patches per held-out image (evenly spaced subset); None = all."""
    repeats: int = 10
    """Independent draws of anchors, negatives and permutations (paper: 10)."""
    jigsaw: bool = True
    loss_backend: str = "auto"
    """InfoNCE path while fitting the predictors (auto, triton, torch)."""
    seed: int = 0
    """Seeds the heads, the fitting data order and the draws; also the random NSE's random_seed."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.patch % 4 or self.patch < 4:
            raise ValueError(f"patch={self.patch} must be a positive multiple of the NSE stride 4")
        bad = [st for st in self.strategies if st not in STRATEGY_DIRECTIONS]
        if bad or not self.strategies:
            raise ValueError(f"strategies={self.strategies}: use one or more of h, v, c")
        for name in ("fit_batch", "num_negatives", "anchors_per_patch", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Untrained heads score chance whatever the NSE: a table of them would look like a result.
        if self.fit_steps < 1:
            raise ValueError(f"--fit-steps {self.fit_steps}: the heads must be fitted, at least 1 step "
                             "(the protocol: 300)")
        if not self.fit_lr > 0:
            raise ValueError(f"--fit-lr {self.fit_lr}: must be > 0 (the protocol: 1e-3)")
        if self.max_patches_per_image is not None and self.max_patches_per_image < 1:
            raise ValueError(f"--max-patches-per-image {self.max_patches_per_image}: must be >= 1, or 0 "
                             "for every dense patch")


def _device(choice: str) -> torch.device:
    """``auto`` (CUDA when there is one) or a device this machine has; ValueError naming it."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from spsr_hpc.inference import cli_device

    return cli_device(choice)


# ---------------------------------------------------------------------------------- held-out data


def dense_patches(img: torch.Tensor, patch: int, max_patches: int | None = None) -> torch.Tensor:
    """Non-overlapping patch×patch tiles of one image on a grid from its top-left corner.

    Args:
        img: (3, H, W) float. Rows/columns beyond the last whole tile are not used.
        max_patches: keep this many, evenly spaced in raster order (None: all).

    Returns:
        (n, 3, patch, patch), n = floor(H/patch)·floor(W/patch) (0 when the image is smaller).
    """
    _, h, w = img.shape
    rows, cols = h // patch, w // patch
    if rows == 0 or cols == 0:
        return img.new_zeros((0, img.shape[0], patch, patch))
    tiles = img[:, : rows * patch, : cols * patch].unfold(1, patch, patch).unfold(2, patch, patch)
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, img.shape[0], patch, patch)
    if max_patches is not None and tiles.shape[0] > max_patches:
        tiles = tiles[torch.linspace(0, tiles.shape[0] - 1, max_patches).round().long()]
    return tiles.contiguous()


@dataclass
class HeldoutSet:
    """The dense patches of one held-out dataset folder."""

    name: str
    folder: str
    patches: torch.Tensor
    """(n, 3, patch, patch) float in [0, 1]."""
    images: int
    skipped: list[str]
    """Images smaller than the patch (not scored)."""

    def summary(self) -> dict[str, Any]:
        return {"folder": self.folder, "images": self.images, "patches": int(self.patches.shape[0]),
                "skipped_smaller_than_patch": self.skipped}  # fmt: skip


def load_heldout(folder: str | Path, s: EvalSettings, name: str | None = None) -> HeldoutSet:
    """Every image of a folder cut into dense patches. ValueError when no image holds one."""
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images in held-out folder {folder}")
    tiles, skipped = [], []
    for f in files:
        arr, _ = read_rgb(f)
        img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0
        t = dense_patches(img, s.patch, s.max_patches_per_image)
        if t.shape[0] == 0:
            skipped.append(f.name)
        tiles.append(t)
    patches = torch.cat(tiles)
    if patches.shape[0] == 0:
        raise ValueError(
            f"every image of {folder} is smaller than --patch {s.patch}: use a smaller --patch "
            "(and then fewer --num-negatives: a P×P patch has (P/4)² keys)"
        )
    return HeldoutSet(name or dataset_name(folder), str(folder), patches, len(files), skipped)


def dataset_name(folder: str | Path) -> str:
    """Name of a dataset folder: its own name, or its parent's for .../<set>/HR."""
    p = Path(folder).resolve()
    return p.parent.name if p.name.lower() in ("hr", "gt", "original") else p.name


def _split_spec(spec: str) -> tuple[str | None, str]:
    """"NAME=PATH" -> (NAME, PATH); a plain path -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return None, spec


# ------------------------------------------------------------------------------------ fitting


def _train_batches(shards: str, s: EvalSettings, device: torch.device) -> Iterator[torch.Tensor]:
    cfg = DataConfig(
        shards=shards, hr_only=True, hr_patch_size=s.patch, batch_size=s.fit_batch, num_workers=0,
        seed=s.seed, batches_per_epoch=max(1, s.fit_steps),
    )  # fmt: skip
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=s.seed)
    while True:
        for batch in loader:
            yield batch["hr"].to(device)


def fit_head(
    objective: nn.Module, head: nn.Module, batches: Iterator[torch.Tensor], s: EvalSettings
) -> list[float]:
    """Adam on the head alone (the NSE is frozen); returns the loss of every step."""
    opt = torch.optim.Adam(head.parameters(), lr=s.fit_lr)
    losses = []
    for step in range(s.fit_steps):
        loss, _, _ = objective(next(batches), torch.Generator().manual_seed(s.seed * 100_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _first_last(losses: list[float]) -> dict[str, float | None]:
    return {"first": losses[0] if losses else None, "last": losses[-1] if losses else None}


def _mean_std(values: list[float]) -> dict[str, Any]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "runs": values}


def _repeated_accuracy(
    score: Callable[[torch.Tensor, torch.Generator], tuple[int, int]],
    patches: torch.Tensor,
    s: EvalSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Mean/std over `s.repeats` draws of `score(batch, g) -> (hits, n)` over all the patches."""
    accs = []
    for r in range(s.repeats):
        g = torch.Generator().manual_seed(s.seed * 7919 + r)
        hits = total = 0
        for i in range(0, patches.shape[0], s.fit_batch):
            c, n = score(patches[i : i + s.fit_batch].to(device), g)
            hits, total = hits + c, total + n
        accs.append(hits / total)
    return _mean_std(accs)


def evaluate_one(
    nse: nn.Module, nse_cfg: NSEConfig, train_shards: str, heldout: list[HeldoutSet], s: EvalSettings
) -> dict[str, Any]:
    """Fit fresh heads on a frozen NSE and score every held-out set. Returns a JSON-able dict
    with ``scores[dataset][metric]`` = {mean, std, runs} for metric top1_<strategy> and jigsaw."""
    device = _device(s.device)
    nse = nse.to(device).eval().requires_grad_(False)
    torch.manual_seed(s.seed)
    out: dict[str, Any] = {"receptive_field": int(nse.receptive_field()), "stride": int(nse.stride)}
    scores: dict[str, dict[str, Any]] = {h.name: {} for h in heldout}
    t0 = time.perf_counter()
    predictors = {st: build_context_predictor(nse_cfg, num_contexts(st)) for st in s.strategies}
    contrastive = ContrastiveObjective(
        nse, predictors, max_anchors_per_image=s.fit_max_anchors, loss_backend=s.loss_backend
    ).to(device)
    out["radius"] = contrastive.radius
    losses = fit_head(contrastive, contrastive.predictors, _train_batches(train_shards, s, device), s)
    out["contrastive_fit_loss"] = _first_last(losses)
    contrastive.eval()
    for h in heldout:
        for st in s.strategies:
            scores[h.name][f"top1_{st}"] = _repeated_accuracy(
                lambda batch, g, st=st: contrastive_top1(
                    contrastive, batch, st, num_negatives=s.num_negatives,
                    anchors_per_image=s.anchors_per_patch, generator=g,
                ),
                h.patches, s, device,
            )  # fmt: skip
    if s.jigsaw:
        torch.manual_seed(s.seed + 1)
        jig = JigsawObjective(nse, build_jigsaw_classifier(nse_cfg), max_anchors_per_image=s.fit_max_anchors)
        jig = jig.to(device)
        losses = fit_head(jig, jig.classifier, _train_batches(train_shards, s, device), s)
        out["jigsaw_fit_loss"] = _first_last(losses)
        jig.eval()
        for h in heldout:
            scores[h.name][JIGSAW] = _repeated_accuracy(
                lambda batch, g: jigsaw_accuracy(
                    jig, batch, tiles_per_image=s.anchors_per_patch, generator=g
                ),
                h.patches, s, device,
            )  # fmt: skip
    out["scores"] = scores
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------ the report


def _own_metrics(method: str | None, strategies: list[str] | None) -> list[str]:
    """Metrics of the task an NSE was pretrained on (bold in the table)."""
    if method == "contrastive":
        return [f"top1_{st}" for st in (strategies or [])]
    if method == "jigsaw":
        return [JIGSAW]
    return []


def _nse_label(spec: str, path: str, meta: dict[str, str]) -> str:
    name, _ = _split_spec(spec)
    if name:
        return name
    p = Path(path)
    return p.parent.name if p.name == "nse.safetensors" and p.parent.name else p.stem


def evaluate(
    nse_specs: list[str],
    train_shards: str,
    heldout_specs: list[str],
    s: EvalSettings,
    *,
    random_baseline: bool = True,
) -> dict[str, Any]:
    """Evaluate each NSE export (``PATH`` or ``LABEL=PATH``) and a random-init NSE on every
    held-out folder (``PATH`` or ``NAME=PATH``). Returns the report (see `write_report`)."""
    heldout = [load_heldout(p, s, n) for n, p in map(_split_spec, heldout_specs)]
    names = [h.name for h in heldout]
    if len(set(names)) != len(names):
        raise ValueError(f"held-out sets need distinct names, got {names}: use --heldout NAME=PATH")
    nses: dict[str, Any] = {}
    cfg0 = NSEConfig()
    for spec in nse_specs:
        path = _split_spec(spec)[1]
        nse = load_nse(path)  # checks the file and its format first
        meta = read_nse_metadata(path)
        cfg = NSEConfig(**json.loads(meta["nse_config"]))
        cfg0 = cfg
        label = _nse_label(spec, path, meta)
        if label in nses:
            raise ValueError(f"two NSEs are labelled {label!r}: use --nse LABEL=PATH")
        if label == RANDOM_NAME and random_baseline:
            raise ValueError(f"the label {RANDOM_NAME!r} is the random-init baseline's row, which would "
                             f"replace {path}'s: use --nse LABEL=PATH with another label (or --no-random)")
        strategies = json.loads(meta["strategies"]) if "strategies" in meta else None
        nses[label] = {
            "path": str(path), "method": meta.get("method"), "strategies": strategies,
            "pretrain_step": meta.get("step"), "own": _own_metrics(meta.get("method"), strategies),
            **evaluate_one(nse, cfg, train_shards, heldout, s),
        }  # fmt: skip
    if random_baseline:
        # The SPSR-R NSE of the same architecture: build_nse with random_init and this seed.
        rcfg = dataclasses.replace(cfg0, random_init=True, random_seed=s.seed)
        nses[RANDOM_NAME] = {
            "path": None, "method": None, "strategies": None, "random_seed": s.seed, "own": [],
            **evaluate_one(build_nse(rcfg), rcfg, train_shards, heldout, s),
        }  # fmt: skip
    return {
        "settings": dataclasses.asdict(s),
        "device": device_name(_device(s.device)),
        "train_shards": train_shards,
        "datasets": {h.name: h.summary() for h in heldout},
        "chance": {"top1": 1.0 / (s.num_negatives + 1), JIGSAW: 1.0 / 24},
        "nses": nses,
    }


def _metrics(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, column title) of the scored metrics, in table order."""
    s = report["settings"]
    cols = [(f"top1_{st}", f"top-1 {st}") for st in s["strategies"]]
    return cols + ([(JIGSAW, "jigsaw")] if s["jigsaw"] else [])


def _pretrained_by(res: dict[str, Any]) -> str:
    if res["method"] == "contrastive":
        return f"contrastive ({', '.join(res['strategies'])})" if res["strategies"] else "contrastive"
    if res["method"]:
        return res["method"]
    return f"none (random init, seed {res.get('random_seed')})" if res["path"] is None else "?"


def format_markdown(report: dict[str, Any]) -> str:
    """One Fig. 14/15-style table per dataset: rows NSEs, cells mean ± std in percent."""
    s, metrics = report["settings"], _metrics(report)
    lines = []
    for ds, info in report["datasets"].items():
        skipped = len(info["skipped_smaller_than_patch"])
        lines += [
            f"### {ds}: {info['images']} images, {info['patches']} dense {s['patch']}×{s['patch']} patches"
            + (f" ({skipped} images smaller than a patch)" if skipped else ""),
            "",
            "| NSE | pretrained by | " + " | ".join(title for _, title in metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for label, res in report["nses"].items():
            cells = []
            for key, _ in metrics:
                v = res["scores"][ds][key]
                cell = f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
                cells.append(f"**{cell}**" if key in res["own"] else cell)
            lines.append(f"| {label} | {_pretrained_by(res)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        f"Accuracy in % (mean ± std over {s['repeats']} draws of {s['anchors_per_patch']} anchors per patch; "
        f"top-1 against {s['num_negatives']} negatives per anchor, "
        f"chance {100 * report['chance']['top1']:.3f} %; "
        f"jigsaw chance {100 / 24:.2f} %). Bold: the task the NSE was pretrained on; the other cells "
        f"are cross-evaluations with a fresh head on the frozen NSE. Heads fitted {s['fit_steps']} steps "
        f"× {s['fit_batch']} crops on {report['train_shards']}; {report['device']}."
    )
    return "\n".join(lines)


def format_csv(report: dict[str, Any]) -> str:
    """One row per NSE × dataset × metric."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["nse", "pretrained_by", "dataset", "metric", "mean", "std", "repeats", "chance", "own_task"])
    for label, res in report["nses"].items():
        for ds in report["datasets"]:
            for key, _ in _metrics(report):
                v = res["scores"][ds][key]
                chance = report["chance"][JIGSAW if key == JIGSAW else "top1"]
                w.writerow([label, _pretrained_by(res), ds, key, f"{v['mean']:.6f}", f"{v['std']:.6f}",
                            len(v["runs"]), f"{chance:.6f}", key in res["own"]])  # fmt: skip
    return buf.getvalue()


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """report.json, report.md and report.csv in out_dir (created), all replaced or none: a failed
    write (OutputWriteError) leaves the previous report whole and no .tmp file."""
    out = Path(out_dir)
    write_all_or_none(
        [(out / "report.json", json.dumps(report, indent=2) + "\n"),
         (out / "report.md", format_markdown(report) + "\n"),
         (out / "report.csv", format_csv(report))],
        kept=f"The report is printed above; the files in {out} are unchanged",
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of launch/evaluate_nse.py."""
    d = EvalSettings()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nse", action="append", default=[],
                   help="nse.safetensors to evaluate, PATH or LABEL=PATH (repeatable)")  # fmt: skip
    p.add_argument("--train-shards", required=True, help="shards the fresh heads are fitted on")
    p.add_argument("--heldout", action="append", required=True,
                   help="held-out HR image folder, PATH or NAME=PATH (repeatable: a table each)")  # fmt: skip
    p.add_argument("--out", default=None, help="folder for report.md, report.csv and report.json")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline row")
    p.add_argument("--strategies", nargs="+", default=d.strategies, choices=["h", "v", "c"])
    p.add_argument("--no-jigsaw", action="store_true", help="skip the jigsaw head and column")
    for name in ("patch", "fit_steps", "fit_batch", "num_negatives", "anchors_per_patch", "repeats", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--max-patches-per-image", type=int, default=0, help="0 = every dense patch")
    p.add_argument("--fit-max-anchors", type=int, default=d.fit_max_anchors, help="0 = all anchors")
    p.add_argument("--fit-lr", type=float, default=d.fit_lr)
    p.add_argument("--device", default=d.device)
    p.add_argument("--loss-backend", default=d.loss_backend, choices=["auto", "triton", "torch"])
    a = p.parse_args(argv)
    if not a.nse and a.no_random:
        p.error("nothing to evaluate: give --nse and/or drop --no-random")
    try:
        s = EvalSettings(
            strategies=a.strategies, patch=a.patch, fit_steps=a.fit_steps, fit_batch=a.fit_batch,
            fit_lr=a.fit_lr, fit_max_anchors=a.fit_max_anchors or None, num_negatives=a.num_negatives,
            anchors_per_patch=a.anchors_per_patch, max_patches_per_image=a.max_patches_per_image or None,
            repeats=a.repeats, jigsaw=not a.no_jigsaw, loss_backend=a.loss_backend, seed=a.seed,
            device=a.device,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    from spsr_hpc.preflight import print_errors

    try:  # before any work (the evaluation takes minutes to hours)
        _device(a.device)
        if a.out:
            check_output_folder(a.out, "--out")
    except ValueError as e:
        return print_errors(e)
    try:
        report = evaluate(a.nse, a.train_shards, a.heldout, s, random_baseline=not a.no_random)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # A missing or foreign NSE file, missing shards, a missing, empty or unreadable held-out
        # folder (BadImageError), patches larger than every image, a backend the device lacks.
        return print_errors(e)
    print(format_markdown(report))
    if a.out:
        try:
            print(f"report: {write_report(report, a.out)}/report.{{md,csv,json}}")
        except OutputWriteError as e:  # a full disk: the report is printed above
            print(f"error: {e}", file=sys.stderr, flush=True)
            return e.exit_code
    return 0


__all__ = [
    "EvalSettings",
    "HeldoutSet",
    "dense_patches",
    "evaluate",
    "evaluate_one",
    "format_csv",
    "format_markdown",
    "load_heldout",
    "main",
    "write_report",
]
