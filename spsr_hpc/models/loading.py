"""Loading pretrained generators: public SPSR, ESRGAN (old/new keys) and our own exports.

docs/method.md §10: checkpoints of other formats must not load "successfully" while loading
nothing. Every load here either accounts for every key (what matched, what was left fresh by
design, what was dropped by design) or raises with the first mismatches listed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spsr_hpc.models.spsr import GRADIENT_KERNEL_H, GRADIENT_KERNEL_V, SPSRGenerator

log = logging.getLogger(__name__)

# Containers we unwrap, in order of preference (BasicSR saves params_ema next to params).
CONTAINER_KEYS = ("params_ema", "params", "state_dict", "model", "module", "generator")
# Prefixes added by DataParallel/DDP/DeepSpeed ("module.") and torch.compile ("_orig_mod.").
STRIP_PREFIXES = ("module.", "_orig_mod.")
_FIXED_SPSR_KEYS = {
    "get_g_nopadding.weight_h": GRADIENT_KERNEL_H,
    "get_g_nopadding.weight_v": GRADIENT_KERNEL_V,
}
_SHOW = 5


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists the first mismatches."""


@dataclass
class LoadReport:
    """What `load_pretrained` did. ``str(report)`` is a one-line summary for logs.

    source: file path or "<state_dict>". format: "spsr" (official SPSR / our SPSR exports),
    "esrgan-old", "esrgan-new" (trunk initialisation of SPSR or a full RRDBNet load) or
    "native" (any other model's own export). matched: model state-dict keys loaded from the
    checkpoint, out of total. fresh: model keys left at their initialisation. dropped:
    checkpoint keys deliberately ignored (e.g. ESRGAN's `model.10` RGB conv, which SPSR lacks).
    """

    source: str
    format: str
    matched: int
    total: int
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    container: str | None = None
    renamed: int = 0

    def __str__(self) -> str:
        parts = [f"loaded {self.matched}/{self.total} keys from {self.source} (format {self.format}"]
        if self.container:
            parts[0] += f", container '{self.container}'"
        if self.renamed:
            parts[0] += f", {self.renamed} keys renamed"
        parts[0] += ")"
        if self.fresh:
            parts.append(f"fresh: {len(self.fresh)} keys in {_groups(self.fresh)}")
        if self.dropped:
            parts.append(f"dropped from checkpoint: {', '.join(self.dropped)}")
        return "; ".join(parts)


def _groups(keys: list[str]) -> str:
    """Compact listing of key groups: the first path component (two for `model.N`)."""
    seen: dict[str, None] = {}
    for k in keys:
        head = k.split(".")
        seen[".".join(head[:2]) if head[0] in ("model", "features") else head[0]] = None
    names = list(seen)
    return "[" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + "]"


