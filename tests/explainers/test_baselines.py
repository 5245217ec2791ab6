"""Control explainers: a reproducible random map and a Sobel edge map."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from xaudit.explainers import create
from xaudit.explainers.baselines import image_seeds

from explainer_helpers import images

MODEL = nn.Conv2d(3, 4, 1)  # baselines ignore the model; any module will do


def test_random_is_uniform_seeded_and_a_function_of_the_image() -> None:
    x = images(3)
    rng = torch.get_rng_state()
    a = create("random", MODEL, seed=0).attribute(x)
    assert torch.equal(torch.get_rng_state(), rng), "global RNG consumed"
    assert a.shape == (3, 32, 32) and a.min() >= 0 and a.max() < 1
    assert abs(float(a.mean()) - 0.5) < 0.02 and abs(float(a.var()) - 1 / 12) < 0.005
    assert torch.equal(a, create("random", MODEL, seed=0).attribute(x))
    assert not torch.equal(a, create("random", MODEL, seed=1).attribute(x))
    # an image gets the same map alone, in another batch, in another position
    assert torch.equal(create("random", MODEL).attribute(x[1:2])[0], a[1])
    assert torch.equal(create("random", MODEL).attribute(torch.cat([x[2:], x[:1]]))[1], a[0])
    # different images get different (uncorrelated) maps
    assert abs(float(torch.corrcoef(a.flatten(1))[0, 1])) < 0.1


def test_image_seeds_see_every_bit() -> None:
    x = images(1)
    y = x.clone()
    y[0, 2, 31, 31] = torch.nextafter(y[0, 2, 31, 31], torch.tensor(10.0))
    assert image_seeds(x, 0) != image_seeds(y, 0)
    assert image_seeds(x, 0) != image_seeds(x, 1)
    xd = x.double()
    yd = xd.clone()
    yd[0, 0, 0, 0] = -yd[0, 0, 0, 0]  # only the sign bit (the high word of a float64) differs
    assert image_seeds(xd, 0) == image_seeds(xd.clone(), 0) != image_seeds(yd, 0)


def test_sobel_matches_scipy() -> None:
    x = images(2)
    ours = create("sobel", MODEL).attribute(x, reduce=None)
    # scipy.ndimage.sobel on each 2-D channel with mode="nearest" (replicate padding)
    ref = np.stack([[np.hypot(ndimage.sobel(ch, axis=0, mode="nearest"), ndimage.sobel(ch, axis=1, mode="nearest"))
                     for ch in img] for img in x.numpy()])
    torch.testing.assert_close(ours, torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    # default: max over channels
    torch.testing.assert_close(create("sobel", MODEL).attribute(x), ours.amax(1), rtol=0, atol=0)


def test_sobel_of_a_ramp() -> None:
    x = torch.arange(16.0).repeat(1, 1, 16, 1)  # value = column index: slope 1 to the right
    got = create("sobel", nn.Conv2d(1, 1, 1)).attribute(x)
    assert torch.allclose(got[0, :, 1:-1], torch.full((16, 14), 8.0))  # (1+2+1)·2
    assert torch.allclose(got[0, :, 0], torch.full((16,), 4.0))  # replicate border: half the step
