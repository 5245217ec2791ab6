"""MaxSensitivity and LocalLipschitz: parity with Quantus on identical noise, known answers, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from xaudit.explainers import create
from xaudit.explainers.base import Explainer
from xaudit.metrics import LocalLipschitz, MaxSensitivity, create_metric
from xaudit.models.backbones import build_backbone

# float32 maps computed by the same explainer on the same inputs; Quantus does its norms in float64
# numpy, xaudit in float32 torch: agreement to float32 rounding
RTOL = 1e-5


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 4, width=8).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"model": model, "x": x, "y": torch.tensor([0, 1, 2]), "saliency": create("saliency", model)}


def _quantus(metric_cls: type, setup: dict, noise: Tensor, normalise: bool, **kw: object) -> np.ndarray:
    """Quantus' scores, one image per call: its ``normalise_by_max`` takes the max over the whole
    batch, xaudit's over each image, and the two agree on a batch of one."""
    quantus = pytest.importorskip("quantus")
    explainer, scores = setup["saliency"], []
    for i in range(setup["x"].shape[0]):
        x, y = setup["x"][i:i + 1], setup["y"][i:i + 1]
        draws = iter(noise[:, i:i + 1])

        def perturb(arr: np.ndarray, indices: object, x: Tensor = x, draws: object = draws, **_: object) -> np.ndarray:
            return (torch.from_numpy(arr).view_as(x) + next(draws)).reshape(arr.shape).numpy()

        def explain(model: object, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
            return explainer.attribute(torch.from_numpy(inputs).float(), torch.from_numpy(targets).long()).numpy()

        metric = getattr(quantus, metric_cls)(nr_samples=noise.shape[0], perturb_func=perturb, normalise=normalise,
                                               abs=False, disable_warnings=True, **kw)
        scores += metric(model=setup["model"], x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=explain(None, x.numpy(), y.numpy()), explain_func=explain, device="cpu")
    return np.asarray(scores)


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize(("ours", "theirs", "kw"), [(MaxSensitivity, "MaxSensitivity", {"radius": 0.1}),
                                                   (LocalLipschitz, "LocalLipschitzEstimate", {"sigma": 0.1})])
def test_parity_with_quantus_on_identical_noise(setup: dict, ours: type, theirs: str, kw: dict,
                                                normalise: bool) -> None:
    metric = ours(setup["model"], n=5, normalise=normalise, **kw)
    noise = metric.noise(setup["x"])
    attr = setup["saliency"].attribute(setup["x"], setup["y"])
    metric.update(setup["x"], attr, setup["y"], setup["saliency"], noise=noise)
    expected = _quantus(theirs, setup, noise, normalise)
    np.testing.assert_allclose(metric.per_sample().numpy(), expected, rtol=RTOL)
    assert float(metric.compute()) == pytest.approx(float(expected.mean()), rel=RTOL)


def test_local_lipschitz_normalises_by_default_so_a_map_s_scale_does_not_matter(setup: dict) -> None:
    """A gradient map and the same map ×1000 are equally robust; unnormalised, the ratio scales."""
    x, y, e = setup["x"], setup["y"], setup["saliency"]

    class Scaled(type(e)):
        def _attribute(self, x: Tensor, target: object) -> Tensor:
            return super()._attribute(x, target) * 1000.0

    scaled = Scaled(setup["model"])
    assert LocalLipschitz(setup["model"]).normalise and not MaxSensitivity(setup["model"]).normalise
    values = {}
    for normalise in (True, False):
        for name, explainer in (("saliency", e), ("scaled", scaled)):
            m = LocalLipschitz(setup["model"], n=3, normalise=normalise)
            m.update(x, explainer.attribute(x, y), y, explainer)
            values[name, normalise] = m.per_sample()
    torch.testing.assert_close(values["scaled", True], values["saliency", True], rtol=1e-4, atol=0)
    torch.testing.assert_close(values["scaled", False], values["saliency", False] * 1000, rtol=1e-4, atol=0)


def test_normalise_must_be_a_bool(setup: dict) -> None:
    with pytest.raises(ValueError, match=r"normalise='yes' must be true or false"):
        create_metric("local_lipschitz", model=setup["model"], normalise="yes")


class Constant(Explainer):
    name = "constant"

    def _attribute(self, x: Tensor, target: object) -> Tensor:
        return torch.ones(x.shape[0], *x.shape[2:])


@pytest.mark.parametrize("cls", [MaxSensitivity, LocalLipschitz])
def test_a_constant_map_is_perfectly_robust(setup: dict, cls: type) -> None:
    explainer = Constant(setup["model"])
    metric = cls(setup["model"], n=4)
    metric.update(setup["x"], explainer.attribute(setup["x"], setup["y"]), setup["y"], explainer)
    assert metric.per_sample().tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("cls", [MaxSensitivity, LocalLipschitz])
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


@pytest.mark.parametrize(("name", "key"), [("max_sensitivity", "radius"), ("local_lipschitz", "sigma")])
@pytest.mark.parametrize("value", [0, -0.1])
def test_noise_scale_must_be_positive(setup: dict, name: str, key: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{key}={value!r} must be a number > 0"):
        create_metric(name, model=setup["model"], **{key: value})


def test_saliency_is_more_sensitive_than_smoothgrad_on_a_trained_cnn(trained_shapes: object) -> None:
    """The published ordering (Yeh et al., 2019): smoothing the gradient lowers max-sensitivity."""
    model, x, y = trained_shapes.net, trained_shapes.x[:16], trained_shapes.label[:16]
    scores = {}
    for method, kw in (("saliency", {}), ("smoothgrad", {"n": 16, "sigma": 0.15})):
        e = create(method, model, **kw)
        m = MaxSensitivity(model, radius=0.1, n=5)
        m.update(x, e.attribute(x, y), y, e)
        scores[method] = float(m.compute())
    print(scores)
    assert scores["saliency"] > scores["smoothgrad"]


def test_update_metric_passes_the_explainer(setup: dict) -> None:
    from xaudit.metrics import update_metric

    x, y, e = setup["x"], setup["y"], setup["saliency"]
    m = create_metric("max_sensitivity", model=setup["model"], n=2)
    update_metric(m, x=x, attr=e.attribute(x, y), target=y, mask=None, explainer=e)
    assert m.per_sample().shape == (3,) and float(m.compute()) > 0
