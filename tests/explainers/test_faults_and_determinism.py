"""A crash inside any explainer (in the forward or the backward pass) leaves the model exactly as
found — no hook left, canonizers undone, weights, modes and grads unchanged — and seeded randomness
(SmoothGrad, RISE, LIME, SHAP, random maps) is bit-reproducible without touching the global torch /
numpy / python RNGs."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaudit.explainers import create
from xaudit.explainers.registry import get

from explainer_helpers import GENERIC_METHODS, images, make_model, method_kw

METHODS = GENERIC_METHODS  # model-specific explainers (senn) are covered in test_contract
MODEL_FREE = {"random", "sobel"}  # baselines that never call the model


def _global_rng() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


# -- a crash inside an explainer ------------------------------------------------------------------
class Crash(RuntimeError):
    pass


class _BackwardBomb(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise Crash("backward")


class Bomb(nn.Module):
    """Identity that raises in the forward pass (``where="forward"``) or in the backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.where: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "forward":
            raise Crash("forward")
        return _BackwardBomb.apply(x) if self.where == "backward" else x


def _model_with_bomb() -> tuple[nn.Module, Bomb]:
    model = make_model("small_cnn")
    bomb = Bomb()
    model.features.block3.insert(1, bomb)  # between conv and BatchNorm: canonizers merge around it
    model.features.block4.insert(0, nn.Identity())
    return model, bomb


def _hooks(model: nn.Module) -> list[int]:
    return [len(getattr(m, a)) for m in model.modules()
            for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
            "hooks": _hooks(model), "requires_grad": [p.requires_grad for p in model.parameters()],
            "relu_inplace": [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)],
            "forward": [type(m).forward for m in model.modules()]}


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("method", METHODS)
def test_a_crash_inside_an_explainer_leaves_the_model_unchanged(method: str, where: str) -> None:
    model, bomb = _model_with_bomb()
    x = images(2)
    before = _snapshot(model)
    with torch.no_grad():
        logits = model(x)
    explainer = create(method, model, **method_kw(method, "small_cnn"))
    bomb.where = where
    try:
        explainer.attribute(x, torch.tensor([1, 2]))
    except Crash:
        crashed = True
    else:  # methods that never run a backward (perturbations, baselines) cannot crash there
        crashed = False
    # every method but the model-free baselines runs the model forward; methods that propagate by
    # their own rules (pattern) or only forward (perturbations) need not reach the autograd backward
    assert crashed or where == "backward" or method in MODEL_FREE, f"{method} ran no forward pass"
    bomb.where = None
    after = _snapshot(model)
    for key in ("modules", "hooks", "requires_grad", "relu_inplace", "forward"):
        assert after[key] == before[key], f"{method}: {key} changed by a crash in the {where}"
    assert all(torch.equal(v, before["state"][k]) for k, v in after["state"].items()), f"{method}: weights changed"
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), logits)
    # and the explainer still works afterwards
    assert torch.isfinite(explainer.attribute(x, torch.tensor([1, 2]))).all()


# -- determinism --------------------------------------------------------------------------------
# methods whose maps depend on a seed (the pattern methods' seed only subsamples their fitting data)
SEEDED = [m for m in METHODS if "seed" in get(m).__init__.__code__.co_varnames and not m.startswith("pattern")]


@pytest.mark.parametrize("method", SEEDED)
def test_seeded_explainers_are_bit_reproducible_and_leave_global_rngs_alone(method: str) -> None:
    assert {"smoothgrad", "rise", "lime", "kernel_shap", "random"} <= set(SEEDED)
    model = make_model("small_cnn")
    x = images(3)
    kw = method_kw(method, "small_cnn")
    rng = _global_rng()
    a = create(method, model, **kw, seed=5).attribute(x, 1)
    b = create(method, model, **kw, seed=5).attribute(x, 1)
    after = _global_rng()
    assert torch.equal(rng[0], after[0]) and np.array_equal(rng[1], after[1]) and rng[2] == after[2]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, create(method, model, **kw, seed=6).attribute(x, 1)), "the seed is used"


