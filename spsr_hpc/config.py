"""YAML run configs as typed dataclasses, validated on load.

A config file is a YAML mapping whose sections are dataclasses (torchtitan style): every field
has a type and a default, an unknown key or a value of the wrong type is an error naming the
dotted key and the file, and a section may define ``validate(self)`` to refuse impossible
combinations. ``key.sub=value`` overrides (value parsed with ``yaml.safe_load``) are applied
before validation, so a command-line typo fails exactly like a typo in the file.

The loader is generic: any root dataclass can be the schema (the NSE pretraining passes its
own), and section classes may live in their own modules.

    cfg = load_config("configs/spsr_g.yaml", ["train.max_steps=10", "deepspeed.zero_stage=1"])
    save_resolved(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from spsr_hpc.files import atomic_output

T = TypeVar("T")

# Generators with a gradient branch (SPSR-G's); the others are backbones without one.
_BRANCH_GENERATORS = ("spsr",)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DeepSpeedConfig",
    "LoggingConfig",
    "OptimConfig",
    "PerceptualConfig",
    "TrainConfig",
    "ValConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "save_resolved",
    "to_dict",
    "validate_tree",
]


class ConfigError(ValueError):
    """A config value is wrong. ``key`` is the dotted path, ``source`` the file (or "<dict>")."""

    def __init__(self, key: str, message: str, source: str = "<dict>") -> None:
        self.key = key
        self.source = source
        self.reason = message
        super().__init__(f"config {source}: key '{key}': {message}")


# --------------------------------------------------------------------------------------------
# Generic dataclass <-> dict conversion with type checking
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists/dicts/dataclasses."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({'; '.join(errors)})", source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"expected one of {list(args)}, got {value!r}", source)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list ({_type_name(tp)}), got {value!r}", source)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                msg = f"expected {len(args)} items ({_type_name(tp)}), got {value!r}"
                raise ConfigError(key, msg, source)
            return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping ({_type_name(tp)}), got {value!r}", source)
        k_tp, v_tp = args if args else (Any, Any)
        return {
            _convert(k, k_tp, key, source): _convert(v, v_tp, f"{key}.{k}", source) for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping (section {tp.__name__}), got {value!r}", source)
        return from_dict(tp, value, source=source, prefix=key)
    if tp is float:
        # YAML reads 1e-4 as a string (YAML 1.1 needs a dot); accept it rather than surprise people.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a float, got {value!r}", source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an int, got {value!r}", source)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}", source)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", source)
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(key, f"expected {tp.__name__}, got {value!r}", source)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for config key '{key}'")


def from_dict(schema: type[T], data: dict[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Build the dataclass ``schema`` from a nested dict; unknown keys and wrong types raise.

    Raises ConfigError (a ValueError) naming the dotted key and ``source``.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass, got {schema!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {data!r}", source)
    try:
        hints = typing.get_type_hints(schema)
    except NameError as e:
        raise TypeError(
            f"cannot resolve the annotations of config class {schema.__qualname__} ({e}); define config "
            "dataclasses at module level so that their (string) annotations can be resolved"
        ) from e
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        bad = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(bad, f"unknown key (valid keys here: {sorted(fields)})", source)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key, source)
    try:
        return schema(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # A section's __post_init__ refused a value: keep its message, add where it came from.
        raise ConfigError(prefix or "<root>", str(e), source) from e


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (tuples become lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def validate_tree(cfg: Any, *, source: str = "<dict>", prefix: str = "") -> None:
    """Call ``validate()`` on every section (children first), turning its ValueError into a
    ConfigError that names the section and ``source``. A section's ``validate`` should name the
    field in its message; ConfigErrors it raises with a relative key get the section prefix."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        return
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        validate_tree(child, source=source, prefix=f"{prefix}.{f.name}" if prefix else f.name)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            key = f"{prefix}.{e.key}" if prefix and not e.key.startswith(prefix + ".") else e.key
            raise ConfigError(key, e.reason, source) from e
        except ValueError as e:
            raise ConfigError(prefix or "<root>", str(e), source) from e


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, f"'{part}' is not a section", "<command line>")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], *, unique: bool = False
) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw config dict in place (value via yaml.safe_load).
    A value that is not YAML is a ConfigError. With ``unique`` (a command line a user typed), so
    is a key given twice; without it (lists composed in code: base, then changes) the last wins."""
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.sub=value", "<command line>")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip().lstrip("-")
        if not dotted:
            raise ConfigError(item, "override has an empty key", "<command line>")
        if unique and dotted in seen:
            raise ConfigError(dotted, "given twice on the command line (the last would win): keep one",
                              "<command line>")
        seen.add(dotted)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(dotted, f"value {raw!r} is not valid YAML ({problem}): fix it, or quote it "
                              f"('{dotted}=\"...\"') to pass a string", "<command line>") from None
        _set_dotted(data, dotted, value)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (the last would win): keep one",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[T] | None = None,
    *,
    unique_overrides: bool = False,
) -> T:
    """Load a YAML file (or only defaults when path is None), apply overrides, type-check and
    validate. Every problem raises ConfigError (a ValueError) naming the dotted key and the file.

    Args:
        path: YAML file with one mapping per section.
        overrides: ``["train.max_steps=10", "loss.gan_weight=0"]``; values are YAML.
        unique_overrides: refuse a key given twice in ``overrides`` (the launchers' command lines).
        schema: root dataclass; default :class:`RunConfig`.
    """
    if schema is None:
        schema = __getattr__("RunConfig")
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise FileNotFoundError(f"config file {p} is a folder: pass a .yaml file (the run configs are "
                                    "in configs/)")
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        with p.open() as f:
            try:
                loaded = yaml.load(f, Loader=_UniqueKeyLoader)
            except yaml.YAMLError as e:
                raise ConfigError("<root>", f"not valid YAML: {e}", source) from e
        if loaded is not None and not isinstance(loaded, dict):
            msg = f"expected a mapping of sections, got {type(loaded).__name__}"
            raise ConfigError("<root>", msg, source)
        data = loaded or {}
    if overrides:
        source = f"{source} (with overrides {list(overrides)})"
        apply_overrides(data, overrides, unique=unique_overrides)
    cfg = from_dict(schema, data, source=source)
    validate_tree(cfg, source=source)
    return cfg


def save_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) as YAML; loadable by load_config."""
    p = Path(path)
    with atomic_output(p) as tmp:  # whole or not at all; OutputWriteError names the file
        p.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=None)
    return p


