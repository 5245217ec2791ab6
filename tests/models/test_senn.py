"""SENN: the self-explaining backbone, its robustness regulariser and its built-in explainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from xaudit.explainers import UnsupportedModelError, create
from xaudit.models import build_backbone, load_classifier
from xaudit.models.senn import SENN
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError

from xaudit_testing import FAST, compose_config


def _senn(width: int = 8, robustness: float = 0.01, seed: int = 0) -> SENN:
    torch.manual_seed(seed)
    net = build_backbone("senn", 4, image_size=32, width=width, num_concepts=5, robustness=robustness)
    assert isinstance(net, SENN) and net.default_target_layer == "concepts"
    return net.eval()


def _x(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_logits_are_the_sum_of_relevance_times_concept() -> None:
    net = _senn()
    x = _x()
    logits, theta, maps = net.parts(x)
    assert theta.shape == (3, 5, 4) and maps.shape == (3, 5, 8, 8) and bool((maps >= 0).all())
    expect = (theta * maps.mean((2, 3))[:, :, None]).sum(1)
    torch.testing.assert_close(logits, expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net(x), logits, rtol=0, atol=0)
    torch.testing.assert_close(net.concept_activations(x), maps.mean((2, 3)), rtol=0, atol=0)


def test_explainer_is_the_concept_relevance_map_and_sums_to_the_logit() -> None:
    net = _senn()
    x = _x()
    target = torch.tensor([0, 3, 2])
    attr = create("senn", net).attribute(x, target)
    logits, theta, maps = net.parts(x)
    # hand computation at feature resolution, spread evenly over each 4x4 cell
    cell = torch.stack([(theta[b, :, target[b], None, None] * maps[b]).sum(0) for b in range(3)]) / 64
    expect = cell.repeat_interleave(4, 1).repeat_interleave(4, 2) / 16
    torch.testing.assert_close(attr, expect.detach(), rtol=1e-5, atol=1e-7)
    # completeness: the map sums to the target logit (float32 summation order: rtol 1e-5)
    torch.testing.assert_close(attr.sum((1, 2)), logits[torch.arange(3), target].detach(), rtol=1e-5, atol=1e-6)
    # "predicted" explains the argmax class
    torch.testing.assert_close(create("senn", net).attribute(x), create("senn", net).attribute(x, logits.argmax(1)))


def test_robustness_penalty_equals_the_explicit_jacobian_difference() -> None:
    """‖∇_x f_c − θ_cᵀ J_x h‖ built from full Jacobians (the paper's definition) equals the one-VJP
    form the model trains with (product rule), to float64 round-off."""
    net = _senn().double()
    x = _x(2).double()
    y = torch.tensor([1, 2])
    _, penalty = net.robustness_penalty(x, y)
    norms = []
    for b in range(2):
        xb = x[b:b + 1]
        grad_f = torch.autograd.functional.jacobian(lambda z, c=int(y[b]): net(z)[0, c], xb).flatten()
        jac_h = torch.autograd.functional.jacobian(lambda z: net.concept_activations(z)[0], xb).flatten(1)  # [K, D]
        theta_c = net.parts(xb)[1][0, :, y[b]].detach()
        norms.append((grad_f - theta_c @ jac_h).norm())
    torch.testing.assert_close(penalty, torch.stack(norms).mean(), rtol=1e-9, atol=1e-12)
    assert float(penalty.detach()) > 0


def test_penalty_is_differentiable_and_zero_weight_costs_nothing() -> None:
    net = _senn().train()
    x, y = _x(4), torch.tensor([0, 1, 2, 3])
    logits, extra = net.training_forward(x, y)
    torch.testing.assert_close(logits, net(x))
    extra.backward()
    # the penalty trains θ's weights (double back-propagation); θ's output bias does not depend on x
    assert float(net.relevance[-1].weight.grad.abs().sum()) > 0 and net.relevance[-1].bias.grad is None
    free = _senn(robustness=0.0).train()
    _, extra0 = free.training_forward(x, y)
    assert float(extra0) == 0.0 and not extra0.requires_grad


def test_each_samples_penalty_depends_on_that_sample_alone() -> None:
    """GroupNorm, not BatchNorm: in train mode a sample's penalty and logits ignore the batch."""
    net = _senn().train()
    x, y = _x(4), torch.tensor([0, 1, 2, 3])
    alone = net.robustness_penalty(x[:1], y[:1])[1]
    pair = net.robustness_penalty(torch.cat([x[:1], x[:1]]), y[[0, 0]])[1]
    torch.testing.assert_close(alone, pair, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_concepts": 0}, r"num_concepts ≥1"),
    ({"robustness": -0.1}, r"robustness=-0.1 must be a number ≥ 0"),
    ({"num_concept": 3}, r"Unknown option for backbone 'senn': 'num_concept'.*num_concepts"),
])
def test_bad_senn_options(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_backbone("senn", 4, **kw)


def test_senn_options_on_another_backbone_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\['num_concepts'\] are not options of resnet18"):
        build_backbone("resnet18", 4, num_concepts=3)


def test_explainer_refuses_models_without_a_senn() -> None:
    with pytest.raises(UnsupportedModelError, match=r"holds no xaudit.models.senn.SENN.*model=senn"):
        create("senn", build_backbone("small_cnn", 4, width=8))

    class Rescaled(nn.Module):  # changes the logits around the SENN: its relevances would not explain them
        def __init__(self, net: SENN) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * 2.0

    with pytest.raises(UnsupportedModelError, match="logits are not those of the SENN inside it"):
        create("senn", Rescaled(_senn())).attribute(_x(), 0)


def test_train_py_model_senn_trains_reloads_and_explains(tmp_path: Path) -> None:
    """``model=senn`` through the real entry point: the regulariser is in the loss and logged, the
    checkpoint reloads as a SENN, and every explainer — its own and post-hoc ones — runs on it."""
    cfg = compose_config([*[o for o in FAST if "backbone.width" not in o], "model=senn", "++model.backbone.width=16",
                          "data.n_train=1600", "data.batch_size=32", "trainer.max_epochs=3",
                          "callbacks.explanation_monitor.explainers=[senn,grad_cam]"],
                         tmp_path)
    result = train(cfg)
    assert result["test/acc"] > 0.5, "3 short epochs: well above the 0.25 of chance"
    rows = (Path(result["run_dir"]) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    extra = [float(r.split(",")[header.index("train/extra_loss")]) for r in rows[1:]
             if r.split(",")[header.index("train/extra_loss")]]
    assert len(extra) == 3 and all(v > 0 for v in extra)
    monitored = [r for r in rows[1:] if r.split(",")[header.index("explain/senn/insertion")]]
    assert len(monitored) == 3, "the monitor explains with senn every epoch"
    model = load_classifier(result["last_ckpt_path"]).eval()
    assert isinstance(model.net, SENN) and model.net.num_concepts == 8
    x = _x(2)
    attr = create("senn", model).attribute(x, 1)  # the LightningModule itself
    torch.testing.assert_close(attr.sum((1, 2)), model(x)[:, 1].detach(), rtol=1e-5, atol=1e-6)
    for method in ("grad_cam", "saliency", "integrated_gradients"):
        assert torch.isfinite(create(method, model).attribute(x, 1)).all(), method
