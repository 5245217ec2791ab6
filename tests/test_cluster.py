"""Cluster runs: a submitit_local multirun of train.py, and the Slurm launcher tied to the trainer."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from xaudit.tasks.train import requeued_checkpoint
from xaudit.utils.launcher import pin_slurm_shape

from xaudit_testing import ROOT, compose_config

#: two tiny jobs: they run side by side on a 2-core machine
TINY = ["data.n_train=256", "data.n_val=64", "data.n_test=64", "data.batch_size=64", "++model.backbone.width=8",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=csv", "callbacks=model_checkpoint"]


def _run(script: str, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_submitit_local_multirun_runs_both_jobs(tmp_path: Path) -> None:
    _run("train.py", ["-m", "hydra/launcher=submitit_local", "seed=0,1", *TINY, f"paths.log_dir={tmp_path / 'logs'}"],
         cwd=tmp_path)
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, "both jobs share one sweep directory"
    sweep = sweeps[0]
    results = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 2, "one submitit job per sweep point"
    returns = {}
    for path in results:
        with open(path, "rb") as f:
            status, job = pickle.load(f)
        assert status == "success", job
        returns[tuple(job.overrides[:1])] = job.return_value
    assert set(returns) == {("seed=0",), ("seed=1",)}
    for num in ("0", "1"):
        job_dir = sweep / num
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert OmegaConf.load(job_dir / ".hydra" / "config.yaml").seed == int(num)
        with open(job_dir / "csv" / "metrics.csv") as f:
            test_acc = [float(r["test/acc"]) for r in csv.DictReader(f) if r.get("test/acc")]
        assert len(test_acc) == 1 and 0.0 <= test_acc[0] <= 1.0
        assert returns[(f"seed={num}",)] == pytest.approx(test_acc[0]), "the job returns its test accuracy"


def _launcher_of(script: str, overrides: list[str], cwd: Path) -> dict:
    """``python <script> --cfg all --resolve ...``'s hydra.launcher (``--cfg hydra`` alone prints the
    interpolations unresolved, and Hydra cannot ``--resolve`` the hydra node without the job config)."""
    out = _run(script, ["--cfg", "all", "--resolve", "hydra/launcher=slurm", *overrides], cwd=cwd, timeout=120)
    return yaml.safe_load(out.stdout)["hydra"]["launcher"]


@pytest.mark.parametrize("script", ["train.py", "audit.py"])
def test_slurm_launcher_follows_trainer_devices(script: str, tmp_path: Path) -> None:
    # the entry point pins the shape on the command line, so `--cfg hydra` itself shows the numbers
    raw = yaml.safe_load(_run(script, ["--cfg", "hydra", "hydra/launcher=slurm", "trainer.devices=4"], cwd=tmp_path,
                              timeout=120).stdout)["hydra"]["launcher"]
    assert (raw["tasks_per_node"], raw["gpus_per_node"], raw["nodes"], raw["max_num_timeout"]) == (4, 4, 1, 3)
    launcher = _launcher_of(script, ["trainer.devices=4"], tmp_path)
    assert launcher["tasks_per_node"] == 4 and launcher["gpus_per_node"] == 4 and launcher["nodes"] == 1
    assert launcher["max_num_timeout"] == 3 and launcher["signal_delay_s"] == 120
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    for key in ("partition", "account", "qos", "constraint"):
        assert key in launcher and launcher[key] is None


def test_pinned_shape_keeps_user_keys_and_leaves_sweeps_to_the_interpolations() -> None:
    argv = ["train.py", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
            "hydra.launcher.gpus_per_node=2", "--cfg", "hydra"]
    assert pin_slurm_shape(argv, "train") == [*argv[:6], "hydra.launcher.tasks_per_node=8",
                                              "hydra.launcher.nodes=2", "--cfg", "hydra"]
    for unchanged in (["train.py", "-m", "hydra/launcher=slurm", "trainer.devices=2,4"],   # swept: decided per job
                      ["train.py", "trainer.devices=4"],                                   # not a Slurm launch
                      ["train.py", "-cn", "other", "hydra/launcher=slurm"]):                # another config
        assert pin_slurm_shape(unchanged, "train") == unchanged
    swept_seed = ["train.py", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "seed=0,1,2"]
    assert pin_slurm_shape(swept_seed, "train")[-3:] == [
        "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=1"]


@pytest.mark.parametrize(("overrides", "tasks", "gpus", "nodes"), [
    (["trainer=ddp", "trainer.devices=4"], 4, 4, 1),
    (["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"], 8, 8, 2),
    (["trainer=ddp"], 1, 1, 1),                     # devices=auto: unknown before the job runs
    (["trainer=gpu"], 1, 1, 1),
    (["trainer=ddp", "trainer.devices=[0,2]"], 2, 2, 1),
    (["trainer=cpu"], 1, 0, 1),                     # no GPU requested for a CPU trainer
    (["trainer=ddp_sim"], 1, 0, 1),                 # ddp_spawn starts its own 2 processes in one task
])
def test_slurm_shape_per_trainer(overrides: list[str], tasks: int, gpus: int, nodes: int, tmp_path: Path) -> None:
    cfg = compose_config(["hydra/launcher=slurm", *overrides], tmp_path)
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (tasks, gpus, nodes)


def test_account_qos_and_requeue_reach_the_sbatch_script(tmp_path: Path) -> None:
    """The launcher's fields become #SBATCH lines the way submitit writes them (no Slurm needed)."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

    cfg = compose_config(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", "hydra.launcher.account=proj",
                          "hydra.launcher.qos=high", "hydra.launcher.partition=gpu", "hydra.launcher.constraint=a100"],
                         tmp_path)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["max_num_timeout"] == 3, "submitit requeues a timed-out job up to 3 times"
    names = SlurmExecutor._equivalence_dict()
    params = {names.get(k, k): v for k, v in launcher.items() if v is not None and k not in (
        "_target_", "submitit_folder", "max_num_timeout")}
    params["mem"] = _convert_mem(params["mem"])
    sbatch = _make_sbatch_string(command="python -c pass", folder=str(tmp_path), **params)
    for line in ("#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --partition=gpu",
                 "#SBATCH --constraint=a100", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --nodes=1", "#SBATCH --signal=USR2@120"):
        assert line in sbatch, sbatch


def test_requeued_job_resumes_its_own_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config([], tmp_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_checkpoint(cfg) is None, "a first run starts fresh"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(cfg) == str(last)
    (Path(cfg.paths.output_dir) / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    assert requeued_checkpoint(cfg) is None, "Lightning's own hpc checkpoint is Lightning's to load"
