"""Activation maximisation: beats every natural image on the trained small CNN, leaves the model
and the global RNG alone, channel objectives, the command line, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xaudit.explainers import maximize_activation
from xaudit.models import Classifier
from xaudit.reporting.activation_max import main
from xaudit.utils.errors import ConfigError

from explainer_helpers import make_model, trained_shapes_cnn


def test_maximised_logit_beats_every_natural_image() -> None:
    """64 Adam steps (Fourier parameterisation, jitter/scale/rotation) per class on the trained small
    CNN. Measured: logits 21.0 / 26.9 / 16.0 / 26.5 against the best of 256 test images 6.9 / 5.8 /
    5.8 / 4.7. Asserted: above the natural maximum of every class."""
    data = trained_shapes_cnn()
    model, x = data["model"], data["images"]
    with torch.no_grad():
        natural = model(x).amax(0)
    vis = maximize_activation(model, target=[0, 1, 2, 3], steps=64, mean=data["mean"], std=data["std"])
    assert (vis.activation > natural).all(), (vis.activation, natural)
    # the returned image is what the model saw: its logits are the reported activations
    with torch.no_grad():
        logits = model(vis.image)
    torch.testing.assert_close(logits.diagonal(), vis.activation, rtol=1e-5, atol=1e-5)
    mean, std = torch.tensor(data["mean"]).view(1, 3, 1, 1), torch.tensor(data["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(vis.image * std + mean, vis.display, rtol=1e-5, atol=1e-6)
    assert vis.display.min() >= 0 and vis.display.max() <= 1 and vis.history.shape == (64,)
    assert vis.history[-8:].mean() > vis.history[:8].mean()


def test_fourier_images_carry_less_high_frequency_energy_than_pixel_images() -> None:
    """The 1/f spectrum scaling favours low frequencies (Mordvintsev et al., 2018): share of the
    (mean-removed) spectral energy above 1/4 cycle/px, Fourier < pixel parameterisation."""
    data = trained_shapes_cnn()

    def high_share(img: torch.Tensor) -> float:
        f = torch.fft.rfft2(img - img.mean((2, 3), keepdim=True)).abs() ** 2
        r = (torch.fft.rfftfreq(32)[None] ** 2 + torch.fft.fftfreq(32)[:, None] ** 2).sqrt()
        return float((f * (r > 0.25)).sum() / f.sum())

    kw = {"target": [0, 1, 2, 3], "steps": 64, "mean": data["mean"], "std": data["std"]}
    fourier = maximize_activation(data["model"], parameterization="fourier", **kw).display
    pixel = maximize_activation(data["model"], parameterization="pixel", **kw).display
    assert high_share(fourier) < high_share(pixel)


def test_model_and_global_rng_are_left_alone() -> None:
    model = make_model("small_cnn").train()
    model.features.block2.eval()  # a mixed-mode model gets each module's own mode back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    req = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    a = maximize_activation(model, target=1, steps=6, seed=3)
    b = maximize_activation(model, layer="features.block3", unit=[2, 5], steps=6, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == req
    assert all(p.grad is None for p in model.parameters()) and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # seeded: the same call gives the same image, another seed another one
    assert torch.equal(maximize_activation(model, target=1, steps=6, seed=3).image, a.image)
    assert not torch.equal(maximize_activation(model, target=1, steps=6, seed=4).image, a.image)
    # a channel objective is the channel's mean activation on the returned image (eval mode)
    model.eval()
    with torch.no_grad():
        acts = model.features[:4](b.image).mean((2, 3))
    torch.testing.assert_close(acts[torch.arange(2), torch.tensor([2, 5])], b.activation, rtol=1e-5, atol=1e-5)


def test_bad_objectives_name_the_fix() -> None:
    model = make_model("small_cnn")
    with pytest.raises(ConfigError, match=r"Unknown target_layer 'features.block7'.*Choices:.*features\.block5"):
        maximize_activation(model, layer="features.block7", unit=0, steps=1)
    with pytest.raises(ConfigError, match=r"unit index 40 is out of range: layer 'features.block5' has 32 units"):
        maximize_activation(model, layer="features.block5", unit=[1, 40], steps=1)
    with pytest.raises(ConfigError, match="either target=<class index>"):
        maximize_activation(model, steps=1)
    with pytest.raises(ConfigError, match="needs unit=<channel index>"):
        maximize_activation(model, layer="features.block5", steps=1)
    with pytest.raises(ConfigError, match=r"target class 4 does not exist: the model has 4 classes \(0\.\.3\)"):
        maximize_activation(model, target=4, steps=1)
    with pytest.raises(ConfigError, match="Unknown parameterization 'fft'"):
        maximize_activation(model, target=0, parameterization="fft")
    with pytest.raises(ConfigError, match="mean and std need 3 values"):
        maximize_activation(model, target=0, mean=[0.5], std=[0.2])


def test_command_line_writes_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m xaudit.reporting.activation_max --ckpt ... --out ...`` on a checkpoint in the format
    train.py writes (weights-only, data description and config under ``xaudit``)."""
    torch.manual_seed(0)
    module = Classifier(backbone={"name": "small_cnn", "width": 8}, num_classes=3, image_size=32)
    data = {"_target_": "xaudit.data.ShapesDataModule", "num_classes": 3, "image_size": 32, "n_train": 6,
            "n_val": 3, "n_test": 9, "batch_size": 4}
    info = {"hparams": dict(module.hparams), "config": {"data": data},
            "data": {"num_classes": 3, "in_chans": 3, "image_size": 32, "mean": [0.3, 0.3, 0.3],
                     "std": [0.2, 0.2, 0.2], "class_names": ["circle", "square", "triangle"], "has_masks": True}}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "xaudit": info}, ckpt)
    out = tmp_path / "docs" / "am.png"
    main(["--ckpt", str(ckpt), "--out", str(out), "--steps", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "circle: activation-max logit" in printed and "max natural (test split) logit" in printed