# --------------------------------------------------------------------------------------------
# Training sections (the model, data and loss sections live in their own modules)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Length, batch and step structure of a run."""

    max_steps: int = 400_000
    """Optimizer steps (after gradient accumulation) to train for."""
    grad_accum: int = 1
    """Micro batches (of data.batch_size per rank) accumulated per optimizer step."""
    global_batch: int | None = None
    """Optional check: data.batch_size x grad_accum x world size must equal it (docs/method.md §5: 30)."""
    seed: int = 0
    """Seeds model initialisation (same on every rank) and the per-rank RNG streams."""
    fusion_warmup_steps: int = 5000
    """For the first N steps only parameters whose name starts with ``fusion_prefix`` train
    (docs/method.md §5); 0 disables. Ignored for generators without such parameters."""
    fusion_prefix: str = "f_"
    ema_decay: float | None = None
    """EMA of the generator weights (e.g. 0.999); None disables it."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """Non-finite loss: stop (naming step, term, last good checkpoint) or skip the step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    """Mixed precision: forward passes under bf16 autocast, weights, gradients, optimizer states,
    BatchNorm statistics, losses, EMA and exports fp32 (docs/training.md, "Precision"). Needs
    native bf16: a CUDA device with compute capability >= 8.0, or a CPU with avx512_bf16/AMX."""
    max_skipped_steps: int = 100
    """With on_nonfinite=skip: give up after this many consecutive skipped steps."""
    max_skip_rate: float | None = 0.01
    """Stop when more than this fraction of the data samples read (all ranks) were skipped as
    unusable (corrupt tar, bad image, ...), naming the shards; null: never stop (still reported)."""
    skip_rate_min_samples: int = 1000
    """The skip rate is judged once this many samples were read (skipped + used, all ranks)."""
    compile: bool = False
    """``torch.compile`` the generator and discriminators (same maths). Off by default: on the
    2-core CPU it measured slower than eager and compiles for minutes (docs/training.md)."""
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    """torch.compile mode with train.compile; "reduce-overhead" adds CUDA graphs (GPU only)."""
    channels_last: bool = False
    """Generator, discriminators and batches in channels_last memory format (same maths; ZeRO 0
    only). Off by default: not faster on the 2-core CPU (docs/training.md)."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in one collective (all-reduce, barrier) once training runs before it
    gives up with exit status 5, naming the step and the newest checkpoint; a watchdog ends a
    rank that makes no progress for this + a grace (10 %, 10-60 s). Choose it above the longest
    time one rank can spend while the others wait: a step (the first one compiles), a checkpoint
    save, rank 0's validation (docs/cluster.md)."""
    init_timeout_s: float = 1800.0
    """Seconds for the start-up: the rendezvous of every rank, building the engines, loading the
    checkpoint to resume (all nodes must have started within it)."""

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.grad_accum < 1:
            raise ConfigError("grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError("global_batch", f"must be >= 1 or null, got {self.global_batch}")
        if self.max_skipped_steps < 1:
            raise ConfigError("max_skipped_steps", f"must be >= 1, got {self.max_skipped_steps}")
        if self.max_skip_rate is not None and not 0.0 <= self.max_skip_rate <= 1.0:
            raise ConfigError("max_skip_rate", f"must be in [0, 1] or null, got {self.max_skip_rate}")
        if self.skip_rate_min_samples < 0:
            raise ConfigError("skip_rate_min_samples", f"must be >= 0, got {self.skip_rate_min_samples}")
        if self.fusion_warmup_steps < 0:
            raise ConfigError("fusion_warmup_steps", f"must be >= 0, got {self.fusion_warmup_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}")
        for name in ("collective_timeout_s", "init_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0 seconds, got {getattr(self, name)}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError("compile_mode", f"{self.compile_mode!r} needs train.compile=true")


@dataclasses.dataclass
class OptimConfig:
    """Adam + MultiStepLR for every network (docs/method.md §5 defaults)."""

    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    milestones: list[int] = dataclasses.field(default_factory=lambda: [50_000, 100_000, 200_000, 300_000])
    gamma: float = 0.5
    fused: bool = True
    """Fused Adam (``torch.optim.Adam(fused=True)``, CPU and CUDA): the same update in one
    kernel per parameter group instead of the default per-tensor loop (docs/training.md)."""

    def validate(self) -> None:
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ConfigError("lr_g" if self.lr_g <= 0 else "lr_d", "learning rates must be > 0")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError("milestones", f"must be increasing, got {self.milestones}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError("gamma", f"must be in (0, 1], got {self.gamma}")


@dataclasses.dataclass
class DeepSpeedConfig:
    """Per-engine DeepSpeed settings; the JSON handed to deepspeed.initialize is built from
    these (or read from ``json`` and checked for consistency with the run config)."""

    zero_stage: int = 0
    """0, 1 or 2 (3 partitions parameters, which a GAN step calling D inside G's step cannot use)."""
    gradient_clipping: float = 0.0
    """Global-norm clipping per engine; 0 disables."""
    json: str | None = None
    """Optional DeepSpeed JSON template (configs/deepspeed/*.json); batch keys are filled in."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto = nccl with CUDA, gloo on CPU."""

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(
                "zero_stage",
                f"ZeRO stage {self.zero_stage} is not supported with several engines (a GAN); "
                "use 0, 1 or 2 (stage 3 partitions parameters, and the generator step must run "
                "the frozen discriminators' full weights)",
            )
        if self.gradient_clipping < 0:
            raise ConfigError("gradient_clipping", f"must be >= 0, got {self.gradient_clipping}")
        if self.json is not None and not Path(self.json).is_file():
            raise ConfigError("json", f"DeepSpeed JSON {self.json} does not exist")
        if self.json is not None:
            import json

            try:
                tpl = json.loads(Path(self.json).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError("json", f"DeepSpeed JSON {self.json} is not valid JSON: {e}") from e
            low = [k for k in ("bf16", "fp16") if isinstance(tpl, dict) and (tpl.get(k) or {}).get("enabled")]
            if low:
                raise ConfigError(
                    "json",
                    f"DeepSpeed JSON {self.json} sets {low[0]}.enabled=true (DeepSpeed's low-precision "
                    "engine); mixed precision is train.bf16=true (bf16 autocast on fp32 engines, "
                    f"docs/training.md): remove the {low[0]} block from the template",
                )


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Relative paths are inside the run directory."""
    every: int = 5000
    """Save every N steps (0: only at the end and on a signal)."""
    keep_last: int = 3
    resume: str = "auto"
    """auto: newest complete checkpoint in dir (or start fresh); none; or a checkpoint path."""
    export_every: int = 0
    """Export the generator as safetensors every N steps (0: only at the end)."""

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError("every", f"must be >= 0, got {self.every}")
        if self.keep_last < 1:
            raise ConfigError("keep_last", f"must be >= 1, got {self.keep_last}")
        if self.export_every < 0:
            raise ConfigError("export_every", f"must be >= 0, got {self.export_every}")


@dataclasses.dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Everything a run writes goes here (config, metrics.jsonl, tb/, images/, checkpoints/)."""
    log_every: int = 10
    image_every: int = 1000
    """Save an LR | SR | HR (+ gradient maps) grid every N steps (0: never)."""
    tensorboard: bool = True
    progress_bar: bool = True
    """A tqdm bar when stdout is a terminal; otherwise (or false) one plain line per logged step."""
    wandb: bool = False
    """Also log scalars to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works)."""
    wandb_project: str = "spsr-hpc"

    def validate(self) -> None:
        if not str(self.run_dir).strip():
            raise ConfigError("run_dir", "is empty (the run would write into the current folder, and "
                              "checkpoint.resume=auto resume whatever ./checkpoints holds): name a folder")
        if self.log_every < 1:
            raise ConfigError("log_every", f"must be >= 1, got {self.log_every}")
        self._validate_wandb()
        if self.image_every < 0:
            raise ConfigError("image_every", f"must be >= 0, got {self.image_every}")


    def _validate_wandb(self) -> None:
        import importlib.util

        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "wandb", "logging.wandb=true needs the `wandb` package, which is not installed: "
                "pip install wandb (or spsr-hpc[wandb]), or set logging.wandb=false"
            )


@dataclasses.dataclass
class ValConfig:
    """Validation on a held-out folder of HR images (LR made with MATLAB bicubic)."""

    dir: str | None = None
    every: int = 5000
    max_images: int = 10
    max_size: int | None = None
    """Centre-crop each HR image to at most this side (LR cropped to match) to keep validation cheap."""
    crop_border: int = 4
    use_ema: bool = True
    lpips: bool = True
    """Also LPIPS-AlexNet (val/lpips) when its weights are on disk (`python -m spsr_hpc.weights
    fetch`); without them it is skipped with one warning, never an error."""
    precision: str = "auto"
    """Autocast of the validation forward: "auto" (the training's: bf16 with train.bf16, else
    fp32), "fp32", or "bf16" (where bf16 is native, as train.bf16). The forward of `evaluate
    --precision` / `infer --precision` (spsr_hpc.inference.sr_images)."""

    def validate(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("precision", f"{self.precision!r} is not 'auto', 'fp32' or 'bf16'")
        if self.every < 0:
            raise ConfigError("every", f"must be >= 0, got {self.every}")
        if self.max_size is not None and self.max_size < 1:
            raise ConfigError("max_size", f"must be >= 1 or null, got {self.max_size}")
        if self.dir is not None and not Path(self.dir).is_dir():
            raise ConfigError("dir", f"validation folder {self.dir} does not exist")


@dataclasses.dataclass
class PerceptualConfig:
    """Backbone of the perceptual loss (ImageNet weights, looked up offline by spsr_hpc.weights)."""

    backbone: str = "vgg19"
    """vgg19 (the paper: conv5_4 before ReLU) or vgg16 (our substitute where torchvision's VGG19 file
    is absent: conv5_3 before ReLU, same normalisation, from `python -m spsr_hpc.weights fetch`)."""
    layer: str | None = None
    """Conv compared before its ReLU; null = conv5_4 (vgg19, the paper) / conv5_3 (vgg16)."""
    weights: str | None = None
    """Path to the backbone's state dict; None = spsr_hpc.weights' lookup (fails naming the file)."""
    random_weights: bool = False
    """Random weights (tests only: the perceptual term is then meaningless)."""

    def validate(self) -> None:
        if self.backbone not in ("vgg19", "vgg16"):
            raise ConfigError("backbone", f"{self.backbone!r} is not 'vgg19' or 'vgg16'")
        if self.layer is not None:
            from spsr_hpc.losses.perceptual import conv_layer_end

            try:
                conv_layer_end(self.backbone, self.layer)
            except ValueError as e:
                raise ConfigError("layer", str(e)) from e


def _run_config_class() -> type:
    """RunConfig composes section classes that live in their own modules."""
    from spsr_hpc.data.config import DataConfig
    from spsr_hpc.losses.objective import LossConfig
    from spsr_hpc.models.config import DiscriminatorConfig, GeneratorConfig, NSEConfig

    @dataclasses.dataclass
    class ModelConfig:
        """Networks of an SR run. Discriminators are built for the names the objective needs
        (``SRObjective.discriminator_names``); a name missing here gets the default
        DiscriminatorConfig ("structure" for the structure D, else "vgg128")."""

        generator: GeneratorConfig = dataclasses.field(default_factory=GeneratorConfig)
        discriminators: dict[str, DiscriminatorConfig] = dataclasses.field(default_factory=dict)
        nse: NSEConfig = dataclasses.field(default_factory=NSEConfig)
        """Frozen NSE for SPSR-P/-J; nse.pretrained is required when the objective uses it."""
        structure_extractor: Literal["nse", "vgg19", "vgg16", "resnet18"] = "nse"
        """Features of the structure pixel loss and the structure D (docs/method.md §11): nse (SPSR-P/-J/-R),
        vgg19 (conv5_4 before ReLU: SPSR-VGG), vgg16 (conv5_3 before ReLU: offline substitute),
        resnet18 (layer3[1], "Conv4_2": SPSR-ResNet). ImageNet ones are frozen, eval mode, ImageNet norm."""
        structure_weights: str | None = None
        """vgg19/vgg16/resnet18: torchvision's state dict; null = spsr_hpc.weights' lookup (torch hub
        cache; converted VGG16). A missing file stops the run at start naming it; never a fallback."""
        structure_random_weights: bool = False
        """vgg19/vgg16/resnet18: random weights (tests only: the structure losses are then meaningless)."""

        def validate(self) -> None:
            if self.structure_extractor == "nse":
                for key in ("structure_weights", "structure_random_weights"):
                    if getattr(self, key):
                        raise ConfigError(
                            key, "applies to the ImageNet structure extractors, not structure_extractor=nse; "
                            f"set model.{key}={'null' if key == 'structure_weights' else 'false'}"
                        )
            elif self.nse.pretrained or self.nse.random_init:
                key = "nse.pretrained" if self.nse.pretrained else "nse.random_init"
                raise ConfigError(
                    key, f"is set but model.structure_extractor={self.structure_extractor} does not use the "
                    f"NSE; unset it or set model.structure_extractor=nse"
                )
            if self.structure_weights and self.structure_random_weights:
                raise ConfigError("structure_random_weights", "excludes model.structure_weights; unset one")

        def discriminator(self, name: str) -> DiscriminatorConfig:
            if name in self.discriminators:
                return self.discriminators[name]
            return DiscriminatorConfig(name="structure" if name == "structure" else "vgg128")

    @dataclasses.dataclass
    class RunConfig:
        """Root of an SR training run config (configs/*.yaml)."""

        model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
        loss: LossConfig = dataclasses.field(default_factory=LossConfig)
        perceptual: PerceptualConfig = dataclasses.field(default_factory=PerceptualConfig)
        data: DataConfig = dataclasses.field(default_factory=DataConfig)
        train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
        optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
        deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
        checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
        logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
        val: ValConfig = dataclasses.field(default_factory=ValConfig)

        def validate(self) -> None:
            from spsr_hpc.precision import bf16_unsupported

            if self.train.bf16:
                reason = bf16_unsupported(self.train.device)
                if reason is not None:
                    raise ConfigError("train.bf16", f"{reason}; set train.bf16=false")
            if self.val.precision == "bf16":
                reason = bf16_unsupported(self.train.device)
                if reason is not None:
                    raise ConfigError("val.precision", f"bf16: {reason}; set val.precision=auto or fp32")
            if self.train.channels_last and self.deepspeed.zero_stage != 0:
                raise ConfigError(
                    "train.channels_last",
                    f"needs deepspeed.zero_stage=0 (ZeRO's flat buffers assume contiguous parameters), "
                    f"got stage {self.deepspeed.zero_stage}; set train.channels_last=false",
                )
            if self.model.generator.scale != self.data.scale:
                raise ConfigError(
                    "data.scale",
                    f"{self.data.scale} differs from model.generator.scale={self.model.generator.scale}",
                )
            has_branch = self.model.generator.name in _BRANCH_GENERATORS
            if self.loss.no_gradient_branch and has_branch:
                raise ConfigError(
                    "loss.no_gradient_branch",
                    f"the ablation removes the gradient branch, but model.generator.name="
                    f"{self.model.generator.name!r} has one (it would train unsupervised); use "
                    "model.generator.name=rrdbnet (the SPSR trunk without branch), or edsr / srresnet",
                )
            self._validate_structure()
            if self.loss.needs_gradient_branch() and not has_branch:
                raise ConfigError(
                    "model.generator.name",
                    f"{self.model.generator.name!r} has no gradient branch, but loss.method="
                    f"{self.loss.method} trains one (branch pixel loss); use model.generator.name=spsr "
                    "or set loss.no_gradient_branch=true",
                )

        def _validate_structure(self) -> None:
            """The extractor is used at all, and a structure D given explicit sizes fits its features."""
            from spsr_hpc.models.extractors import feature_shape

            m = self.model
            if not self.loss.needs_nse():
                if m.structure_extractor != "nse":
                    raise ConfigError(
                        "model.structure_extractor",
                        f"{m.structure_extractor} has no effect: loss.method={self.loss.method} (with its "
                        "switches) uses no structure loss; use loss.method=spsr_p or leave it at nse",
                    )
                return
            if "structure" not in self.loss.discriminator_names():
                return
            d = m.discriminator("structure")
            hr = self.data.patch_size * self.data.scale
            c, h, _ = feature_shape(m.structure_extractor, hr, hr, nse_out_dim=m.nse.out_dim)
            for key, got, want in (("in_ch", d.in_ch, c), ("input_size", d.input_size, h)):
                if got is not None and got != want:
                    raise ConfigError(
                        f"model.discriminators.structure.{key}",
                        f"{got}, but structure_extractor={m.structure_extractor} gives {c}×{h}×{h} features "
                        f"for {hr}×{hr} HR patches; set it to {want} or null (sized from the extractor)",
                    )

    for cls in (ModelConfig, RunConfig):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    # get_type_hints resolves the (string) annotations in this module's namespace.
    globals().update(
        DataConfig=DataConfig, LossConfig=LossConfig, GeneratorConfig=GeneratorConfig,
        DiscriminatorConfig=DiscriminatorConfig, NSEConfig=NSEConfig, ModelConfig=ModelConfig,
    )
    return RunConfig


def __getattr__(name: str) -> Any:
    # RunConfig imports the model/data/loss modules; build it lazily so that importing
    # spsr_hpc.config (e.g. from those modules or the NSE helper) stays cheap and cycle-free.
    if name == "RunConfig":
        cls = globals().get("_RunConfig") or _run_config_class()
        globals()["_RunConfig"] = cls
        return cls
    raise AttributeError(name)
