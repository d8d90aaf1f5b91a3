"""NSE evaluation: held-out top-1 against an independent brute force, and trained beats random."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spsr_hpc.models import NSEConfig, build_nse
from spsr_hpc.models.config import build_context_predictor
from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.evaluate import EvalSettings, evaluate_one, format_table, load_heldout
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


@pytest.mark.slow
def test_trained_nse_beats_random_on_heldout_top1(bundled_shards):
    """A short CPU pretraining lifts held-out top-1 above a random-init NSE (same heads budget)."""
    shards = bundled_shards
    heldout = load_heldout(bundled_shards.parent / "photos" / "val" / "HR", 128)
    from spsr_hpc.data.config import DataConfig
    from spsr_hpc.data.loader import build_train_loader

    torch.manual_seed(0)
    cfg = NSEConfig(width=32, out_dim=32, predictor_hidden=64)
    obj = _objective(cfg)
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
    s = EvalSettings(strategies=["c"], patch=128, fit_steps=30, fit_batch=4, num_negatives=100,
                     anchors_per_image=64, crops_per_image=4, repeats=3, jigsaw=False, loss_backend="torch")
    trained = evaluate_one(obj.nse, cfg, str(shards), heldout, s)
    torch.manual_seed(123)
    random = evaluate_one(build_nse(cfg), cfg, str(shards), heldout, s)
    report = {"settings": vars(s), "device": "cpu", "chance": {"top1": 1 / 101},
              "results": {"trained": trained, "random-init": random}}
    print(format_table(report))
    assert trained["top1_c"]["mean"] > random["top1_c"]["mean"]
