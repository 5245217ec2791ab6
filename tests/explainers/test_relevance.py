"""LRP and deep Taylor: conservation, composites and user rules, and the errors that name the fix.

Conservation (Bach et al., 2015): relevance starts as the target logit y, and a rule conserves it
through a layer when the layer has no bias that absorbs some. What holds exactly, and is tested:

- ε → 0 (ε = 1e-9): Σ R = y in any bias-free network, for any target.
- z⁺ (bias-free): Σ R = y whenever the target neuron has a positive contribution; every hidden
  neuron that carries relevance is an active ReLU, so it always has one. If the target has none,
  its relevance is lost (Σ R = 0), tested too.
- flat and z^B at the input, and so ``epsilon_plus_flat`` and ``deep_taylor``, conserve in the same
  networks. α2β1 conserves only where a neuron has both positive and negative contributions.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import xaudit.explainers.relevance  # noqa: F401  (registers lrp, deep_taylor, deeplift, deepshap)
from xaudit.explainers import ExplainerInputError, UnsupportedModelError, create
from xaudit.explainers.relevance import AlphaBeta, Epsilon, ZPlus
from xaudit.utils.errors import ConfigError

from explainer_helpers import images, make_model


def relu_net(bias: bool = False, seed: int = 0) -> nn.Module:
    """A small ReLU CNN with max- and average pooling, a hidden dense layer and in-place ReLUs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 8, bias=bias), nn.ReLU(), nn.Linear(8, 4, bias=bias)).eval()


def logit(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, target[:, None])[:, 0]


def relative_conservation_error(model: nn.Module, x: torch.Tensor, target: torch.Tensor, **kw: Any) -> float:
    rel = create("lrp", model, **kw).attribute(x, target, reduce=None)
    y = logit(model, x, target)
    return float(((rel.sum((1, 2, 3)) - y).abs() / y.abs()).max())


X16 = images(6, size=16, seed=2)
ALL_TARGETS = torch.tensor([0, 1, 2, 3, 0, 1])


def test_epsilon_to_zero_conserves_for_every_target() -> None:
    err = relative_conservation_error(relu_net(), X16, ALL_TARGETS, composite="epsilon", epsilon=1e-9,
                                      stabilizer=1e-9)
    assert err < 1e-4


def test_zplus_conserves_when_the_target_has_a_positive_contribution() -> None:
    err = relative_conservation_error(relu_net(), X16, ALL_TARGETS, composite={"Convolution": "zplus",
                                      "Linear": "zplus"}, stabilizer=1e-9)
    assert err < 1e-4
    # …and loses the relevance of a target neuron with no positive contribution at all
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 2.0, 0.5, 1.0], [-1.0, -2.0, -0.5, -1.0]]))
    x = torch.rand(3, 1, 2, 2) + 0.1  # positive inputs: class 1 has only negative contributions
    rel = create("lrp", net, composite={"Linear": "zplus"}).attribute(x, 1, reduce=None)
    assert torch.equal(rel, torch.zeros_like(rel))
    assert bool((logit(net, x, torch.ones(3, dtype=torch.long)) < 0).all())


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "deep_taylor", "epsilon_gamma_box"])
def test_input_rules_conserve_too(composite: str) -> None:
    # flat / z^B at the input; γ in between conserves where outputs are positive (all ReLU layers)
    err = relative_conservation_error(relu_net(), X16, ALL_TARGETS, composite=composite, epsilon=1e-9,
                                      stabilizer=1e-9)
    assert err < 1e-4