# ------------------------------------------------------------------------------------------
# reading and normalising
# ------------------------------------------------------------------------------------------
def read_state_dict(
    path_or_state_dict: str | os.PathLike | Mapping,
) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Return (flat state dict on CPU, source description, container key used or None)."""
    if isinstance(path_or_state_dict, Mapping):
        sd, source = dict(path_or_state_dict), "<state_dict>"
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        p = Path(path_or_state_dict).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        source = str(p)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise TypeError(
                f"{p}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}"
            )
        sd = dict(sd)
    else:
        raise TypeError(
            f"load_pretrained: expected a path or a state dict, got {type(path_or_state_dict).__name__}"
        )

    container = None
    while not all(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in CONTAINER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if key is None:
            bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:_SHOW]
            raise CheckpointMismatchError(
                f"{source}: not a plain state dict: entries {bad} are not tensors and none of the "
                f"containers {CONTAINER_KEYS} is present (top-level keys: {list(sd)[:10]})"
            )
        container = key if container is None else f"{container}.{key}"
        sd = dict(sd[key])
    if not sd:
        raise CheckpointMismatchError(f"{source}: the state dict is empty")

    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd, source, container


_NEW_BODY = re.compile(r"^(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.conv(\d)\.(weight|bias)$")
_NEW_SINGLE = {
    "conv_first": "first",
    "conv_body": "body_conv",
    "trunk_conv": "body_conv",
    "conv_up1": "up1",
    "upconv1": "up1",
    "conv_up2": "up2",
    "upconv2": "up2",
    "conv_up3": "up3",
    "upconv3": "up3",
    "conv_hr": "hr",
    "HRconv": "hr",
    "conv_last": "last",
}


def is_esrgan_new(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_first.weight" in sd and any(_NEW_BODY.match(k) for k in sd)


def esrgan_new_to_old(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename BasicSR / xinntao-ESRGAN keys (conv_first, body.N.rdb1.conv1, RRDB_trunk.N.RDB1.conv1,
    conv_body/trunk_conv, conv_up*/upconv*, conv_hr/HRconv, conv_last) to the original layout.

    Unknown keys are kept as they are (they then show up as unexpected).
    """
    nb = 1 + max(int(m.group(1)) for k in sd if (m := _NEW_BODY.match(k)))
    n_up = sum(1 for i in (1, 2, 3) if f"conv_up{i}.weight" in sd or f"upconv{i}.weight" in sd)
    index = {
        "first": "model.0",
        "body_conv": f"model.1.sub.{nb}",
        "hr": f"model.{3 * n_up + 2}",
        "last": f"model.{3 * n_up + 4}",
    }
    for i in range(1, n_up + 1):
        index[f"up{i}"] = f"model.{3 * i}"
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if m := _NEW_BODY.match(k):
            out[f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.0.{m.group(4)}"] = v
            continue
        name, _, leaf = k.rpartition(".")
        role = _NEW_SINGLE.get(name)
        out[f"{index[role]}.{leaf}" if role in index else k] = v
    return out


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every state-dict entry, no shared storage (safetensors refuses aliases such as
    SPSR's model.8 / HR_conv0_new.0); save with safetensors.torch.save_file or torch.save."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------
def _mismatch_message(
    source: str, model: nn.Module, fmt: str, missing: list[str], unexpected: list[str], shapes: list[str]
) -> str:
    lines = [
        f"{source}: checkpoint (format {fmt}) does not fit {type(model).__name__}: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(shapes)} shape mismatches; nothing was loaded."
    ]
    if missing:
        lines.append(f"  first missing: {missing[:_SHOW]}")
    if unexpected:
        lines.append(f"  first unexpected: {unexpected[:_SHOW]}")
    if shapes:
        lines.append(f"  first shape mismatches: {shapes[:_SHOW]}")
    return "\n".join(lines)


def _is_trunk_key(k: str) -> bool:
    return k.startswith("model.")


def load_pretrained(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, *, strict: bool = True
) -> LoadReport:
    """Load a checkpoint into `model` and report what matched; raise when it does not fit.

    Accepted sources: a path (``.safetensors`` via safetensors, anything else via
    ``torch.load(weights_only=True)``) or a state dict. Containers ``params_ema``, ``params``,
    ``state_dict``, ``model``, ``module`` are unwrapped; ``module.`` / ``_orig_mod.`` prefixes
    are stripped. Formats:

    * public SPSR checkpoints and our SPSRGenerator exports: every key must match; the fixed
      ``get_g_nopadding.weight_{h,v}`` entries are checked against the expected stencils;
      ``model.8`` and ``HR_conv0_new.0`` (one module) must agree when both are present.
    * ESRGAN RRDB checkpoints, old keys (``model.0``, ``model.1.sub.*``, ``model.3/6/8/10``) or
      new keys (``conv_first``, ``body.N.rdb1.conv1``/``RRDB_trunk.N.RDB1.conv1``,
      ``conv_body``/``trunk_conv``, ``conv_up1/2``/``upconv1/2``, ``conv_hr``/``HRconv``,
      ``conv_last``): into an SPSRGenerator they initialise the trunk (every trunk key must be
      there; ``model.10`` has no counterpart and is dropped; branch, fusion and
      ``HR_conv1_new`` stay fresh and are listed); into an RRDBNet they load completely.
    * any other model: its own state dict, every key.

    Args:
        strict: when False, model keys absent from the checkpoint are left fresh and listed
            (with a warning) instead of raising. Unexpected keys and shape mismatches raise
            in both modes.

    Returns a LoadReport; raises CheckpointMismatchError (a ValueError) listing the first
    missing, unexpected and shape-mismatched keys, before any weight is changed.
    """
    sd, source, container = read_state_dict(path_or_state_dict)
    target = model.state_dict()
    heads = {k.split(".", 1)[0] for k in sd}
    if not any(k in target for k in sd) and len(heads) == 1 and all("." in k for k in sd):
        # A submodule saved from its parent (e.g. `nse.conv1.weight` from a pretraining objective).
        head = heads.pop()
        stripped = {k.split(".", 1)[1]: v for k, v in sd.items()}
        if any(k in target for k in stripped):
            sd, container = stripped, f"{container + '.' if container else ''}{head}"
    fmt, renamed = "native", 0
    if is_esrgan_new(sd):
        sd, fmt, renamed = esrgan_new_to_old(sd), "esrgan-new", len(sd)

    dropped: list[str] = []
    by_design_fresh: set[str] = set()
    is_spsr = isinstance(model, SPSRGenerator)
    fixed_seen: list[str] = []

    if is_spsr:
        # SPSR's own format: fixed stencils and the model.8 / HR_conv0_new.0 alias.
        for key, expected in _FIXED_SPSR_KEYS.items():
            if key in sd:
                got = sd.pop(key)
                fixed_seen.append(key)
                if tuple(got.shape) != tuple(expected.shape) or not torch.equal(got.float().cpu(), expected):
                    raise CheckpointMismatchError(
                        f"{source}: {key} is {got.flatten().tolist()} but SPSR's fixed gradient stencil is "
                        f"{expected.flatten().tolist()}; not an SPSR checkpoint of this code's convention"
                    )
        hr_idx = len(model.model) - 2  # the conv shared with HR_conv0_new (model.8 at ×4)
        trunk_only = all(_is_trunk_key(k) for k in sd)
        for leaf in ("weight", "bias"):
            a, b = f"model.{hr_idx}.{leaf}", f"HR_conv0_new.0.{leaf}"
            if a in sd and b in sd and not torch.equal(sd[a], sd[b]):
                raise CheckpointMismatchError(
                    f"{source}: {a} and {b} differ, but they are one module in SPSR (saved twice)"
                )
            if a in sd and b not in sd:
                sd[b] = sd[a]
            elif b in sd and a not in sd:
                sd[a] = sd[b]
        if trunk_only:
            fmt = "esrgan-new" if fmt == "esrgan-new" else "esrgan-old"
            last = f"model.{hr_idx + 2}."  # ESRGAN's final nf→3 conv (model.10 at ×4): no counterpart
            dropped = sorted(k for k in sd if k.startswith(last))
            for k in dropped:
                del sd[k]
            by_design_fresh = {
                k
                for k in target
                if not _is_trunk_key(k) and not k.startswith("HR_conv0_new") and k not in _FIXED_SPSR_KEYS
            }
        else:
            fmt = "spsr"
    elif sum(1 for k in sd if _is_trunk_key(k)) == len(sd) and "model.1.sub.0.RDB1.conv1.0.weight" in sd:
        fmt = "esrgan-new" if fmt == "esrgan-new" else "esrgan-old"

    fixed = set(_FIXED_SPSR_KEYS) if is_spsr else set()
    optional = {k for k in target if k.endswith("num_batches_tracked")} | fixed
    missing = [k for k in target if k not in sd and k not in optional and k not in by_design_fresh]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd
        if k in target and tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if unexpected or shapes or (missing and strict) or not any(k in target for k in sd):
        raise CheckpointMismatchError(_mismatch_message(source, model, fmt, missing, unexpected, shapes))

    result = model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    loaded = [k for k in target if k in sd]
    fresh = [k for k in target if k not in sd and k not in fixed and not k.endswith("num_batches_tracked")]
    if missing:
        log.warning(
            "load_pretrained(strict=False): %d model keys left fresh: %s", len(missing), missing[:_SHOW]
        )
    return LoadReport(
        source=source,
        format=fmt,
        matched=len(loaded) + len(fixed_seen),
        total=len(target),
        fresh=fresh,
        dropped=dropped,
        container=container,
        renamed=renamed,
    )
