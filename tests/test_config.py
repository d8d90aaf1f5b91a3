"""Config loading/validation and the small training-infrastructure pieces (no process group)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spsr_hpc.config import (
    ConfigError,
    DeepSpeedConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    save_resolved,
    to_dict,
)
from spsr_hpc.train.checkpoint import (
    META_NAME,
    capture_rng_state,
    find_latest,
    list_checkpoints,
    resolve_resume,
    restore_rng_state,
)
from spsr_hpc.train.ema import EMA
from spsr_hpc.train.engines import check_global_batch, deepspeed_config
from spsr_hpc.train.guards import first_nonfinite, sync_flags
from spsr_hpc.train.logging import RunLogger, image_grid, read_jsonl

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "nse" not in p.name)


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    out = save_resolved(cfg, tmp_path / "resolved.yaml")
    assert load_config(out) == cfg
    assert cfg.model.generator.scale == cfg.data.scale == 4


def test_paper_defaults_in_spsr_g():
    cfg = load_config(REPO / "configs" / "spsr_g.yaml")
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.betas) == (1e-4, 1e-4, (0.9, 0.999))
    assert (cfg.optim.milestones, cfg.optim.gamma) == ([50_000, 100_000, 200_000, 300_000], 0.5)
    assert cfg.data.patch_size * cfg.data.scale == 128
    assert cfg.data.batch_size * 2 == 30  # the public code's 30 over 2 GPUs
    assert (cfg.data.hflip, cfg.data.vflip, cfg.data.transpose) == (True, True, True)
    assert cfg.train.fusion_warmup_steps == 5000
    assert cfg.loss.discriminator_names() == ("image", "gradient")


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("train.max_stepz=3", "train.max_stepz", "unknown key"),
        ("model.generator.nff=3", "model.generator.nff", "unknown key"),
        ("train.max_steps=abc", "train.max_steps", "expected an int"),
        ("train.max_steps=1.5", "train.max_steps", "expected an int"),
        ("train.ema_decay=[1]", "train.ema_decay", "expected float | None"),
        ("optim.betas=[0.9]", "optim.betas", "expected 2 items"),
        ("train.on_nonfinite=maybe", "train.on_nonfinite", "expected one of"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage", "ZeRO stage 3 is not supported"),
        ("train.max_steps=0", "train.max_steps", "must be >= 1"),
        ("optim.milestones=[5,2]", "optim.milestones", "increasing"),
        ("data.scale=2", "data.scale", "differs from model.generator.scale"),
        ("loss.method=nope", "loss", "loss.method='nope'"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, override, key, fragment):
    path = _write(tmp_path, "train:\n  max_steps: 10\n  device: cpu\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    err = info.value
    assert err.key == key
    assert str(path) in str(err) and f"'{key}'" in str(err) and fragment in str(err)


def test_unknown_key_in_file_names_file(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 10\n  fusion_warmup: 3\n")
    with pytest.raises(ValueError, match=r"run\.yaml.*'train\.fusion_warmup'.*unknown key"):
        load_config(path)


def test_overrides_are_yaml_and_beat_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 10\noptim:\n  lr_g: 1e-4\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=7",
            "optim.milestones=[1, 2]",
            "train.ema_decay=0.5",
            "model.discriminators.image.nf=8",
            "val.dir=null",
        ],
    )
    assert cfg.train.max_steps == 7 and cfg.optim.milestones == [1, 2] and cfg.train.ema_decay == 0.5
    assert cfg.optim.lr_g == 1e-4  # "1e-4" is a YAML string; float fields accept it
    assert cfg.model.discriminator("image").nf == 8
    assert cfg.model.discriminator("structure").name == "structure"
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(path, ["train.max_steps"])


@dataclasses.dataclass
class Head:
    hidden: int = 4
    kind: str = "mlp"

    def validate(self) -> None:
        if self.kind not in ("mlp", "linear"):
            raise ConfigError("kind", f"unknown head {self.kind!r}")


@dataclasses.dataclass
class Root:
    head: Head = dataclasses.field(default_factory=Head)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    tags: dict[str, int] = dataclasses.field(default_factory=dict)


def test_generic_schema(tmp_path):
    path = _write(tmp_path, "head:\n  hidden: 8\ntags: {a: 1}\n")
    cfg = load_config(path, ["optim.lr_g=1e-3"], schema=Root)
    assert cfg.head.hidden == 8 and cfg.tags == {"a": 1} and cfg.optim.lr_g == 1e-3
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]
    with pytest.raises(ConfigError) as info:
        load_config(path, ["head.kind=conv"], schema=Root)
    assert info.value.key == "head.kind" and str(path) in str(info.value)
    with pytest.raises(ConfigError, match=r"'tags\.a'"):
        load_config(path, ["tags.a=x"], schema=Root)


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys, bundled_shards):
    from spsr_hpc.train.trainer import main

    path = _write(tmp_path, "train:\n  max_stepz: 10\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz" in err and str(path) in err
    assert not torch.distributed.is_initialized()
    good = REPO / "configs" / "tiny_spsr_g.yaml"
    shards = f"data.shards={bundled_shards}"
    assert main(["--config", str(good), "--validate", "train.max_steps=3", shards]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["max_steps"] == 3 and out["loss"]["method"] == "spsr_g"


# --- engines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_templates_load(stage):
    tpl = REPO / "configs" / "deepspeed" / f"zero{stage}.json"
    cfg = deepspeed_config(
        micro_batch_per_gpu=3, grad_accum=2, zero_stage=stage, gradient_clipping=1.0, template=tpl
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == stage and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is False and "train_batch_size" not in cfg
    assert "torch_autocast" not in cfg
    # train.bf16: fp32 engines with DeepSpeed's torch_autocast on and no bf16 communication.
    amp = deepspeed_config(micro_batch_per_gpu=3, zero_stage=stage, autocast_bf16=True, template=tpl)
    assert amp["bf16"]["enabled"] is False
    assert amp["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def test_deepspeed_config_refusals(tmp_path):
    tpl = REPO / "configs" / "deepspeed" / "zero1.json"
    with pytest.raises(ValueError, match=r"zero_optimization\.stage=1 but deepspeed\.zero_stage=2"):
        deepspeed_config(micro_batch_per_gpu=1, zero_stage=2, template=tpl)
    with pytest.raises(ValueError, match="zero_stage=3"):
        deepspeed_config(micro_batch_per_gpu=1, zero_stage=3)
    bad = _write(tmp_path, json.dumps({"optimizer": {"type": "Adam"}}), "ds.json")
    with pytest.raises(ValueError, match="FusedAdam"):
        deepspeed_config(micro_batch_per_gpu=1, template=bad)
    blocks = ({"bf16": {"enabled": True}}, {"fp16": {"enabled": True}}, {"torch_autocast": {"enabled": True}})
    for block in blocks:
        low = _write(tmp_path, json.dumps(block), "low.json")
        with pytest.raises(ValueError, match=f"{next(iter(block))}.*remove"):
            deepspeed_config(micro_batch_per_gpu=1, template=low)


def test_global_batch_check():
    assert check_global_batch(15, 1, 2, 30) == 30
    assert check_global_batch(4, 2, 3, None) == 24
    with pytest.raises(ValueError, match=r"data.batch_size=15.*= 15, but train.global_batch=30"):
        check_global_batch(15, 1, 1, 30)


# --- checkpoints --------------------------------------------------------------------------------


def _fake_ckpt(root: Path, name: str, meta: dict | None) -> Path:
    p = root / name
    p.mkdir(parents=True)
    if meta is not None:
        (p / META_NAME).write_text(json.dumps(meta))
        (p / "trainer.pt").write_bytes(b"x")  # a manifest-less checkpoint must hold trainer.pt
    return p


def test_latest_complete_checkpoint_ignores_partial_ones(tmp_path):
    good1 = _fake_ckpt(tmp_path, "step_0000100", {"complete": True, "step": 100})
    good2 = _fake_ckpt(tmp_path, "step_0000200", {"complete": True, "step": 200})
    _fake_ckpt(tmp_path, "step_0000300.tmp", {"complete": True, "step": 300})  # never renamed
    _fake_ckpt(tmp_path, "step_0000400", None)  # no marker
    _fake_ckpt(tmp_path, "step_0000500", {"complete": False})
    (tmp_path / "step_0000600").mkdir()
    (tmp_path / "step_0000600" / META_NAME).write_text("{trunc")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100, 200]
    assert find_latest(tmp_path) == good2
    assert resolve_resume("auto", tmp_path) == good2
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume(str(good1), tmp_path) == good1
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_0000400"), tmp_path)
    assert find_latest(tmp_path / "missing") is None


def test_rng_state_round_trip(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    random.random(), np.random.rand(5), torch.rand(7)
    restore_rng_state(loaded)
    got = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert torch.equal(got[2], expected[2])


# --- EMA, guards, logging -------------------------------------------------------------------------


def test_ema_matches_formula():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, 0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 3))  # changes BN running stats and num_batches_tracked
    ema.update(net)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert ema.shadow["1.num_batches_tracked"].item() == 1
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema2 = EMA(other, 0.5)
    ema2.load_state_dict(ema.state_dict())
    ema2.copy_to(other)
    torch.testing.assert_close(other[0].weight, ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(net, 1.0)


def test_first_nonfinite_and_flags():
    assert first_nonfinite({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}) is None
    assert (
        first_nonfinite(
            {"a": torch.tensor(1.0), "b": torch.tensor(float("nan")), "c": torch.tensor(float("inf"))}
        )
        == "b"
    )
    assert first_nonfinite({"a": 1.0, "b": float("-inf")}) == "b"
    assert sync_flags(True, False) == [True, False]


def test_image_grid_and_logger(tmp_path):
    lr, sr, hr = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    maps = torch.rand(3, 3, 18, 18) * 5
    grid = image_grid(lr, sr, hr, extra=[maps], max_images=2)
    assert grid.shape == (3, 32, 64) and grid.min() >= 0 and grid.max() <= 1
    torch.testing.assert_close(grid[:, :16, 16:32], sr[0])
    torch.testing.assert_close(grid[:, :16, :16], lr[0].repeat_interleave(4, 1).repeat_interleave(4, 2))
    # With labels, a header strip names each column; the images below it are unchanged. The
    # 16-px columns are narrower than the labels, which wrap (nothing is cut): a taller header.
    from spsr_hpc.labels import header_height, label_layout

    names = ["LR", "SR", "HR", "map"]
    labelled = image_grid(lr, sr, hr, extra=[maps], max_images=2, labels=names)
    HEADER_PX = header_height(max(len(lines) for lines in label_layout(names, [16] * 4)))
    assert HEADER_PX > 18 and all("".join(ls) == n for ls, n in zip(label_layout(names, [16] * 4), names))
    assert labelled.shape == (3, HEADER_PX + 32, 64)
    torch.testing.assert_close(labelled[:, HEADER_PX:], grid, atol=1 / 255, rtol=0)
    header = labelled[:, :HEADER_PX]
    assert header.max() == 1 and header.min() < 0.5  # white strip with dark text
    with pytest.raises(ValueError, match="3 labels for 4 columns"):
        image_grid(lr, sr, hr, extra=[torch.rand(3, 3, 18, 18)], labels=["LR", "SR", "HR"])
    log = RunLogger(tmp_path, total_steps=10, tensorboard=True, progress_bar=False)
    log.log(1, {"loss/a": 0.5}, samples=8)
    log.log(2, {"loss/a": float("nan")})
    png = log.log_images(2, "grid", grid)
    log.close()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["loss/a"] == 0.5 and recs[1]["loss/a"] == "nan"
    assert "samples_per_s" in recs[0] and png is not None and png.is_file()
    assert any((tmp_path / "tb").iterdir())


# ---------------------------------------------------------------------------------------------
# Every shipped config validates with the command a user runs; ablation consistency
# ---------------------------------------------------------------------------------------------

ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _is_nse_pretraining(path: Path) -> bool:
    return "objective" in (yaml.safe_load(path.read_text()) or {})


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_with_its_cli(path, capsys, bundled_shards, tmp_path):
    """`python launch/train.py --config X --validate` (launch/pretrain_nse.py for NSE configs).

    --validate also checks the files a run opens at start, so the files a config names (shards,
    pretrained G / NSE, VGG weights) are pointed at stand-ins that exist."""
    raw = yaml.safe_load(path.read_text()) or {}
    stand_in = tmp_path / "weights.pth"
    stand_in.write_bytes(b"")
    overrides = [f"data.shards={bundled_shards}"]
    if _is_nse_pretraining(path):
        from spsr_hpc.nse.pretrain import main
    else:
        from spsr_hpc.train.trainer import main

        model = raw.get("model", {})
        if (model.get("generator") or {}).get("pretrained"):
            overrides.append(f"model.generator.pretrained={stand_in}")
        if (model.get("nse") or {}).get("pretrained"):
            overrides.append(f"model.nse.pretrained={stand_in}")
        if not (raw.get("perceptual") or {}).get("random_weights"):
            overrides.append(f"perceptual.weights={stand_in}")
        if model.get("structure_extractor", "nse") != "nse" and not model.get("structure_random_weights"):
            overrides.append(f"model.structure_weights={stand_in}")
    assert main(["--config", str(path), "--validate", *overrides]) == 0, capsys.readouterr().err


def test_every_config_is_listed():
    """The NSE and ablation configs the paper's tables need exist (README lists them)."""
    names = {p.stem for p in ALL_CONFIGS}
    assert {
        "spsr_g", "spsr_p", "spsr_j", "esrgan", "rrdb_psnr", "spsr_g_no_branch", "spsr_g_no_grad_loss",
        "spsr_g_no_grad_gan", "spsr_g_no_grad_pixel", "spsr_p_no_struct_loss", "spsr_p_no_struct_gan",
        "spsr_p_no_struct_pixel", "spsr_p_no_branch", "spsr_p_v", "spsr_p_c", "spsr_r", "edsr_g", "edsr_p",
        "srresnet_g", "srresnet_p", "nse_contrastive", "nse_contrastive_v", "nse_contrastive_c",
        "nse_jigsaw", "spsr_vgg", "spsr_resnet", "edsr_psnr", "srresnet_psnr", "edsr_gan", "srresnet_gan",
    } <= names


