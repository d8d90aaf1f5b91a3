"""NSE evaluation: held-out top-1 against an independent brute force, and trained beats random."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import torch.nn.functional as F

from spsr_hpc.models import NSEConfig, build_nse
from spsr_hpc.models.config import build_context_predictor
from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.evaluate import EvalSettings, dense_patches, evaluate_one, load_heldout
from spsr_hpc.nse.metrics import contrastive_top1, valid_negative_mask
from spsr_hpc.nse.sampling import exclusion_centers, num_contexts, sample_anchors


def _objective(cfg: NSEConfig, strategies=("c",)) -> ContrastiveObjective:
    nse = build_nse(cfg)
    preds = {s: build_context_predictor(cfg, num_contexts(s)) for s in strategies}
    return ContrastiveObjective(nse, preds, loss_backend="torch")


def test_valid_negative_mask_matches_chebyshev_loop():
    centres = torch.tensor([[[14, 3, 25]]])  # grid 5 wide
    mask = valid_negative_mask(centres, 35, 5, 2)
    for j in range(35):
        r, c = divmod(j, 5)
        near = any(max(abs(r - cr), abs(c - cc)) < 2 for cr, cc in (divmod(int(x), 5) for x in centres[0, 0]))
        assert bool(mask[0, 0, j]) == (not near)


def test_contrastive_top1_matches_brute_force():
    """Same draws, scored by a per-anchor loop over explicit negative lists."""
    torch.manual_seed(0)
    cfg = NSEConfig(width=16, out_dim=8, predictor_hidden=16)
    obj = _objective(cfg).eval()
    hr = torch.rand(2, 3, 96, 96)
    hits, total = contrastive_top1(obj, hr, "c", num_negatives=30, anchors_per_image=10,
                                   generator=torch.Generator().manual_seed(1))
    assert total == 20
    # Replay the generator: anchors (argsort of rand), then the negative-sampling noise.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = obj.nse(hr)
        b, _, h, w = z.shape
        raw = z.flatten(2).transpose(1, 2)  # the predictor sees raw vectors, as in training
        keys = F.normalize(raw, dim=-1)
        targets, contexts = sample_anchors(b, h, w, obj.offsets["c"], 10, g)
        noise = torch.rand(b, 10, h * w, generator=g)
        want = 0
        for i in range(b):
            for n in range(10):
                t, ctx = int(targets[i, n]), contexts[i, n].tolist()
                p = F.normalize(obj.predictors["c"](torch.cat([raw[i, c] for c in ctx])), dim=0)
                cand = [
                    j for j in range(h * w)
                    if all(max(abs(j // w - c // w), abs(j % w - c % w)) >= obj.radius for c in [t, *ctx])
                ]
                negs = sorted(cand, key=lambda j: float(noise[i, n, j]))[:30]
                pos = float(p @ keys[i, t])
                want += int(all(pos > float(p @ keys[i, j]) for j in negs))
        centres = exclusion_centers(targets, contexts)
        assert (valid_negative_mask(centres, h * w, w, obj.radius).sum(-1) >= 30).all()
    assert hits == want


@pytest.mark.parametrize("strategy", ["h", "v", "c"])
def test_evaluation_scores_what_training_computes(strategy):
    """The cosines the top-1 metric ranks are the logits/τ of the training loss, anchor by anchor.

    Same NSE, predictor and anchors: τ·cos with the valid-negative mask (positive kept) gives
    exactly the per-anchor InfoNCE loss that training hands to spsr_kernels.info_nce. A metric
    that fed the predictor other context vectors (e.g. normalised ones) fails this.
    """
    from spsr_hpc.nse.contrastive import feature_keys
    from spsr_hpc.nse.metrics import prediction_cosines
    from spsr_kernels import info_nce

    torch.manual_seed(0)
    cfg = NSEConfig(width=16, out_dim=8, predictor_hidden=16)
    obj = _objective(cfg, strategies=(strategy,)).eval()
    with torch.no_grad():
        keys = feature_keys(obj.nse(torch.rand(2, 3, 96, 96)))
        assert float(keys.norm(dim=-1).mean()) > 1.5  # raw vectors: normalising them would matter
        kw = obj.loss_inputs(keys, 24, 24, strategy)
        targets, centres = kw["pos_index"], kw["exclude_centers"]
        want = info_nce(kw.pop("pred"), kw.pop("keys"), kw.pop("pos_index"), reduction="none",
                        backend="torch", **kw)
        cos = prediction_cosines(obj, keys, centres[..., 1:], strategy)
    keep = valid_negative_mask(centres, keys.shape[1], 24, obj.radius)
    keep.scatter_(2, targets.unsqueeze(-1), True)
    logits = (obj.scale * cos).masked_fill(~keep, float("-inf"))
    got = torch.logsumexp(logits, -1) - obj.scale * cos.gather(2, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # The feeding matters: normalised contexts (the old evaluation) give other predictions.
    with torch.no_grad():
        ctx = centres[..., 1:]
        as_trained = F.normalize(obj.predict(keys, ctx, strategy), dim=-1)
        from_unit = F.normalize(obj.predict(F.normalize(keys, dim=-1), ctx, strategy), dim=-1)
    assert not torch.allclose(as_trained, from_unit, atol=1e-3)


def test_too_few_negatives_raises():
    obj = _objective(NSEConfig(width=16, out_dim=8, predictor_hidden=16)).eval()
    with pytest.raises(ValueError, match="valid negatives"):
        contrastive_top1(obj, torch.rand(1, 3, 96, 96), "c", num_negatives=5000, anchors_per_image=4,
                         generator=torch.Generator().manual_seed(0))


def test_dense_patches_tile_the_image_without_overlap():
    img = torch.rand(3, 70, 135)
    tiles = dense_patches(img, 32)
    assert tiles.shape == (2 * 4, 3, 32, 32)
    for k, (r, c) in enumerate((r, c) for r in range(2) for c in range(4)):
        assert torch.equal(tiles[k], img[:, 32 * r : 32 * r + 32, 32 * c : 32 * c + 32])
    assert dense_patches(img, 80).shape[0] == 0
    sub = dense_patches(img, 32, max_patches=3)
    assert [int((tiles == t).all(dim=(1, 2, 3)).nonzero()) for t in sub] == [0, 4, 7]


def _export(tmp_path, name, method, strategies=None, width=8):
    from spsr_hpc.nse.config import NSEPretrainConfig
    from spsr_hpc.nse.export import save_nse
    from spsr_hpc.nse.pretrain import export_metadata

    cfg = NSEPretrainConfig()
    cfg.objective.method = method
    if strategies:
        cfg.objective.strategies = strategies
    nse_cfg = NSEConfig(width=width, out_dim=8, predictor_hidden=16, jigsaw_hidden=16)
    torch.manual_seed(len(name))  # not the random baseline's draw (seed 0)
    return save_nse(build_nse(nse_cfg), nse_cfg, tmp_path / name / "nse.safetensors",
                    extra=export_metadata(cfg, 3))


def test_report_tables_per_dataset_and_nse(bundled_shards, tmp_path, capsys):
    """End to end at toy size: two exports + random row, two held-out folders -> md/csv/json."""
    from spsr_hpc.nse.evaluate import main

    h = _export(tmp_path, "nse_contrastive", "contrastive", ["h"])
    j = _export(tmp_path, "nse_jigsaw", "jigsaw")
    val = bundled_shards.parent / "photos" / "val" / "HR"
    out = tmp_path / "eval"
    rc = main(["--nse", str(h), "--nse", f"J={j}", "--train-shards", str(bundled_shards),
               "--heldout", str(val), "--heldout", f"again={val}", "--patch", "96", "--fit-steps", "2",
               "--fit-batch", "2", "--num-negatives", "50", "--anchors-per-patch", "8", "--repeats", "3",
               "--max-patches-per-image", "2", "--loss-backend", "torch", "--strategies", "h", "c",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["nses"]) == ["nse_contrastive", "J", "random-init"]
    assert list(report["datasets"]) == ["val", "again"]  # .../val/HR is named after its parent
    for res in report["nses"].values():
        for ds in ("val", "again"):
            assert set(res["scores"][ds]) == {"top1_h", "top1_c", "jigsaw"}
            assert all(len(v["runs"]) == 3 for v in res["scores"][ds].values())
    # Same patches, same seeds: two folders with the same images give the same numbers.
    r0 = report["nses"]["J"]["scores"]
    assert r0["val"] == r0["again"]
    assert report["nses"]["nse_contrastive"]["own"] == ["top1_h"] and report["nses"]["J"]["own"] == ["jigsaw"]
    md = (out / "report.md").read_text()
    assert md.count("| NSE | pretrained by | top-1 h | top-1 c | jigsaw |") == 2
    row = next(line for line in md.splitlines() if line.startswith("| nse_contrastive | contrastive (h) |"))
    assert row.count("**") == 2  # only its own task (top-1 h) is bold
    assert "| random-init | none (random init, seed 0) |" in md
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert len(rows) == 3 * 2 * 3
    assert {r["own_task"] for r in rows if r["nse"] == "J" and r["metric"] == "jigsaw"} == {"True"}


@pytest.mark.slow
def test_trained_nse_beats_random_on_heldout_top1(bundled_shards):
    """A short CPU pretraining (h strategy) lifts held-out top-1 above a random-init NSE (same
    head budget, dense patches, 10 repeats)."""
    from spsr_hpc.data.config import DataConfig
    from spsr_hpc.data.loader import build_train_loader

    shards = bundled_shards
    torch.manual_seed(0)
    cfg = NSEConfig(width=32, out_dim=32, predictor_hidden=64)
    obj = _objective(cfg, strategies=("h",))
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    loader = build_train_loader(
        DataConfig(shards=str(shards), hr_only=True, hr_patch_size=96, batch_size=4, num_workers=0,
                   batches_per_epoch=60),
        rank=0, world_size=1, seed=0,
    )  # fmt: skip
    for step, batch in enumerate(loader):
        loss, _, _ = obj(batch["hr"], torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = EvalSettings(strategies=["h"], patch=128, fit_steps=30, fit_batch=4, num_negatives=100,
                     anchors_per_patch=64, repeats=10, jigsaw=False, loss_backend="torch")
    heldout = [load_heldout(bundled_shards.parent / "photos" / "val" / "HR", s)]
    trained = evaluate_one(obj.nse, cfg, str(shards), heldout, s)["scores"]["val"]["top1_h"]
    rcfg = NSEConfig(width=32, out_dim=32, predictor_hidden=64, random_init=True)
    random = evaluate_one(build_nse(rcfg), rcfg, str(shards), heldout, s)["scores"]["val"]["top1_h"]
    print(f"top-1 h: trained {trained['mean']:.4f} ± {trained['std']:.4f}, "
          f"random {random['mean']:.4f} ± {random['std']:.4f}")
    assert trained["mean"] > random["mean"]


def test_cli_user_errors_are_one_line_with_status_2(bundled_shards, tmp_path, capsys):
    """A missing or foreign --nse file, a missing held-out folder, an --out that is a file: each
    was a traceback with exit status 1 (the last one after the whole evaluation had run)."""
    from spsr_hpc.nse.evaluate import main

    val = bundled_shards.parent / "photos" / "val" / "HR"
    fast = ["--patch", "96", "--fit-steps", "1", "--fit-batch", "2", "--num-negatives", "20",
            "--anchors-per-patch", "4", "--repeats", "1", "--max-patches-per-image", "1",
            "--loss-backend", "torch", "--no-random", "--train-shards", str(bundled_shards)]  # fmt: skip
    (tmp_path / "afile").write_text("x")
    generator = tmp_path / "g.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(generator))
    nse = str(_export(tmp_path, "n", "jigsaw"))
    missing = str(tmp_path / "none.safetensors")
    cases = {
        "missing NSE": (["--nse", missing, "--heldout", str(val)], "none.safetensors"),
        "not an NSE": (["--nse", str(generator), "--heldout", str(val)], "g.safetensors"),
        "missing held-out": (["--nse", nse, "--heldout", str(tmp_path / "no")], str(tmp_path / "no")),
        "--out a file": (["--nse", nse, "--heldout", str(val), "--out", str(tmp_path / "afile")],
                         "is a file"),
    }
    for name, (args, named) in cases.items():
        capsys.readouterr()
        assert main([*args, *fast]) == 2, name
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and named in err[0], (name, err)
