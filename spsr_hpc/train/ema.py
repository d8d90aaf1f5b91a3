"""Exponential moving average of a network's weights (BasicSR's ``net_g_ema``)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights, kept in fp32 on the weights' device.

    Buffers that are not floating point (e.g. BatchNorm counters) are copied.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
            for k, v in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, object]) -> float:
        """Load the averaged weights; the decay stays this EMA's own (the run's config). Returns
        the saved decay, for the caller to report a change."""
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, extra {extra[:5]}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        return float(state["decay"])  # type: ignore[arg-type]

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into ``module`` (cast to its dtypes)."""
        sd = module.state_dict()
        module.load_state_dict({k: self.shadow[k].to(dtype=sd[k].dtype, device=sd[k].device) for k in sd})
