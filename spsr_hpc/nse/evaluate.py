"""NSE evaluation (SHARED SPEC §6, paper 5.2 / B.2): frozen NSE, fresh heads, held-out accuracy.

For each NSE (every given ``nse.safetensors`` and a randomly initialised NSE as the baseline):

1. freeze it; fit a fresh context predictor per strategy (InfoNCE, as in pretraining) and a fresh
   jigsaw classifier on random HR crops of the training shards, for the same number of steps
   with the same data order for every NSE;
2. on held-out images, draw random crops and random anchors; report contrastive top-1 accuracy
   (the positive beats `num_negatives` valid negatives drawn per anchor, see
   spsr_hpc.nse.metrics) and jigsaw accuracy, as mean and standard deviation over `repeats`
   independent draws.

    python launch/evaluate_nse.py --nse runs/nse_contrastive/nse.safetensors \
        --train-shards data/div2k_shards --heldout data/bsd100/HR --out runs/nse_eval.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from spsr_hpc.models import NSEConfig, build_nse
from spsr_hpc.models.config import build_context_predictor, build_jigsaw_classifier
from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.export import load_nse, read_nse_metadata
from spsr_hpc.nse.jigsaw import JigsawObjective
from spsr_hpc.nse.metrics import contrastive_top1, jigsaw_accuracy
from spsr_hpc.nse.sampling import num_contexts

RANDOM_NAME = "random-init"


@dataclass
class EvalSettings:
    """How the heads are fitted and the held-out accuracies drawn (CLI flags of evaluate_nse)."""

    strategies: list[str] = field(default_factory=lambda: ["h", "v", "c"])
    patch: int = 256
    """HR crop side for fitting and evaluation (multiple of 4; 256 -> 64×64 maps)."""
    fit_steps: int = 300
    fit_batch: int = 16
    fit_lr: float = 1e-3
    fit_max_anchors: int | None = 256
    """Anchors (jigsaw grids) per image per fitting step; null = all."""
    num_negatives: int = 2000
    """Negatives drawn per held-out anchor among its valid ones (SPEC: ~2,000)."""
    anchors_per_image: int = 256
    """Random held-out anchors (jigsaw grids) per crop."""
    crops_per_image: int = 4
    """Random held-out crops per image and repeat."""
    repeats: int = 5
    jigsaw: bool = True
    loss_backend: str = "auto"
    """InfoNCE path while fitting the predictors (auto, triton, torch)."""
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.patch % 4:
            raise ValueError(f"patch={self.patch} must be a multiple of the NSE stride 4")
        for name in ("fit_batch", "num_negatives", "anchors_per_image", "crops_per_image", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0, got {self.fit_steps}")


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def load_heldout(folder: str | Path, patch: int) -> list[torch.Tensor]:
    """Every image of a folder as (3, H, W) float in [0, 1]; images smaller than patch raise."""
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images in held-out folder {folder}")
    images = []
    for f in files:
        arr, _ = read_rgb(f)
        if min(arr.shape[:2]) < patch:
            raise ValueError(
                f"held-out image {f} is {arr.shape[1]}x{arr.shape[0]}, smaller than --patch {patch}"
            )
        images.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0)
    return images


def heldout_crops(
    images: list[torch.Tensor], patch: int, per_image: int, generator: torch.Generator
) -> torch.Tensor:
    """Random patch×patch crops: (len(images)·per_image, 3, patch, patch) float in [0, 1]."""
    crops = []
    for img in images:
        _, h, w = img.shape
        for _ in range(per_image):
            y = int(torch.randint(h - patch + 1, (1,), generator=generator))
            x = int(torch.randint(w - patch + 1, (1,), generator=generator))
            crops.append(img[:, y : y + patch, x : x + patch])
    return torch.stack(crops)


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
    heldout: list[torch.Tensor],
    s: EvalSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Mean/std over `s.repeats` draws of held-out crops and anchors of `score(batch, g) -> (hits, n)`."""
    accs = []
    for r in range(s.repeats):
        g = torch.Generator().manual_seed(s.seed * 7919 + r)
        crops = heldout_crops(heldout, s.patch, s.crops_per_image, g).to(device)
        hits = total = 0
        for i in range(0, crops.shape[0], s.fit_batch):
            c, n = score(crops[i : i + s.fit_batch], g)
            hits, total = hits + c, total + n
        accs.append(hits / total)
    return _mean_std(accs)


