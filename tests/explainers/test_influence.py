"""Influence-directed explanations: known influences on a handcrafted model, the quantity of
interest changing the experts, a real model against an independent split-network gradient,
distributions of interest (batches, dataloaders, one class), and the errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from xaudit.data import ShapesDataModule
from xaudit.explainers import (
    ExplainerInputError,
    InfluenceDirected,
    create,
    distributional_influence,
)
from xaudit.utils.errors import ConfigError

from explainer_helpers import images, make_model

# class A's head weights over the five units, class B's (class 2 is unused)
W_A = [3.0, 2.0, 0.0, 5.0, 5.0]
W_B = [3.0, 0.0, 1.0, 5.0, 5.0]


class _Experts(nn.Module):
    """1×1 conv with 5 units: units 0–2 copy input channels 0–2; unit 3 is forced to zero (zero
    filter and bias, so ReLU's gradient at 0 cuts it); unit 4 is forced to zero after the ReLU by a
    fixed gate. Then global average pool → linear head (A: ``W_A``, B: ``W_B``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for c in range(3):
                self.conv.weight[c, c] = 1.0
            self.conv.weight[4, 0] = 1.0  # unit 4 is active before its gate
            self.fc.weight.copy_(torch.tensor([W_A, W_B, [0.0] * 5]))
        self.register_buffer("gate", torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]).view(1, 5, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.relu(self.conv(x)) * self.gate
        return self.fc(z.mean((2, 3)))


def _positive_images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5


def test_forced_zero_channels_have_exactly_zero_influence() -> None:
    """∂q/∂z summed over positions is the head weight (GAP spreads it as w/16 over 16 positions),
    so the influences are known exactly; both forced-to-zero units get exactly 0."""
    model = _Experts()
    x = _positive_images()
    res = distributional_influence(model, x, target=0, layer="conv", top_k=2)
    assert torch.equal(res.influence, torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert res.influence[3] == 0 and res.influence[4] == 0 and res.n == 6
    assert res.units.tolist() == [0, 1] and res.scores.tolist() == [3.0, 2.0]
    # after the ReLU the gated unit 4 is still exactly 0; unit 3 is zero *and still read* by the
    # head, so its gradient (its influence, Leino et al.'s definition) is the head weight
    after = distributional_influence(model, x, target=0, layer="relu")
    assert after.influence[4] == 0 and after.influence[3] == 5.0


def test_experts_change_with_the_quantity_of_interest() -> None:
    """Class A alone: unit 0 (weight 3) is the expert. A vs B (logit_A − logit_B): unit 0 feeds both
    classes equally and cancels; unit 1 (2 − 0) is the expert, unit 2 (0 − 1) argues for B."""
    model = _Experts()
    x = _positive_images()
    alone = distributional_influence(model, x, target=0, layer="conv", top_k=1)
    versus = distributional_influence(model, x, target=0, versus=1, layer="conv", top_k=1)
    assert alone.units.tolist() == [0] and versus.units.tolist() == [1]
    assert torch.equal(versus.influence, torch.tensor([0.0, 2.0, -1.0, 0.0, 0.0], dtype=torch.float64))
    # the per-example explainer: top-1 unit's influence × ∂(Σ z_j)/∂x ⊙ x = 3·x₀ (A) and 2·x₁ (A vs B)
    torch.testing.assert_close(create("internal_influence", model, target_layer="conv", top_k=1).attribute(x, 0),
                               3 * x[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(create("internal_influence", model, target_layer="conv", top_k=1, versus=1).attribute(
        x, 0), 2 * x[:, 1], rtol=1e-6, atol=1e-6)
    # unit attributions: ∂(Σ z_j)/∂x ⊙ x summed over channels
    maps = InfluenceDirected(model, 0, layer="conv").unit_attributions(x, [1, 3])
    assert maps.shape == (6, 2, 4, 4)
    torch.testing.assert_close(maps[:, 0], x[:, 1])
    assert torch.equal(maps[:, 1], torch.zeros(6, 4, 4))  # the forced-zero unit: no input attribution


def test_real_model_against_a_split_network_gradient() -> None:
    """small CNN, layer features.block4: the influence equals the mean of ∂q/∂z computed by running
    the network in two halves with z as a leaf (no hooks); before the GAP → linear head (block5)
    it is exactly fc.weight[A] − fc.weight[B] for any distribution."""
    model = make_model("small_cnn")
    x = images(6, seed=1)
    res = distributional_influence(model, x, target=1, versus=3, layer="features.block4", top_k=4)
    with torch.no_grad():
        z = model.features[:5](x)  # block1, block2, pool1, block3, block4
    z.requires_grad_(True)
    rest = model.fc(torch.flatten(model.avgpool(model.features[5:](z)), 1))
    (g,) = torch.autograd.grad((rest[:, 1] - rest[:, 3]).sum(), z)
    expect = g.double().sum((2, 3)).mean(0)
    torch.testing.assert_close(res.influence, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.units, expect.topk(4).indices)
    head = distributional_influence(model, x, target=1, versus=3, layer="features.block5")
    w = model.fc.weight.detach().double()
    torch.testing.assert_close(head.influence, w[1] - w[3], rtol=1e-5, atol=1e-6)


def test_distribution_of_interest_from_a_dataloader_filtered_to_a_class() -> None:
    torch.manual_seed(0)
    model = make_model("small_cnn")
    dm = ShapesDataModule(n_train=4, n_val=24, n_test=4, batch_size=8, image_size=32)
    dm.setup("validate")
    loader = dm.val_dataloader()
    res = distributional_influence(model, loader, target=2, of_class=2)
    batch = {k: torch.cat([b[k] for b in loader]) for k in ("image", "label")}
    only = batch["image"][batch["label"] == 2]
    direct = distributional_influence(model, only, target=2)
    assert res.n == only.shape[0] == int((batch["label"] == 2).sum()) > 0
    torch.testing.assert_close(res.influence, direct.influence, rtol=1e-6, atol=1e-7)
    # the same from one batch dict, and the layer defaults to the backbone's target layer
    assert res.layer == "features.block5"
    one = distributional_influence(model, batch, target=2, of_class=2)
    torch.testing.assert_close(one.influence, direct.influence, rtol=1e-6, atol=1e-7)


def test_model_is_left_exactly_as_found() -> None:
    model = make_model("small_cnn").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    inf = InfluenceDirected(model, 1, layer="features.block3")
    inf.influence(images(4))
    inf.unit_attributions(images(2), 3)
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules()) and torch.equal(torch.get_rng_state(), rng)


def test_bad_input_names_the_problem_and_the_fix(get_model: Any) -> None:
    model = get_model("small_cnn")
    inf = InfluenceDirected(model, 1, layer="features.block5")
    with pytest.raises(ConfigError, match=r"distribution of interest is empty \(0 examples\)"):
        inf.influence(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ConfigError, match="empty"):
        inf.influence([])
    dm = ShapesDataModule(num_classes=3, n_train=4, n_val=6, n_test=4, batch_size=3, image_size=32)
    dm.setup("validate")
    with pytest.raises(ConfigError, match=r"empty \(0 examples after keeping class 3\).*of_class is a label"):
        inf.influence(dm.val_dataloader(), of_class=3)
    with pytest.raises(ConfigError, match="of_class needs labels"):
        inf.influence(images(2), of_class=1)
    with pytest.raises(ConfigError,
                       match=r"unit index 32 is out of range: layer 'features.block5' has 32 units.*0\.\.31"):
        inf.unit_attributions(images(1), [0, 32])
    with pytest.raises(ConfigError, match=r"Unknown target_layer 'features.block9'.*Choices:.*features\.block5"):
        InfluenceDirected(model, 1, layer="features.block9")
    with pytest.raises(ExplainerInputError, match="class index 7 but the model has 4 classes"):
        InfluenceDirected(model, 7).influence(images(2))
    with pytest.raises(ExplainerInputError, match=r"target equals versus=1 for sample\(s\) \[0\]"):
        create("internal_influence", model, versus=1).attribute(images(2), torch.tensor([1, 2]))
    with pytest.raises(ExplainerInputError, match="versus=5 is not a class"):
        InfluenceDirected(model, 1, versus=5).influence(images(2))
