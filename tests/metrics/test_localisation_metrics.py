"""PointingGame, RelevanceMass (parity with Quantus) and MaskIoU (hand-computed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import quantus
import torch

from xaudit.metrics import MaskIoU, PointingGame, RelevanceMass


def random_masks(n: int, size: int, seed: int) -> torch.Tensor:
    """Random discs (never empty) as bool masks [n,size,size]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(2, size - 2, (n, 2), generator=g)
    radius = torch.randint(1, size // 3, (n,), generator=g)
    d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    return d2 <= radius[:, None, None] ** 2


def test_pointing_game_and_relevance_mass_match_quantus(tiny_cnn):
    """Exact agreement with Quantus' PointingGame and RelevanceMassAccuracy on the same maps/masks.

    Tolerance: pointing game is a 0/1 per sample (exact); relevance mass is a ratio of float64
    sums on both sides (1e-12). Non-negative maps, because Quantus sums signed attribution while
    the metric (Arras et al.) counts only positive relevance; tolerance 0 radius, because Quantus
    has none.
    """
    n, size = 24, 16
    g = torch.Generator().manual_seed(2)
    attr = torch.rand(n, size, size, generator=g) ** 3
    mask = random_masks(n, size, seed=3)
    x = torch.randn(n, 3, size, size, generator=g).numpy()  # Quantus wants inputs; unused by these metrics
    y = np.zeros(n, dtype=np.int64)
    a, s = attr[:, None].double().numpy(), mask[:, None].numpy().astype(np.float64)

    pg = PointingGame(tolerance=0)
    pg.update(attr, mask)
    ref_pg = quantus.PointingGame(disable_warnings=True, normalise=False, abs=False)(
        model=tiny_cnn, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu")
    np.testing.assert_array_equal(pg.per_sample().numpy(), np.asarray(ref_pg, dtype=np.float64))
    assert 0 < float(pg.compute()) < 1  # hits and misses both occur

    rm = RelevanceMass()
    rm.update(attr, mask)
    ref_rm = quantus.RelevanceMassAccuracy(disable_warnings=True, normalise=False, abs=False)(
        model=tiny_cnn, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu")
    np.testing.assert_allclose(rm.per_sample().numpy(), np.asarray(ref_rm), rtol=0, atol=1e-12)


def test_pointing_game_tolerance_ties_and_empty_masks():
    attr = torch.zeros(4, 9, 9)
    mask = torch.zeros(4, 9, 9, dtype=torch.bool)
    mask[:, 0, 0] = True
    attr[0, 0, 0] = 1.0  # on the object: hit
    attr[1, 0, 3] = 1.0  # 3 px to the right of it: miss at tolerance 2, hit at 3
    attr[2, 2, 2] = 1.0  # at distance sqrt(8) ≈ 2.83: hit at 3 (Euclidean disc), miss at 2
    mask[3] = False  # empty mask: undefined
    for tolerance, expected in ((0, [1, 0, 0]), (2, [1, 0, 0]), (3, [1, 1, 1])):
        m = PointingGame(tolerance=tolerance)
        m.update(attr, mask)
        values = m.per_sample()
        assert values[:3].tolist() == expected and math.isnan(values[3])
        assert float(m.compute()) == pytest.approx(sum(expected) / 3)  # NaN samples are skipped
    # a constant map: every pixel is the maximum, the score is the share of them on the object
    flat = PointingGame()
    flat.update(torch.ones(1, 4, 4), torch.tensor([[[1, 1, 0, 0]] + [[0, 0, 0, 0]] * 3], dtype=torch.bool))
    assert float(flat.compute()) == pytest.approx(2 / 16)


def test_mask_iou_by_hand():
    attr = torch.arange(16.0).view(1, 4, 4)  # top 25% = the last row (values 12..15)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 3, :2] = True  # 2 pixels of that row
    mask[0, 0, 0] = True  # and one elsewhere
    m = MaskIoU(top_k=0.25)
    m.update(attr, mask)
    assert float(m.compute()) == pytest.approx(2 / 5)  # |top ∩ mask| = 2, |top ∪ mask| = 4 + 1
    m2 = MaskIoU(top_k=0.5)  # last two rows: 8 pixels, 2 of them on the mask
    m2.update(attr, mask)
    assert float(m2.compute()) == pytest.approx(2 / 9)


def test_relevance_mass_counts_only_positive_attribution():
    attr = torch.tensor([[[3.0, -5.0], [1.0, 0.0]], [[-1.0, -2.0], [-3.0, -4.0]]])
    mask = torch.tensor([[[True, True], [False, False]]] * 2)
    m = RelevanceMass()
    m.update(attr, mask)
    values = m.per_sample()
    assert float(values[0]) == pytest.approx(3 / 4)  # negatives are no "mass"
    assert math.isnan(values[1])  # no positive attribution at all: undefined
    assert float(m.compute()) == pytest.approx(3 / 4)


def test_localisation_directions_and_batches_accumulate():
    assert PointingGame.higher_is_better and MaskIoU.higher_is_better and RelevanceMass.higher_is_better
    attr, mask = torch.rand(6, 8, 8), random_masks(6, 8, seed=0)
    one, two = RelevanceMass(), RelevanceMass()
    one.update(attr, mask)
    two.update(attr[:2], mask[:2])
    two.update(attr[2:], mask[2:])
    torch.testing.assert_close(one.per_sample(), two.per_sample())
    torch.testing.assert_close(one.compute(), two.compute())
