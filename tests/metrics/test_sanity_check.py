"""SanityCheck: similarities vs scipy/skimage, randomisation parity with Quantus' MPRT, safety."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import scipy.stats
import skimage.metrics
import torch

from xaudit.explainers import create
from xaudit.metrics import SanityCheck, spearman, ssim
from xaudit.metrics.randomisation import parameter_layers, randomise_
from xaudit.utils.errors import ConfigError


def test_spearman_matches_scipy_including_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=g).double()  # many ties
    b = torch.randint(0, 7, (6, 40), generator=g).double()
    b[0] = a[0] * 2 + 1  # monotone: exactly 1
    ours = spearman(a, b)
    ref = [scipy.stats.spearmanr(a[i], b[i])[0] for i in range(6)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)
    assert float(ours[0]) == pytest.approx(1.0)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None]))[0]  # constant: undefined


def test_ssim_matches_skimage():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 20, 17, generator=g)
    b = 0.7 * a + 0.3 * torch.rand(4, 20, 17, generator=g)
    b[3] = a[3]
    ours = ssim(a, b)
    for i in range(4):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        data_range = max(x.max(), y.max()) - min(x.min(), y.min())  # per pair, as Quantus does
        ref = skimage.metrics.structural_similarity(x, y, data_range=data_range)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)
    assert float(ours[3]) == pytest.approx(1.0)


def saliency_for_quantus(model, inputs, targets, **kwargs):
    """Quantus' explain_func: xaudit's saliency, so only the randomisation and comparison differ."""
    x, t = torch.as_tensor(inputs), torch.as_tensor(targets).long()
    return create("saliency", model).attribute(x, t).numpy()


@pytest.mark.parametrize(("mode", "order"), [("cascading", "top_down"), ("independent", "independent")])
def test_parity_with_quantus_mprt(trained_shapes, mode, order):
    """Same layers, same random weights, same Spearman values as Quantus' MPRT, layer by layer.

    Our layer draws from a generator seeded with ``seed``; Quantus seeds the global RNG with
    ``seed + 1`` before each layer's ``reset_parameters`` — so ``MPRT(seed=4)`` = ``seed=5`` here.
    Tolerance 1e-6: both rank the same float32 maps; only the float64 correlation arithmetic differs.
    """
    net, x, y = trained_shapes.net, trained_shapes.x[:6], trained_shapes.label[:6]
    attr = create("saliency", net).attribute(x, y)
    ours = SanityCheck(net, explainer="saliency", mode=mode, seed=5)
    ours.update(x, attr, y)
    with torch.random.fork_rng():  # Quantus re-seeds the global RNG
        mprt = quantus.MPRT(layer_order=order, seed=4, similarity_func=quantus.similarity_func.correlation_spearman,
                            abs=True, normalise=False, disable_warnings=True)
        ref = mprt(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=attr.numpy(), device="cpu",
                   explain_func=saliency_for_quantus, batch_size=6)
    # Quantus walks "independent" input-first; we always list top-down: compare by layer name
    assert ours.layers == parameter_layers(net)[::-1]
    assert sorted(ours.layers) == sorted(k for k in ref if k != "original")
    scores = ours.layer_scores("spearman").numpy()
    np.testing.assert_allclose(scores, np.stack([ref[k] for k in ours.layers], axis=1), rtol=0, atol=1e-6)
    # the saliency map of a trained model does change once the weights are random
    assert float(scores[:, -1].mean()) < 0.5


def test_randomise_matches_reset_parameters_with_the_same_seed(trained_shapes):
    net = trained_shapes.net
    mine = type(net)(num_classes=4, width=16)
    mine.load_state_dict(net.state_dict())
    ref = type(net)(num_classes=4, width=16)
    ref.load_state_dict(net.state_dict())
    randomise_(mine.features.block5, seed=11)
    with torch.random.fork_rng():
        for m in ref.features.block5.modules():
            if hasattr(m, "reset_parameters"):
                torch.manual_seed(11)
                m.reset_parameters()
    for (k, v), (_, w) in zip(mine.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k
    assert not torch.equal(mine.features.block5[0].weight, net.features.block5[0].weight)


def test_model_independent_map_fails_and_caller_model_is_untouched(trained_shapes):
    net, x, y = trained_shapes.net, trained_shapes.x[:4], trained_shapes.label[:4]
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    try:
        sobel = create("sobel", net).attribute(x, y)
        m = SanityCheck(net, explainer="sobel", layers=["fc", "features.block5", "features"], similarity="ssim")
        with torch.inference_mode():  # as in Lightning's test loop
            m.update(x, sobel, y)
            value = m.compute()
        assert all(mod.training for mod in net.modules())
    finally:
        net.eval()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)
    # an edge detector ignores the model: identical maps after every randomisation step
    assert float(value) == pytest.approx(1.0, abs=1e-9)
    assert list(m.per_layer("spearman")) == ["fc", "features.block5", "features"]
    assert m.layer_scores("spearman").shape == (4, 3) and SanityCheck.higher_is_better is False


def test_bad_layer_and_explainer_names(tiny_cnn):
    with pytest.raises(ConfigError, match=r"Unknown layer 'features\.blok5'.*features\.block5"):
        SanityCheck(tiny_cnn, layers=["features.blok5"])
    with pytest.raises(ConfigError, match=r"Unknown explainer 'gradcam'.*grad_cam"):
        SanityCheck(tiny_cnn, explainer="gradcam")
    with pytest.raises(ConfigError, match=r"Unknown mode 'cascade'.*cascading"):
        SanityCheck(tiny_cnn, mode="cascade")


def test_maps_smaller_than_the_ssim_window(linear_scorer):
    model = linear_scorer(torch.arange(1.0, 17.0))  # 1x4x4 inputs: too small for 7x7 SSIM windows
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 0])  # class 1 is a constant: a zero map
    attr = create("saliency", model).attribute(x, y)
    m = SanityCheck(model, explainer="saliency", similarity="spearman")
    m.update(x, attr, y)
    assert m.layer_scores("ssim").isnan().all() and not m.layer_scores("spearman").isnan().any()
    with pytest.raises(ValueError, match="similarity='ssim' needs maps of at least 7x7 pixels"):
        SanityCheck(model, explainer="saliency", similarity="ssim").update(x, attr, y)


def test_evaluate_re_explains_with_the_method_it_evaluates() -> None:
    """Inside evaluate, sanity_check compares the evaluated method's map with the *same* method's
    map on the randomised model; an explainer named in its spec is kept."""
    from xaudit.metrics.evaluator import ExplainerEvaluation
    from xaudit.models.backbones import build_backbone

    torch.manual_seed(0)
    net = build_backbone("small_cnn", num_classes=3, width=4).eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    spec = {"name": "sanity_check", "layers": ["fc"], "similarity": "spearman"}
    ev = ExplainerEvaluation(net, "grad_cam", {}, {"own": spec, "named": {**spec, "explainer": "saliency"}})
    assert ev.metrics["own"].explainer == "grad_cam" and ev.metrics["named"].explainer == "saliency"
    ev.test_step({"image": x, "label": y}, 0)
    direct = SanityCheck(net, explainer="grad_cam", layers=["fc"])
    direct.update(x, create("grad_cam", net).attribute(x, y), y)
    torch.testing.assert_close(ev.metrics["own"].compute(), direct.compute())
    # grad_cam's map against saliency's on the randomised model: the mismatch evaluate used to report
    assert not torch.allclose(ev.metrics["named"].compute(), direct.compute())
