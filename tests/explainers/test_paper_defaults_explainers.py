"""The published protocols' defaults, pinned (issue 26).

LIME = the lime package's ``LimeImageExplainer().explain_instance`` (lime 0.2.0.1); SmoothGrad,
SmoothGrad² and VarGrad = Hooker et al. (2019, ROAR) on signed gradients with the PAIR saliency
library's ``GetSmoothedMask`` defaults that ROAR's code calls. Our defaults are read from the
signatures; where the lime package is installed its own defaults are read from it too, so a
drift on either side fails here. Behavioural parity lives in test_surrogate.py and
test_smoothgrad.py.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import pairwise_distances

from xaudit.explainers import Lime, Saliency, SmoothGrad, create
from xaudit.explainers.surrogate import _lime_kernel

#: lime 0.2.0.1's image defaults, from lime/lime_image.py and lime/lime_base.py
LIME_PACKAGE: dict[str, Any] = {
    "kernel_width": 0.25,  # LimeImageExplainer.__init__(kernel_width=.25), kernel √exp(−d²/w²)
    "num_samples": 1000,  # explain_instance(num_samples=1000), data[0, :] = 1 first
    "hide_color": None,  # explain_instance(hide_color=None): each superpixel's mean colour
    "distance_metric": "cosine",  # explain_instance(distance_metric='cosine') on the binary samples
    "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2},  # SegmentationAlgorithm('quickshift', ...)
    "ridge_alpha": 1,  # LimeBase: Ridge(alpha=1, fit_intercept=True); labels = classifier_fn's probabilities
}
#: PAIR saliency's GetSmoothedMask(stdev_spread=.15, nsamples=25), called with its defaults by ROAR's code
PAIR_SMOOTHGRAD: dict[str, Any] = {"stdev_spread": 0.15, "nsamples": 25}


def _defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_lime_defaults_are_the_lime_packages() -> None:
    d = _defaults(Lime)
    assert d["n_samples"] == LIME_PACKAGE["num_samples"]
    assert d["kernel_width"] == LIME_PACKAGE["kernel_width"]
    assert d["segmentation"] == "quickshift"
    assert {k: d[k] for k in ("kernel_size", "max_dist", "ratio")} == LIME_PACKAGE["quickshift"]
    assert LIME_PACKAGE["hide_color"] is None and d["baseline"] == "segment_mean"
    assert LIME_PACKAGE["distance_metric"] == "cosine" and d["distance"] == "interpretable"
    assert d["alpha"] == LIME_PACKAGE["ridge_alpha"]
    assert d["score"] == "prob"  # lime regresses classifier_fn's output: predict-proba values
    built = create("lime", torch.nn.Conv2d(3, 1, 1))
    assert (built.n_samples, built.segmentation, built.baseline, built.score) == (1000, "quickshift", "segment_mean",
                                                                                 "prob")


def test_lime_weights_are_lime_kernel_on_sklearn_cosine_distance() -> None:
    """Our sample weights = lime's √exp(−d²/w²) of sklearn's cosine distance to the all-ones row
    (the empty coalition included: distance 1); the first row is all ones and the others are
    Bernoulli(1/2) like ``randint(0, 2)``. Weights to 1e-12; the Bernoulli mean within 0.01
    (±4.5σ of 100 000 entries)."""
    lime = create("lime", torch.nn.Conv2d(3, 1, 1))
    z, w = lime.coalitions(3, torch.Generator().manual_seed(0))  # 3 superpixels: empty rows occur
    assert z.shape == (1000, 3) and torch.equal(z[0], torch.ones(3, dtype=torch.float64))
    assert bool((z.sum(1) == 0).any())
    d = pairwise_distances(z.numpy(), z[0].numpy().reshape(1, -1), metric="cosine").ravel()
    width = LIME_PACKAGE["kernel_width"]
    np.testing.assert_allclose(w.numpy(), np.sqrt(np.exp(-(d ** 2) / width ** 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_lime_kernel(torch.tensor(d), width),
                               torch.from_numpy(np.sqrt(np.exp(-(d ** 2) / width ** 2))),
                               rtol=1e-12, atol=1e-12)
    big, _ = create("lime", torch.nn.Conv2d(3, 1, 1), n_samples=2001).coalitions(50, torch.Generator().manual_seed(1))
    assert abs(float(big[1:].mean()) - 0.5) < 0.01


def test_lime_package_defaults_are_still_these() -> None:
    """Read the installed lime's defaults (skipped where lime is not installed)."""
    lime_image = pytest.importorskip("lime.lime_image")
    lime_base = pytest.importorskip("lime.lime_base")
    init = inspect.signature(lime_image.LimeImageExplainer.__init__).parameters
    explain = inspect.signature(lime_image.LimeImageExplainer.explain_instance).parameters
    assert float(init["kernel_width"].default) == LIME_PACKAGE["kernel_width"]
    assert init["kernel"].default is None
    assert explain["num_samples"].default == LIME_PACKAGE["num_samples"]
    assert explain["hide_color"].default is LIME_PACKAGE["hide_color"]
    assert explain["distance_metric"].default == LIME_PACKAGE["distance_metric"]
    assert explain["segmentation_fn"].default is None and explain["model_regressor"].default is None
    source = inspect.getsource(lime_image.LimeImageExplainer)
    qs = re.search(r"SegmentationAlgorithm\(\s*'quickshift',\s*kernel_size=([\d.]+),\s*max_dist=([\d.]+),"
                   r"\s*ratio=([\d.]+)", source)
    assert qs is not None, "lime's default segmentation is no longer quickshift"
    assert dict(zip(("kernel_size", "max_dist", "ratio"), map(float, qs.groups()))) == LIME_PACKAGE["quickshift"]
    assert "np.sqrt(np.exp(-(d ** 2) / kernel_width ** 2))" in source
    assert "randint(0, 2, num_samples * n_features)" in source and "data[0, :] = 1" in source
    # the final surrogate (model_regressor=None); the Ridge(alpha=0 / 0.01) fits above it only select features
    ridge = re.search(r"model_regressor = Ridge\(alpha=([\d.]+), fit_intercept=True",
                      inspect.getsource(lime_base.LimeBase))
    assert ridge is not None and float(ridge.group(1)) == LIME_PACKAGE["ridge_alpha"]


def test_smoothgrad_defaults_are_hookers_on_signed_gradients() -> None:
    """Default base: the signed raw gradient (Hooker et al., 2019), the per-channel aggregate
    reduced by the channel sum; n and sigma are the PAIR library's GetSmoothedMask defaults
    (σ relative to the image's max − min, as ours). The earlier |∂y/∂x| base stays ``base="saliency"``."""
    d = _defaults(SmoothGrad)
    assert d["base"] == "gradient" and d["variant"] == "sg"
    assert d["n"] == PAIR_SMOOTHGRAD["nsamples"] and d["sigma"] == PAIR_SMOOTHGRAD["stdev_spread"]
    net = torch.nn.Conv2d(3, 1, 1)
    for variant in ("sg", "sg2", "vargrad"):
        sg = create("smoothgrad", net, variant=variant)
        assert isinstance(sg.base, Saliency) and sg.base.abs is False and sg.default_reduce == "sum"
    old = create("smoothgrad", net, base="saliency")
    assert old.base.abs is True and old.default_reduce == "max_abs"
