"""ROAD (parity with pytorch-grad-cam) and Quantus 0.6's EfficientMPRT / SmoothMPRT / RandomLogit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torchmetrics import CatMetric

from xaudit.data.shapes import ShapesDataModule
from xaudit.explainers import create
from xaudit.metrics import road as road_mod
from xaudit.metrics.axiomatic_quantus import InputInvariance
from xaudit.metrics.randomisation_quantus import (
    EfficientMPRT,
    RandomLogit,
    SmoothMPRT,
    discrete_entropy,
)
from xaudit.metrics.registry import metric_class
from xaudit.metrics.road import ROAD, linear_impute
from xaudit.models import build_backbone
from xaudit.utils.errors import ConfigError


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 4, width=8).eval()
    x = torch.randn(3, 3, 16, 16)
    attr = torch.rand(3, 16, 16)
    target = torch.tensor([0, 2, 3])
    return model, x, attr, target


def _saliency(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
    a = create("saliency", model, abs=False).attribute(torch.as_tensor(inputs), torch.as_tensor(targets).long())
    return a.detach().numpy()


# -- ROAD -----------------------------------------------------------------------------------
def test_registered() -> None:
    assert metric_class("road") is ROAD
    assert metric_class("efficient_mprt") is EfficientMPRT
    assert metric_class("smooth_mprt") is SmoothMPRT
    assert metric_class("random_logit") is RandomLogit


def test_imputer_matches_grad_cam_spsolve() -> None:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 24, 24, generator=g)
    removed = torch.rand(3, 24, 24, generator=g) < torch.tensor([0.9, 0.5, 0.1])[:, None, None]
    out, residual = linear_impute(x, removed)
    ref = torch.stack([NoisyLinearImputer(noise=0.0)(x[i], (~removed[i]).float()) for i in range(3)])
    # the reference returns float32: agreement is to float32 rounding
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-6
    assert float(residual.max()) < 1e-9


def test_road_parity_with_grad_cam(setup, monkeypatch) -> None:
    from pytorch_grad_cam.metrics import road as gc
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    model, x, attr, target = setup
    monkeypatch.setattr(gc.NoisyLinearImputer.__init__, "__defaults__", (0.0, gc.neighbors_weights))
    cams = attr.numpy()
    for output, tcls in (("prob", ClassifierOutputSoftmaxTarget), ("logit", ClassifierOutputTarget)):
        targets = [tcls(int(t)) for t in target]
        m = ROAD(model, percentiles=[20, 50, 80], noise=0.0, output=output)
        m.update(x, attr, target)
        morf = np.stack([gc.ROADMostRelevantFirst(p)(x, cams, targets, model) for p in (20, 50, 80)], 1)
        lerf = np.stack([gc.ROADLeastRelevantFirst(p)(x, cams, targets, model) for p in (20, 50, 80)], 1)
        combined = gc.ROADCombined(percentiles=[20, 50, 80])(x, cams, targets, model)
        np.testing.assert_allclose(m.morf_curves().numpy(), morf, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.lerf_curves().numpy(), lerf, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.per_sample().numpy(), combined, rtol=1e-5, atol=1e-6)


def test_road_noise_is_per_image_and_seeded(setup) -> None:
    model, x, attr, target = setup
    a = ROAD(model, percentiles=[30, 70], internal_batch_size=3)
    a.update(x, attr, target)
    b = ROAD(model, percentiles=[30, 70])
    for i in (2, 0, 1):  # other batches, other order
        b.update(x[i:i + 1], attr[i:i + 1], target[i:i + 1])
    torch.testing.assert_close(b.per_sample()[[1, 2, 0]], a.per_sample(), rtol=1e-6, atol=1e-7)
    c = ROAD(model, percentiles=[30, 70], noise=0.0)
    c.update(x, attr, target)
    assert not torch.equal(c.per_sample(), a.per_sample())
    assert torch.isfinite(a.compute())


def test_road_constant_map_is_nan(setup) -> None:
    model, x, _, target = setup
    m = ROAD(model, percentiles=[50], noise=0.0)
    m.update(x[:1], torch.ones(1, 16, 16), target[:1])
    assert torch.isnan(m.per_sample()).all()


@pytest.mark.parametrize("bad", [[0, 50], [50, 100], [], [-5], [120]])
def test_road_bad_percentiles(setup, bad) -> None:
    with pytest.raises(ConfigError, match="strictly inside"):
        ROAD(setup[0], percentiles=bad)


def test_road_bad_inputs(setup) -> None:
    model, x, attr, target = setup
    m = ROAD(model)
    with pytest.raises(ValueError, match="attribution shape"):
        m.update(x, attr[:, :8], target)
    with pytest.raises(ValueError, match="target"):
        m.update(x, attr, target.float())
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        ROAD(None)  # type: ignore[arg-type]


# -- randomisation --------------------------------------------------------------------------
def test_discrete_entropy_matches_numpy() -> None:
    import scipy.stats

    a = torch.randn(4, 300, dtype=torch.float64)
    a[1] = a[1].round(decimals=1)
    a[2] = 1.0
    ref = [scipy.stats.entropy(np.histogram(r, bins=100)[0]) for r in a.numpy()]
    np.testing.assert_allclose(discrete_entropy(a).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_efficient_mprt_parity(setup) -> None:
    import quantus

    model, x, _, target = setup
    attr = torch.as_tensor(_saliency(model, x.numpy(), target.numpy()))
    m = EfficientMPRT(model, explainer="saliency", explainer_kwargs={"abs": False}, seed=42)
    m.update(x, attr, target)
    q = quantus.EfficientMPRT(seed=42, disable_warnings=True)
    ref = q(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=None, explain_func=_saliency,
            device="cpu")
    np.testing.assert_allclose(m.per_sample().numpy(), np.asarray(ref), rtol=1e-5)


def test_random_logit_parity(setup) -> None:
    import quantus

    model, x, _, target = setup
    attr = torch.as_tensor(_saliency(model, x.numpy(), target.numpy()))

    class QuantusDraw(RandomLogit):  # Quantus' class draw for a one-image batch
        def off_targets(self, x, target, num_classes):
            np.random.seed(self.seed)
            r = torch.as_tensor(np.random.randint(0, num_classes - 1, 1)).expand(x.shape[0])
            return r + (r >= target).long()

    for sim, func in (("ssim", None), ("spearman", quantus.similarity_func.correlation_spearman)):
        m = QuantusDraw(model, explainer="saliency", explainer_kwargs={"abs": False}, similarity=sim, seed=7)
        q = quantus.RandomLogit(num_classes=4, seed=7, similarity_func=func, disable_warnings=True)
        ref = []
        for i in range(3):  # one image per call: Quantus normalises by the batch max
            m.update(x[i:i + 1], attr[i:i + 1], target[i:i + 1])
            ref += q(model=model, x_batch=x[i:i + 1].numpy(), y_batch=target[i:i + 1].numpy(),
                     a_batch=attr[i:i + 1].numpy(), explain_func=_saliency, device="cpu")
        np.testing.assert_allclose(m.per_sample().numpy(), np.asarray(ref, dtype=float), rtol=1e-5, atol=1e-7)


def test_smooth_mprt_parity(setup) -> None:
    import quantus

    model, x, _, target = setup
    x, target = x[:2], target[:2]
    attr = torch.as_tensor(_saliency(model, x.numpy(), target.numpy()))
    nr = 4
    layers = 11

    np.random.seed(3)
    draws = [np.stack([np.random.randn(*x.shape) for _ in range(nr - 1)], 1) for _ in range(layers + 1)]

    class QuantusNoise(SmoothMPRT):  # the global-NumPy draws in Quantus' order
        def smoothing_noise(self, x, step):
            return torch.as_tensor(draws[step], dtype=x.dtype)

    m = QuantusNoise(model, explainer="saliency", explainer_kwargs={"abs": False}, nr_samples=nr)
    assert len(m.layers) == layers
    m.update(x, attr, target)
    np.random.seed(3)
    q = quantus.SmoothMPRT(nr_samples=nr, disable_warnings=True)
    ref = q(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=attr.numpy(),
            explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"}, device="cpu")
    ref = np.stack([np.asarray(v, dtype=float) for v in ref.values()], 1)
    np.testing.assert_allclose(m.layer_scores().numpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.per_sample().numpy(), ref[:, 1:].mean(1), rtol=1e-5)


def test_randomisation_errors(setup) -> None:
    model = setup[0]
    with pytest.raises(ConfigError, match="layer_order"):
        SmoothMPRT(model, layer_order="sideways")
    with pytest.raises(ConfigError, match="similarity"):
        RandomLogit(model, similarity="cosine")
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        EfficientMPRT(None)  # type: ignore[arg-type]
    assert road_mod.DEFAULT_PERCENTILES == (10, 20, 30, 40, 50, 60, 70, 80, 90)


# -- DDP ------------------------------------------------------------------------------------
class _Probe(pl.LightningModule):
    """ROAD, RandomLogit, EfficientMPRT, SmoothMPRT and InputInvariance updated per test batch; rank 0
    saves the gathered values."""

    def __init__(self, state: dict[str, torch.Tensor], out: str) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", num_classes=4, width=8)
        self.net.load_state_dict(state)
        self.net.eval()
        self.out = out
        self.road = ROAD(self.net, percentiles=[25, 75])
        self.logit = RandomLogit(self.net, explainer="saliency")
        self.emprt = EfficientMPRT(self.net, explainer="saliency")
        self.smprt = SmoothMPRT(self.net, explainer="saliency", nr_samples=3)
        self.invariance = InputInvariance(self.net)
        self.index = CatMetric()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        attr = create("saliency", self.net).attribute(x, y)
        self.road.update(x, attr, y)
        self.logit.update(x, attr, y)
        self.emprt.update(x, attr, y)
        self.smprt.update(x, attr, y)
        self.invariance.update(x, attr, y, create("saliency", self.net))
        self.index.update(batch["index"])

    def on_test_epoch_end(self) -> None:
        result = {"index": self.index.compute().long(), "road": self.road.per_sample(),
                  "morf": self.road.morf_curves(), "logit": self.logit.per_sample(),
                  "emprt": self.emprt.per_sample(), "smprt": self.smprt.per_sample(),
                  "invariance": self.invariance.per_sample()}
        if self.trainer.is_global_zero:
            torch.save(result, self.out)


def _run(state: dict[str, torch.Tensor], out: Path, devices: int) -> dict[str, torch.Tensor]:
    extra = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **extra)
    dm = ShapesDataModule(n_train=8, n_val=8, n_test=11, eval_batch_size=4, seed=3)
    trainer.test(_Probe(state, str(out)), datamodule=dm, verbose=False)
    return torch.load(out, weights_only=True)


@pytest.mark.ddp
def test_ddp_two_processes_equal_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = build_backbone("small_cnn", num_classes=4, width=8).state_dict()
    one = _run(state, tmp_path / "one.pt", devices=1)
    two = _run(state, tmp_path / "two.pt", devices=2)
    order = two["index"].argsort()
    assert one["index"].tolist() == list(range(11))
    for key in ("road", "morf", "logit", "emprt", "smprt", "invariance"):
        assert torch.isfinite(one[key]).all(), key
        torch.testing.assert_close(two[key][order], one[key], rtol=1e-4, atol=1e-5, msg=key)
