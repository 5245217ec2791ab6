"""Test helpers: compose the real Hydra configs (shrunk for speed), write tiny on-disk datasets.

A module of its own (not conftest) so test files can import it unambiguously: there are
several conftest.py files in the tree.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Small enough for a 2-core CPU, big enough that the small CNN learns the shapes.
FAST = [
    "data.n_train=640",
    "data.n_val=128",
    "data.n_test=256",
    "data.batch_size=64",
    "++model.backbone.width=8",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.explanation_monitor.num_samples=8",
    "callbacks.explanation_monitor.steps=8",
]


#: the model the audit tests audit: fast data, checkpointing only, enough epochs to learn the shapes (>0.9)
AUDITED_TRAIN = [*[o for o in FAST if not o.startswith("callbacks.")], "callbacks=model_checkpoint",
                 "data.n_train=1200", "data.n_test=300", "++model.backbone.width=16", "trainer.max_epochs=4"]
#: audit.py overrides for quiet test runs
QUIET = ["trainer.enable_progress_bar=false", "logger=csv"]


def compose_config(overrides: Sequence[str], out: Path, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` like ``python train.py`` would, writing under ``out``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.log_dir = str(out / "logs")
        cfg.paths.data_dir = str(out / "data")
        cfg.hydra.runtime.output_dir = str(out / "run")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    (out / "run").mkdir(parents=True, exist_ok=True)
    return cfg


def write_cifar10(root: Path, n_train_per_batch: int = 12, n_test: int = 20, seed: int = 0) -> Path:
    """Write tiny CIFAR-10 python batches in the real on-disk format (what the tarball holds)."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = [int(v) for v in rng.integers(0, 10, n)]
        return {"batch_label": "fake", "labels": labels,
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}

    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train_per_batch), f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_train_per_batch, "num_vis": 3072}, f)
    return root


def write_image_folder(root: Path, classes: Sequence[str] = ("cat", "dog", "fox"), per_class: int = 4,
                       size: int = 20, splits: Sequence[str] = ("train", "val"), seed: int = 0) -> Path:
    """Write a PNG class-folder tree ``root/<split>/<class>/<i>.png``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def kill_when(script: str, args: Sequence[str], cwd: Path, ready: Callable[[], bool], what: str,
              timeout: float = 300.0, poll: float = 0.02) -> None:
    """Run ``python <script> <args>`` (offline W&B) and SIGKILL it as soon as ``ready()`` holds.

    Fails with the process' stderr if it exits first, or with ``what`` if ``ready`` never holds."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else f"{script} exited"
            assert time.monotonic() < deadline, f"{what} in {timeout:.0f} s"
            time.sleep(poll)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# -- attribution stores: what a killed write left, and that the rerun finished it without recompute --
def store_logs(attr_root: Path) -> dict[Path, str]:
    """Every ``done`` log of every method and split under ``attr_root``, with its text."""
    return {p: p.read_text() for p in attr_root.glob("*/*/done_*.txt")}


def logged_batches(attr_root: Path) -> int:
    """How many finished batches the ``done`` logs under ``attr_root`` record."""
    return sum(len(text.splitlines()) for text in store_logs(attr_root).values())


def assert_store_resumed(attr_root: Path, reference_root: Path, logged: dict[Path, str]) -> None:
    """After the rerun of a killed store write: the batches logged before the kill stay logged, every
    sample is logged exactly once (nothing was recomputed), and the shard files equal the
    uninterrupted run's byte for byte."""
    import json

    import torch

    for log, before in logged.items():
        complete = before.rsplit("\n", 1)[0]  # the last line may have been cut by the kill
        assert log.read_text().startswith(complete), f"{log}: finished batches stay logged"
    for layout in attr_root.glob("*/*/layout.json"):
        n = json.loads(layout.read_text())["n"]
        count = torch.zeros(n, dtype=torch.long)
        for log in layout.parent.glob("done_*.txt"):
            for line in log.read_text().splitlines():
                a, b, c = (int(v) for v in line.partition("|")[0].split())
                count[a:b:c] += 1
        assert count.tolist() == [1] * n, f"{layout.parent}: a sample was written twice or never"
    files = sorted(p.relative_to(attr_root) for p in attr_root.glob("*/*/maps_*"))
    assert files and files == sorted(p.relative_to(reference_root) for p in reference_root.glob("*/*/maps_*"))
    for rel in files:
        assert (attr_root / rel).read_bytes() == (reference_root / rel).read_bytes(), rel
