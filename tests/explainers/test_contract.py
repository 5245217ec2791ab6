"""The contract every explainer keeps, on every method × (small CNN, resnet18, vgg11_bn).

No side effects (no hook left, param.grad untouched, modes/requires_grad unchanged, same outputs,
global RNG untouched), output shape/device/dtype, batch invariance, and the same result inside a
real ``Trainer.validate`` (inference mode) as outside it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from xaudit.data import ShapesDataModule
from xaudit.explainers import create

from explainer_helpers import (
    BATCH_DEPENDENT,
    GENERIC_METHODS,
    MODELS,
    SPECIFIC_CASES,
    images,
    make_model,
    method_kw,
)

METHODS = GENERIC_METHODS
# every generic method on every model, and the model-specific explainers (senn) on their model
CASES = [(m, n) for m in METHODS for n in MODELS] + SPECIFIC_CASES
# one (method, model) per method for the single-model checks
SMALL = [(m, "small_cnn") for m in METHODS] + list(SPECIFIC_CASES[:1])


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(getattr(m, attr)) for m in model.modules() for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]


def _global_hooks() -> int:
    mod = torch.nn.modules.module
    return sum(len(getattr(mod, n)) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                               "_global_backward_hooks", "_global_backward_pre_hooks"))


def _scale(a: torch.Tensor) -> float:
    return float(a.abs().max()) or 1.0


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_contract(method: str, model_name: str, get_model: Any) -> None:
    model = get_model(model_name)
    x = images(2)
    x_before = x.clone()
    target = torch.tensor([1, 3])
    hooks = _hook_counts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    req = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        logits = model(x)
    rng = torch.get_rng_state()

    explainer = create(method, model, **method_kw(method, model_name))
    attr = explainer.attribute(x, target)

    # output contract
    assert attr.shape == (2, 32, 32) and attr.dtype == x.dtype and attr.device == x.device
    assert torch.isfinite(attr).all() and not attr.requires_grad
    # no side effects
    assert _hook_counts(model) == hooks and _global_hooks() == 0
    assert torch._C._len_torch_function_stack() == 0
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == req
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before) and not x.requires_grad
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was consumed"
    with torch.no_grad():
        assert torch.equal(model(x), logits)
    # deterministic
    torch.testing.assert_close(explainer.attribute(x, target), attr, rtol=0, atol=0)
    # batch invariance (eval mode): row i equals that sample alone. The tolerance allows the last-bit
    # differences of float32 kernels chosen per batch size, relative to the logits for methods that
    # subtract logits (occlusion); any leak between samples is orders of magnitude larger.
    if method in BATCH_DEPENDENT:
        return
    for i in range(2):
        alone = explainer.attribute(x[i:i + 1], target[i:i + 1])
        atol = 1e-5 * max(_scale(attr[i]), _scale(logits[i]))
        torch.testing.assert_close(alone[0], attr[i], rtol=1e-4, atol=atol)


@pytest.mark.parametrize(("method", "model_name"), SMALL)
def test_train_mode_model_is_left_exactly_as_found(method: str, model_name: str) -> None:
    """In train mode a forward would update BatchNorm statistics: they must be restored, and the
    mode must stay train."""
    model = make_model(model_name).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(4)
    create(method, model, **method_kw(method, model_name)).attribute(x, 0)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_float64_input_gives_float64_output() -> None:
    x = images(2).double()
    for method, model_name in SMALL:
        model = make_model(model_name).double()
        attr = create(method, model, **method_kw(method, model_name)).attribute(x, 1)
        assert attr.dtype == torch.float64, method


def test_frozen_model_and_caller_tensor_requiring_grad() -> None:
    """Parameters with requires_grad=False and an input that requires grad both work unchanged."""
    x = images(2).requires_grad_(True)
    for method, model_name in SMALL:
        model = make_model(model_name)
        for p in model.parameters():
            p.requires_grad_(False)
        attr = create(method, model, **method_kw(method, model_name)).attribute(x, 2)
        assert attr.shape == (2, 32, 32), method
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert x.grad is None and x.requires_grad


class _ExplainingModule(pl.LightningModule):
    """A LightningModule whose validation_step explains its batch with every method."""

    def __init__(self, net: nn.Module, model_name: str) -> None:
        super().__init__()
        self.net = net
        self.model_name = model_name
        self.methods = _methods_for(model_name)
        self.results: dict[str, torch.Tensor] = {}
        self.inference_mode_seen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.inference_mode_seen = torch.is_inference_mode_enabled()
        for method in self.methods:
            # the explainer gets the LightningModule itself; target_layer names resolve inside `net`
            explainer = create(method, self, **method_kw(method, self.model_name))
            self.results[method] = explainer.attribute(batch["image"], batch["label"])


def _methods_for(model_name: str) -> list[str]:
    return [m for m, n in SPECIFIC_CASES if n == model_name] or list(METHODS)


@pytest.mark.parametrize("model_name", [*MODELS, "senn"])
def test_runs_inside_trainer_validate(model_name: str, get_model: Any) -> None:
    dm = ShapesDataModule(n_train=8, n_val=2, n_test=2, batch_size=2, image_size=32)
    module = _ExplainingModule(copy.deepcopy(get_model(model_name)), model_name)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert module.inference_mode_seen, "Lightning should run validation under inference mode"
    assert set(module.results) == set(module.methods)
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    for method in module.methods:
        outside = create(method, module, **method_kw(method, model_name)).attribute(batch["image"], batch["label"])
        got = module.results[method]
        assert not got.is_inference()
        torch.testing.assert_close(got, outside, rtol=0, atol=0, msg=lambda m, k=method: f"{k}: {m}")
    assert all(p.grad is None for p in module.parameters())


OTHER_BACKBONES = ("resnet34", "resnet50", "vgg16", "densenet121", "mobilenet_v3_small")
# heads that are not GAP → linear after the default layer: CAM must refuse them clearly
NO_CAM_HEAD = {"vgg16", "densenet121", "mobilenet_v3_small"}


@pytest.mark.parametrize("backbone", OTHER_BACKBONES)
def test_every_other_backbone(backbone: str) -> None:
    """The remaining foundation backbones: every method runs (CAM refuses non-GAP heads), with the
    contract's shape/dtype and no leftover hooks or gradients."""
    from xaudit.explainers import UnsupportedModelError

    model = make_model(backbone, cifar_stem=backbone == "vgg16")
    hooks = _hook_counts(model)
    x = images(2)
    for method in METHODS:
        kw = method_kw(method, backbone)
        if backbone == "vgg16" and method == "score_cam":
            kw["target_layer"] = "features.1"  # 64 channels: one masked forward each
        explainer = create(method, model, **kw)
        if method == "cam" and backbone in NO_CAM_HEAD:
            with pytest.raises(UnsupportedModelError, match="grad_cam"):
                explainer.attribute(x, 1)
            continue
        attr = explainer.attribute(x, torch.tensor([1, 2]))
        assert attr.shape == (2, 32, 32) and attr.dtype == torch.float32 and torch.isfinite(attr).all(), method
    assert _hook_counts(model) == hooks
    assert all(p.grad is None for p in model.parameters())
