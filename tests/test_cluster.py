"""A cluster user's first day: install next to their own torch, optional packages, SLURM, batch
logs, early one-line errors, weights that carry their architecture, help texts, layering."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spsr_hpc import distributed as sdist
from spsr_hpc.config import ConfigError, LoggingConfig, to_dict
from spsr_hpc.models import GeneratorConfig, build_generator
from spsr_hpc.train.logging import RunLogger

REPO = Path(__file__).resolve().parents[1]
TINY = GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1], scale=4)


def _env(**extra: str) -> dict[str, str]:
    launcher = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / ".shim"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run_python(code: str, *, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=timeout)


# A meta-path finder that makes `import <name>` fail as if the package were not installed.
_BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
"""


def _blocked(names: list[str], body: str) -> str:
    return _BLOCKER.format(blocked=names) + textwrap.dedent(body)


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher or SLURM variables (the test sets the ones it needs)."""
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                             "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    return monkeypatch


# --- 1. install next to the user's torch -------------------------------------------------------

TORCH_213 = sorted(Path("/opt/wheels").glob("torch-2.13.0*cp311*.whl")) if sys.version_info[:2] == (3, 11) \
    else []


def _dry_run(python: Path, *args: str, report: Path) -> dict:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--dry-run", "--report", str(report), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def _planned(report: dict) -> dict[str, str]:
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}


@pytest.fixture(scope="module")
def venv_torch_213(tmp_path_factory):
    """A venv holding only torch 2.13 (the CPU wheel on this machine's disk, without its deps)."""
    if not TORCH_213:
        pytest.skip("needs the torch 2.13 CPU wheel under /opt/wheels (and Python 3.11)")
    venv = tmp_path_factory.mktemp("venv213") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(TORCH_213[0])],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"could not install the torch 2.13 wheel: {proc.stderr[-500:]}")
    return py


