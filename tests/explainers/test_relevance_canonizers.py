"""Canonizers: which BatchNorms get merged, that the merged model computes the same function, and
that the model is bit-identical afterwards — also when the explanation fails half-way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import xaudit.explainers.pattern
import xaudit.explainers.relevance  # noqa: F401  (registers lrp, deep_taylor, deeplift, deepshap)
from xaudit.explainers import ExplainerInputError, create
from xaudit.explainers.canonizers import affine_of, find_batchnorm_merges, forward_overrides
from xaudit.explainers.relevance import COMPOSITES

from explainer_helpers import images, make_model


def merges_of(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    return find_batchnorm_merges(model, lambda: model(x))


def test_batchnorm_merges_are_observed_not_guessed() -> None:
    x = images(1)
    small = merges_of(make_model("small_cnn"), x)
    assert small == {f"features.block{i}.0": f"features.block{i}.1" for i in range(1, 6)}
    resnet = merges_of(make_model("resnet18"), x)
    assert resnet["conv1"] == "bn1" and resnet["layer2.0.conv2"] == "layer2.0.bn2"
    assert resnet["layer2.0.downsample.0"] == "layer2.0.downsample.1" and len(resnet) == 20

    class Tricky(nn.Module):
        """BN after a concatenation, a conv feeding two BNs, a conv whose output is also used
        elsewhere, a train-mode BN and a BN after an in-place ReLU (its input is still the conv's
        output tensor object): none of them can be merged; the last conv→BN can."""

        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3, self.c4, self.c5, self.c6 = (nn.Conv2d(3, 3, 1) for _ in range(6))
            self.bn_cat, self.bn_a, self.bn_b, self.bn_c, self.bn_train, self.bn_relu, self.bn_ok = (
                nn.BatchNorm2d(c) for c in (6, 3, 3, 3, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cat = self.bn_cat(torch.cat([self.c1(x), x], 1))
            y2 = self.c2(x)
            shared = self.bn_a(y2) + self.bn_b(y2)
            y3 = self.c3(x)
            reused = self.bn_c(y3) + y3  # merging would change the second use of y3
            after_relu = self.bn_relu(torch.relu_(self.c5(x)))
            return (cat.sum(1, keepdim=True) + shared + reused + self.bn_train(self.c4(x)) + after_relu
                    + self.bn_ok(self.c6(x)))

    tricky = Tricky().eval()
    tricky.bn_train.train()
    assert merges_of(tricky, x) == {"c6": "bn_ok"}


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "vgg11_bn"])
def test_merged_layers_compute_the_same_function(name: str) -> None:
    model = make_model(name, **({"cifar_stem": True} if name == "vgg11_bn" else {}))
    x = images(2)
    merges = merges_of(model, x)
    overrides: dict[nn.Module, Callable[..., Any]] = {}
    for layer, bn in merges.items():
        a = affine_of(model.get_submodule(layer), model.get_submodule(bn))  # type: ignore[arg-type]
        assert a is not None
        overrides[model.get_submodule(layer)] = lambda t, a=a: a(t)
        overrides[model.get_submodule(bn)] = lambda t: t
    with torch.no_grad():
        expected = model(x)
        with forward_overrides(overrides):
            merged = model(x)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an explanation must leave as it found it, down to the bits and the objects."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, p) for n, p in model.named_parameters()],
        "buffers": [(n, b) for n, b in model.named_buffers()],
        "modules": [(n, m, type(m), sorted(m.__dict__)) for n, m in model.named_modules()],
        "hooks": [len(getattr(m, h)) for m in model.modules() for h in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")],
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert all(n1 == n2 and p1 is p2 for (n1, p1), (n2, p2) in zip(after["params"], before["params"], strict=True))
    assert all(n1 == n2 and b1 is b2 for (n1, b1), (n2, b2) in zip(after["buffers"], before["buffers"], strict=True))
    assert [(n, m, t, d) for n, m, t, d in after["modules"]] == before["modules"]
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert after["hooks"] == before["hooks"] and after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(p.grad is None for p in model.parameters())
    assert torch._C._len_torch_function_stack() == 0


MODELS = [("small_cnn", {}), ("vgg11_bn", {"cifar_stem": True}), ("resnet18", {})]


@pytest.mark.parametrize(("name", "kw"), MODELS)
def test_model_is_bit_identical_after_every_composite_and_after_errors(name: str, kw: dict) -> None:
    model = make_model(name, **kw)
    x = images(2)
    with torch.no_grad():
        logits = model(x)
    before = snapshot(model)
    for composite in COMPOSITES:
        create("lrp", model, composite=composite).attribute(x, torch.tensor([0, 3]))
        assert_unchanged(model, before)
    # an error raised inside the canonized forward/backward (a bad class index, found on the logits)
    with pytest.raises(ExplainerInputError, match="classes"):
        create("lrp", model).attribute(x, 9)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), logits)


class Boom(nn.Module):
    """Raises in the middle of the forward when armed (a model that fails half-way)."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_canonizers_are_reverted_when_the_model_raises_mid_forward() -> None:
    model = make_model("resnet18")
    model.layer2.add_module("boom", Boom())
    model.layer2.boom.armed = False
    x = images(2)
    before = snapshot(model)
    for method, kw in (("lrp", {}), ("deep_taylor", {}), ("pattern_attribution", {"fit_data": x})):
        explainer = create(method, model, **kw)
        before = snapshot(model)
        model.layer2.boom.armed = True
        try:
            with pytest.raises(RuntimeError, match="boom"):
                explainer.attribute(x, 1)
        finally:
            model.layer2.boom.armed = False
        assert_unchanged(model, before)


def test_train_mode_batchnorm_is_not_merged_and_the_model_stays_in_train_mode() -> None:
    model = make_model("small_cnn").train()
    before = snapshot(model)
    x = images(4)
    rel = create("lrp", model).attribute(x, 0)
    assert torch.isfinite(rel).all()
    assert_unchanged(model, before)  # running statistics restored, modes untouched
    with pytest.raises(Exception, match="train mode"):
        create("lrp", model, rules={"BatchNorm": "zplus"}).attribute(x, 0)
    assert_unchanged(model, before)
