"""DeletionInsertion: closed-form curves on a linear model, parity with Quantus pixel-flipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import quantus
import torch

from xaudit.metrics import DeletionInsertion, make_substrate


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def trapezoid(ys: list[float], xs: list[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(ys) - 1))


def test_linear_model_curves_have_the_closed_form(linear_scorer):
    # logit of class 0 = sum of the pixels, so removing pixels subtracts their values exactly
    model = linear_scorer(torch.ones(4))
    x = torch.tensor([0.4, 0.3, 0.2, 0.1]).view(1, 1, 2, 2)
    attr = x[:, 0].clone()
    target = torch.tensor([0])
    deletion = DeletionInsertion(model, mode="deletion", steps=4)
    insertion = DeletionInsertion(model, mode="insertion", steps=4, substrate="zero")
    deletion.update(x, attr, target)
    insertion.update(x, attr, target)
    del_logits = [1.0, 0.6, 0.3, 0.1, 0.0]
    ins_logits = [0.0, 0.4, 0.7, 0.9, 1.0]
    del_curve = [sigmoid(v) for v in del_logits]
    ins_curve = [sigmoid(v) for v in ins_logits]
    fractions = [0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(deletion.curves()[0], torch.tensor(del_curve), rtol=0, atol=1e-6)
    torch.testing.assert_close(insertion.curves()[0], torch.tensor(ins_curve), rtol=0, atol=1e-6)
    assert float(deletion.compute()) == pytest.approx(trapezoid(del_curve, fractions), abs=1e-6)
    assert float(insertion.compute()) == pytest.approx(trapezoid(ins_curve, fractions), abs=1e-6)
    assert deletion.higher_is_better is False and insertion.higher_is_better is True


def test_uneven_chunks_and_per_sample_order(linear_scorer):
    # 3x3 = 9 pixels in 2 steps: 4 then 5 pixels; the AUC uses the true fractions 0, 4/9, 1
    w = torch.arange(1.0, 10.0) / 10
    model = linear_scorer(w)
    x = torch.ones(2, 1, 3, 3)
    attr = torch.stack([w.view(3, 3), -w.view(3, 3)])  # sample 1 ranks the pixels the other way round
    m = DeletionInsertion(model, mode="deletion", steps=2)
    m.update(x, attr, torch.tensor([0, 1]))
    total = float(w.sum())
    top4, bottom4 = float(w[-4:].sum()), float(w[:4].sum())
    p0 = [sigmoid(total), sigmoid(total - top4), sigmoid(0.0)]
    p1 = [1 - sigmoid(total), 1 - sigmoid(total - bottom4), 1 - sigmoid(0.0)]  # target 1: 1 − p(class 0)
    fractions = [0.0, 4 / 9, 1.0]
    torch.testing.assert_close(m.curves(), torch.tensor([p0, p1]), rtol=0, atol=1e-6)
    expected = [trapezoid(p0, fractions), trapezoid(p1, fractions)]
    torch.testing.assert_close(m.per_sample(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert float(m.compute()) == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_parity_with_quantus_pixel_flipping(trained_gray):
    """Our deletion curve after each step equals Quantus' PixelFlipping curve on the same inputs.

    Single-channel images, because Quantus counts channel values as features (and needs the step
    to divide H*W): 64 features per step = our 16 steps on 32x32 images. Its curve omits the
    unperturbed point, which is our curve[:, 0]. Tolerance 1e-5: float32 forwards of differently
    composed batches (Quantus: one step per batch; us: mixed chunks) differ by a few ulps.
    """
    net, x, y = trained_gray
    x, y = x[:12], y[:12]
    g = torch.Generator().manual_seed(1)
    attr = torch.rand(12, 32, 32, generator=g)  # distinct values: no tie-order ambiguity
    ours = DeletionInsertion(net, mode="deletion", steps=16, substrate="zero", internal_batch_size=100)
    ours.update(x, attr, y)
    pixel_flipping = quantus.PixelFlipping(features_in_step=64, perturb_baseline=0.0, normalise=False,
                                           abs=False, disable_warnings=True)
    ref = np.asarray(pixel_flipping(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=attr[:, None].numpy(),
                                    device="cpu", batch_size=12))
    curves = ours.curves()
    assert float(curves.std()) > 0.05  # the curves move: a meaningful comparison
    np.testing.assert_allclose(curves[:, 1:].numpy(), ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        p_x = net(x).softmax(-1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(curves[:, 0], p_x, rtol=0, atol=1e-5)
    # AUC over [0,1] of the full curve, computed independently with numpy (np.trapz is gone in numpy 2.4)
    full = np.concatenate([p_x.numpy()[:, None], ref], axis=1)
    auc = np.trapezoid(full, x=np.linspace(0, 1, 17), axis=1)
    np.testing.assert_allclose(ours.per_sample().numpy(), auc, rtol=0, atol=1e-5)


@pytest.mark.parametrize("substrate", ["zero", "blur", "mean"])
def test_curve_endpoints_are_image_and_substrate(tiny_cnn, substrate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    attr = torch.rand(3, 16, 16, generator=g)
    target = torch.tensor([0, 1, 2])
    with torch.no_grad():
        p_x = tiny_cnn(x).softmax(-1).gather(1, target[:, None])[:, 0]
        p_s = tiny_cnn(make_substrate(x, substrate)).softmax(-1).gather(1, target[:, None])[:, 0]
    deletion = DeletionInsertion(tiny_cnn, mode="deletion", steps=4, substrate=substrate)
    insertion = DeletionInsertion(tiny_cnn, mode="insertion", steps=4, substrate=substrate)
    deletion.update(x, attr, target)
    insertion.update(x, attr, target)
    torch.testing.assert_close(deletion.curves()[:, 0], p_x, rtol=0, atol=1e-5)
    torch.testing.assert_close(deletion.curves()[:, -1], p_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(insertion.curves()[:, 0], p_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(insertion.curves()[:, -1], p_x, rtol=0, atol=1e-5)
    assert not torch.allclose(p_x, p_s, atol=1e-3)  # the substrate really changes the prediction


def test_substrates_are_what_they_claim():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(make_substrate(x, "zero"), torch.zeros_like(x))
    torch.testing.assert_close(make_substrate(x, "mean"), x.mean((2, 3), keepdim=True).expand_as(x))
    blurred = make_substrate(x, "gaussian")  # xaudit's wide blur (σ = side/8), the pre-protocol-2 substrate
    assert blurred.shape == x.shape and blurred.std() < 0.5 * x.std()  # smooth, not a copy


def test_blur_substrate_is_rises_reference_blur_at_224_and_scales_with_the_side():
    """RISE's evaluation.py: kern = gkern(11, 5) (scipy gaussian_filter of a centred delta), applied
    per channel by conv2d(x, kern, padding=5) on the normalised image. Tolerance: float32 conv (1e-5)."""
    from scipy.ndimage import gaussian_filter

    from xaudit.explainers.fills import rise_kernel_size, rise_sigma

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kern = torch.zeros(3, 3, 11, 11, dtype=torch.float64)
    for c in range(3):
        kern[c, c] = torch.from_numpy(gaussian_filter(delta, 5))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.conv2d(x.double(), kern, padding=5).float()
    torch.testing.assert_close(make_substrate(x, "blur"), ref, rtol=0, atol=1e-5)
    # the scaling rule: σ = 5·side/224, kernel 2·round(σ)+1 (≥3)
    assert (rise_sigma(224, 224), rise_kernel_size(rise_sigma(224, 224))) == (5.0, 11)
    assert rise_sigma(32, 32) == pytest.approx(5 * 32 / 224) and rise_kernel_size(rise_sigma(32, 32)) == 3
    assert rise_sigma(448, 448) == 10.0 and rise_kernel_size(10.0) == 21


def test_chunking_batching_and_inference_mode_do_not_change_results(tiny_cnn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 16, 16, generator=g)
    attr = torch.randn(5, 16, 16, generator=g)
    target = torch.tensor([0, 1, 2, 3, 0])
    whole = DeletionInsertion(tiny_cnn, mode="insertion", steps=8, internal_batch_size=1000)
    whole.update(x, attr, target)
    chunked = DeletionInsertion(tiny_cnn, mode="insertion", steps=8, internal_batch_size=3)
    with torch.inference_mode():  # as in Lightning's test loop
        chunked.update(x[:2], attr[:2], target[:2])
        chunked.update(x[2:], attr[2:], target[2:])
        mean = chunked.compute()
    # tolerance: float32 conv results depend slightly on the batch size of the forward
    torch.testing.assert_close(chunked.curves(), whole.curves(), rtol=0, atol=1e-5)
    torch.testing.assert_close(mean, whole.compute(), rtol=0, atol=1e-5)