def test_alpha2_beta1_loses_relevance_where_a_neuron_has_no_negative_part() -> None:
    # with positive weights and inputs z⁻ = 0 everywhere: only α·(z⁺ part) remains, i.e. 2·y
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    x = torch.rand(2, 3, 2, 2)
    rel = create("lrp", net, composite={"Linear": "alpha2_beta1"}, stabilizer=1e-9).attribute(x, 0, reduce=None)
    y = logit(net, x, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(rel.sum((1, 2, 3)), 4 * y, rtol=1e-4, atol=0)  # two layers: α² = 4


def test_per_channel_relevance_and_default_channel_sum() -> None:
    model = make_model("small_cnn")
    x = images(2)
    e = create("lrp", model)
    per_channel = e.attribute(x, 1, reduce=None)
    assert per_channel.shape == (2, 3, 32, 32)
    torch.testing.assert_close(e.attribute(x, 1), per_channel.sum(1), rtol=0, atol=0)
    assert e.default_reduce == "sum"


def test_user_mapping_equals_the_named_composite() -> None:
    model = make_model("resnet18")
    x = images(2)
    named = create("lrp", model, composite="epsilon_plus_flat").attribute(x, 2)
    mapped = create("lrp", model, composite={"first": "flat", "Convolution": "zplus", "Linear": "epsilon"}).attribute(
        x, 2)
    by_class = create("lrp", model, composite={"first": "flat", "Conv2d": ZPlus(), "Linear": {"rule": "epsilon"}})
    torch.testing.assert_close(mapped, named, rtol=0, atol=0)
    torch.testing.assert_close(by_class.attribute(x, 2), named, rtol=0, atol=0)


def test_layer_names_beat_first_which_beats_types() -> None:
    model = relu_net()
    e = create("lrp", model, composite="epsilon_plus_flat", rules={"9": "zplus", "3": {"rule": "gamma", "gamma": 1.0}})
    rules = e.rules()
    assert rules["0"].name == "flat" and rules["3"].name == "gamma" and rules["3"].gamma == 1.0
    assert rules["7"].name == "epsilon" and rules["9"].name == "zplus"
    assert rules["5"].name == "norm"  # AdaptiveAvgPool2d
    e2 = create("lrp", model, composite={"Conv2d": "epsilon", "Linear": "epsilon", "0": "zbox"}, epsilon=0.5,
                low=-3.0, high=3.0)
    r2 = e2.rules()
    assert r2["3"].epsilon == 0.5 and r2["0"].name == "zbox" and r2["0"].low == -3.0


def test_layer_rules_change_the_result_locally() -> None:
    # a different rule on the last layer only changes how its input relevance is split
    model = relu_net()
    x = X16
    a = create("lrp", model, composite="epsilon_plus").attribute(x, 1)
    b = create("lrp", model, composite="epsilon_plus", rules={"9": AlphaBeta(1.0, 0.0)}).attribute(x, 1)
    assert not torch.allclose(a, b)
    c = create("lrp", model, composite="epsilon_plus", rules={"9": Epsilon(1e-6)}).attribute(x, 1)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


class Scale(nn.Module):
    """A layer type no composite knows: a learned per-channel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s.view(1, -1, 1, 1)


def scaled_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), Scale(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3, bias=False)).eval()


def test_a_layer_no_rule_covers_is_named_with_the_fix() -> None:
    with pytest.raises(UnsupportedModelError, match=r"no rule for layer '1' \(Scale\).*rules=\{'1': 'epsilon'\}"
                       r".*rules=\{'Scale': 'epsilon'\}"):
        create("lrp", scaled_net())
    # the fix from the message works: ε on a layer that is linear in its input conserves
    model = scaled_net()
    x = X16[:2]
    err = relative_conservation_error(model, x, torch.tensor([0, 2]), composite="epsilon",
                                      rules={"Scale": "epsilon"}, epsilon=1e-9, stabilizer=1e-9)
    assert err < 1e-4


def test_bad_composites_and_rules_list_the_choices() -> None:
    model = relu_net()
    with pytest.raises(ConfigError, match=r"Unknown LRP composite 'eps_plus_flat'.*Did you mean 'epsilon_plus_flat'"):
        create("lrp", model, composite="eps_plus_flat")
    with pytest.raises(ConfigError, match=r"Unknown LRP rule 'zplsu'.*Did you mean 'zplus'"):
        create("lrp", model, rules={"Conv2d": "zplsu"})
    with pytest.raises(ConfigError, match=r"'Conv2D'.*Did you mean 'Conv2d'"):
        create("lrp", model, composite={"Conv2D": "zplus"})
    with pytest.raises(ConfigError, match="alpha − beta = 1"):
        create("lrp", model, rules={"Conv2d": {"rule": "alpha_beta", "alpha": 2.0, "beta": 2.0}})
    with pytest.raises(ConfigError, match=r"parameter of LRP rule 'zplus'.*'gama'"):
        create("lrp", model, rules={"Conv2d": {"rule": "zplus", "gama": 1.0}})
    with pytest.raises(ConfigError, match="'Sum' rule must be"):
        create("lrp", model, rules={"Sum": "zplus"})
    with pytest.raises(ConfigError, match="container"):
        create("lrp", make_model("resnet18"), rules={"layer1.0": "epsilon"})


def test_a_weight_rule_on_a_layer_without_weights_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"rule 'zplus' changes weights.*layer '5' \(AdaptiveAvgPool2d\)"):
        create("lrp", relu_net(), rules={"5": "zplus"})


class InPlaceSkip(nn.Module):
    """``x += conv(x)``: the conv's input is overwritten after the conv used it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        x += y
        return x


def test_unsupported_in_place_op_is_named_and_the_model_stays_intact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), InPlaceSkip(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"input of layer '2.conv' was modified in place.*x = x \+ y"):
        create("lrp", model).attribute(X16[:2], 0)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_torchvision_resnet_in_place_skip_sum_with_and_without_the_canonizer() -> None:
    model = make_model("resnet18")
    x = images(2)
    canonized = create("lrp", model).attribute(x, 1, reduce=None)
    # without the skip canonizer the in-place `out += identity` runs as written: its plain gradient
    # is the unstabilised proportional split, so only the 1e-6 "norm" stabiliser differs
    plain = create("lrp", model, canonizers=["merge_batchnorm"]).attribute(x, 1, reduce=None)
    scale = float(canonized.abs().max())
    torch.testing.assert_close(plain, canonized, rtol=0, atol=1e-4 * scale)


