"""Issue 26: every metric default is the paper's value (scaled by the stated rule), and ties are
broken by the one seeded ranking, so a flat map scores like a random one wherever the model looks."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from xaudit.explainers.fills import rise_kernel_size, rise_sigma
from xaudit.metrics import DeletionInsertion
from xaudit.metrics.localisation import MaskIoU, PointingGame
from xaudit.metrics.perturbation import step_counts
from xaudit.ops.masking import keep_mask, removal_order
from xaudit.ops.ranking import pixel_ranks

CONF = Path(__file__).resolve().parents[2] / "conf"


# -- defaults pinned to the papers -----------------------------------------------------------------
def test_deletion_insertion_defaults_are_rises_protocol(linear_scorer):
    sig = inspect.signature(DeletionInsertion.__init__).parameters
    assert sig["steps"].default is None and sig["substrate"].default is None and sig["blur_sigma"].default is None
    model = linear_scorer(torch.ones(224 * 224))
    deletion, insertion = DeletionInsertion(model, mode="deletion"), DeletionInsertion(model, mode="insertion")
    # RISE evaluation.py: substrate_fn = torch.zeros_like (deletion) / blur with klen=11, ksig=5 (insertion)
    assert (deletion.substrate, insertion.substrate) == ("zero", "blur")
    # step = 224 pixels at 224², n_steps = (HW + step - 1) // step = 224; scaled: one image side per step
    assert deletion.steps_for(224, 224) == 224 and torch.equal(step_counts(224 * 224, 224)[:3],
                                                               torch.tensor([0, 224, 448]))
    assert deletion.steps_for(32, 32) == 32 and deletion.steps_for(64, 48) == 48
    assert DeletionInsertion.protocol_target == "predicted"  # RISE explains the top-1 class
    card = insertion.protocol((224, 224))
    assert card["params"]["blur_sigma"] == 5.0 and card["params"]["blur_kernel"] == 11
    assert card["deviations"] == [] and deletion.protocol((32, 32))["deviations"] == []
    assert insertion.protocol((32, 32))["params"]["blur_sigma"] == round(5 * 32 / 224, 4)
    # a changed default is listed as a deviation
    wide = DeletionInsertion(model, mode="insertion", steps=8, substrate="gaussian").protocol((32, 32))
    assert "steps=8 (paper: 32)" in wide["deviations"] and "substrate='gaussian' (paper: 'blur')" in wide["deviations"]


def test_blur_scaling_rule():
    assert (rise_sigma(224, 224), rise_kernel_size(5.0)) == (5.0, 11)
    assert rise_sigma(112, 112) == 2.5 and rise_kernel_size(2.5) == 5  # 2·round(σ)+1 (round half to even)
    assert rise_kernel_size(rise_sigma(16, 16)) == 3  # never below 3


def test_pointing_game_tolerance_is_torchrays_15px_at_224_scaled():
    assert inspect.signature(PointingGame.__init__).parameters["tolerance"].default is None
    pg = PointingGame()
    assert [pg.tolerance_for(s, s) for s in (224, 32, 64, 448)] == [15, 2, 4, 30]
    assert PointingGame.protocol_target == "label" and pg.protocol((224, 224))["deviations"] == []
    assert PointingGame(tolerance=0).protocol((224, 224))["deviations"] == ["tolerance=0 (paper: 15)"]
    # a hit 2 px off the object at 32 px counts by default, not with tolerance 0
    attr = torch.zeros(1, 32, 32)
    attr[0, 10, 12] = 1.0
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 10, 14:20] = True
    pg.update(attr, mask)
    strict = PointingGame(tolerance=0)
    strict.update(attr, mask)
    assert float(pg.compute()) == 1.0 and float(strict.compute()) == 0.0


def test_shipped_configs_use_the_paper_defaults():
    ev = OmegaConf.load(CONF / "audit" / "evaluate.yaml").evaluate.metrics
    for label in ("deletion", "insertion"):
        extra = {k: v for k, v in ev[label].items() if k not in ("name", "mode")}
        assert all(v is None for v in extra.values()), f"{label} overrides a RISE default: {extra}"
    assert all(v is None for k, v in ev.pointing_game.items() if k != "name")
    assert OmegaConf.load(CONF / "audit.yaml").target == "auto"
    mon = OmegaConf.load(CONF / "callbacks" / "explanation_monitor.yaml").explanation_monitor
    assert mon.substrate is None
    roar = OmegaConf.load(CONF / "audit" / "roar.yaml").roar
    assert list(roar.fractions) == [0.1, 0.3, 0.5, 0.7, 0.9] and roar.fill == "auto"
    from xaudit.tasks.audit import ROAR_PAPER

    assert ROAR_PAPER == {"fractions": [0.1, 0.3, 0.5, 0.7, 0.9], "seeds": 5, "fill": "train_mean"}


# -- ties: one seeded ranking ---------------------------------------------------------------------
class TopLeftScorer(torch.nn.Module):
    """Class 0's logit is the sum of the top-left quadrant's pixels: the model looks only there."""

    def __init__(self, side: int) -> None:
        super().__init__()
        w = torch.zeros(side, side)
        w[: side // 2, : side // 2] = 4.0 / (side * side / 4)
        self.weight = torch.nn.Parameter(w.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.weight
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def _deletion(model: torch.nn.Module, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    m = DeletionInsertion(model, mode="deletion", steps=16)
    m.update(x, attr, torch.zeros(x.shape[0], dtype=torch.long))
    return m.per_sample()


def test_constant_map_deletes_like_a_random_map_wherever_the_model_looks():
    n, side = 256, 16
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, side, side, generator=g) + 0.5
    model = TopLeftScorer(side)
    const = _deletion(model, x, torch.ones(n, side, side))
    rand = _deletion(model, x, torch.rand(n, side, side, generator=g))
    se = ((const.var() + rand.var()) / n).sqrt()
    assert abs(float(const.mean() - rand.mean())) < 4 * float(se)
    # what position ties did: the constant map's order was the raster order, top-left first
    raster = _deletion(model, x, -torch.arange(side * side, dtype=torch.float32).view(1, side, side).expand(n, -1, -1))
    assert float(rand.mean() - raster.mean()) > 20 * float(se)


def test_constant_map_iou_equals_a_random_maps():
    n, side = 256, 16
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, side, side, dtype=torch.bool)
    mask[:, : side // 2, : side // 2] = True  # every object in the top-left quadrant
    mask[:, 0, -1] = torch.arange(n) % 2 == 0  # vary the masks a little (seeds come from map + mask)

    def iou(attr: torch.Tensor) -> torch.Tensor:
        m = MaskIoU(top_k=0.25)
        m.update(attr, mask)
        return m.per_sample()

    const, rand = iou(torch.zeros(n, side, side)), iou(torch.rand(n, side, side, generator=g))
    se = ((const.var() + rand.var()) / n).sqrt()
    assert abs(float(const.mean() - rand.mean())) < 4 * float(se)
    raster = iou(-torch.arange(side * side, dtype=torch.float32).view(1, side, side).expand(n, -1, -1))
    assert float(raster.mean() - rand.mean()) > 20 * float(se)  # position ties would have favoured the top-left


def test_roar_masks_of_a_constant_map_are_uniform_over_positions():
    n, side = 512, 16
    keep = keep_mask(torch.zeros(n, side, side), 0.25, "roar", tie_seed=0)
    assert int((~keep).flatten(1).sum(1).unique().numel()) == 1  # exactly 64 pixels removed per image
    share = (~keep[:, : side // 2, : side // 2]).float().sum() / (~keep).float().sum()
    assert abs(float(share) - 0.25) < 0.01  # removed pixels fall in the top-left quadrant by its area share


def test_roar_and_metrics_rank_with_the_same_function():
    attr = torch.randint(0, 3, (6, 8, 8)).float()  # many ties
    seeds = torch.arange(6) + 7 * 1_000_003
    assert torch.equal(removal_order(attr, tie_seed=7), pixel_ranks(attr, seeds))
    k = 16
    keep = keep_mask(attr, k / 64, "roar", tie_seed=7)
    assert torch.equal(~keep.flatten(1), pixel_ranks(attr, seeds) < k)


def test_tie_seed_is_recorded_and_ties_do_not_depend_on_the_batch(linear_scorer):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 8, 8, generator=g)
    attr = (torch.rand(5, 8, 8, generator=g) * 3).floor()  # ties
    model = linear_scorer(torch.randn(64, generator=g))
    target = torch.zeros(5, dtype=torch.long)
    whole = DeletionInsertion(model, steps=8, tie_seed=3)
    whole.update(x, attr, target)
    parts = DeletionInsertion(model, steps=8, tie_seed=3)
    for i in (4, 0, 2, 1, 3):
        parts.update(x[i:i + 1], attr[i:i + 1], target[i:i + 1])
    order = torch.tensor([4, 0, 2, 1, 3])
    torch.testing.assert_close(parts.per_sample(), whole.per_sample()[order], rtol=0, atol=1e-12)
    other = DeletionInsertion(model, steps=8, tie_seed=4)
    other.update(x, attr, target)
    assert not torch.equal(other.per_sample(), whole.per_sample())  # the seed decides the ties
    assert whole.protocol((8, 8))["params"]["tie_seed"] == 3
    with pytest.raises(ValueError, match="steps=None"):
        DeletionInsertion(model).fractions(64)
