"""FaithfulnessCorrelation: parity with Quantus on fixed subsets, seeded and sharding-independent."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import scipy.stats
import torch

from xaudit.metrics import FaithfulnessCorrelation, faithfulness_correlation


def quantus_subsets(seed: int, runs: int, batch: int, n_features: int, size: int) -> np.ndarray:
    """Replay the global-numpy draws Quantus makes after ``np.random.seed(seed)``: [B, runs, size]."""
    np.random.seed(seed)
    draws = [np.stack([np.random.choice(n_features, size, replace=False) for _ in range(batch)]) for _ in range(runs)]
    return np.stack(draws, axis=1)


@pytest.mark.parametrize("output", ["prob", "logit"])
def test_parity_with_quantus_on_fixed_subsets(trained_gray, output):
    """Same images, maps and pixel subsets → the same correlations as Quantus.

    Quantus' FaithfulnessCorrelation reads logits unless called with ``softmax=True``; ours reads
    the probability by default (``output="prob"``), so both settings are compared.
    One channel, so Quantus' features are pixels. Quantus draws its subsets from the global numpy
    RNG; we replay those draws and hand the subsets to our functional core. Tolerance 1e-4 on a
    correlation: the probability drops are float32 differences of ~1e-1, so forward rounding of
    ~1e-7 moves the correlation by ~1e-6; 1e-4 leaves margin without hiding a real difference
    (a different subset or baseline moves it by >1e-2).
    """
    net, x, y = trained_gray
    x, y = x[:10], y[:10]
    attr = torch.rand(10, 32, 32, generator=torch.Generator().manual_seed(5)) * x[:, 0].abs()
    runs, size, seed = 30, 128, 7
    state = np.random.get_state()
    try:
        subsets = quantus_subsets(seed, runs, 10, 32 * 32, size)
        np.random.seed(seed)
        metric = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=size, perturb_baseline=0.0,
                                                 normalise=False, abs=False, return_aggregate=False,
                                                 disable_warnings=True)
        ref = np.asarray(metric(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=attr[:, None].numpy(),
                                device="cpu", batch_size=10, softmax=output == "prob"))
    finally:
        np.random.set_state(state)
    ours = faithfulness_correlation(net, x, attr, y, torch.from_numpy(subsets), substrate="zero",
                                    output=output)
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 0.2  # non-trivial correlations
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4)


def test_correlation_is_pearson_of_sums_and_drops(trained_gray):
    """Hand-check one sample: the subsets' attribution sums vs the probability drops, via scipy."""
    net, x, y = trained_gray
    x, y = x[:1], y[:1]
    attr = x[:, 0].clone()
    subsets = torch.stack([torch.randperm(1024, generator=torch.Generator().manual_seed(i))[:50]
                           for i in range(8)])[None]
    ours = float(faithfulness_correlation(net, x, attr, y, subsets)[0])
    sums, drops = [], []
    with torch.no_grad():
        p = net(x).softmax(-1)[0, y[0]]
        for s in subsets[0]:
            xp = x.clone().view(-1)
            xp[s] = 0.0
            sums.append(float(attr.view(-1)[s].sum()))
            drops.append(float(p - net(xp.view(1, 1, 32, 32)).softmax(-1)[0, y[0]]))
    assert abs(ours - scipy.stats.pearsonr(sums, drops)[0]) < 1e-4  # float32 forwards, as above


def test_subsets_depend_on_seed_and_image_only(tiny_cnn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    m = FaithfulnessCorrelation(tiny_cnn, nr_runs=5, subset_size=10, seed=3)
    together = m.subsets(x)
    alone = torch.cat([m.subsets(x[i : i + 1]) for i in range(4)])
    assert torch.equal(together, alone)  # batch composition does not matter (DDP-exact)
    assert together.shape == (4, 5, 10)
    assert all(len(set(row.tolist())) == 10 for row in together.flatten(0, 1))  # without replacement
    assert not torch.equal(FaithfulnessCorrelation(tiny_cnn, nr_runs=5, subset_size=10, seed=4).subsets(x), together)


def test_metric_is_reproducible_and_leaves_the_global_rng_alone(tiny_cnn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 16, generator=g)
    attr = torch.randn(6, 16, 16, generator=g)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    rng_before = torch.random.get_rng_state()
    a = FaithfulnessCorrelation(tiny_cnn, nr_runs=8, subset_size=16, seed=0)
    a.update(x[:4], attr[:4], target[:4])
    a.update(x[4:], attr[4:], target[4:])
    b = FaithfulnessCorrelation(tiny_cnn, nr_runs=8, subset_size=16, seed=0, internal_batch_size=5)
    with torch.inference_mode():
        b.update(x, attr, target)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    torch.testing.assert_close(a.per_sample(), b.per_sample(), rtol=0, atol=1e-5)
    assert a.per_sample().shape == (6,) and FaithfulnessCorrelation.higher_is_better is True
    torch.testing.assert_close(a.compute(), a.per_sample().mean().float(), rtol=0, atol=1e-6)
