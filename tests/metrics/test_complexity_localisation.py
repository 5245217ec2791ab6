"""Complexity (Sparseness, Complexity, EffectiveComplexity) and the Quantus localisation metrics
(AttributionLocalisation, AUC, Focus, RelevanceRankAccuracy, TopKIntersection): parity with
Quantus 0.6, hand-computed answers, errors, DDP.

Quantus normalises by one max over the whole batch; xaudit per image. The parity calls pass
``normalise_func_kwargs={"normalise_axes": (1, 2, 3)}`` so Quantus normalises per image too, and
keep its defaults otherwise.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import quantus
import torch
from torch import nn

import xaudit.metrics.complexity as cx
import xaudit.metrics.localisation_quantus as lq
from xaudit.explainers import create
from xaudit.metrics.base import update_metric
from xaudit.metrics.faithfulness_sets import Sufficiency
from xaudit.metrics.registry import create_metric, metric_class
from xaudit.utils.errors import ConfigError

PER_IMAGE = {"normalise_axes": (1, 2, 3)}


def maps_and_masks(n: int = 6, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed continuous maps (no ties) and rectangular masks, one of them empty."""
    g = torch.Generator().manual_seed(seed)
    attr = torch.randn(n, size, size, generator=g)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n - 1):
        r0, c0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        mask[i, r0:r0 + 3 + i, c0:c0 + 4] = True
        attr[i][mask[i]] += 1.0  # informative maps: AUC etc. away from chance
    return attr, mask


def quantus_call(metric: Any, model: nn.Module, attr: torch.Tensor, mask: torch.Tensor | None = None,
                 **extra: Any) -> np.ndarray:
    x = torch.zeros(attr.shape[0], 1, *attr.shape[-2:]).numpy()
    s = None if mask is None else mask[:, None].numpy().astype(np.float32)
    out = metric(model=model, x_batch=x, y_batch=np.zeros(attr.shape[0], dtype=int), a_batch=attr.numpy().copy(),
                 s_batch=s, device="cpu", **extra)
    return np.asarray(out, dtype=np.float64)


def values(metric: Any, *args: Any) -> np.ndarray:
    metric.update(*args)
    return metric.per_sample().numpy()


# -- parity with Quantus ----------------------------------------------------------------------
@pytest.mark.parametrize("normalise,abs_", [(True, True), (False, False), (True, False)])
def test_complexity_metrics_match_quantus(tiny_gray_cnn, normalise, abs_):
    """Tolerance 1e-5 relative (Quantus computes in float32, xaudit in float64); measured ≤2e-7."""
    attr, _ = maps_and_masks()
    if not abs_:
        attr = attr.abs()  # Quantus' Sparseness/Complexity are meant for non-negative maps
    kw = {"normalise": normalise, "abs": abs_, "disable_warnings": True, "normalise_func_kwargs": PER_IMAGE}
    for ours, ref in [(cx.Sparseness, quantus.Sparseness), (cx.Complexity, quantus.Complexity)]:
        got = values(ours(normalise=normalise, abs=abs_), attr)
        np.testing.assert_allclose(got, quantus_call(ref(**kw), tiny_gray_cnn, attr), rtol=1e-5, atol=0)
    # EffectiveComplexity counts: exact, with a threshold that actually splits the pixels
    for eps in (1e-5, 0.3):
        got = values(cx.EffectiveComplexity(eps=eps, normalise=normalise, abs=abs_), attr)
        ref = quantus_call(quantus.EffectiveComplexity(eps=eps, **kw), tiny_gray_cnn, attr)
        np.testing.assert_array_equal(got, ref)
        assert 0 < got.min() <= got.max() <= 256


def test_per_image_normalisation_equals_quantus_default_on_one_image_batches(tiny_gray_cnn):
    """The deviation: Quantus' default normalise_by_max takes one max over the batch, so its
    EffectiveComplexity of a sample changes with the batch; on one-image batches it equals ours."""
    attr, _ = maps_and_masks()
    ours = values(cx.EffectiveComplexity(eps=0.3), attr)
    alone = [quantus_call(quantus.EffectiveComplexity(eps=0.3, disable_warnings=True), tiny_gray_cnn, attr[i:i + 1])[0]
             for i in range(attr.shape[0])]
    np.testing.assert_array_equal(ours, alone)
    batch = quantus_call(quantus.EffectiveComplexity(eps=0.3, disable_warnings=True), tiny_gray_cnn, attr)
    assert (batch != ours).any()  # Quantus' batch-wide max: the values depend on the batch


