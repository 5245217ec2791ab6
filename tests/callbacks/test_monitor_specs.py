"""The monitor's ``metrics``: evaluate-style specs or the list of names, mapped to specs (no training)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from xaudit.callbacks import ExplanationMonitor
from xaudit.utils.errors import ConfigError


def test_names_map_to_specs_with_the_monitors_defaults() -> None:
    monitor = ExplanationMonitor(metrics=["deletion", "pointing_game", "sparseness"], steps=8, substrate="blur",
                                 robustness={"max_sensitivity": {"radius": 0.1}}, seed=3)
    assert monitor.metric_specs == {
        "deletion": {"name": "deletion_insertion", "mode": "deletion", "steps": 8, "substrate": "blur"},
        "pointing_game": {"name": "pointing_game"},
        "sparseness": {"name": "sparseness"},  # any registered metric, with its defaults
        "max_sensitivity": {"name": "max_sensitivity", "n": 4, "seed": 3, "radius": 0.1},  # options ask for it
    }
    assert ExplanationMonitor().metric_names == ["deletion", "insertion", "mass_in_mask", "pointing_game"]


def test_specs_are_taken_as_evaluate_takes_them() -> None:
    specs = {"ins": {"name": "deletion_insertion", "mode": "insertion", "steps": 4}, "mass": {"name": "relevance_mass"}}
    monitor = ExplanationMonitor(metrics=OmegaConf.create(specs))  # as Hydra passes it
    assert monitor.metric_specs == specs and monitor.metric_names == ["ins", "mass"]


@pytest.mark.parametrize(("metrics", "match"), [
    ({"d": {"name": "delition_insertion"}}, r"Unknown metric 'delition_insertion'.*deletion_insertion"),
    ({"d": {"name": "deletion_insertion", "stepz": 4}}, r"stepz.*steps"),
    ({"d": {"name": "deletion_insertion", "steps": 0}}, r"steps=0 must be an integer ≥1"),
    ({"d": {"mode": "deletion"}}, r"callbacks\.explanation_monitor\.metrics\.d must be a mapping with a 'name' key"),
    (["delition"], r"Unknown monitor metric 'delition'.*deletion"),
])
def test_bad_metric_specs_fail_at_construction(metrics: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ExplanationMonitor(metrics=metrics)
