"""Metrics that run the model leave it exactly as they found it, in and out of inference mode."""

from __future__ import annotations

import pytest
import torch

from xaudit.metrics import Completeness, DeletionInsertion, FaithfulnessCorrelation, SanityCheck

MODEL_METRICS = {
    "deletion": lambda net: DeletionInsertion(net, steps=4, substrate="blur"),
    "faithfulness": lambda net: FaithfulnessCorrelation(net, nr_runs=4, subset_size=8),
    "completeness": lambda net: Completeness(net),
    "sanity": lambda net: SanityCheck(net, explainer="grad_cam", layers=["fc", "features.block5"]),
}


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("name", list(MODEL_METRICS))
def test_caller_model_is_left_exactly_as_it_was(tiny_cnn, name, inference):
    model = tiny_cnn.train()  # train mode: a naive metric would update BatchNorm's running stats
    model.features.block1[1].eval()  # mixed modes must be restored module by module
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    needs_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.random.get_rng_state()
    g = torch.Generator().manual_seed(0)
    x, attr, y = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g), torch.tensor([0, 1, 2])
    metric = MODEL_METRICS[name](model)
    with torch.inference_mode(inference):
        metric.update(x, attr, y)
        value = metric.compute()
    assert torch.isfinite(value)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == needs_grad
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded draws use local generators
    assert not list(metric.parameters()) and not list(metric.children())  # the model is not registered