NO_GB = "loss.no_gradient_branch"


@pytest.mark.parametrize(
    ("config", "overrides", "key", "fragment"),
    [
        ("spsr_g_no_branch.yaml", ["model.generator.name=spsr"], NO_GB, "use model.generator.name=rrdbnet"),
        ("spsr_p_no_branch.yaml", ["model.generator.name=spsr"], NO_GB, "rrdbnet"),
        ("spsr_g.yaml", ["model.generator.name=rrdbnet"], "model.generator.name", "no gradient branch"),
        ("spsr_p.yaml", ["model.generator.name=edsr"], "model.generator.name", NO_GB + "=true"),
        ("spsr_r.yaml", ["model.nse.pretrained=runs/x/nse.safetensors"], "model.nse", "exclude each other"),
        ("spsr_r.yaml", ["model.nse.random_seed=-1"], "model.nse", "random_seed"),
    ],
)
def test_ablation_combinations_refused(config, overrides, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        load_config(REPO / "configs" / config, overrides)
    assert e.value.key == key


def test_ablation_configs_are_what_the_tables_train():
    p_nb = load_config(REPO / "configs/spsr_p_no_branch.yaml")
    assert (p_nb.model.generator.name, p_nb.loss.method) == ("rrdbnet", "spsr_p")
    assert "branch_pixel" not in p_nb.loss.active_terms() and p_nb.loss.needs_nse()
    r = load_config(REPO / "configs/spsr_r.yaml")
    assert (r.model.nse.random_init, r.model.nse.pretrained, r.model.nse.random_seed) == (True, None, 0)
    p = load_config(REPO / "configs/spsr_p.yaml")
    assert to_dict(r.loss) == to_dict(p.loss) and r.model.generator == p.model.generator
    # SPSR-P (Table I) = SPSR-P-h: the h NSE; -v / -c read the NSEs of the sampling study.
    assert p.model.nse.pretrained == "runs/nse_contrastive/nse.safetensors"
    for st in ("v", "c"):
        c = load_config(REPO / f"configs/spsr_p_{st}.yaml")
        assert c.model.nse.pretrained == f"runs/nse_contrastive_{st}/nse.safetensors"
        assert to_dict(c.loss) == to_dict(p.loss)
