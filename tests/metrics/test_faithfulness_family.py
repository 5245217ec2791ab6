"""Quantus' faithfulness family (estimate, monotonicity, monotonicity correlation, region perturbation,
selectivity): parity with Quantus 0.6, hand checks, batch/DDP independence and input errors.

Parity runs on 1-channel images, where Quantus' features (channel values) are our pixels, with
continuous random maps (no ties: Quantus breaks them by numpy's unstable argsort, we by a seeded hash).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import quantus
import torch
from torch import nn
from torchmetrics import CatMetric

from xaudit.metrics.faithfulness import (
    FaithfulnessEstimate,
    Monotonicity,
    MonotonicityCorrelation,
    RegionPerturbation,
    Selectivity,
    monotonicity_correlation,
    patch_grid,
)
from xaudit.metrics.registry import create_metric, metric_class
from xaudit.models.backbones import build_backbone
from xaudit.utils.errors import ConfigError

Q = {"disable_warnings": True, "return_aggregate": False}


def gray_net(seed: int = 0, sharpen: float = 3.0) -> nn.Module:
    """A seeded 1-channel small CNN whose probabilities move (but do not saturate) with the pixels."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_backbone("small_cnn", num_classes=4, in_chans=1, width=8)
    with torch.no_grad():
        net.fc.weight.mul_(sharpen)
    return net.eval()


def data(b: int = 6, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, size, size, generator=g)
    attr = torch.randn(b, size, size, generator=g)
    return x, attr, torch.arange(b) % 4


def quantus_run(metric: Any, net: nn.Module, x: torch.Tensor, attr: torch.Tensor, y: torch.Tensor,
                softmax: bool) -> list:
    return metric(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=attr[:, None].numpy(), device="cpu",
                  batch_size=len(x), softmax=softmax)


def rel_close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64),
                               rtol=rtol, atol=0)


# -- parity with Quantus -----------------------------------------------------------------------
@pytest.mark.parametrize("output", ["logit", "prob"])
def test_faithfulness_estimate_parity(output):
    """Quantus' defaults (black baseline, abs=False, normalise=True) at features_in_step=16 (16 groups).
    Measured agreement ~1e-7 relative; 1e-5 is the acceptance bound."""
    net, (x, attr, y) = gray_net(), data()
    ref = quantus_run(quantus.FaithfulnessEstimate(features_in_step=16, **Q), net, x, attr, y, output == "prob")
    m = FaithfulnessEstimate(net, features_in_step=16, output=output, internal_batch_size=7)
    m.update(x, attr, y)
    assert float(np.abs(ref).max()) > 0.2
    rel_close(m.per_sample().numpy(), ref)


def test_faithfulness_estimate_defaults_are_quantus():
    m = FaithfulnessEstimate(gray_net())
    q = quantus.FaithfulnessEstimate(disable_warnings=True)
    assert (m.features_in_step, m.perturb_baseline, m.abs, m.output) == (
        q.features_in_step, q.perturb_func.keywords["perturb_baseline"], q.abs, "logit")


