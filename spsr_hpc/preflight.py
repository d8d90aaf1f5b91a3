"""Checks of a run's inputs that need no model, no engine and no process group.

``launch/train.py`` and ``launch/pretrain_nse.py`` (with and without ``--validate``) call
:func:`check_run_inputs` right after the config loads, so a missing shard folder, an unreadable
manifest, a loader package that is not installed or a missing weight file is reported in one
``error:`` line per problem, with exit status 2, before the expensive start-up (building the
models, DeepSpeed's engines and its one-off C++ op build). Tracebacks stay for real bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


class StartupError(ValueError):
    """An input found unusable while a run starts, after these checks but before any step (a
    pretrained file that does not fit the model, a checkpoint that cannot be resumed): the
    training entry points print it as one ``error:`` line and exit with status 2."""


class PreflightError(ValueError):
    """One or more inputs of a run are missing or unusable; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def data_problems(data: Any) -> list[str]:
    """Shards exist (a make_shards folder needs a readable manifest), the loader is installed."""
    from spsr_hpc.data.dali_loader import dali_missing_message
    from spsr_hpc.data.loader import index_path, resolve_shards

    problems = []
    try:
        shards = resolve_shards(data.shards)
    except (ValueError, OSError) as e:
        problems.append(str(e))
        shards = []
    mode = getattr(data, "verify_shards", "off")
    if shards and mode != "off":
        from spsr_hpc.data.shards import verify_shards

        bad = verify_shards(shards, mode)
        if bad:
            named = "; ".join(f"{sh}: {what}" for sh, what in bad[:5]) + (" ..." if len(bad) > 5 else "")
            problems.append(
                f"{len(bad)} shard(s) differ from their manifest (data.verify_shards={mode}): {named}. The "
                "shards were truncated or changed after make_shards wrote them (a copy that did not finish, "
                "a full disk): re-run launch/make_shards.py (or copy them again), or set "
                "data.verify_shards=off to train on them anyway (lost samples are then counted and "
                "limited by train.max_skip_rate)"
            )
    problems += _manifest_problems(data, shards)
    if data.loader == "dali":
        msg = dali_missing_message()
        if msg:
            problems.append(msg)
        missing = [str(index_path(s)) for s in shards if not index_path(s).is_file()]
        if missing:
            problems.append(
                f"data.loader=dali needs an index next to every shard; missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} (make_shards writes them, or run DALI's wds2idx)"
            )
    return problems


def _manifest_problems(data: Any, shards: list[str]) -> list[str]:
    """Shards whose make_shards manifest says they were cut at another scale, or into crops
    smaller than the HR training patch: every sample would be refused as unusable, and the run
    would stop only after thousands of them (the loader's consecutive-unusable limit)."""
    from spsr_hpc.data.shards import shard_manifests

    problems = []
    by_folder: dict[str, dict] = {}  # each folder's manifests read once
    sets: dict[tuple[str, str], dict] = {}  # (folder, prefix) -> params: each set once
    for sh in shards:
        folder = str(Path(sh).parent)
        if folder not in by_folder:
            by_folder[folder] = shard_manifests(folder)
        found = by_folder[folder].get(Path(sh).name)
        if found is not None:
            params = found[1].get("params") or {}
            sets.setdefault((folder, str(params.get("prefix"))), params)
    several = len({f for f, _ in sets}) < len(sets)  # several sets in one folder: name each
    for (folder, prefix), params in sorted(sets.items()):
        if several:
            folder = f"{folder} ({prefix}-*.tar)"
        scale, crop = params.get("scale"), params.get("crop_size")
        if not data.hr_only and scale is not None and int(scale) != data.scale:
            problems.append(
                f"data.shards: {folder} was made at scale {scale} (its manifest) but "
                f"data.scale={data.scale}: set data.scale={scale} (and model.generator.scale), or make "
                f"shards at scale {data.scale} with launch/make_shards.py --scale"
            )
        elif crop is not None and int(crop) < data.hr_patch:
            problems.append(
                f"data.shards: {folder} holds {crop}x{crop} HR crops (its manifest) but the HR training "
                f"patch is {data.hr_patch}: lower data.patch_size, or make shards with "
                f"launch/make_shards.py --crop {data.hr_patch} (or more) --step ..."
            )
    return problems


