"""Every training row of Tables I, III and V and of the SPSR-G / SPSR-P ablations trains its REAL config.

Each config file below is loaded as it is; the tiny run changes sizes only (generator nf/nb/gc/taps,
D widths and input sizes, NSE width, 64 HR patches, batch 2, 2 steps) and swaps the files a real run
reads for tiny stand-ins: the PSNR RRDB becomes the export of the tiny ``rrdb_psnr`` run trained
first, the pretrained NSE a random frozen one (``model.nse.random_init``), the perceptual VGG19 a
random one. The method and the ablation switches stay the file's. One subprocess (this file doubles
as its worker script; CPU kernels on their PyTorch path) trains them all; the tests then compare
what each run logged with what docs/method.md §4 says that row trains, written out in
tests/paper_runs.py and below independently of the objective's code: the generator's loss terms
(exactly those, every step, all finite, summing to the logged total), the discriminators, the
generator architecture and the structure extractor. A copy of ``spsr_g_no_grad_gan.yaml`` with its
switch flipped trains as well and must fail that check.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from paper_runs import CONFIGS, TINY, Batches, discriminators_of, run_worker
from paper_runs import ESRGAN_TERMS as ESRGAN
from paper_runs import PSNR_TERMS as PSNR
from paper_runs import SPSR_G_TERMS as SPSR_G
from paper_runs import SPSR_P_TERMS as SPSR_P

RRDB, SPSR = "RRDBNet", "SPSRGenerator"
# config -> (paper row, generator class, generator terms, structure extractor: the NSE pretraining
# config whose export the real file reads, "random" (SPSR-R) or None (no structure loss)).
ROWS: dict[str, tuple[str, str, set[str], str | None]] = {
    "rrdb_psnr": ("Table I, RRDB", RRDB, PSNR, None),
    "esrgan": ("Table I, ESRGAN", RRDB, ESRGAN, None),
    "spsr_g": ("Table I, SPSR-G", SPSR, SPSR_G, None),
    "spsr_j": ("Table I, SPSR-J", SPSR, SPSR_P, "nse_jigsaw"),
    "spsr_p": ("Table I, SPSR-P = Table V, SPSR-P-h", SPSR, SPSR_P, "nse_contrastive"),
    "spsr_p_v": ("Table V, SPSR-P-v", SPSR, SPSR_P, "nse_contrastive_v"),
    "spsr_p_c": ("Table V, SPSR-P-c", SPSR, SPSR_P, "nse_contrastive_c"),
    "spsr_p_no_branch": ("Table III, SPSR-P w/o gradient branch", RRDB, SPSR_P - {"branch_pixel"},
                         "nse_contrastive"),
    "spsr_r": ("Table VI, SPSR-R", SPSR, SPSR_P, "random"),
    "spsr_g_no_branch": ("SPSR-G w/o gradient branch", RRDB, SPSR_G - {"branch_pixel"}, None),
    "spsr_g_no_grad_loss": ("SPSR-G w/o gradient loss", SPSR, SPSR_G - {"gradient_pixel", "gradient_gan"},
                            None),
    "spsr_g_no_grad_gan": ("SPSR-G w/o gradient GAN", SPSR, SPSR_G - {"gradient_gan"}, None),
    "spsr_g_no_grad_pixel": ("SPSR-G w/o gradient pixel loss", SPSR, SPSR_G - {"gradient_pixel"}, None),
    "spsr_p_no_struct_loss": ("SPSR-P w/o structure loss", SPSR,
                              SPSR_P - {"structure_pixel", "structure_gan"}, None),
    "spsr_p_no_struct_gan": ("SPSR-P w/o structure GAN", SPSR, SPSR_P - {"structure_gan"}, "nse_contrastive"),
    "spsr_p_no_struct_pixel": ("SPSR-P w/o structure pixel loss", SPSR, SPSR_P - {"structure_pixel"},
                               "nse_contrastive"),
}
# The NSE each pretraining config trains (docs/method.md §6; Table V's sampling strategies).
NSE_OBJECTIVES = {"nse_jigsaw": ("jigsaw", None), "nse_contrastive": ("contrastive", ["h"]),
                  "nse_contrastive_v": ("contrastive", ["v"]), "nse_contrastive_c": ("contrastive", ["c"])}
MUTANT = ("spsr_g_no_grad_gan", "no_gradient_gan: true", "no_gradient_gan: false")
STEPS = 2


def tiny_overrides(cfg, rrdb_export: str | None) -> list[str]:
    """Sizes only (and tiny stand-ins for the files a real run reads), from the real config `cfg`."""
    g = cfg.model.generator
    ovs = [*TINY, f"train.max_steps={STEPS}", "model.generator.nf=8", "model.generator.nb=2",
           "model.generator.gc=4"]
    if g.name == "spsr":
        ovs.append("model.generator.taps=[0,1]")
    if g.pretrained:
        ovs.append(f"model.generator.pretrained={rrdb_export}")
    sizes = {"image": 64, "gradient": 66, "structure": None}  # HR 64: padded gradient maps 66
    for name in sorted(set(cfg.model.discriminators) | set(cfg.loss.discriminator_names())):
        size = sizes[name]
        ovs += [f"model.discriminators.{name}.nf=4",
                f"model.discriminators.{name}.input_size={'null' if size is None else size}"]
    if cfg.model.nse.pretrained:
        ovs += ["model.nse.pretrained=null", "model.nse.random_init=true"]
    if cfg.model.nse.pretrained or cfg.model.nse.random_init:
        ovs.append("model.nse.width=16")
    return ovs


def worker(out: Path) -> None:
    from spsr_hpc.config import load_config
    from spsr_hpc.models.loading import read_state_dict
    from spsr_hpc.train.engines import destroy_distributed
    from spsr_hpc.train.trainer import Trainer

    mutant = out / f"{MUTANT[0]}_mutant.yaml"
    text = (CONFIGS / f"{MUTANT[0]}.yaml").read_text()
    assert MUTANT[1] in text
    mutant.write_text(text.replace(MUTANT[1], MUTANT[2]))
    paths = {name: CONFIGS / f"{name}.yaml" for name in ROWS} | {"mutant": mutant}

    results, rrdb_export = {}, None
    for name, path in paths.items():  # rrdb_psnr first: its export starts the others
        real = load_config(path)
        run_dir = out / name
        cfg = load_config(path, [*tiny_overrides(real, rrdb_export), f"logging.run_dir={run_dir}"])
        t = Trainer(cfg, loader=Batches())
        g = t.g_engine.module
        obj = t.objective
        start = {k: v.detach().clone() for k, v in g.state_dict().items()}
        nse0 = {k: v.detach().clone() for k, v in obj.nse.state_dict().items()} if obj.nse is not None else {}
        summary = t.fit()
        t.close()
        if name == "rrdb_psnr":
            rrdb_export = summary["exports"][-1]
        pre = read_state_dict(cfg.model.generator.pretrained)[0] if cfg.model.generator.pretrained else {}
        results[name] = {
            "generator": type(g).__name__,
            "d": sorted(t.d_engines),
            "extractor": None if obj.nse is None else type(obj.nse).__name__,
            "nse_frozen": obj.nse is None or (
                not any(p.requires_grad for p in obj.nse.parameters())
                and all(torch.equal(v, obj.nse.state_dict()[k]) for k, v in nse0.items())),
            "perceptual": obj.perceptual is not None,
            # The trunk's first conv starts as the tiny PSNR RRDB's (real file: pretrained/RRDB_PSNR_x4.pth).
            "from_rrdb": bool(pre) and torch.equal(start["model.0.weight"], pre["model.0.weight"].float()),
            "step": summary["step"],
            "logged": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
        }
    destroy_distributed()
    (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return run_worker(__file__, tmp_path_factory.mktemp("ablations"), interpret=False)


def check_row(name: str, r: dict) -> None:
    """What the tiny run of config `name` trained is what ROWS says that paper row trains."""
    row, generator, terms, extractor = ROWS[name]
    assert r["step"] == STEPS and [rec["step"] for rec in r["logged"]] == list(range(1, STEPS + 1)), row
    assert r["generator"] == generator, f"{row}: generator {r['generator']}, expected {generator}"
    ds = discriminators_of(terms)
    assert r["d"] == ds, f"{row}: discriminators {r['d']}, expected {ds}"
    assert r["perceptual"] == ("perceptual" in terms), row
    assert r["extractor"] == (None if extractor is None else "NSE") and r["nse_frozen"], row
    assert r["from_rrdb"] == (name != "rrdb_psnr"), f"{row}: not started from the PSNR RRDB"
    for rec in r["logged"]:
        logged = {k.split("/", 2)[2] for k in rec if k.startswith("loss/g/")}
        assert logged == terms, f"{row}, step {rec['step']}: terms {sorted(logged)}, expected {sorted(terms)}"
        d_logged = sorted({k.split("/")[1][2:] for k in rec if k.startswith("loss/d_")})
        assert d_logged == ds, f"{row}: D losses logged for {d_logged}, expected {ds}"
        losses = {k: v for k, v in rec.items() if k.startswith("loss/")}
        assert all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), f"{row}: {losses}"
        parts = sum(rec[f"loss/g/{t}"] for t in terms)
        assert math.isclose(parts, rec["loss/g_total"], rel_tol=1e-6, abs_tol=1e-12), (row, parts, rec)


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(ROWS))
def test_real_config_trains_its_row(runs, name):
    check_row(name, runs[name])


@pytest.mark.parametrize("name", list(ROWS))
def test_real_config_reads_its_rows_structure_extractor(name):
    """The real file names the NSE of its row (h / v / c contrastive, jigsaw; SPSR-R a seeded random
    one): the tiny runs replace that file by a random NSE, so this is where -v, -c and -J differ."""
    from spsr_hpc.config import load_config
    from spsr_hpc.nse.config import NSEPretrainConfig

    nse = load_config(CONFIGS / f"{name}.yaml").model.nse
    extractor = ROWS[name][3]
    if extractor is None or extractor == "random":
        assert nse.pretrained is None and nse.random_init == (extractor == "random")
        return
    pre = load_config(CONFIGS / f"{extractor}.yaml", schema=NSEPretrainConfig)
    method, strategies = NSE_OBJECTIVES[extractor]
    assert pre.objective.method == method and not nse.random_init
    if strategies is not None:
        assert pre.objective.strategies == strategies
    assert nse.pretrained == f"{pre.logging.run_dir}/nse.safetensors"


# What a tiny version may change (dotted prefixes): sizes, the files a real run reads, logging.
TINY_KEYS = ("model.generator.nf", "model.generator.nb", "model.generator.gc", "model.generator.taps",
             "model.generator.pretrained", "model.nse.width", "model.nse.pretrained", "model.nse.random_init",
             "data.patch_size", "data.batch_size", "train.max_steps", "perceptual.random_weights", "logging.",
             "val.dir")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", list(ROWS))
def test_tiny_version_changes_sizes_and_stand_ins_only(name):
    """Method, switches, weights, schedule, generator name, D kinds: all the real file's."""
    from spsr_hpc.config import load_config, to_dict

    real = load_config(CONFIGS / f"{name}.yaml")
    tiny = load_config(CONFIGS / f"{name}.yaml", [*tiny_overrides(real, "tiny/generator.safetensors"),
                                                    "logging.run_dir=tiny"])
    a, b = _flat(to_dict(real)), _flat(to_dict(tiny))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    d_sizes = tuple(f"model.discriminators.{n}.{f}" for n in real.model.discriminators
                    for f in ("nf", "input_size"))
    assert [k for k in changed if not k.startswith(TINY_KEYS + d_sizes)] == []
    assert "train.max_steps" in changed and "data.patch_size" in changed


def test_a_flipped_switch_fails_the_check(runs):
    """A copy of spsr_g_no_grad_gan.yaml with no_gradient_gan: false trains SPSR-G's full objective
    (gradient GAN term and gradient D): the check of the real file's row must reject it."""
    with pytest.raises(AssertionError, match="SPSR-G w/o gradient GAN"):
        check_row(MUTANT[0], runs["mutant"])
    assert runs["mutant"]["d"] == ["gradient", "image"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
