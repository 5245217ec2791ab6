"""The resume fingerprint holds the effective recipe; a changed one is refused or accepted explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl

from xaudit.roar.results import ConfigMismatchError, ResultsLog
from xaudit.roar.runner import Recipe
from xaudit.tasks.audit import effective_recipe


def _trainer(**kw: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      **kw)


def test_effective_recipe_counts_devices_nodes_and_accumulation() -> None:
    recipe = Recipe(epochs=2, batch_size=32, eval_batch_size=64, channels_last=True)
    one = effective_recipe({"_target_": "m"}, recipe, _trainer(devices=1))
    assert (one["global_batch"], one["world_size"], one["precision"]) == (32, 1, "32-true")
    many = effective_recipe({"_target_": "m"}, recipe, _trainer(devices=2, strategy="ddp_spawn",
                                                                 accumulate_grad_batches=3, precision="bf16-mixed"))
    assert (many["global_batch"], many["world_size"], many["accumulate_grad_batches"]) == (32 * 2 * 3, 2, 3)
    assert many["precision"] == "bf16-mixed" and many["channels_last"] is True


def test_changed_recipe_names_the_keys_and_can_be_accepted(tmp_path: Path) -> None:
    log = ResultsLog(tmp_path)
    old = {"checkpoint": "abc", "recipe": {"global_batch": 128, "precision": "32-true", "epochs": 4}}
    log.check_config(old)
    new = {"checkpoint": "abc", "recipe": {"global_batch": 512, "precision": "bf16-mixed", "epochs": 4}}
    with pytest.raises(ConfigMismatchError, match=r"recipe.global_batch: 128 → 512.*recipe.precision.*"
                                                  r"out_dir=.*accept_changes=\[recipe.global_batch,recipe.precision\]"):
        log.check_config(new)
    with pytest.raises(ConfigMismatchError, match=r"recipe.precision: '32-true' → 'bf16-mixed'"):
        log.check_config(new, accept=["recipe.global_batch"])  # only part of the change accepted
    log.check_config(new, accept=["recipe"])
    stored = json.loads((tmp_path / "audit_config.json").read_text())
    assert stored["recipe"]["global_batch"] == 512, "the accepted setup becomes the directory's"
    assert any("global_batch" in a for a in stored["accepted"]) and any("precision" in a for a in stored["accepted"])
    log.check_config(new)  # a rerun of the new setup needs nothing more
    with pytest.raises(ConfigMismatchError, match="checkpoint: 'abc' → 'xyz'"):
        log.check_config({**new, "checkpoint": "xyz"}, accept=["recipe"])