@pytest.mark.slow
def test_plain_install_replaces_torch_but_the_constraints_keep_it(venv_torch_213, tmp_path):
    py = venv_torch_213
    naive = _planned(_dry_run(py, "-e", str(REPO), report=tmp_path / "naive.json"))
    if "torch" not in naive:
        pytest.skip("the package index offers no torchvision that needs a newer torch: nothing to guard")
    # The problem as reported: pip plans to replace the user's torch 2.13.
    assert not naive["torch"].startswith("2.13")
    guard = REPO / "scripts" / "torch_guard.py"
    assert subprocess.run([str(py), str(guard), "check", str(tmp_path / "naive.json")],
                          capture_output=True, timeout=60).returncode == 1
    pins = subprocess.run([str(py), str(guard), "constraints"], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    assert pins.strip() == "torch==2.13.0+cpu"
    (tmp_path / "c.txt").write_text(pins)
    plan = _dry_run(py, "-c", str(tmp_path / "c.txt"), "-e", str(REPO), report=tmp_path / "pinned.json")
    planned = _planned(plan)
    assert "torch" not in planned and "torchvision" in planned
    tv = next(i for i in plan["install"] if i["metadata"]["name"].lower() == "torchvision")
    torch_req = [r for r in tv["metadata"].get("requires_dist", [])
                 if r.replace(" ", "").startswith("torch=")]
    assert all("2.13" in r for r in torch_req), torch_req  # a torchvision built for torch 2.13
    assert subprocess.run([str(py), str(guard), "check", str(tmp_path / "pinned.json")],
                          capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
def test_setup_env_keeps_the_installed_torch_or_refuses(venv_torch_213):
    env = {**os.environ, "SPSR_VENV": str(venv_torch_213.parent.parent), "SPSR_DRY_RUN": "1",
           "SPSR_EXTRAS": "dev"}
    ok = subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                        env=env, timeout=900)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "keeping the installed torch==2.13.0+cpu" in ok.stdout
    # A torchvision that needs another torch next to torch 2.13: no install can keep both.
    dirs = ("/opt/wheels", "/opt/pypi-more/files")
    tv = sorted(w for d in dirs for w in Path(d).glob("torchvision-0.29*cp311*.whl"))
    if not tv:
        pytest.skip(f"needs a torchvision 0.29 wheel in {' or '.join(dirs)} for the refusal case")
    subprocess.run([str(venv_torch_213), "-m", "pip", "install", "--quiet", "--no-deps", str(tv[-1])],
                   check=True, timeout=900)
    try:
        bad = subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                             env=env, timeout=900)
    finally:
        subprocess.run([str(venv_torch_213), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision"],
                       timeout=300)
    assert bad.returncode == 2
    assert "does not fit together" in bad.stderr and "torchvision 0.29" in bad.stderr
    assert "SPSR_ALLOW_TORCH_CHANGE=1" in bad.stderr


def test_torch_guard_check_reads_a_pip_report(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import torch_guard
    finally:
        sys.path.pop(0)
    report = {"install": [{"metadata": {"name": "torch", "version": "2.14.1"}},
                          {"metadata": {"name": "tqdm", "version": "4.67"}}]}
    assert torch_guard.planned_changes(report, {"torch": "2.13.0+cu130"}) == [
        "torch: installed 2.13.0+cu130 -> planned 2.14.1"]
    assert torch_guard.planned_changes(report, {}) == []
    assert torch_guard.constraint_lines({"torch": "2.13.0+cu130", "triton": "3.5.0"}) == [
        "torch==2.13.0+cu130", "triton==3.5.0"]


# --- 2. optional packages ------------------------------------------------------------------------


def test_everything_imports_and_runs_without_triton():
    code = _blocked(["triton"], """
        import os
        os.environ["TRITON_INTERPRET"] = "1"  # would pick the kernels if triton were there
        import torch
        import spsr_kernels, spsr_hpc.models, spsr_hpc.losses, spsr_hpc.evaluate, spsr_hpc.inference
        import spsr_hpc.train.trainer, spsr_hpc.nse.pretrain
        assert spsr_kernels.HAS_TRITON is False
        torch.manual_seed(0)
        for padding in (1, 2):
            x = torch.rand(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
            y = spsr_kernels.gradient_map(x, padding)
            (g,) = torch.autograd.grad(y.square().sum(), x)
            xr = x.detach().requires_grad_()
            yr = spsr_kernels.gradient_map_ref(xr, padding)
            (gr,) = torch.autograd.grad(yr.square().sum(), xr)
            torch.testing.assert_close(y, yr)
            torch.testing.assert_close(g, gr)
        pred, keys = torch.randn(2, 5, 8), torch.randn(2, 12, 8)
        idx = torch.randint(0, 12, (2, 5))
        torch.testing.assert_close(spsr_kernels.info_nce(pred, keys, idx),
                                   spsr_kernels.info_nce_ref(pred, keys, idx))
        from spsr_hpc.models import GeneratorConfig, build_generator
        g = build_generator(GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1]))
        assert g(torch.rand(1, 3, 8, 8)).sr.shape == (1, 3, 32, 32)
        try:
            spsr_kernels.gradient_map(torch.rand(1, 1, 4, 4), backend="triton")
        except ValueError as e:
            print("REFUSED:", e)
        import sys
        assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
    """)
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED: gradient_map: backend='triton': triton is not installed" in proc.stdout


def test_dali_loader_without_dali_names_the_extras(monkeypatch, bundled_shards):
    from spsr_hpc.data import DataConfig, build_train_loader
    from spsr_hpc.preflight import data_problems

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails
    cfg = DataConfig(shards=str(bundled_shards), loader="dali", batch_size=2, patch_size=16, scale=4)
    with pytest.raises(ModuleNotFoundError, match=r"\[dali-cuda12\].*\[dali-cuda13\]"):
        build_train_loader(cfg, rank=0, world_size=1)
    (problem,) = data_problems(cfg)
    assert "data.loader=dali" in problem and "[dali-cuda13]" in problem and "webdataset" in problem
    assert data_problems(DataConfig(shards=str(bundled_shards), batch_size=2, patch_size=16, scale=4)) == []


def test_bundled_photos_without_scikit_image_name_it(monkeypatch, tmp_path, capsys):
    from spsr_hpc.data import load_bundled_photos

    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ModuleNotFoundError, match="scikit-image"):
        load_bundled_photos()
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import make_shards
    finally:
        sys.path.pop(0)
    assert make_shards.main(["--bundled", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "scikit-image" in err and "0 bundled photos" not in err


# --- 3. SLURM ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu17", ["gpu17"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
        ("dgx-a100-[009-011]", ["dgx-a100-009", "dgx-a100-010", "dgx-a100-011"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert sdist.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node[3-1]", "node[a-b]", "node]1["])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        sdist.expand_nodelist(bad)


def test_ranks_come_from_slurm_when_no_launcher_set_them(no_launcher):
    mp = no_launcher
    # The case of the report: under srun, no RANK; task 1 of 2.
    mp.setenv("SLURM_PROCID", "1")
    mp.setenv("SLURM_NTASKS", "2")
    mp.setenv("SLURM_LOCALID", "1")
    mp.setenv("SLURM_JOB_NODELIST", "node[07-08]")
    mp.setenv("SLURM_JOB_ID", "123456")
    assert (sdist.get_rank(), sdist.get_world_size(), sdist.get_local_rank()) == (1, 2, 1)
    assert not sdist.is_main_process()
    env = sdist.slurm_launch_env()
    assert env["MASTER_ADDR"] == "node07" and env["MASTER_PORT"] == str(29500 + 123456 % 10000)
    mp.setenv("MASTER_ADDR", "10.0.0.5")  # the documented override
    mp.setenv("MASTER_PORT", "4242")
    assert sdist.slurm_launch_env()["MASTER_ADDR"] == "10.0.0.5"
    assert sdist.slurm_launch_env()["MASTER_PORT"] == "4242"
    # A launcher's variables win over SLURM's.
    mp.setenv("RANK", "5")
    mp.setenv("WORLD_SIZE", "8")
    mp.setenv("LOCAL_RANK", "3")
    assert (sdist.get_rank(), sdist.get_world_size(), sdist.get_local_rank()) == (5, 8, 3)


def test_batch_script_itself_is_one_process(no_launcher):
    # The batch script (not an srun step) has SLURM_PROCID=0 and the job's task count.
    no_launcher.setenv("SLURM_PROCID", "0")
    no_launcher.setenv("SLURM_NTASKS", "8")
    assert sdist.slurm_launch_env() == {}
    assert (sdist.get_rank(), sdist.get_world_size()) == (0, 1)
    no_launcher.setenv("SLURM_STEP_ID", "0")  # inside `srun`: 8 tasks
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", "8")
    no_launcher.setenv("SLURM_STEP_NODELIST", "gpu[1-2]")
    assert (sdist.get_rank(), sdist.get_world_size()) == (0, 8)
    assert sdist.slurm_launch_env()["MASTER_ADDR"] == "gpu1"


def test_refuses_when_several_tasks_would_all_be_rank_0(no_launcher, tmp_path, capsys, bundled_shards):
    mp = no_launcher
    for k, v in {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        mp.setenv(k, v)
    with pytest.raises(ValueError, match="several tasks would all be rank 0"):
        sdist.check_launch_env()
    from spsr_hpc.train import trainer

    mp.setattr(trainer, "run", lambda *a, **k: pytest.fail("the run must not start"))
    rc = trainer.main(["--config", str(REPO / "configs" / "tiny_psnr.yaml"), f"data.shards={bundled_shards}"])
    assert rc == 2 and "several tasks would all be rank 0" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()
    # One launcher per node (torchrun inside srun --ntasks-per-node=1) is fine.
    mp.setenv("WORLD_SIZE", "16")
    sdist.check_launch_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_srun_tasks_form_one_process_group(tmp_path):
    """Two processes with only SLURM's variables (as srun -n 2 sets them) start one gloo group.

    spsr_hpc.train.engines.init_distributed calls export_slurm_env before DeepSpeed's env://
    start; plain torch.distributed is used here to leave DeepSpeed's one-off C++ op build out.
    """
    code = """
        import torch, torch.distributed as dist
        from spsr_hpc import distributed as sdist
        sdist.export_slurm_env()
        dist.init_process_group("gloo")
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        print("RESULT", dist.get_rank(), dist.get_world_size(), sdist.get_local_rank(), int(t.item()))
        dist.destroy_process_group()
    """
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                                       SLURM_STEP_ID="0", SLURM_STEP_NODELIST="127.0.0.1", SLURM_JOB_ID="7",
                                       MASTER_PORT=port))
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT 0 2 0 3", "RESULT 1 2 1 3"]


def test_sbatch_example_is_valid_bash_and_lets_slurm_set_ranks():
    script = REPO / "launch" / "slurm_train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node" in text and "srun" in text and "launch/train.py" in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "RANK=" in line or "WORLD_SIZE=" in line]
    assert any("--validate" in line for line in code)


# --- 4. logs in a batch system -------------------------------------------------------------------


def test_plain_line_per_logged_step_without_a_terminal(tmp_path, capsys):
    logger = RunLogger(tmp_path, total_steps=100, tensorboard=False, progress_bar=True)  # stdout: captured
    assert logger._bar is None
    logger.log(10, {"loss/g_total": 0.5, "loss/g/pixel": 0.25, "lr/generator": 1e-4}, samples=40)
    logger.log(20, {"loss/g_total": 0.125}, samples=40)
    logger.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2
    assert lines[0].startswith("step 10/100 (10.0%) | g_total 0.5 pixel 0.25 | ") and "img/s" in lines[0]
    assert lines[1].startswith("step 20/100 (20.0%) | g_total 0.125") and "eta " in lines[1]
    off = RunLogger(tmp_path / "off", total_steps=5, tensorboard=False, progress_bar=False)
    off.log(5, {"loss/g_total": 1.0})
    off.close()
    assert "step 5/5 (100.0%) | g_total 1" in capsys.readouterr().out


def test_bar_shows_the_current_steps_losses(tmp_path, monkeypatch, capsys):
    import spsr_hpc.train.logging as tlog

    monkeypatch.setattr(tlog, "_is_terminal", lambda: True)
    logger = RunLogger(tmp_path, total_steps=30, tensorboard=False, progress_bar=True)
    bar = logger._bar
    bar.mininterval, bar.miniters, bar.dynamic_miniters = 0, 0, False  # draw on every update
    for step, value in [(10, 1.5), (20, 2.5)]:
        logger.log(step, {"loss/g_total": value})
        drawn = capsys.readouterr().err.split("\r")[-1]
        assert f"g_total={value}" in drawn and f"{step}/30" in drawn
    logger.progress(21, {"loss/g_total": 7.25})
    assert "g_total=7.25" in capsys.readouterr().err.split("\r")[-1]
    logger.close()


def test_wandb_is_optional_and_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert LoggingConfig().wandb is False  # off by default
    with pytest.raises(ConfigError, match="pip install wandb"):
        LoggingConfig(wandb=True).validate()
    with pytest.raises(ModuleNotFoundError, match=r"logging\.wandb=true needs the `wandb` package"):
        RunLogger(tmp_path, total_steps=1, tensorboard=False, progress_bar=False, wandb_project="p")


def test_wandb_receives_the_logged_scalars(tmp_path, monkeypatch):
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        id = "abc123"

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    LoggingConfig(wandb=True).validate()
    logger = RunLogger(tmp_path, total_steps=10, tensorboard=False, progress_bar=False, wandb_project="proj",
                       wandb_config={"a": 1})
    logger.log(10, {"loss/g_total": 0.5})
    logger.close()
    assert calls["init"][0]["project"] == "proj" and calls["init"][0]["config"] == {"a": 1}
    assert calls["log"] == [(10, {"loss/g_total": 0.5})] and calls["finish"] == [True]
    assert (tmp_path / "wandb_id").read_text() == "abc123"


# --- 5. errors before the expensive part ---------------------------------------------------------


def _train_main(args, monkeypatch):
    from spsr_hpc.train import trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("models/engines must not be built"))
    return trainer.main(args)


def test_validate_and_start_check_shards_loader_and_weights(no_launcher, tmp_path, capsys, bundled_shards):
    cfg = str(REPO / "configs" / "tiny_psnr.yaml")
    for extra in ([], ["--validate"]):
        assert _train_main(["--config", cfg, *extra, f"data.shards={tmp_path / 'nope'}"], no_launcher) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0] and "data.shards" in err[0]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    broken = f"data.shards={tmp_path / 'broken'}"
    assert _train_main(["--config", cfg, "--validate", broken], no_launcher) == 2
    assert "manifest.json is unreadable" in capsys.readouterr().err
    no_launcher.setitem(sys.modules, "nvidia.dali", None)
    assert _train_main(["--config", cfg, "--validate", f"data.shards={bundled_shards}", "data.loader=dali"],
                       no_launcher) == 2
    assert "[dali-cuda12]" in capsys.readouterr().err
    assert _train_main(["--config", cfg, f"data.shards={bundled_shards}",
                        f"model.generator.pretrained={tmp_path / 'rrdb.pth'}"], no_launcher) == 2
    assert "model.generator.pretrained=" in capsys.readouterr().err
    no_launcher.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    rc = _train_main(["--config", str(REPO / "configs" / "tiny_spsr_g.yaml"), f"data.shards={bundled_shards}",
                      "perceptual.random_weights=false"], no_launcher)
    assert rc == 2 and "vgg19" in capsys.readouterr().err
    assert _train_main(["--config", cfg, "--validate", f"data.shards={bundled_shards}"], no_launcher) == 0
    assert not torch.distributed.is_initialized()


def test_nse_pretraining_checks_shards_first(no_launcher, tmp_path, capsys):
    from spsr_hpc.nse import pretrain

    no_launcher.setattr(pretrain, "pretrain", lambda cfg: pytest.fail("must not start"))
    rc = pretrain.main(["--config", str(REPO / "configs" / "tiny_nse_contrastive.yaml"),
                        f"data.shards={tmp_path / 'none'}"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: ")


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_evaluate_checks_every_pair_and_checkpoint_before_building(tmp_path, monkeypatch, capsys):
    import spsr_hpc.evaluate as ev
    from spsr_hpc.inference import export_generator

    hr = _photos(tmp_path / "HR", [(32, 32), (40, 24)])
    lr = _photos(tmp_path / "LR", [(8, 8), (9, 6)])  # im1 should be 10x6
    ckpt = export_generator(build_generator(TINY), tmp_path / "g.safetensors",
                            metadata={"generator": json.dumps(to_dict(TINY))})
    monkeypatch.setattr(ev, "build_and_load", lambda *a, **k: pytest.fail("no model may be built"))
    with pytest.raises(ev.EvalInputError, match=r"im1\.png is 6x9 but HR im1\.png \(mod-cropped 24x40\)"):
        ev.evaluate({"tiny": (TINY, ckpt)}, {"s": (hr, lr)}, 4, tmp_path / "out", progress=False)
    with pytest.raises(ev.EvalInputError, match=r"missing\.pth"):
        ev.evaluate({"tiny": (TINY, tmp_path / "missing.pth")}, {"s": (hr, None)}, 4, tmp_path / "out",
                    progress=False)
    with pytest.raises(SystemExit) as info:
        ev.main(["--model", f"tiny={ckpt}", "--dataset", f"s={hr},{lr}", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: dataset 's'")


# --- 6. weights that carry their architecture ----------------------------------------------------


def _trainer_style_export(path: Path, cfg: GeneratorConfig) -> Path:
    """What Trainer.export writes: the generator section as JSON in the metadata."""
    from spsr_hpc.inference import export_generator

    torch.manual_seed(0)
    meta = {"step": "10", "method": "psnr", "generator": json.dumps(to_dict(cfg))}
    return export_generator(build_generator(cfg), path, metadata=meta)


def test_infer_and_evaluate_read_the_architecture_from_metadata(tmp_path, capsys):
    from spsr_hpc.evaluate import main as eval_main
    from spsr_hpc.inference import generator_config_from_metadata, main, resolve_arch

    cfg = GeneratorConfig(name="spsr", nf=8, nb=3, gc=4, taps=[0, 2], scale=2)
    ckpt = _trainer_style_export(tmp_path / "g.safetensors", cfg)
    assert generator_config_from_metadata(ckpt) == cfg
    assert resolve_arch(ckpt, nb=4).nb == 4 and resolve_arch(ckpt, nb=4).taps == [0, 2]  # flags win
    lr = _photos(tmp_path / "in", [(12, 10)])
    copy = tmp_path / "copy.safetensors"
    written = main(["--input", str(lr), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                    "--tile", "0", "--no-progress", "--export-safetensors", str(copy)])
    assert np.asarray(Image.open(written[0])).shape == (24, 20, 3)
    assert generator_config_from_metadata(tmp_path / "copy.safetensors") == cfg  # the export keeps it
    hr = _photos(tmp_path / "HR", [(24, 20)])
    report = eval_main(["--model", f"mine={ckpt}", "--dataset", f"s={hr}", "--out", str(tmp_path / "ev"),
                        "--no-lpips", "--no-progress"])
    assert {r["method"] for r in report.summary} == {"Bicubic", "mine"}
    capsys.readouterr()
    # An explicit flag that contradicts the tensors: one line naming what the tensors imply.
    with pytest.raises(SystemExit) as info:
        main(["--input", str(lr), "--checkpoint", str(ckpt), "--nf", "16", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "its tensors imply spsr (nf=8, nb=3, gc=4): pass --arch spsr --nf 8 --nb 3 --gc 4" in err


def test_checkpoint_without_metadata_mismatch_names_the_implied_architecture(tmp_path, capsys):
    from spsr_hpc.inference import implied_architecture, main
    from spsr_hpc.models import CheckpointMismatchError

    for name, kw in [("rrdbnet", {"gc": 4}), ("edsr", {}), ("srresnet", {})]:
        model = build_generator(GeneratorConfig(name=name, nf=8, nb=3, **kw))
        found = implied_architecture(model.state_dict())
        assert found["arch"] == name and found["nf"] == 8 and found["nb"] == 3
    torch.save(build_generator(TINY).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "tiny.pth"), "--export-safetensors", str(tmp_path / "x.st")])
    err = capsys.readouterr().err
    assert "does not fit the spsr (nf=64, nb=23" in err and "--arch spsr --nf 8 --nb 2 --gc 4" in err
    from spsr_hpc.inference import build_and_load

    with pytest.raises(CheckpointMismatchError, match="its tensors imply spsr"):
        build_and_load(tmp_path / "tiny.pth", GeneratorConfig(name="spsr", nf=8, nb=3, gc=4, taps=[0, 1]))


# --- 7. help texts and progress output -----------------------------------------------------------


def _launch_module(name: str):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("parser_of", ["make_shards", "bench_loaders", "infer", "evaluate"])
def test_every_option_has_help(parser_of):
    import argparse

    from spsr_hpc.bench.loaders import build_parser as bench_parser
    from spsr_hpc.evaluate import build_parser as eval_parser
    from spsr_hpc.inference import build_parser as infer_parser

    parser = {"make_shards": lambda: _launch_module("make_shards").build_parser(),
              "bench_loaders": bench_parser, "infer": infer_parser, "evaluate": eval_parser}[parser_of]()
    missing = [a.option_strings for a in parser._actions
               if a.option_strings and not a.help and a.help != argparse.SUPPRESS]
    assert missing == []


def test_make_shards_epilog_keeps_its_lines():
    text = _launch_module("make_shards").build_parser().format_help()
    assert "X4 \\\n        --out data/div2k_shards" in text


def test_skip_warnings_go_above_the_progress_bar(tmp_path, capsys):
    import warnings

    from spsr_hpc.data import write_shards

    hr = _photos(tmp_path / "HR", [(16, 16)])
    (hr / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warnings.warn would fail the test
        m = write_shards(hr, tmp_path / "out", scale=4, workers=0, progress=True)
    assert m["skipped_count"] == 1
    err = capsys.readouterr().err
    assert "warning: make_shards: skipping corrupt.png" in err
    line = next(seg for seg in err.splitlines() if "skipping" in seg)
    assert line.startswith("warning:")  # on a line of its own, not glued to the bar


# --- 8. layering ---------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


def test_nothing_below_bench_imports_it():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "spsr_hpc").rglob("*.py")
                 if "bench" not in p.relative_to(REPO / "spsr_hpc").parts
                 and any(m == "spsr_hpc.bench" or m.startswith("spsr_hpc.bench.") for m in _imports(p))]
    assert offenders == []
    from spsr_hpc.bench.common import device_name
    from spsr_hpc.device import device_name as neutral

    assert device_name is neutral


def test_loaders_do_not_import_each_other_in_a_circle():
    data = REPO / "spsr_hpc" / "data"
    for name in ("wds_loader", "dali_loader", "loader_state"):
        assert "spsr_hpc.data.loader" not in _imports(data / f"{name}.py"), name
    assert not {"spsr_hpc.data.wds_loader", "spsr_hpc.data.dali_loader"} & _imports(data / "loader_state.py")



def test_infer_user_errors_are_one_line(tmp_path, capsys):
    from spsr_hpc.inference import main

    ckpt = _trainer_style_export(tmp_path / "g.safetensors", TINY)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    for argv in (["--input", str(tmp_path / "in"), "--checkpoint", str(ckpt)],
                 ["--input", str(tmp_path / "missing"), "--checkpoint", str(ckpt)],
                 ["--input", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "none.safetensors")]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
