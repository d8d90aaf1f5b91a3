"""Run the authors' own SPSR-G training step (``SPSRModel`` of github.com/Maclory/SPSR) here.

Nothing of their code is in this repository: the user passes a checkout, whose ``code/``
folder is put on ``sys.path`` for as long as their classes are imported and built. Two things
their code assumes are patched for that time only: ``.cuda()`` on the fixed gradient stencils
(identity without CUDA) and torchvision's ``vgg19(pretrained=True)`` (built without weights:
nothing may be downloaded; our perceptual VGG19 weights are copied in afterwards). Their
networks get our trainer's initial weights (generator: the same state-dict keys; discriminators:
the same tensors in the same order), and they train every generator parameter from the first
step (``Branch_pretrain`` off), like our benchmark config.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def _their_imports(code_dir: Path) -> Iterator[None]:
    import torchvision

    saved_modules = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    for k in saved_modules:
        del sys.modules[k]
    orig_cuda, orig_vgg19 = torch.Tensor.cuda, torchvision.models.vgg19
    sys.path.insert(0, str(code_dir))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torchvision.models.vgg19 = lambda *a, pretrained=False, **k: orig_vgg19(weights=None)
    try:
        yield
    finally:
        torch.Tensor.cuda = orig_cuda  # type: ignore[method-assign]
        torchvision.models.vgg19 = orig_vgg19
        sys.path.remove(str(code_dir))
        sys.modules.update(saved_modules)


def _copy_by_order(src: torch.nn.Module, dst: torch.nn.Module, what: str) -> None:
    a, b = list(src.state_dict().values()), dst.state_dict()
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b.values())):
        raise ValueError(f"public SPSR {what} does not match ours tensor by tensor; cannot copy weights")
    dst.load_state_dict(dict(zip(b.keys(), a)))


class PublicSPSRStep:
    """``step(batch)`` = their ``feed_data`` + ``optimize_parameters``, on our trainer's weights.

    Args:
        checkout: path to a clone of github.com/Maclory/SPSR (holding ``code/models/SPSR_model.py``).
        trainer: an SPSR-G Trainer at the paper's architecture, before it trains.
    """

    def __init__(self, checkout: str | Path, trainer: Any) -> None:
        code_dir = Path(checkout).expanduser().resolve() / "code"
        if not (code_dir / "models" / "SPSR_model.py").is_file():
            raise ValueError(
                f"--public-code {checkout}: no code/models/SPSR_model.py there; pass a checkout of "
                "https://github.com/Maclory/SPSR"
            )
        g_cfg, d_cfg, cfg = trainer.cfg.model.generator, trainer.cfg.model.discriminator("image"), trainer.cfg
        w = trainer.objective.weights
        opt = {
            "model": "spsr", "scale": g_cfg.scale, "gpu_ids": [0] if trainer.device.type == "cuda" else None,
            "is_train": True,
            "path": {"pretrain_model_G": None, "pretrain_model_D": None},
            "network_G": {"which_model_G": "spsr_net", "norm_type": None, "mode": "CNA",
                          "nf": trainer.g_engine.module.nf, "nb": trainer.g_engine.module.nb,
                          "in_nc": 3, "out_nc": 3, "gc": trainer.g_engine.module.gc, "scale": g_cfg.scale},
            "network_D": {"which_model_D": "discriminator_vgg_128", "norm_type": "batch",
                          "act_type": "leakyrelu", "mode": "CNA", "nf": d_cfg.nf, "in_nc": 3},
            "train": {
                "lr_G": cfg.optim.lr_g, "weight_decay_G": 0, "beta1_G": cfg.optim.betas[0],
                "lr_D": cfg.optim.lr_d, "weight_decay_D": 0, "beta1_D": cfg.optim.betas[0],
                "lr_scheme": "MultiStepLR", "lr_steps": list(cfg.optim.milestones),
                "lr_gamma": cfg.optim.gamma,
                "pixel_criterion": "l1", "pixel_weight": w["pixel"],
                "feature_criterion": "l1", "feature_weight": w["perceptual"],
                "gan_type": "vanilla", "gan_weight": w["image_gan"],
                "gradient_pixel_weight": w["gradient_pixel"], "gradient_gan_weight": w["gradient_gan"],
                "pixel_branch_criterion": "l1", "pixel_branch_weight": w["branch_pixel"],
                "Branch_pretrain": 0, "Branch_init_iters": 1,
                "D_update_ratio": None, "D_init_iters": None,
            },
        }
        with _their_imports(code_dir):
            spsr_model = importlib.import_module("models.SPSR_model")
            self.model = spsr_model.SPSRModel(opt)
        m = self.model
        m.netG.load_state_dict(trainer.g_engine.module.state_dict(), strict=True)
        _copy_by_order(trainer.d_engines["image"].module, m.netD, "image discriminator")
        _copy_by_order(trainer.d_engines["gradient"].module, m.netD_grad, "gradient discriminator")
        net_f = m.netF.module if isinstance(m.netF, torch.nn.DataParallel) else m.netF
        net_f.features.load_state_dict(trainer.objective.perceptual.features.state_dict())
        self.device = trainer.device
        self.iteration = 0

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        self.iteration += 1
        self.model.feed_data({"LR": batch["lr"].to(self.device), "HR": batch["hr"].to(self.device)})
        self.model.optimize_parameters(self.iteration)
        return dict(self.model.get_current_log())


__all__ = ["PublicSPSRStep"]