def evaluate_one(
    nse: nn.Module, nse_cfg: NSEConfig, train_shards: str, heldout: list[torch.Tensor], s: EvalSettings
) -> dict[str, Any]:
    """Fit fresh heads on a frozen NSE and measure held-out accuracies. Returns a JSON-able dict."""
    device = _device(s.device)
    nse = nse.to(device).eval().requires_grad_(False)
    torch.manual_seed(s.seed)
    out: dict[str, Any] = {"receptive_field": int(nse.receptive_field()), "stride": int(nse.stride)}
    predictors = {st: build_context_predictor(nse_cfg, num_contexts(st)) for st in s.strategies}
    contrastive = ContrastiveObjective(
        nse, predictors, max_anchors_per_image=s.fit_max_anchors, loss_backend=s.loss_backend
    ).to(device)
    out["radius"] = contrastive.radius
    t0 = time.perf_counter()
    losses = fit_head(contrastive, contrastive.predictors, _train_batches(train_shards, s, device), s)
    out["contrastive_fit_loss"] = _first_last(losses)
    contrastive.eval()
    for st in s.strategies:
        out[f"top1_{st}"] = _repeated_accuracy(
            lambda batch, g, st=st: contrastive_top1(
                contrastive, batch, st, num_negatives=s.num_negatives,
                anchors_per_image=s.anchors_per_image, generator=g,
            ),
            heldout, s, device,
        )  # fmt: skip
    if s.jigsaw:
        torch.manual_seed(s.seed + 1)
        clf = build_jigsaw_classifier(nse_cfg)
        jig = JigsawObjective(nse, clf, max_anchors_per_image=s.fit_max_anchors).to(device)
        losses = fit_head(jig, jig.classifier, _train_batches(train_shards, s, device), s)
        out["jigsaw_fit_loss"] = _first_last(losses)
        jig.eval()
        out["jigsaw_acc"] = _repeated_accuracy(
            lambda batch, g: jigsaw_accuracy(jig, batch, tiles_per_image=s.anchors_per_image, generator=g),
            heldout, s, device,
        )  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate(
    nse_paths: list[str],
    train_shards: str,
    heldout_dir: str,
    s: EvalSettings,
    *,
    random_baseline: bool = True,
) -> dict[str, Any]:
    """Evaluate each NSE export (and a random-init NSE of the same architecture)."""
    heldout = load_heldout(heldout_dir, s.patch)
    results: dict[str, Any] = {}
    cfg0 = NSEConfig()
    for path in nse_paths:
        meta = read_nse_metadata(path)
        cfg = NSEConfig(**json.loads(meta["nse_config"])) if "nse_config" in meta else NSEConfig()
        cfg0 = cfg
        results[str(path)] = {
            "method": meta.get("method"), "pretrain_step": meta.get("step"),
            **evaluate_one(load_nse(path), cfg, train_shards, heldout, s),
        }  # fmt: skip
    if random_baseline:
        torch.manual_seed(s.seed + 12345)
        fresh = build_nse(cfg0)
        results[RANDOM_NAME] = {"method": None, **evaluate_one(fresh, cfg0, train_shards, heldout, s)}
    device = _device(s.device)
    return {
        "settings": dataclasses.asdict(s),
        "device": device_name(device),
        "train_shards": train_shards,
        "heldout_dir": str(heldout_dir),
        "heldout_images": len(heldout),
        "chance": {"top1": 1.0 / (s.num_negatives + 1), "jigsaw": 1.0 / 24},
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """Rows: NSEs; columns: top-1 per strategy and jigsaw accuracy, mean ± std in percent."""
    strategies = report["settings"]["strategies"]
    cols = [f"top1 {st}" for st in strategies] + (["jigsaw"] if report["settings"]["jigsaw"] else [])
    keys = [f"top1_{st}" for st in strategies] + (["jigsaw_acc"] if report["settings"]["jigsaw"] else [])
    rows = []
    for name, res in report["results"].items():
        cells = [f"{100 * res[k]['mean']:.1f} ± {100 * res[k]['std']:.1f}" for k in keys]
        rows.append([name if len(name) < 48 else "…" + name[-47:], *cells])
    header = ["NSE", *cols]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    s = report["settings"]
    lines.append(
        f"(% over {s['repeats']} repeats of {s['crops_per_image']} crops/image × {s['anchors_per_image']} "
        f"anchors; {s['num_negatives']} negatives per anchor, chance {100 * report['chance']['top1']:.2f}% "
        f"top-1, {100 / 24:.1f}% jigsaw; {report['device']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of launch/evaluate_nse.py."""
    d = EvalSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nse", action="append", default=[], help="nse.safetensors to evaluate (repeatable)")
    p.add_argument("--train-shards", required=True, help="shards the fresh heads are fitted on")
    p.add_argument("--heldout", required=True, help="folder of held-out HR images")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    p.add_argument("--strategies", nargs="+", default=d.strategies, choices=["h", "v", "c"])
    p.add_argument("--no-jigsaw", action="store_true")
    for name in ("patch", "fit_steps", "fit_batch", "num_negatives", "anchors_per_image", "crops_per_image",
                 "repeats", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--fit-max-anchors", type=int, default=d.fit_max_anchors, help="0 = all anchors")
    p.add_argument("--fit-lr", type=float, default=d.fit_lr)
    p.add_argument("--device", default=d.device)
    p.add_argument("--loss-backend", default=d.loss_backend, choices=["auto", "triton", "torch"])
    a = p.parse_args(argv)
    s = EvalSettings(
        strategies=a.strategies, patch=a.patch, fit_steps=a.fit_steps, fit_batch=a.fit_batch, fit_lr=a.fit_lr,
        fit_max_anchors=a.fit_max_anchors or None, num_negatives=a.num_negatives,
        anchors_per_image=a.anchors_per_image, crops_per_image=a.crops_per_image, repeats=a.repeats,
        jigsaw=not a.no_jigsaw, loss_backend=a.loss_backend, seed=a.seed, device=a.device,
    )  # fmt: skip
    if not a.nse and a.no_random:
        p.error("nothing to evaluate: give --nse and/or drop --no-random")
    report = evaluate(a.nse, a.train_shards, a.heldout, s, random_baseline=not a.no_random)
    print(format_table(report))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"report: {out}")
    return 0


__all__ = ["EvalSettings", "evaluate", "evaluate_one", "format_table", "main"]