def test_deep_taylor_is_lrp_with_zplus_and_a_box_input() -> None:
    model = make_model("vgg11_bn", cifar_stem=True)
    x = images(2)
    dt = create("deep_taylor", model, low=-2.5, high=2.5).attribute(x, 3)
    lrp = create("lrp", model, composite="deep_taylor", low=-2.5, high=2.5).attribute(x, 3)
    torch.testing.assert_close(dt, lrp, rtol=0, atol=0)
    assert create("deep_taylor", model, input_rule="w_square").rules()["features.0"].name == "w_square"
    with pytest.raises(ConfigError, match="Unknown deep_taylor input_rule"):
        create("deep_taylor", model, input_rule="epsilon")


def test_zbox_bounds_default_to_each_images_range() -> None:
    model = relu_net()
    x = X16[:3]
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    default = create("lrp", model, composite="deep_taylor").attribute(x, 2)
    explicit = create("lrp", model, composite="deep_taylor", low=lo, high=hi).attribute(x, 2)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    per_channel = create("lrp", model, composite="deep_taylor", low=[-3.0, -3.0, -3.0], high=[3.0, 3.0, 3.0])
    scalar = create("lrp", model, composite="deep_taylor", low=-3.0, high=3.0)
    torch.testing.assert_close(per_channel.attribute(x, 2), scalar.attribute(x, 2), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="does not broadcast"):
        create("lrp", model, composite="deep_taylor", low=[0.0, 1.0]).attribute(x, 2)


def test_flattened_first_layer_gets_input_relevance_in_image_shape() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).eval()
    x = images(2, size=4)
    rel = create("lrp", mlp, stabilizer=1e-9, epsilon=1e-9).attribute(x, 1, reduce=None)  # flat on the first
    assert rel.shape == x.shape
    y = logit(mlp, x, torch.ones(2, dtype=torch.long))
    torch.testing.assert_close(rel.sum((1, 2, 3)), y, rtol=1e-4, atol=0)


def test_bad_target_after_the_forward_is_reported() -> None:
    with pytest.raises(ExplainerInputError, match="classes"):
        create("lrp", relu_net()).attribute(X16[:2], 7)
