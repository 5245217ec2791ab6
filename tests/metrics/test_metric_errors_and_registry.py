"""Bad input → a clear error naming the problem and the fix; the registry builds every metric."""

from __future__ import annotations

import pytest
import torch

from xaudit.metrics import (
    Completeness,
    DeletionInsertion,
    FaithfulnessCorrelation,
    MaskIoU,
    PointingGame,
    RelevanceMass,
    SanityCheck,
    create_metric,
    metric_class,
    metric_names,
    update_metric,
)
from xaudit.utils.errors import ConfigError

MODEL_METRICS = [
    lambda net: DeletionInsertion(net, steps=4),
    lambda net: FaithfulnessCorrelation(net, nr_runs=3, subset_size=4),
    lambda net: Completeness(net),
    lambda net: SanityCheck(net, layers=["fc"]),
]


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g), torch.tensor([0, 1])


@pytest.mark.parametrize("make", MODEL_METRICS)
def test_attribution_shape_must_match_the_images(tiny_cnn, batch, make):
    x, attr, y = batch
    for bad in (attr[:, :8], attr[:1], attr[:, None].expand(2, 2, 16, 16)):
        with pytest.raises(ValueError,
                           match=r"attribution shape \[.*\] does not match the images: expected \[2, 16, 16\]"):
            make(tiny_cnn).update(x, bad, y)


@pytest.mark.parametrize("make", MODEL_METRICS)
def test_nan_attributions_are_refused(tiny_cnn, batch, make):
    x, attr, y = batch
    attr = attr.clone()
    attr[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/Inf values \(samples \[1\]\)"):
        make(tiny_cnn).update(x, attr, y)


@pytest.mark.parametrize("cls", [PointingGame, MaskIoU, RelevanceMass])
def test_localisation_needs_masks_of_the_right_shape(cls, batch):
    _, attr, _ = batch
    with pytest.raises(ConfigError, match=r"needs ground-truth object masks.*data=shapes"):
        cls().update(attr, None)
    with pytest.raises(ConfigError, match="needs ground-truth object masks"):
        update_metric(cls(), x=torch.zeros(2, 3, 16, 16), attr=attr, target=torch.tensor([0, 1]), mask=None)
    with pytest.raises(ValueError, match=r"mask shape \[2, 8, 8\] does not match the attribution shape \[2, 16, 16\]"):
        cls().update(attr, torch.zeros(2, 8, 8, dtype=torch.bool))
    nan = attr.clone()
    nan[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        cls().update(nan, torch.ones(2, 16, 16, dtype=torch.bool))


def test_steps_substrate_and_mode_are_checked_at_construction(tiny_cnn):
    for steps in (0, -3, 2.5):
        with pytest.raises(ConfigError, match=rf"steps={steps!r} must be an integer ≥1"):
            DeletionInsertion(tiny_cnn, steps=steps)
    with pytest.raises(ConfigError, match=r"Unknown substrate 'blurr' \(substrate\)\. Did you mean 'blur'\? "
                                          r"Choices: blur, gaussian, mean, zero\."):
        DeletionInsertion(tiny_cnn, substrate="blurr")
    with pytest.raises(ConfigError, match=r"Unknown substrate 'noise'.*Choices: blur, gaussian, mean, zero"):
        FaithfulnessCorrelation(tiny_cnn, substrate="noise")
    with pytest.raises(ConfigError, match=r"Unknown mode 'delete'.*Did you mean 'deletion'"):
        DeletionInsertion(tiny_cnn, mode="delete")
    with pytest.raises(ValueError, match=r"steps=300 exceeds the 16x16=256 pixels"):
        DeletionInsertion(tiny_cnn, steps=300).update(torch.zeros(1, 3, 16, 16), torch.rand(1, 16, 16),
                                                      torch.tensor([0]))
    with pytest.raises(ConfigError, match="tolerance=-1 must be an integer ≥0"):
        PointingGame(tolerance=-1)
    with pytest.raises(ConfigError, match=r"top_k=1.5 must be a fraction in \(0, 1\]"):
        MaskIoU(top_k=1.5)


def test_targets_and_images_are_checked(tiny_cnn, batch):
    x, attr, _ = batch
    with pytest.raises(ValueError, match=r"target must be a long tensor \[B\]=\[2\]"):
        DeletionInsertion(tiny_cnn, steps=2).update(x, attr, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class indices outside \[0, 4\)"):
        DeletionInsertion(tiny_cnn, steps=2).update(x, attr, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"images x must be a float tensor \[B,C,H,W\]"):
        Completeness(tiny_cnn).update(x[0], attr, torch.tensor([0, 1]))


def test_registry_builds_every_metric_by_name(tiny_cnn):
    # the original nine, plus Quantus' families (issue 29); every name builds from its defaults
    assert {"completeness", "deletion_insertion", "faithfulness_correlation", "local_lipschitz", "mask_iou",
            "max_sensitivity", "pointing_game", "relevance_mass", "sanity_check", "road", "sparseness",
            "auc"} <= set(metric_names())
    import inspect

    for name in metric_names():
        kw = {"model": tiny_cnn} if "model" in inspect.signature(metric_class(name)).parameters else {}
        assert type(create_metric(name, **kw)).__name__ == metric_class(name).__name__
    m = create_metric("deletion_insertion", model=tiny_cnn, mode="insertion", steps=8)
    assert isinstance(m, DeletionInsertion) and m.mode == "insertion" and m.steps == 8
    assert isinstance(create_metric("pointing_game", tolerance=2), PointingGame)
    with pytest.raises(ConfigError, match=r"Unknown metric 'pointing' \(metric\.name\)\. Did you mean 'pointing_game'"):
        create_metric("pointing")


def test_update_metric_dispatches_by_signature(tiny_cnn, batch):
    x, attr, y = batch
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:8, 4:8] = True
    for m in (DeletionInsertion(tiny_cnn, steps=4), PointingGame()):
        update_metric(m, x=x, attr=attr, target=y, mask=mask)
        assert m.per_sample().shape == (2,)