def insert_pixels(arr: np.ndarray, indices: np.ndarray, x_flat: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Monotonicity's insertion as the paper means it: copy the image's values into the baseline."""
    out = arr.copy()
    rows = np.arange(arr.shape[0])[:, None]
    out[rows, indices] = x_flat[rows, indices]
    return out


def test_monotonicity_parity_with_quantus_loop_and_fixed_insertion(linear_scorer):
    """Quantus' loop (ascending order, steps, all(diff ≥ 0)) with the insertion as its perturb_func.

    A linear scorer (p₀ = sigmoid(w·x)) with positive weights but some negative ones on half the
    images' support makes both outcomes occur; 0/1 results must agree exactly.
    """
    g = torch.Generator().manual_seed(3)
    w = torch.rand(256, generator=g) + 0.1
    w[::7] = -0.3  # a few negative pixels: inserting them lowers p₀ (or raises p₁)
    net = linear_scorer(w).eval()
    x = torch.randn(16, 1, 16, 16, generator=g)
    attr = torch.randn(16, 16, 16, generator=g)
    y = torch.arange(16) % 2
    q = quantus.Monotonicity(features_in_step=64, perturb_func=insert_pixels,
                             perturb_func_kwargs={"x_flat": x.reshape(16, -1).numpy()}, **Q)
    ref = np.asarray(quantus_run(q, net, x, attr, y, True), dtype=np.float64)
    m = Monotonicity(net, features_in_step=64, internal_batch_size=5)
    m.update(x, attr, y)
    np.testing.assert_array_equal(m.per_sample().numpy(), ref)
    assert 0 < ref.sum() < 16  # both outcomes occur
    # the curve by hand: insert the lowest-|attribution| pixels first into the black image
    c = m.curves()[3]
    order = attr[3].abs().flatten().argsort()
    xb = torch.full((256,), float(x[3].min()))
    with torch.no_grad():
        for k in range(4):
            xb[order[64 * k: 64 * (k + 1)]] = x[3].flatten()[order[64 * k: 64 * (k + 1)]]
            p = net(xb.view(1, 1, 16, 16)).softmax(-1)[0, y[3]]
            assert abs(float(c[k]) - float(p)) < 1e-6


def test_quantus_monotonicity_quirk_always_true():
    """Documents the deviation: Quantus 0.6 never inserts the pixels, so every sample is monotonic."""
    net, (x, attr, y) = gray_net(), data(b=6, seed=4)
    ref = quantus_run(quantus.Monotonicity(features_in_step=64, **Q), net, x, attr, y, True)
    assert all(bool(v) for v in ref)
    m = Monotonicity(net, features_in_step=64)
    m.update(x, attr, y)
    assert float(m.compute()) < 1.0  # the fixed insertion is not trivially monotonic


def quantus_uniform_draws(seed: int, steps: int, runs: int, batch: int) -> np.ndarray:
    """Replay Quantus' draws after ``np.random.seed(seed)``: one U(0,1) per image per (step, run) call."""
    np.random.seed(seed)
    d = np.stack([np.stack([np.random.uniform(size=batch) for _ in range(runs)]) for _ in range(steps)])
    return d.transpose(2, 0, 1)  # [B, steps, runs]


def test_monotonicity_correlation_parity_on_shared_draws():
    """Same uniform draws injected into both; Spearman of sums vs variances. Measured: equal to ~1e-12
    (ranks are discrete; the float32 variances never swap order here)."""
    net, (x, attr, y) = gray_net(), data()
    steps, runs, seed = 16, 5, 11
    state = np.random.get_state()
    try:
        draws = quantus_uniform_draws(seed, steps, runs, len(x))
        np.random.seed(seed)
        ref = quantus_run(quantus.MonotonicityCorrelation(nr_samples=runs, features_in_step=16, **Q),
                          net, x, attr, y, True)
    finally:
        np.random.set_state(state)
    ours = monotonicity_correlation(net, x, attr.abs(), y, torch.from_numpy(draws).float(), 16,
                                    internal_batch_size=13)
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 0.2
    rel_close(ours.numpy(), ref)


def test_monotonicity_correlation_defaults_and_draws():
    net, (x, _, _) = gray_net(), data(b=3)
    m = MonotonicityCorrelation(net, nr_samples=4, features_in_step=32, seed=2)
    q = quantus.MonotonicityCorrelation(disable_warnings=True)
    d = MonotonicityCorrelation(net)
    assert (d.nr_samples, d.features_in_step, d.eps, d.abs) == (q.nr_samples, q.features_in_step, q.eps, q.abs)
    assert q.perturb_func.keywords["perturb_baseline"] == "uniform"
    together = m.draws(x)
    assert together.shape == (3, 8, 4) and float(together.min()) >= 0 and float(together.max()) < 1
    assert torch.equal(together, torch.cat([m.draws(x[i:i + 1]) for i in range(3)]))


@pytest.mark.parametrize(("size", "patch", "order", "regions"),
                         [(16, 4, "morf", 100), (16, 4, "lerf", 5), (18, 4, "morf", 100)])
def test_region_perturbation_parity(size, patch, order, regions, linear_scorer):
    """Curves equal Quantus' per-sample output (padded grid at 18 px); AOPC = Σ curve / (L+1) by hand.
    A linear scorer, whose probability moves a lot when patches go (the untrained CNN's barely does)."""
    x, attr, y = data(size=size)
    net = linear_scorer(torch.randn(size * size, generator=torch.Generator().manual_seed(9)) * 0.2).eval()
    y = y % 2
    ref = np.stack(quantus_run(quantus.RegionPerturbation(patch_size=patch, order=order, regions_evaluation=regions,
                                                          **Q), net, x, attr, y, True))
    m = RegionPerturbation(net, patch_size=patch, order=order, regions_evaluation=regions, internal_batch_size=9)
    m.update(x, attr, y)
    assert float(np.abs(ref).max()) > 0.05  # the probabilities move
    np.testing.assert_allclose(m.curves().numpy(), ref, rtol=1e-5, atol=1e-6)  # drops are differences of probs
    rel_close(m.per_sample().numpy(), ref.astype(np.float64).sum(1) / (ref.shape[1] + 1))
    assert m.higher_is_better is (order == "morf")


@pytest.mark.parametrize(("size", "baseline"), [(16, "black"), (18, 0.5)])
def test_selectivity_parity(size, baseline):
    net, (x, attr, y) = gray_net(sharpen=30.0), data(size=size)
    q = quantus.Selectivity(patch_size=4, perturb_baseline=baseline, **Q)
    ref = np.stack(quantus_run(q, net, x, attr, y, True))
    m = Selectivity(net, patch_size=4, perturb_baseline=baseline, internal_batch_size=11)
    m.update(x, attr, y)
    assert float(ref.max() - ref.min()) > 0.05
    rel_close(m.curves().numpy(), ref)
    # Quantus' get_auc_score is np.trapz(curve, dx=1); numpy 2 removed np.trapz, so it is replayed here
    rel_close(m.per_sample().numpy(), [np.trapezoid(r.astype(np.float64), dx=1) for r in ref])


def test_patch_metric_defaults_are_quantus():
    net = gray_net()
    r, qr = RegionPerturbation(net), quantus.RegionPerturbation(disable_warnings=True)
    s, qs = Selectivity(net), quantus.Selectivity(disable_warnings=True)
    assert (r.patch_size, r.order, r.regions_evaluation, r.abs) == (qr.patch_size, qr.order, qr.regions_evaluation,
                                                                      qr.abs)
    assert (s.patch_size, s.abs, s.perturb_baseline) == (qs.patch_size, qs.abs,
                                                         qs.perturb_func.keywords["perturb_baseline"])
    assert Monotonicity(net).abs is quantus.Monotonicity(disable_warnings=True).abs is True


def test_patch_grid_matches_quantus_padding():
    pid, n = patch_grid(6, 5, 4)
    assert n == 4  # padded to 8x8: (1,1) rows, (1,2) columns
    assert pid.view(6, 5)[:3, :3].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert pid.view(6, 5)[3, 3] == 3


# -- batching, determinism, registry -------------------------------------------------------------
def small_metrics(net: nn.Module) -> dict[str, Any]:
    return {
        "faithfulness_estimate": FaithfulnessEstimate(net, features_in_step=32, internal_batch_size=5),
        "monotonicity": Monotonicity(net, features_in_step=64, internal_batch_size=3),
        "monotonicity_correlation": MonotonicityCorrelation(net, nr_samples=3, features_in_step=64, seed=1),
        "region_perturbation": RegionPerturbation(net, patch_size=4, regions_evaluation=6),
        "selectivity": Selectivity(net, patch_size=8),
    }


def test_batch_split_and_chunking_do_not_matter_and_rng_untouched():
    net, (x, attr, y) = gray_net(), data(b=5)
    before = torch.random.get_rng_state()
    a, b = small_metrics(net), small_metrics(net)
    for name in a:
        a[name].update(x[:2], attr[:2], y[:2])
        a[name].update(x[2:], attr[2:], y[2:])
        b[name].internal_batch_size = 1000
        with torch.inference_mode():
            b[name].update(x, attr, y)
        torch.testing.assert_close(a[name].per_sample(), b[name].per_sample(), rtol=1e-5, atol=1e-6, msg=name)
        assert a[name].per_sample().shape == (5,)
        assert metric_class(name) is type(a[name])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(p.grad is None for p in net.parameters())


def test_registry_and_cards():
    net = gray_net()
    for name, cls in [("faithfulness_estimate", FaithfulnessEstimate), ("monotonicity", Monotonicity),
                      ("monotonicity_correlation", MonotonicityCorrelation),
                      ("region_perturbation", RegionPerturbation), ("selectivity", Selectivity)]:
        m = create_metric(name, model=net)
        assert isinstance(m, cls) and m.family == "faithfulness" and m.paper and m.measures
        assert isinstance(m.higher_is_better, bool)
        assert m.protocol((32, 32))["params"]


def test_constant_map_is_nan_for_correlations():
    net, (x, _, y) = gray_net(), data(b=2)
    m = FaithfulnessEstimate(net, features_in_step=64)
    m.update(x, torch.zeros(2, 16, 16), y)
    assert torch.isnan(m.per_sample()).all()  # zero attribution sums: Pearson undefined (scipy: NaN)


# -- errors ------------------------------------------------------------------------------------
def test_bad_inputs_name_the_fix():
    net, (x, attr, y) = gray_net(), data(b=2)
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        FaithfulnessEstimate(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features_in_step=7 must divide"):
        FaithfulnessEstimate(net, features_in_step=7).update(x, attr, y)
    with pytest.raises(ValueError, match="patch_size=32 exceeds"):
        Selectivity(net, patch_size=32).update(x, attr, y)
    with pytest.raises(ConfigError, match="perturb_baseline"):
        RegionPerturbation(net, perturb_baseline="gray")
    with pytest.raises(ConfigError, match="perturb_baseline"):
        Monotonicity(net, perturb_baseline=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="order"):
        RegionPerturbation(net, order="top")
    with pytest.raises(ConfigError, match="eps"):
        MonotonicityCorrelation(net, eps=0.0)
    with pytest.raises(ConfigError, match="nr_samples"):
        MonotonicityCorrelation(net, nr_samples=0)
    with pytest.raises(ConfigError, match="output"):
        Selectivity(net, output="proba")
    with pytest.raises(ValueError, match="attribution shape"):
        Monotonicity(net, features_in_step=64).update(x, attr[:, :8], y)
    with pytest.raises(ValueError, match="target must be a long tensor"):
        RegionPerturbation(net).update(x, attr, y.float())
    with pytest.raises(ValueError, match="outside"):
        RegionPerturbation(net, patch_size=8).update(x, attr, y + 10)


# -- DDP ---------------------------------------------------------------------------------------
class FamilyProbe(pl.LightningModule):
    """Updates the five metrics in ``test_step``; rank 0 saves per-sample values and sample ids."""

    def __init__(self, state: dict[str, torch.Tensor], out: str) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", num_classes=4, width=8)
        self.net.load_state_dict(state)
        self.net.eval()
        self.out = out
        self.metrics = nn.ModuleDict(small_metrics(self.net))
        self.index = CatMetric()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x = batch["image"]
        attr = x.mean(1) + 0.3 * x[:, 0] ** 2  # a fixed function of the sample
        for metric in self.metrics.values():
            metric.update(x, attr, batch["label"])
        self.index.update(batch["index"])

    def on_test_epoch_end(self) -> None:
        result: dict[str, Any] = {"index": self.index.compute().long()}
        for name, metric in self.metrics.items():
            result[name] = {"mean": metric.compute(), "per_sample": metric.per_sample()}
        if self.trainer.is_global_zero:
            torch.save(result, self.out)


def ddp_run(state: dict[str, torch.Tensor], out: Path, devices: int) -> dict[str, Any]:
    from xaudit.data.shapes import ShapesDataModule

    extra = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **extra)
    dm = ShapesDataModule(image_size=16, n_train=8, n_val=8, n_test=13, eval_batch_size=4, seed=3)
    trainer.test(FamilyProbe(state, str(out)), datamodule=dm, verbose=False)
    return torch.load(out, weights_only=False)


@pytest.mark.ddp
def test_two_processes_equal_one(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = build_backbone("small_cnn", num_classes=4, width=8).state_dict()
    one = ddp_run(state, tmp_path / "one.pt", devices=1)
    two = ddp_run(state, tmp_path / "two.pt", devices=2)
    assert sorted(two["index"].tolist()) == list(range(13)) and two["index"].tolist() != list(range(13))
    for name in small_metrics(nn.Identity()):
        a, b = one[name], two[name]
        assert a["per_sample"].shape == b["per_sample"].shape == (13,), name
        assert torch.isfinite(a["mean"]), name
        torch.testing.assert_close(b["per_sample"][two["index"].argsort()], a["per_sample"][one["index"].argsort()],
                                   rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        torch.testing.assert_close(b["mean"], a["mean"], rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)