def _file_problem(key: str, path: str | None) -> str | None:
    if path and not Path(path).expanduser().is_file():
        return f"{key}={path} does not exist (needed at start)"
    if path and str(path).endswith(".safetensors"):
        from safetensors import safe_open

        try:  # the header only (a truncated or foreign file fails here), no tensor is read
            with safe_open(str(Path(path).expanduser()), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            return (f"{key}={path} is not a readable safetensors file ({e}): re-export it or point at "
                    "another file")
    return None


def weight_problems(cfg: Any) -> list[str]:
    """Pretrained generator / NSE files, the ImageNet structure extractor's file (SPSR-VGG /
    SPSR-ResNet) and the backbone of the perceptual loss (SR runs)."""
    from spsr_hpc.weights import MissingWeightsError, resolve_backbone_weights

    problems = []
    model, loss = getattr(cfg, "model", None), getattr(cfg, "loss", None)
    if model is not None:
        problems.append(_file_problem("model.generator.pretrained", model.generator.pretrained))
    extractor = getattr(model, "structure_extractor", "nse") if model is not None else "nse"
    if loss is not None and loss.needs_nse() and extractor != "nse":
        # SPSR-VGG / SPSR-ResNet: the ImageNet extractor's file, never a silent fallback.
        if not model.structure_random_weights:
            try:
                resolve_backbone_weights(extractor, model.structure_weights)
            except MissingWeightsError as e:
                problems.append(f"model.structure_extractor={extractor}: {e} (Explicit path: "
                                "model.structure_weights=PATH.)")
    elif loss is not None and loss.needs_nse():
        if model.nse.random_init:
            pass  # SPSR-R: a seeded random NSE, no file
        elif not model.nse.pretrained:
            problems.append(
                f"loss.method={loss.method} uses structure losses and needs a pretrained NSE: set "
                "model.nse.pretrained (launch/pretrain_nse.py writes one), model.nse.random_init=true "
                "(SPSR-R) or loss.no_structure_loss=true"
            )
        else:
            problems.append(_file_problem("model.nse.pretrained", model.nse.pretrained))
    if loss is not None and loss.needs_perceptual() and not cfg.perceptual.random_weights:
        try:
            resolve_backbone_weights(cfg.perceptual.backbone, cfg.perceptual.weights)
        except MissingWeightsError as e:
            problems.append(f"perceptual.weights: {e}")
    return [p for p in problems if p]


def run_problems(cfg: Any) -> list[str]:
    """The run's device, its output folder and its validation images (SR runs)."""
    problems = []
    train = getattr(cfg, "train", None)
    if getattr(train, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    backend = getattr(getattr(cfg, "objective", None), "loss_backend", None)  # NSE pretraining
    if backend == "triton":
        import torch

        from spsr_kernels import interpreter_active

        on_cpu = getattr(train, "device", None) == "cpu" or not torch.cuda.is_available()
        if on_cpu and not interpreter_active():
            problems.append("objective.loss_backend=triton runs the Triton kernels, which need a CUDA GPU "
                            "(or TRITON_INTERPRET=1, slow): use objective.loss_backend=auto or torch")
    run_dir = getattr(getattr(cfg, "logging", None), "run_dir", None)
    if run_dir and Path(run_dir).exists() and not Path(run_dir).is_dir():
        problems.append(f"logging.run_dir={run_dir} is a file, not a folder: choose another logging.run_dir")
    val = getattr(cfg, "val", None)
    if val is not None and val.dir and Path(val.dir).is_dir():
        problems += _val_problems(val)
    return problems


def _val_problems(val: Any) -> list[str]:
    """Validation reads the first ``val.max_images`` images of ``val.dir`` at each validation; an
    unusable one would stop the run there, after the steps since the last checkpoint."""
    from spsr_hpc.data.images import BadImageError, list_images, read_rgb

    files = list_images(val.dir)
    if not files:
        return [f"val.dir={val.dir} holds no image files: add HR images, or set val.dir=null"]
    bad = []
    for path in files[: val.max_images]:
        try:
            read_rgb(path)
        except (BadImageError, OSError, ValueError) as e:
            bad.append(str(e))
    if bad:
        return [f"val.dir={val.dir}: {len(bad)} unreadable image(s): {'; '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}: replace or remove them"]
    return []


def launch_problems() -> list[str]:
    """Several srun tasks that would all be rank 0 (see spsr_hpc.distributed.check_launch_env)."""
    from spsr_hpc.distributed import check_launch_env

    try:
        check_launch_env()
    except ValueError as e:
        return [str(e)]
    return []


def run_input_problems(cfg: Any) -> list[str]:
    """Every problem :func:`check_run_inputs` would report (an empty list when all is well)."""
    return launch_problems() + data_problems(cfg.data) + weight_problems(cfg) + run_problems(cfg)


def check_run_inputs(cfg: Any, *, source: str = "<config>") -> None:
    """Raise :class:`PreflightError` (a ValueError) listing every missing or unusable input."""
    problems = run_input_problems(cfg)
    if problems:
        raise PreflightError([f"{source}: {p}" for p in problems])


def print_errors(exc: BaseException) -> int:
    """Print ``error: <line>`` per problem on stderr (rank 0 only) and return exit status 2."""
    from spsr_hpc.distributed import is_main_process

    if is_main_process():
        for line in getattr(exc, "problems", None) or [str(exc)]:
            print(f"error: {line}", file=sys.stderr, flush=True)
    return 2


__all__ = ["PreflightError", "StartupError", "check_run_inputs", "data_problems", "launch_problems",
           "print_errors", "run_input_problems", "run_problems", "weight_problems"]
