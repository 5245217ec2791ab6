"""Every registered metric keeps the metric contract (issue 31), checked over the registry.

A metric registered with :func:`~xaudit.metrics.registry.register_metric` is covered here with no
other edit: it builds through the registry (:func:`~xaudit.metrics.evaluator.build_metrics`, as
``evaluate.metrics`` does), updates from a tiny batch through :func:`~xaudit.metrics.base.update_metric`
with the inputs its ``update_inputs`` name, gives a finite (or NaN: undefined) mean and one value per
sample, and leaves the caller's model exactly as it found it (modes, weights and buffers,
``requires_grad``, ``.grad``, hooks, the global RNGs). :func:`check_metric_contract` is a plain
function so other tests (the toy metric's) call it too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import xaudit.metrics  # noqa: F401  (registers the built-in metrics)
from xaudit.explainers import create
from xaudit.metrics.base import update_metric
from xaudit.metrics.evaluator import build_metrics
from xaudit.metrics.registry import metric_names

BATCH, SIZE = 3, 16
#: options that keep a metric cheap on 16 px inputs (Monte-Carlo draws, steps); default: its own defaults
CHEAP: dict[str, dict[str, Any]] = {
    "avg_sensitivity": {"n": 2},
    "consistency": {"n": 2},
    "continuity": {"nr_steps": 2},
    "deletion_insertion": {"steps": 4},
    "efficient_mprt": {"n_bins": 4},
    "faithfulness_correlation": {"nr_runs": 4, "subset_size": 8},
    "faithfulness_estimate": {"features_in_step": 16},
    "local_lipschitz": {"n": 2},
    "max_sensitivity": {"n": 2},
    "monotonicity": {"features_in_step": 16},
    "monotonicity_correlation": {"features_in_step": 16, "nr_samples": 2},
    "non_sensitivity": {"features_in_step": 16},
    "region_perturbation": {"patch_size": 4, "regions_evaluation": 4},
    "relative_input_stability": {"n": 2},
    "relative_output_stability": {"n": 2},
    "relative_representation_stability": {"n": 2},
    "sanity_check": {"layers": ["fc", "features.block5"]},
    "selectivity": {"patch_size": 4},
    "sensitivity_n": {"features_in_step": 16},
    "smooth_mprt": {"nr_samples": 2},
}


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """``x`` [3,3,16,16], ``attr`` [3,16,16], ``target`` [3] and a square ``mask`` [3,16,16]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.bool)
    mask[:, 4:10, 5:11] = True
    return {"x": torch.randn(BATCH, 3, SIZE, SIZE, generator=g), "attr": torch.rand(BATCH, SIZE, SIZE, generator=g),
            "target": torch.tensor([0, 1, 2]), "mask": mask}


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about the caller's model (and the global RNGs) a metric must leave as it was."""
    return {
        "modes": {n: m.training for n, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()],
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any], name: str) -> None:
    assert after["modes"] == before["modes"], f"{name} changed module modes"
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{name} changed {k}"
    assert after["requires_grad"] == before["requires_grad"], f"{name} changed requires_grad"
    for k, g in before["grads"].items():
        assert (g is None) == (after["grads"][k] is None) and (g is None or torch.equal(g, after["grads"][k])), \
            f"{name} touched {k}.grad"
    assert after["hooks"] == before["hooks"], f"{name} left hooks on the model"
    assert torch.equal(after["torch_rng"], before["torch_rng"]), f"{name} drew from torch's global RNG"
    assert np.array_equal(after["numpy_rng"], before["numpy_rng"]), f"{name} drew from numpy's global RNG"


def check_metric_contract(name: str, model: nn.Module, options: dict[str, Any] | None = None,
                          method: str = "saliency") -> torch.Tensor:
    """Build metric ``name`` from the registry, update it once on :func:`tiny_batch` and check the
    contract; returns its per-sample values."""
    batch = tiny_batch()
    explainer = create(method, model)
    model.train()  # train mode: a metric that forgot eval() would update BatchNorm's running statistics
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # mixed modes restored per module
    model.fc.weight.requires_grad_(False)
    before = snapshot(model)
    metric = build_metrics({name: {"name": name, **(options or {})}}, model, method)[name]
    update_metric(metric, explainer=explainer, **batch)
    value, per = metric.compute(), metric.per_sample()
    assert value.numel() == 1 and not torch.isinf(value), f"{name}: compute() = {value}"
    assert per.shape == (BATCH,), f"{name}: per_sample() has shape {tuple(per.shape)}, not one value per sample"
    assert not torch.isinf(per).any(), f"{name}: per-sample values {per}"
    assert_same(before, snapshot(model), name)
    assert not list(metric.parameters()) and not list(metric.children()), f"{name} registered the model"
    return per


@pytest.mark.parametrize("name", metric_names())
def test_registered_metric_keeps_the_contract(tiny_cnn: nn.Module, name: str) -> None:
    check_metric_contract(name, tiny_cnn, CHEAP.get(name))


def test_the_check_catches_a_metric_that_changes_the_model(tiny_cnn: nn.Module) -> None:
    from xaudit.metrics.base import ModelHolder, XAuditMetric
    from xaudit.metrics.registry import _METRICS, register_metric

    @register_metric("test_careless")
    class Careless(ModelHolder, XAuditMetric):
        def __init__(self, model: nn.Module, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._hold(model)

        def update(self, x: torch.Tensor, attr: torch.Tensor, target: torch.Tensor) -> None:
            self.model.eval()  # forgets to restore the caller's modes
            self._add_values(torch.rand(x.shape[0]))  # and draws from the global RNG

    try:
        with pytest.raises(AssertionError, match="test_careless changed module modes"):
            check_metric_contract("test_careless", tiny_cnn)
    finally:
        _METRICS.pop("test_careless", None)
