"""Property-based check of the explainer contract (hypothesis): for random small shapes, batch
sizes and channel counts, every method returns a finite [B,H,W] map of the input's dtype on the
input's device and leaves no hooks, no parameter gradients, no changed weights and the global RNG
untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from xaudit.explainers import create
from xaudit.models.backbones import build_backbone

from explainer_helpers import GENERIC_METHODS, method_kw, randomize_batchnorm

_MODELS: dict[int, nn.Module] = {}


def small_cnn(channels: int) -> nn.Module:
    """One seeded width-8 small CNN per channel count (kept across examples; never modified)."""
    if channels not in _MODELS:
        torch.manual_seed(0)
        _MODELS[channels] = randomize_batchnorm(build_backbone("small_cnn", 4, in_chans=channels, width=8)).eval()
    return _MODELS[channels]


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, a)) for m in model.modules()
               for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(12, 24), st.integers(12, 24),
                   st.integers(0, 2**16))


@pytest.mark.parametrize("method", GENERIC_METHODS)
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes)
def test_contract_holds_for_random_shapes(method: str, shape: tuple[int, int, int, int, int]) -> None:
    b, c, h, w, seed = shape
    model = small_cnn(c)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    target = torch.randint(0, 4, (b,), generator=g)
    kw = method_kw(method, "small_cnn")
    if "fit_data" in kw:  # pattern methods: fit on data of this example's shape
        kw = {**kw, "fit_data": torch.randn(8, c, h, w, generator=g)}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    rng = torch.random.get_rng_state()
    attr = create(method, model, **kw).attribute(x, target)
    assert attr.shape == (b, h, w) and attr.dtype == x.dtype and attr.device == x.device
    assert torch.isfinite(attr).all()
    assert hook_count(model) == hooks, "hooks left on the model"
    assert all(p.grad is None for p in model.parameters()), "parameter gradients left"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), "weights changed"
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG was consumed"