def test_complexity_known_answers():
    one_hot = torch.zeros(2, 8, 8)
    one_hot[0, 3, 4] = 5.0
    one_hot[1] = 1.0  # uniform
    s = values(cx.Sparseness(), one_hot)
    assert s[0] > 0.98 and abs(s[1]) < 1e-9
    c = values(cx.Complexity(), one_hot)
    assert abs(c[0]) < 1e-9 and c[1] == pytest.approx(math.log(64), rel=1e-9)
    np.testing.assert_array_equal(values(cx.EffectiveComplexity(), one_hot), [1, 64])
    # all-zero map: Sparseness 0 (Quantus' +1e-7), Complexity undefined → NaN and skipped by compute()
    zero = torch.zeros(1, 8, 8)
    assert values(cx.Sparseness(), zero)[0] == pytest.approx(0.0, abs=1e-9)
    m = cx.Complexity()
    m.update(torch.cat([zero, one_hot]))
    assert math.isnan(float(m.per_sample()[0])) and float(m.compute()) == pytest.approx(math.log(64) / 2)


def test_mask_metrics_match_quantus(tiny_gray_cnn):
    """Defaults of Quantus (abs, normalise). Tolerances: ratios 1e-5 relative (Quantus float32 sums,
    measured ≤1e-6); AUC/rank accuracy/top-k are ranks and counts: 1e-12."""
    attr, mask = maps_and_masks()
    q = {"disable_warnings": True, "normalise_func_kwargs": PER_IMAGE}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Quantus warns about the empty mask
        cases = [
            (lq.AttributionLocalisation(), quantus.AttributionLocalisation(**q), 1e-5),
            (lq.AttributionLocalisation(abs=False, positive_attributions=True),
             quantus.AttributionLocalisation(abs=False, positive_attributions=True, **q), 1e-5),
            (lq.AUC(), quantus.AUC(**q), 1e-12),
            (lq.RelevanceRankAccuracy(), quantus.RelevanceRankAccuracy(**q), 1e-12),
            (lq.TopKIntersection(k=20), quantus.TopKIntersection(k=20, **q), 1e-12),
            (lq.TopKIntersection(k=50, concept_influence=True),
             quantus.TopKIntersection(k=50, concept_influence=True, **q), 1e-12),
        ]
        for ours, ref, rtol in cases:
            got = values(ours, attr, mask)
            want = quantus_call(ref, tiny_gray_cnn, attr, mask)
            assert np.isnan(got[-1]) and np.isnan(want[-1]), type(ours).__name__  # empty mask
            np.testing.assert_allclose(got, want, rtol=rtol, atol=0, equal_nan=True, err_msg=type(ours).__name__)
            assert np.isfinite(got[:-1]).all()


