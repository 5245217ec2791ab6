"""Quantus' robustness family beyond Max-Sensitivity/Local-Lipschitz: parity, known answers, errors, DDP."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import CatMetric

import xaudit.metrics.robustness_quantus as rq
from xaudit.data.shapes import ShapesDataModule
from xaudit.explainers import create
from xaudit.metrics import create_metric, metric_names, update_metric
from xaudit.metrics.robustness_quantus import (
    AvgSensitivity,
    Consistency,
    Continuity,
    RelativeInputStability,
    RelativeOutputStability,
    RelativeRepresentationStability,
    translate,
)
from xaudit.models.backbones import build_backbone

# the same float32 maps on the same inputs; Quantus' norms run in numpy, ours in torch float64/32
RTOL = 1e-5
LAYER = "features.block3.0"  # a Conv2d: Quantus' get_hidden_representations skips Sequential blocks


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 4, width=8).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"model": model, "x": x, "y": torch.tensor([0, 1, 2]), "saliency": create("saliency", model)}


def _explain_fn(explainer: Any) -> Any:
    def explain(model: object, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
        return explainer.attribute(torch.from_numpy(np.asarray(inputs)).float(),
                                   torch.from_numpy(np.asarray(targets)).long()).numpy()
    return explain


def _injected(noise: Tensor, shape: torch.Size) -> Any:
    """A Quantus ``perturb_func`` that adds our draws, one [B,C,H,W] slice per call."""
    draws = iter(noise)

    def perturb(arr: np.ndarray, indices: object, **_: object) -> np.ndarray:
        return (torch.from_numpy(arr).view(shape) + next(draws)).reshape(arr.shape).numpy()
    return perturb


# -- parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("normalise", [False, True])
def test_avg_sensitivity_parity_with_quantus_on_identical_noise(setup: dict, normalise: bool) -> None:
    quantus = pytest.importorskip("quantus")
    x, y, e = setup["x"], setup["y"], setup["saliency"]
    metric = AvgSensitivity(setup["model"], n=5, normalise=normalise)
    noise = metric.noise(x)
    metric.update(x, e.attribute(x, y), y, e, noise=noise)
    expected = []
    for i in range(x.shape[0]):  # one image per call: Quantus normalises by the batch's max
        xi, yi = x[i:i + 1], y[i:i + 1]
        q = quantus.AvgSensitivity(nr_samples=5, perturb_func=_injected(noise[:, i:i + 1], xi.shape),
                                   normalise=normalise, abs=False, disable_warnings=True)
        expected += q(model=setup["model"], x_batch=xi.numpy(), y_batch=yi.numpy(),
                      a_batch=e.attribute(xi, yi).numpy(), explain_func=_explain_fn(e), device="cpu")
    np.testing.assert_allclose(metric.per_sample().numpy(), expected, rtol=RTOL)
    # and it is the mean, where MaxSensitivity is the max, of the same ratios
    mx = rq.MaxSensitivity(setup["model"], n=5, normalise=normalise)
    mx.update(x, e.attribute(x, y), y, e, noise=noise)
    assert bool((mx.per_sample() >= metric.per_sample()).all())


_RELATIVE = [(RelativeInputStability, "RelativeInputStability", {}, {}),
             (RelativeOutputStability, "RelativeOutputStability", {}, {}),
             (RelativeRepresentationStability, "RelativeRepresentationStability", {"layer": LAYER},
              {"layer_names": [LAYER]})]


@pytest.mark.parametrize(("ours", "theirs", "kw", "qkw"), _RELATIVE)
def test_relative_stability_parity_with_quantus_on_identical_noise(setup: dict, ours: type, theirs: str,
                                                                   kw: dict, qkw: dict) -> None:
    quantus = pytest.importorskip("quantus")
    x, y, e = setup["x"], setup["y"], setup["saliency"]
    attr = e.attribute(x, y)
    metric = ours(setup["model"], n=4, return_nan_when_prediction_changes=False, internal_batch_size=5, **kw)
    noise = metric.noise(x)
    assert float(noise.min()) >= 0.02 and float(noise.max()) <= 0.2  # Quantus' U(0.02, 0.2)
    metric.update(x, attr, y, e, noise=noise)
    q = getattr(quantus, theirs)(nr_samples=4, perturb_func=_injected(noise, x.shape),
                                 return_nan_when_prediction_changes=False, disable_warnings=True, **qkw)
    expected = q(model=setup["model"], x_batch=x.numpy(), y_batch=y.numpy(), a_batch=attr.numpy(),
                 explain_func=_explain_fn(e), device="cpu")
    np.testing.assert_allclose(metric.per_sample().numpy(), expected, rtol=RTOL)


def test_continuity_parity_with_quantus(setup: dict) -> None:
    quantus = pytest.importorskip("quantus")
    x, y, e = setup["x"], setup["y"], setup["saliency"]
    metric = Continuity(setup["model"], internal_batch_size=20)  # 28 steps × 3 images in 5 chunks
    metric.update(x, e.attribute(x, y), y, e)
    expected = []
    for i in range(x.shape[0]):  # one image per call: Quantus normalises by the batch's max
        xi, yi = x[i:i + 1], y[i:i + 1]
        q = quantus.Continuity(disable_warnings=True)
        expected += list(q(model=setup["model"], x_batch=xi.numpy(), y_batch=yi.numpy(),
                           a_batch=e.attribute(xi, yi).numpy(), explain_func=_explain_fn(e), device="cpu"))
    np.testing.assert_allclose(metric.per_sample().numpy(), expected, rtol=RTOL)


def test_translate_matches_quantus_batched_translation() -> None:
    quantus = pytest.importorskip("quantus")
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    for t in (-7, -3, 0, 2, 6):
        ours = translate(x, torch.full((2,), t))
        theirs = quantus.functions.perturb_func.batched_translation(x.numpy(), "black", t, direction="x")
        np.testing.assert_array_equal(ours.numpy(), theirs)


def _consistency_data(n: int = 12) -> tuple[nn.Module, Tensor, Tensor]:
    """A linear model, images it predicts varied classes for, and maps in 3 groups sharing their
    top pixels (so labels repeat)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, 16, 16, generator=g) * 3
    patterns = torch.randn(3, 16, 16, generator=g) * 10
    attr = patterns[torch.arange(n) % 3] + torch.randn(n, 16, 16, generator=g) * 0.01
    attr[::4] = -attr[::4]  # a sign flip, visible with abs=False
    return model, x, attr


