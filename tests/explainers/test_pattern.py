"""PatternNet / PatternAttribution (Kindermans et al., 2018): the signal direction of a linear toy
problem with a known distractor is recovered, the estimators equal their textbook formulas, and
patterns are stored, reloaded and required."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xaudit.explainers.pattern  # noqa: F401  (registers pattern_net, pattern_attribution)
from xaudit.data import ShapesDataModule
from xaudit.explainers import ExplainerInputError, create
from xaudit.explainers.pattern import PatternsNotFittedError, _patches
from xaudit.utils.errors import ConfigError

from explainer_helpers import images, make_model

A_SIGNAL = torch.tensor([1.0, 0.0])  # a_s: the direction the signal s lives in
A_DISTRACTOR = torch.tensor([1.0, 1.0])  # a_d: the distractor's direction
W = torch.tensor([1.0, -1.0])  # the filter that extracts s: wᵀa_s = 1, wᵀa_d = 0


def toy_data(n: int, seed: int = 0, dependent_distractor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x = a_s·s + a_d·d as images [n, 2, 1, 1], and s. With ``dependent_distractor`` the distractor
    also carries ``min(s, 0)``: independent of s where s > 0, correlated where s ≤ 0."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g)
    d = torch.randn(n, generator=g)
    if dependent_distractor:
        d = d + 2 * s.clamp(max=0)
    x = s[:, None] * A_SIGNAL + d[:, None] * A_DISTRACTOR
    return x.view(n, 2, 1, 1), s


def linear_toy() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([W, torch.tensor([0.3, 0.2])]))
    return model


def test_pattern_net_recovers_the_signal_direction_not_the_filter() -> None:
    model = linear_toy()
    x_fit, _ = toy_data(20000)
    e = create("pattern_net", model, fit_data=x_fit)
    assert e.estimators["1"] == "linear"  # the logit layer
    torch.testing.assert_close(e.patterns["1"][0], A_SIGNAL, atol=0.03, rtol=0)
    x, s = toy_data(5, seed=1)
    signal = e.attribute(x, 0, reduce=None)[:, :, 0, 0]
    torch.testing.assert_close(signal, s[:, None] * e.patterns["1"][0], rtol=1e-5, atol=1e-6)  # a·y, y = s
    torch.testing.assert_close(signal, s[:, None] * A_SIGNAL, atol=0.1 * float(s.abs().max()), rtol=0)
    # the gradient shows the filter w = (1, −1), which points half into the distractor
    gradient = create("saliency", model, abs=False).attribute(x, 0, reduce=None)[:, :, 0, 0]
    torch.testing.assert_close(gradient, W.expand(5, 2), rtol=0, atol=0)


def test_pattern_attribution_is_w_times_a_times_y_and_sums_to_the_logit() -> None:
    model = linear_toy()
    x_fit, _ = toy_data(20000)
    e = create("pattern_attribution", model, fit_data=x_fit)
    x, s = toy_data(4, seed=2)
    rel = e.attribute(x, 0, reduce=None)[:, :, 0, 0]
    torch.testing.assert_close(rel, s[:, None] * W * e.patterns["1"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rel.sum(1), s, rtol=1e-5, atol=1e-6)  # wᵀa = 1


def relu_toy() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(W[None])
        model[3].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return model


def test_two_component_estimator_for_relu_layers() -> None:
    # the distractor depends on s only where the ReLU is off: the y > 0 estimator ignores that half
    x_fit, _ = toy_data(40000, dependent_distractor=True)
    auto = create("pattern_net", relu_toy(), fit_data=x_fit)
    assert auto.estimators == {"1": "relu", "3": "linear"}
    torch.testing.assert_close(auto.patterns["1"][0], A_SIGNAL, atol=0.03, rtol=0)
    linear = create("pattern_net", relu_toy(), fit_data=x_fit, estimator="linear")
    assert float((linear.patterns["1"][0] - A_SIGNAL).abs().max()) > 0.2  # biased by the dependent half
    x, s = toy_data(6, seed=3)
    signal = auto.attribute(x, 0, reduce=None)[:, :, 0, 0]
    expected = s.clamp(min=0)[:, None] * auto.patterns["1"][0] * float(auto.patterns["3"][0, 0])
    torch.testing.assert_close(signal, expected, rtol=1e-5, atol=1e-6)


def reference_pattern(xs: torch.Tensor, ys: torch.Tensor, w: torch.Tensor, positive: bool) -> torch.Tensor:
    """Kindermans et al. (2018), eq. for S_a / S_a+-: cov[x, y] / (wᵀcov[x, y]), on y > 0 for a⁺."""
    if positive:
        keep = ys > 0
        xs, ys = xs[keep], ys[keep]
    cov = (xs * ys[:, None]).mean(0) - xs.mean(0) * ys.mean()
    return cov / (cov @ w)


def test_estimators_equal_the_formula_for_grouped_strided_convolutions() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2).double()).eval()
    data = images(8, size=9, channels=4, seed=5).double()
    e = create("pattern_net", model, fit_data=data, shrinkage=0.0)
    assert e.estimators == {"0": "relu", "4": "linear"}
    with torch.no_grad():
        z = conv(data)
    xs, ys = _patches(conv, data, z)
    # independent reference: unfold per group by hand
    cols = F.unfold(data, 3, padding=1, stride=2)  # [B, 4·9, L]
    for o in range(6):
        group = o // 3
        x_o = cols[:, group * 18:(group + 1) * 18].transpose(1, 2).reshape(-1, 18)
        y_o = z[:, o].reshape(-1)
        torch.testing.assert_close(xs[:, group], x_o, rtol=0, atol=0)
        torch.testing.assert_close(ys[:, group, o % 3], y_o, rtol=0, atol=0)
        ref = reference_pattern(x_o, y_o, conv.weight[o].reshape(-1), positive=True)
        torch.testing.assert_close(e.patterns["0"][o].reshape(-1), ref, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        h = model[:4](data)
    ref = reference_pattern(h, model(data)[:, 1], model[4].weight[1], positive=False)
    torch.testing.assert_close(e.patterns["4"][1], ref, rtol=1e-9, atol=1e-12)


def test_shrinkage_pulls_few_sample_patterns_toward_w_over_w_squared() -> None:
    model = linear_toy()
    x_fit, _ = toy_data(3)
    full = create("pattern_net", model, fit_data=x_fit, shrinkage=1.0)
    torch.testing.assert_close(full.patterns["1"][0], W / W.dot(W), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="shrinkage"):
        create("pattern_net", model, shrinkage=2.0)


def test_patterns_save_and_load_with_weights_only(tmp_path: Path) -> None:
    model = make_model("small_cnn")
    x = images(2)
    fitted = create("pattern_attribution", model, fit_data=images(8, seed=4))
    path = fitted.save(tmp_path / "patterns.pt")
    state = torch.load(path, weights_only=True)
    assert set(state["patterns"]) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    reloaded = create("pattern_attribution", model, patterns=path)
    torch.testing.assert_close(reloaded.attribute(x, 1), fitted.attribute(x, 1), rtol=0, atol=0)
    from_state = create("pattern_net", model, patterns=state)
    assert from_state.fitted and from_state.estimators == fitted.estimators
    with pytest.raises(ConfigError, match="shape"):
        create("pattern_net", make_model("small_cnn", width=4), patterns=path)


def test_attribute_before_fit_names_the_fix() -> None:
    e = create("pattern_net", make_model("small_cnn"))
    with pytest.raises(ExplainerInputError, match="classes"):  # bad input is still reported first
        e.attribute(images(2), 9)
    with pytest.raises(PatternsNotFittedError, match=r"pattern_net has no signal patterns yet: call "
                       r"explainer\.fit\(datamodule"):
        e.attribute(images(2), 1)


def test_fit_on_a_datamodule_merges_batchnorm_and_leaves_rng_and_model_alone() -> None:
    model = make_model("small_cnn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dm = ShapesDataModule(n_train=32, n_val=2, n_test=2, batch_size=8, image_size=32)
    rng = torch.get_rng_state()
    e = create("pattern_attribution", model).fit(dm, max_batches=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert e.estimators["features.block1.0"] == "relu" and e.estimators["fc"] == "linear"  # BN merged: conv→ReLU
    again = create("pattern_attribution", model).fit(dm, max_batches=2)
    assert all(torch.equal(again.patterns[k], v) for k, v in e.patterns.items())
    attr = e.attribute(images(2), torch.tensor([0, 3]))
    assert attr.shape == (2, 32, 32) and torch.isfinite(attr).all()