def test_attribution_localisation_signed_nan_and_weighted_by_hand():
    attr = torch.tensor([[[2.0, -3.0], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])
    # signed (abs=False): sample 0 has Σa=0 → ratio 2/1e-9 > 1 → NaN, as Quantus
    got = values(lq.AttributionLocalisation(abs=False, normalise=False), attr, mask)
    assert math.isnan(got[0]) and got[1] == pytest.approx(0.5, rel=1e-8)
    # weighted: ratio · |mask|/(H·W) (Quantus' x_batch[2:].size is a bug; computed by hand)
    got = values(lq.AttributionLocalisation(weighted=True, normalise=False), attr, mask)
    np.testing.assert_allclose(got, [2 / 6 * 0.25, 0.5 * 0.5], rtol=1e-8)


def test_rank_metrics_ties_are_expected_values():
    attr = torch.zeros(1, 4, 4)  # all tied: every ranking equally likely
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # 4 of 16 pixels
    assert values(lq.RelevanceRankAccuracy(), attr, mask)[0] == pytest.approx(0.25)
    assert values(lq.TopKIntersection(k=3), attr, mask)[0] == pytest.approx(0.25)
    assert values(lq.AUC(), attr, mask)[0] == pytest.approx(0.5)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert math.isnan(values(lq.AUC(), torch.randn(1, 4, 4), full)[0])  # no negatives: undefined


def test_top_k_default_scales_quantus_k():
    m = lq.TopKIntersection()
    assert m.k_for(224, 224) == 1000 and m.k_for(32, 32) == 20
    assert m.protocol_params((32, 32))["k"] == 20 and m.paper_params((32, 32)) == {"k": 20}


class TinyMosaicNet(nn.Module):
    """Global-pooled conv net: accepts 2H×2W mosaics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_focus_matches_quantus_on_the_same_mosaics():
    """Quantus' Focus scores the same mosaics, maps and tile flags. Tolerance 1e-5 relative
    (float32 on Quantus' side; measured ≤1e-7)."""
    net = TinyMosaicNet().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    target = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    explainer = create("saliency", net)
    m = lq.Focus(seed=3, internal_batch_size=3)
    update_metric(m, x=x, attr=None, target=target, explainer=explainer)
    got = m.per_sample().numpy()
    mosaic, flags, valid = m.mosaics(x, target)
    assert valid.all() and mosaic.shape == (8, 1, 16, 16) and (flags.sum(1) == 2).all()
    # each mosaic: the anchor, one other same-class image, two other-class images
    for i in range(8):
        tiles = [mosaic[i, :, :8, :8], mosaic[i, :, :8, 8:], mosaic[i, :, 8:, :8], mosaic[i, :, 8:, 8:]]
        idx = [int(((x - t).flatten(1).abs().sum(1) == 0).nonzero()[0]) for t in tiles]
        assert len(set(idx)) == 4 and i in idx
        assert [bool(target[j] == target[i]) for j in idx] == flags[i].tolist()
    attr = explainer.attribute(mosaic, target)
    ref = quantus.Focus(disable_warnings=True, normalise_func_kwargs=PER_IMAGE)(
        model=net, x_batch=mosaic.numpy(), y_batch=target.numpy(), a_batch=attr.numpy(),
        custom_batch=[tuple(int(v) for v in f) for f in flags], device="cpu")
    np.testing.assert_allclose(got, np.asarray(ref, dtype=np.float64), rtol=1e-5, atol=0)
    # reproducible and independent of the explainer chunking
    again = lq.Focus(seed=3, internal_batch_size=64)
    again.update(x, target, explainer)
    np.testing.assert_allclose(again.per_sample().numpy(), got, rtol=0, atol=1e-6)


def test_focus_nan_without_partners():
    net = TinyMosaicNet().eval()
    x = torch.randn(4, 1, 8, 8)
    target = torch.tensor([0, 1, 1, 2])  # class 0 and 2 have no partner
    m = lq.Focus()
    m.update(x, target, create("saliency", net))
    v = m.per_sample()
    assert torch.isnan(v[[0, 3]]).all() and torch.isfinite(v[[1, 2]]).all()


# -- errors and registry ---------------------------------------------------------------------
def test_registered_names_and_attributes():
    names = {"sparseness": cx.Sparseness, "complexity": cx.Complexity, "effective_complexity": cx.EffectiveComplexity,
             "attribution_localisation": lq.AttributionLocalisation, "auc": lq.AUC, "focus": lq.Focus,
             "relevance_rank_accuracy": lq.RelevanceRankAccuracy, "top_k_intersection": lq.TopKIntersection}
    for name, cls in names.items():
        assert metric_class(name) is cls
        assert cls.paper and cls.measures and cls.family in ("complexity", "localisation")
    assert cx.Sparseness.update_inputs == ("attr",)
    assert isinstance(create_metric("effective_complexity", eps=0.1), cx.EffectiveComplexity)


def test_bad_inputs_name_the_fix():
    attr, mask = maps_and_masks(2, 8)
    with pytest.raises(ConfigError, match="needs ground-truth object masks"):
        update_metric(lq.AUC(), attr=attr, mask=None)
    with pytest.raises(ConfigError, match="needs ground-truth object masks"):
        lq.RelevanceRankAccuracy().update(attr, None)
    with pytest.raises(ValueError, match="mask shape"):
        lq.AttributionLocalisation().update(attr, mask[:, :4])
    with pytest.raises(ValueError, match=r"attribution shape|\[B,H,W\]"):
        cx.Sparseness().update(attr[0])
    with pytest.raises(ConfigError, match="k=64 must be smaller than the 64 pixels"):
        lq.TopKIntersection(k=64).update(attr, mask)
    with pytest.raises(ConfigError, match="k=0"):
        lq.TopKIntersection(k=0)
    with pytest.raises(ConfigError, match="max_size"):
        lq.AttributionLocalisation(max_size=1.5)
    with pytest.raises(ConfigError, match="eps"):
        cx.EffectiveComplexity(eps=-1.0)
    with pytest.raises(ConfigError, match="abs"):
        cx.Complexity(abs="yes")
    with pytest.raises(ValueError, match="needs 'explainer'"):
        update_metric(lq.Focus(), x=torch.randn(2, 1, 8, 8), target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs an xaudit Explainer"):
        lq.Focus().update(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), explainer=TinyMosaicNet())
    with pytest.raises(ValueError, match="target must be a long tensor"):
        lq.Focus().update(torch.randn(2, 1, 8, 8), torch.tensor([0.0, 1.0]), create("saliency", TinyMosaicNet()))


# -- DDP -------------------------------------------------------------------------------------
class ProbeModule(pl.LightningModule):
    """Updates the map-only and mask metrics, Focus and Sufficiency in ``test_step``."""

    def __init__(self, state: dict[str, torch.Tensor], out: str) -> None:
        super().__init__()
        from xaudit.models.backbones import build_backbone

        self.net = build_backbone("small_cnn", num_classes=4, width=16)
        self.net.load_state_dict(state)
        self.net.eval()
        self.out = out
        self.metrics = nn.ModuleDict({
            "sparseness": cx.Sparseness(), "complexity": cx.Complexity(), "effective": cx.EffectiveComplexity(),
            "attr_loc": lq.AttributionLocalisation(), "auc": lq.AUC(), "rra": lq.RelevanceRankAccuracy(),
            "topk": lq.TopKIntersection(), "focus": lq.Focus(), "sufficiency": Sufficiency(self.net),
        })
        from torchmetrics import CatMetric

        self.index = CatMetric()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        explainer = create("saliency", self.net)
        attr = explainer.attribute(batch["image"], batch["label"])
        for metric in self.metrics.values():
            update_metric(metric, x=batch["image"], attr=attr, target=batch["label"], mask=batch["mask"],
                          explainer=explainer)
        self.index.update(batch["index"])

    def on_test_epoch_end(self) -> None:
        result: dict[str, Any] = {"index": self.index.compute().long()}
        for name, metric in self.metrics.items():
            result[name] = {"mean": metric.compute(), "per_sample": metric.per_sample()}
        if self.trainer.is_global_zero:
            torch.save(result, self.out)


def run_probe(state: dict[str, torch.Tensor], out: Path, devices: int) -> dict[str, Any]:
    from xaudit.data.shapes import ShapesDataModule

    extra = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **extra)
    dm = ShapesDataModule(n_train=8, n_val=8, n_test=13, eval_batch_size=5, seed=3)
    trainer.test(ProbeModule(state, str(out)), datamodule=dm, verbose=False)
    return torch.load(out, weights_only=False)


@pytest.mark.ddp
def test_two_processes_equal_one(tmp_path):
    """Every metric, Focus (mosaics drawn from the batch) and Sufficiency (neighbours in the batch)
    included: evaluation shards are whole batches, so a batch is the same on 1 and 2 processes."""
    from xaudit.models.backbones import build_backbone

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_backbone("small_cnn", num_classes=4, width=16).state_dict().items()}
    one = run_probe(state, tmp_path / "one.pt", devices=1)
    two = run_probe(state, tmp_path / "two.pt", devices=2)
    assert sorted(two["index"].tolist()) == list(range(13)) and two["index"].tolist() != list(range(13))
    order = two["index"].argsort()
    # 13 samples in batches of 5: rank 0 takes [0, 5) and [10, 13), rank 1 takes [5, 10)
    assert two["index"].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 5, 6, 7, 8, 9]
    for name in ("focus", "sufficiency"):  # enough defined values that the comparison means something
        assert int(torch.isfinite(one[name]["per_sample"]).sum()) >= 5, name
    for name in ("sparseness", "complexity", "effective", "attr_loc", "auc", "rra", "topk", "focus", "sufficiency"):
        a, b = one[name], two[name]
        assert a["per_sample"].shape == b["per_sample"].shape == (13,), name
        torch.testing.assert_close(b["per_sample"][order], a["per_sample"][one["index"].argsort()],
                                   rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        torch.testing.assert_close(b["mean"], a["mean"], rtol=1e-4, atol=1e-5, msg=name)
