"""Faults, determinism and safe loading across the code base.

- SIGKILL during `python train.py` loses at most the running epoch: `ckpt_path=last` resumes;
- the metrics' random subsets are bit-reproducible and leave the global RNGs alone;
- no `weights_only=False` and no unrestricted `pickle.load` anywhere in the shipped code.
(Explainer crashes and seeds: tests/explainers/test_faults_and_determinism.py; the audit's kill
tests, for cells and attribution shards: tests/tasks/test_audit.py.)
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from xaudit.explainers import create
from xaudit.metrics import FaithfulnessCorrelation
from xaudit.models.backbones import build_backbone
from xaudit.models.classifier import load_checkpoint
from xaudit.tasks.train import train

from xaudit_testing import FAST, ROOT, compose_config, kill_when

# -- SIGKILL during training --------------------------------------------------------------------
TRAIN = [*[o for o in FAST if not o.startswith("callbacks.")], "callbacks=model_checkpoint", "test=false"]


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    epochs = 4
    log_dir = tmp_path / "logs"
    kill_when("train.py", [*TRAIN, f"trainer.max_epochs={epochs}", f"paths.log_dir={log_dir}"], tmp_path,
              lambda: bool(list(log_dir.glob("train/**/checkpoints/last.ckpt"))), "no checkpoint", poll=0.05)
    killed = load_checkpoint(next(log_dir.glob("train/**/checkpoints/last.ckpt")))
    assert killed["epoch"] < epochs - 1, "killed before the last epoch"

    cfg = compose_config([*TRAIN, f"trainer.max_epochs={epochs}", "ckpt_path=last"], tmp_path)
    result = train(cfg)
    resumed = load_checkpoint(result["last_ckpt_path"])
    steps_per_epoch = killed["global_step"] // (killed["epoch"] + 1)
    assert resumed["epoch"] == epochs - 1 and resumed["global_step"] == epochs * steps_per_epoch
    # it continued from the killed run's weights and optimiser state, not from scratch: the resumed
    # run logged only the epochs after the checkpoint
    metrics = next(Path(result["run_dir"]).glob("**/metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    logged = {int(float(row.split(",")[header.index("epoch")])) for row in metrics[1:]
              if row.split(",")[header.index("epoch")]}
    assert min(logged) == killed["epoch"] + 1 and max(logged) == epochs - 1


# -- determinism --------------------------------------------------------------------------------
def _global_rng() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_metric_subsets_are_bit_reproducible_and_leave_global_rngs_alone() -> None:
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 4, width=8).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    attr = create("saliency", model).attribute(x, 1)
    rng = _global_rng()
    values = []
    for seed in (3, 3, 4):
        m = FaithfulnessCorrelation(model, nr_runs=16, subset_size=32, seed=seed)
        m.update(x, attr, torch.ones(4, dtype=torch.long))
        values.append(m.compute())
    after = _global_rng()
    assert torch.equal(rng[0], after[0]) and np.array_equal(rng[1], after[1]) and rng[2] == after[2]
    assert torch.equal(values[0], values[1]) and not torch.equal(values[0], values[2])


# -- safe loading -------------------------------------------------------------------------------
SHIPPED = [ROOT / "train.py", ROOT / "audit.py",
           *(p for d in ("src", "callbacks", "benchmarks") for p in sorted((ROOT / d).rglob("*.py")))]


def _unsafe_calls(path: Path) -> list[str]:
    """Calls that can unpickle arbitrary objects: torch.load without weights_only=True, pickle.load(s)
    (the restricted CIFAR reader subclasses pickle.Unpickler instead), numpy allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        where = f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}"
        if ((name.endswith("torch.load") and kw.get("weights_only") != "True")
                or name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load")
                or kw.get("allow_pickle") == "True" or kw.get("weights_only") == "False"):
            found.append(where)
    return found


def test_no_unsafe_unpickling_in_the_shipped_code() -> None:
    assert len(SHIPPED) > 40
    assert [c for p in SHIPPED for c in _unsafe_calls(p)] == []


def test_the_unsafe_call_finder_finds_them(tmp_path: Path) -> None:
    bad = ROOT / "tests" / "_unsafe_example.py"
    try:
        bad.write_text("import pickle, torch\ntorch.load('a')\ntorch.load('a', weights_only=False)\n"
                       "pickle.load(open('a', 'rb'))\nimport numpy as np\nnp.load('a', allow_pickle=True)\n"
                       "torch.load('a', weights_only=True)\n")
        assert len(_unsafe_calls(bad)) == 4
    finally:
        bad.unlink()