def _top_n(n: int, use_abs: bool) -> Any:
    def discretise(a: np.ndarray, **_: object) -> int:
        v = np.abs(a) if use_abs else a
        idx = np.sort(np.argsort(-np.abs(v), kind="stable")[:n])
        return int(hashlib.md5(np.concatenate([idx, np.sign(v[idx])]).tobytes()).hexdigest(), 16)
    return discretise


@pytest.mark.parametrize(("discretise", "use_abs"), [("top_n", True), ("top_n", False), ("first_n_sign", True),
                                                     ("first_n_sign", False)])
def test_consistency_parity_with_quantus(discretise: str, use_abs: bool) -> None:
    quantus = pytest.importorskip("quantus")
    model, x, attr = _consistency_data()
    metric = Consistency(model, discretise=discretise, abs=use_abs)
    for i in range(0, 12, 5):  # pooled over updates: batching does not matter
        metric.update(x[i:i + 5], attr[i:i + 5])
    qkw = {} if discretise == "first_n_sign" else {"discretise_func": _top_n(5, use_abs)}
    q = quantus.Consistency(abs=use_abs, disable_warnings=True, **qkw)
    expected = q(model=model, x_batch=x.numpy(), y_batch=np.zeros(12, dtype=int), a_batch=attr.numpy(),
                 device="cpu", batch_size=64)
    np.testing.assert_allclose(metric.per_sample().numpy(), expected, rtol=RTOL)
    assert float(metric.compute()) == pytest.approx(float(np.mean(expected)), rel=RTOL)
    assert len(set(model(x).argmax(-1).tolist())) == 3  # not a trivial 1.0 everywhere
    if discretise == "top_n":  # 3 groups (6 with the sign flips seen)
        assert len(torch.unique(metric.labels(attr), dim=0)) == (3 if use_abs else 6)


