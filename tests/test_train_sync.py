"""Global-batch statistics under data parallelism: GlobalBatchNorm2d and RaGAN's relativistic mean.

Two gloo ranks with b samples each must reproduce one process holding the 2b samples: outputs,
losses, running statistics and gradients (the ranks' parameter gradients averaged, as DeepSpeed
does). The two workers are this file run as a script; the references are computed here, without
a process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WORLD = 2
B = 3  # samples per rank


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = WORLD * B
    return {
        "bn_x": torch.randn(n, 4, 5, 5, generator=g) * 2 + 1,
        "bn_w": torch.randn(n, 4, 5, 5, generator=g),
        "real": torch.randn(n, 3, 32, 32, generator=g),
        "fake": torch.randn(n, 3, 32, 32, generator=g),
    }


def _disc(sync_bn: bool):
    from spsr_hpc.models import VGGDiscriminator

    torch.manual_seed(3)
    return VGGDiscriminator(in_ch=3, nf=4, input_size=32, sync_bn=sync_bn)


def _bn_case(bn: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two training forwards (running stats move twice), loss = sum(y * w), backward."""
    x = x.clone().requires_grad_(True)
    bn(x.detach())
    y = bn(x)
    (y * w).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "w_grad": bn.weight.grad,
        "b_grad": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def _gan_case(d: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """RaGAN D loss (one backward into D) and G loss (gradient into the fake input)."""
    from spsr_hpc.losses.gan import ragan_d_loss, ragan_g_loss

    d_loss = ragan_d_loss(d(real), d(fake))
    d_loss.backward()
    d_grads = torch.cat([p.grad.flatten() for p in d.parameters()])
    d.zero_grad()
    for p in d.parameters():
        p.requires_grad_(False)
    fake = fake.clone().requires_grad_(True)
    with torch.no_grad():
        real_logits = d(real)
    g_loss = ragan_g_loss(real_logits, d(fake))
    g_loss.backward()
    return {"d_loss": d_loss.detach(), "d_grads": d_grads, "g_loss": g_loss.detach(), "fake_grad": fake.grad}


def worker(out: Path) -> None:
    import torch.distributed as dist

    from spsr_hpc.models.discriminators import GlobalBatchNorm2d

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = _inputs()
    sl = slice(rank * B, (rank + 1) * B)
    res: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)
    bn = GlobalBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    res.update({f"bn/{k}": v for k, v in _bn_case(bn, data["bn_x"][sl], data["bn_w"][sl]).items()})
    for sync in (True, False):
        got = _gan_case(_disc(sync), data["real"][sl], data["fake"][sl])
        res.update({f"gan_sync{int(sync)}/{k}": v for k, v in got.items()})
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("sync")
    port = str(_free_port())
    procs = []
    for r in range(WORLD):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK",)}
        env.update(RANK=str(r), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(f"rank {r} failed (rc {p.returncode}):\n{logs[r][-4000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


pytestmark = [pytest.mark.distributed]


def _cat(ranks, key):
    return torch.cat([r[key] for r in ranks])


def _mean(ranks, key):
    return torch.stack([r[key] for r in ranks]).mean(0)


def test_global_batchnorm_equals_batchnorm_on_the_concatenated_batch(ranks):
    data = _inputs()
    torch.manual_seed(0)
    ref_bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.uniform_(-0.5, 0.5)
    ref = _bn_case(ref_bn, data["bn_x"], data["bn_w"])
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(_cat(ranks, "bn/y"), ref["y"], **tol)
    torch.testing.assert_close(_cat(ranks, "bn/x_grad"), ref["x_grad"], **tol)
    # loss = sum over the global batch: the parameter gradient is the sum of the ranks' gradients
    for k in ("w_grad", "b_grad"):
        torch.testing.assert_close(sum(r[f"bn/{k}"] for r in ranks), ref[k], **tol)
    for k in ("running_mean", "running_var"):
        for r in ranks:  # the same on every rank, and those of the whole batch
            torch.testing.assert_close(r[f"bn/{k}"], ref[k], **tol)


def test_ragan_and_sync_bn_two_ranks_equal_one_rank_with_twice_the_batch(ranks):
    data = _inputs()
    ref = _gan_case(_disc(True), data["real"], data["fake"])
    tol = {"atol": 1e-6, "rtol": 1e-5}
    # Per-rank losses are local shares; their mean is the loss of the whole batch.
    torch.testing.assert_close(_mean(ranks, "gan_sync1/d_loss"), ref["d_loss"], **tol)
    torch.testing.assert_close(_mean(ranks, "gan_sync1/g_loss"), ref["g_loss"], **tol)
    # DeepSpeed averages parameter gradients over ranks.
    torch.testing.assert_close(_mean(ranks, "gan_sync1/d_grads"), ref["d_grads"], **tol)
    # Input gradients: each rank holds its slice of the global batch's gradient, divided by the
    # number of ranks (the averaging happens on the parameters downstream).
    torch.testing.assert_close(_cat(ranks, "gan_sync1/fake_grad") / WORLD, ref["fake_grad"], **tol)


def test_per_rank_batchnorm_is_what_differs_without_sync_bn(ranks):
    """Control: per-rank statistics (the public code's choice) do not reproduce the big batch,
    so the equality above is a property of sync_bn, not of the sizes used."""
    data = _inputs()
    ref = _gan_case(_disc(True), data["real"], data["fake"])
    got = _mean(ranks, "gan_sync0/d_grads")
    assert (got - ref["d_grads"]).abs().max() > 1e-3


def test_ragan_global_mean_gradient_matches_autograd_on_the_whole_batch():
    """Without a group, ragan on the whole batch is the formula with torch means (reference)."""
    from spsr_hpc.losses.gan import ragan_d_loss, ragan_g_loss

    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g).requires_grad_(True)
    def bce(x, target):
        return F.binary_cross_entropy_with_logits(x, torch.full_like(x, target))

    ref_d = (bce(real - fake.mean(), 1.0) + bce(fake - real.mean(), 0.0)) / 2
    ref_g = (bce(real - fake.mean(), 0.0) + bce(fake - real.mean(), 1.0)) / 2
    for ours, theirs in ((ragan_d_loss(real, fake), ref_d), (ragan_g_loss(real, fake), ref_g)):
        a = torch.autograd.grad(ours, fake, retain_graph=True)[0]
        b = torch.autograd.grad(theirs, fake, retain_graph=True)[0]
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(a, b)


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
