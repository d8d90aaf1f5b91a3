"""The multi-node recipe, simulated on one machine: two DeepSpeed launchers, one per "node", with
a hostfile and ``--no_ssh`` (each launcher starts its node's ranks itself; what a cluster
scheduler does with one ``deepspeed --no_ssh --node_rank $NODE_RANK`` per node). The two-node
run must train exactly like one node with the same two ranks (``torchrun --nproc_per_node 2``):
same parameters bit for bit and the same logged losses.

Uses launch/train.py with the real WebDataset loader on tiny shards made here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import REPO, _env  # the same clean launcher environment

BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _overrides(shards: Path, run_dir: Path) -> list[str]:
    return [
        f"data.shards={shards}", "data.batch_size=2", "data.patch_size=8", "data.num_workers=0",
        "model.generator.nf=8", "model.generator.nb=1", "model.generator.gc=4",
        "train.max_steps=3", "train.ema_decay=null", "checkpoint.every=0",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=1",
        "logging.image_every=0", "val.dir=null", f"logging.run_dir={run_dir}",
    ]


@pytest.fixture(scope="module")
def shards(noise_shards) -> Path:
    return noise_shards  # tests/conftest.py: read only


def test_two_launchers_with_hostfile_and_no_ssh_train_like_one_node(shards, tmp_path):
    from safetensors.torch import load_file

    from spsr_hpc.train.logging import read_jsonl

    cfg = str(REPO / "configs" / "tiny_psnr.yaml")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(_free_port())
    two = tmp_path / "two_nodes"
    launchers = [
        subprocess.Popen(
            [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
             "--master_addr", "127.0.0.1", "--master_port", port,
             str(REPO / "launch" / "train.py"), "--config", cfg, *_overrides(shards, two)],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for n in (0, 1)
    ]
    one = tmp_path / "one_node"
    single = subprocess.Popen(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(REPO / "launch" / "train.py"), "--config", cfg, *_overrides(shards, one)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for p in [*launchers, single]:
        log = p.communicate(timeout=900)[0]
        assert p.returncode == 0, log[-4000:]
    a, b = load_file(str(two / "generator.safetensors")), load_file(str(one / "generator.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [[r["loss/g_total"] for r in read_jsonl(d / "metrics.jsonl") if "loss/g_total" in r]
              for d in (two, one)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    meta = [p for p in (two / "checkpoints").iterdir()]
    assert len(meta) == 1 and '"world_size": 2' in (meta[0] / "meta.json").read_text()