# -- known answers and behaviour ---------------------------------------------------------------
def test_relative_stability_drops_copies_whose_prediction_flips(setup: dict) -> None:
    """Per image: the max over the copies that keep the predicted class (NaN if none do); checked
    against the same metric run copy by copy with nothing dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)).eval()  # predictions move with the noise
    x, y, e = setup["x"], setup["y"], create("saliency", model)
    attr = e.attribute(x, y)
    metric = RelativeOutputStability(model, n=6)
    noise = torch.randn(6, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 3  # big: some flip
    metric.update(x, attr, y, e, noise=noise)
    per_copy = []
    with torch.no_grad():
        keep = model(x[None].add(noise).flatten(0, 1)).argmax(-1).view(6, 3) == model(x).argmax(-1)
    for j in range(6):
        one = RelativeOutputStability(model, n=1, return_nan_when_prediction_changes=False)
        one.update(x, attr, y, e, noise=noise[j:j + 1])
        per_copy.append(one.per_sample())
    ratios = torch.stack(per_copy).masked_fill(~keep, float("nan"))
    assert 0 < int(keep.sum()) < keep.numel(), "the test needs some flipped copies"
    expected = torch.stack([r[~r.isnan()].max() if (~r.isnan()).any() else r[0] for r in ratios.T])
    torch.testing.assert_close(metric.per_sample(), expected, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("cls", [AvgSensitivity, RelativeInputStability])
def test_seeded_reproducible_batch_independent_and_global_rng_untouched(setup: dict, cls: type) -> None:
    x, y, e = setup["x"], setup["y"], setup["saliency"]
    attr = e.attribute(x, y)
    rng = torch.get_rng_state()
    a, b, one = cls(setup["model"], n=3), cls(setup["model"], n=3), cls(setup["model"], n=3)
    a.update(x, attr, y, e)
    b.update(x, attr, y, e)
    one.update(x[1:2], attr[1:2], y[1:2], e)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(a.per_sample(), b.per_sample())
    assert float(one.per_sample()[0]) == pytest.approx(float(a.per_sample()[1]), rel=1e-5)


def test_explanations_are_batched_one_call_per_chunk(setup: dict) -> None:
    x, y, e = setup["x"], setup["y"], setup["saliency"]
    calls: list[int] = []

    class Counting(type(e)):
        def _attribute(self, x: Tensor, target: object) -> Tensor:
            calls.append(x.shape[0])
            return super()._attribute(x, target)

    counting = Counting(setup["model"])
    for metric, expected in ((RelativeInputStability(setup["model"], n=5, internal_batch_size=8), [8, 7]),
                             (Continuity(setup["model"], nr_steps=4, internal_batch_size=64), [12])):
        calls.clear()
        metric.update(x, e.attribute(x, y), y, counting)
        assert calls == expected


def test_continuity_of_a_constant_map_is_zero_and_update_metric_works(setup: dict) -> None:
    from xaudit.explainers.base import Explainer

    class Constant(Explainer):
        name = "constant"

        def _attribute(self, x: Tensor, target: object) -> Tensor:
            return torch.ones(x.shape[0], *x.shape[2:])

    x, y = setup["x"], setup["y"]
    explainer = Constant(setup["model"])
    for name in ("continuity", "avg_sensitivity"):
        m = create_metric(name, model=setup["model"], **({"n": 2} if name == "avg_sensitivity" else {}))
        update_metric(m, x=x, attr=explainer.attribute(x, y), target=y, explainer=explainer)
        assert m.per_sample().tolist() == [0.0, 0.0, 0.0]


def test_registered_names_and_card_attributes() -> None:
    names = {"avg_sensitivity": AvgSensitivity, "consistency": Consistency, "continuity": Continuity,
             "relative_input_stability": RelativeInputStability, "relative_output_stability": RelativeOutputStability,
             "relative_representation_stability": RelativeRepresentationStability}
    assert set(names) <= set(metric_names())
    for cls in names.values():
        assert cls.family == "robustness" and cls.paper and cls.measures
    assert Consistency.higher_is_better and not Continuity.higher_is_better
    assert not RelativeInputStability.higher_is_better


# -- errors ----------------------------------------------------------------------------------
def test_unknown_layer_lists_the_layers(setup: dict) -> None:
    with pytest.raises(ValueError, match=r"(?s)nope.*features\.block3\.0"):
        RelativeRepresentationStability(setup["model"], layer="nope")
    assert RelativeRepresentationStability(setup["model"]).layer == "features.block5"  # the backbone's default


@pytest.mark.parametrize(("name", "kw", "match"), [
    ("relative_input_stability", {"lower_bound": 0.3, "upper_bound": 0.2}, r"upper_bound=0\.2 must be larger"),
    ("relative_output_stability", {"lower_bound": -1.0}, r"lower_bound=-1\.0 must be a number > 0"),
    ("relative_input_stability", {"return_nan_when_prediction_changes": "yes"}, r"must be true or false"),
    ("avg_sensitivity", {"radius": 0}, r"radius=0 must be a number > 0"),
    ("consistency", {"discretise": "hash"}, r"top_n"),
    ("continuity", {"nr_steps": 0}, r"nr_steps=0 must be an integer"),
    ("continuity", {"normalise": 1}, r"normalise=1 must be true or false"),
])
def test_bad_options_are_refused(setup: dict, name: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_metric(name, model=setup["model"], **kw)


@pytest.mark.parametrize("cls", [AvgSensitivity, Consistency, Continuity, RelativeInputStability])
def test_a_model_is_required(cls: type) -> None:
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module; got NoneType"):
        cls(None)


def test_bad_update_inputs_name_the_fix(setup: dict) -> None:
    x, y, e, model = setup["x"], setup["y"], setup["saliency"], setup["model"]
    attr = e.attribute(x, y)
    with pytest.raises(ValueError, match=r"needs the explainer that produced attr"):
        RelativeInputStability(model, n=1).update(x, attr, y, None)
    with pytest.raises(ValueError, match=r"attribution shape \[3, 16, 16\] does not match"):
        Continuity(model).update(x, attr[:, :16, :16], y, e)
    with pytest.raises(ValueError, match=r"target must be a long tensor"):
        RelativeOutputStability(model, n=1).update(x, attr, y.float(), e)
    with pytest.raises(ValueError, match=r"noise must be \[n,B,C,H,W\]"):
        RelativeInputStability(model, n=1).update(x, attr, y, e, noise=torch.zeros(3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"nr_steps=100 exceeds 2·W\+1=65"):
        Continuity(model, nr_steps=100).update(x, attr, y, e)
    with pytest.raises(ValueError, match=r"n=2000 exceeds the 1024 values"):
        Consistency(model, n=2000).update(x, attr)
    with pytest.raises(ValueError, match=r"images x must be a float tensor"):
        Consistency(model).update(x[0], attr)


# -- DDP -------------------------------------------------------------------------------------
class FamilyProbe(pl.LightningModule):
    """Updates every metric of this module in ``test_step``; rank 0 saves values and sample ids."""

    def __init__(self, state: dict[str, Tensor], out: str) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", num_classes=4, width=8)
        self.net.load_state_dict(state)
        self.net.eval()
        self.out = out
        self.metrics = nn.ModuleDict({
            "avg_sensitivity": AvgSensitivity(self.net, n=2, seed=2),
            "consistency": Consistency(self.net, n=3),
            "continuity": Continuity(self.net, nr_steps=5),
            "ris": RelativeInputStability(self.net, n=2, seed=2),
            "ros": RelativeOutputStability(self.net, n=2, seed=2),
            "rrs": RelativeRepresentationStability(self.net, layer="features.block4", n=2, seed=2),
        })
        self.index = CatMetric()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        explainer = create("saliency", self.net)
        attr = explainer.attribute(x, y)
        for metric in self.metrics.values():
            update_metric(metric, x=x, attr=attr, target=y, explainer=explainer)
        self.index.update(batch["index"])

    def on_test_epoch_end(self) -> None:
        result: dict[str, Any] = {"index": self.index.compute().long()}
        for name, metric in self.metrics.items():
            result[name] = {"mean": metric.compute(), "per_sample": metric.per_sample()}
        if self.trainer.is_global_zero:
            torch.save(result, self.out)


def _run(state: dict[str, Tensor], out: Path, devices: int) -> dict[str, Any]:
    extra = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **extra)
    dm = ShapesDataModule(n_train=8, n_val=8, n_test=16, eval_batch_size=4, seed=3)  # ranks get 8 each
    trainer.test(FamilyProbe(state, str(out)), datamodule=dm, verbose=False)
    return torch.load(out, weights_only=False)


@pytest.mark.ddp
def test_two_processes_equal_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = build_backbone("small_cnn", num_classes=4, width=8).state_dict()
    one = _run(state, tmp_path / "one.pt", devices=1)
    two = _run(state, tmp_path / "two.pt", devices=2)
    assert one["index"].tolist() == list(range(16)) and sorted(two["index"].tolist()) == list(range(16))
    for name in ("avg_sensitivity", "consistency", "continuity", "ris", "ros", "rrs"):
        a, b = one[name], two[name]
        assert a["per_sample"].shape == b["per_sample"].shape == (16,), name
        assert torch.isfinite(a["mean"]), name
        torch.testing.assert_close(b["per_sample"][two["index"].argsort()], a["per_sample"], rtol=1e-4, atol=1e-5,
                                   equal_nan=True, msg=name)
        torch.testing.assert_close(b["mean"], a["mean"], rtol=1e-4, atol=1e-5, msg=name)


# -- the caller's model is left as it was ----------------------------------------------------------
@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("name", ["avg_sensitivity", "consistency", "continuity", "relative_input_stability",
                                  "relative_output_stability", "relative_representation_stability"])
def test_caller_model_is_left_exactly_as_it_was(tiny_cnn: nn.Module, name: str, inference: bool) -> None:
    model = tiny_cnn.train()  # train mode: a naive metric would update BatchNorm's running stats
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    needs_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 1, 2])
    explainer = create("saliency", model)
    attr = explainer.attribute(x, y)
    kw = {"nr_steps": 4} if name == "continuity" else {"n": 2} if name != "consistency" else {}
    metric = create_metric(name, model=model, **kw)
    with torch.inference_mode(inference):
        update_metric(metric, x=x, attr=attr, target=y, explainer=explainer)
        value = metric.compute()
    assert torch.isfinite(value)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == needs_grad
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
