"""The NSE weights file the SPSR-P/J configs load by path: ``nse.safetensors``.

The safetensors file holds the NSE's state dict (plain tensor names, no ``module.`` prefix) and,
in its string metadata, the NSEConfig as JSON plus the receptive field and stride it implies, so
``load_nse(path)`` rebuilds the exact architecture without any other file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spsr_hpc.files import atomic_output
from spsr_hpc.models import NSEConfig, build_nse

FORMAT = "spsr-hpc-nse-v1"


def save_nse(nse: nn.Module, cfg: NSEConfig, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the NSE weights and config to ``path`` (a .safetensors file), atomically.

    Args:
        nse: the network (a DeepSpeed engine's ``.module`` or a plain module).
        cfg: the NSEConfig it was built from.
        extra: more string metadata (e.g. pretraining method and step).
    """
    path = Path(path)
    state = {k: v.detach().float().cpu().contiguous() for k, v in nse.state_dict().items()}
    meta = {
        "format": FORMAT,
        # `pretrained` would make build_nse load another file on top of these weights.
        "nse_config": json.dumps(dataclasses.asdict(dataclasses.replace(cfg, pretrained=None))),
        "receptive_field": str(int(nse.receptive_field())),
        "stride": str(int(nse.stride)),
        **(extra or {}),
    }
    with atomic_output(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=meta)
    return path


def read_nse_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of an NSE weights file (format, nse_config JSON, geometry, ...)."""
    from safetensors import safe_open

    if Path(path).is_dir():
        raise ValueError(f"NSE weights {path} is a folder: pass its nse.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({e}): re-export it, or point at "
                         "another file") from e


def load_nse(
    path: str | Path, *, device: str | torch.device = "cpu", frozen: bool = True
) -> nn.Module:
    """Rebuild an NSE from an ``nse.safetensors`` written by `save_nse` (strict key match).

    Args:
        path: the weights file.
        device: where to put the network.
        frozen: eval mode and ``requires_grad_(False)`` (how SPSR-P/J use it).

    Returns:
        The NSE: (B, 3, H, W) float in [0, 1] -> (B, 32, H/4, W/4) with the default config.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"NSE weights {path} is a folder: pass its nse.safetensors")
    if not path.is_file():
        raise FileNotFoundError(
            f"NSE weights {path} not found: pretrain one with `launch/pretrain_nse.py` "
            "(it writes <output_dir>/nse.safetensors)"
        )
    meta = read_nse_metadata(path)
    if meta.get("format") != FORMAT or "nse_config" not in meta:
        raise ValueError(
            f"{path} is not an NSE export (metadata format={meta.get('format')!r}, expected {FORMAT!r}); "
            "export one with spsr_hpc.nse.export.save_nse"
        )
    cfg = NSEConfig(**json.loads(meta["nse_config"]))
    nse = build_nse(cfg)
    try:
        state = load_file(str(path))
    except Exception as e:  # a header that reads but tensors cut short
        raise ValueError(f"{path} is not a readable safetensors file ({e}): re-export it") from e
    result = nse.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the NSE it describes: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    nse.to(device)
    if frozen:
        nse.eval().requires_grad_(False)
    return nse
