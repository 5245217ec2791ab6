"""Activation maximisation: an image that maximises a class logit or a channel of a layer.

Feature visualisation as in Olah et al., 2017 ("Feature Visualization", Distill) with the
parameterisation of Mordvintsev et al., 2018 ("Differentiable Image Parameterizations"): the image
is the inverse real FFT of a learnt spectrum scaled by 1/frequency (so low frequencies move first),
colours are decorrelated with Lucid's ImageNet colour-correlation square root and squashed into
[0,1] with a sigmoid, then normalised with the model's mean/std. Each Adam step sees a randomly
jittered, scaled and rotated copy (transformation robustness), so the image works for the model
rather than exploiting single pixels.

>>> from xaudit.explainers.activation_max import maximize_activation
>>> v = maximize_activation(model, target=[0, 1, 2, 3], steps=256)           # one image per class
>>> v.display  # [4,3,H,W] in [0,1];  v.image: normalised model input;  v.activation: logits [4]
>>> maximize_activation(model, layer="features.block5", unit=7)               # a channel instead

The command line that renders a checkpoint's classes to a PNG lives in the reporting layer
(explainers never import tasks or reporting):
``python -m xaudit.reporting.activation_max --ckpt path/to/best.ckpt --out docs/activation_max.png``.

The random initialisation and transforms come from a local generator seeded by ``seed`` (the
global RNG is untouched); the model runs in eval mode and gets its modes back, gets no hooks left
and no ``param.grad`` (gradients are taken with ``torch.autograd.grad`` w.r.t. the image only).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import expected_channels, explain_mode
from xaudit.explainers.hooks import record_output, resolve_layer
from xaudit.explainers.influence import check_units
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int

PARAMETERIZATIONS: tuple[str, ...] = ("fourier", "pixel")
# Lucid's square root of the ImageNet colour correlation matrix (columns: decorrelated channels)
_COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]],
                                       dtype=torch.float64)


@dataclass(frozen=True)
class Visualization:
    """Result of :func:`maximize_activation`: ``image`` [B,C,H,W] in the model's normalised input space,
    ``display`` the same images in [0,1], ``activation`` [B] the objective of each final image
    (untransformed), ``history`` [steps] the mean objective of each optimisation step."""

    image: Tensor
    display: Tensor
    activation: Tensor
    history: Tensor


def _as_list(name: str, value: object) -> list[int]:
    vals = [value] if isinstance(value, numbers.Integral) else value
    if isinstance(vals, Tensor):
        vals = vals.flatten().tolist()
    if not isinstance(vals, Sequence) or isinstance(vals, str) or not vals or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals):
        raise ConfigError(f"{name} must be an int or a non-empty list of ints; got {value!r}.")
    return [int(v) for v in vals]


def _data_info(model: nn.Module) -> dict:
    """The data description a trained xaudit Classifier carries (mean, std, image size, classes)."""
    for m in model.modules():
        info = getattr(m, "xaudit_info", None)
        if isinstance(info, dict) and isinstance(info.get("data"), dict):
            return info["data"]
    return {}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (BatchNorm must use its statistics on a batch of one); every
    module's own ``training`` flag is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class _Parameterization:
    """Learnt tensor → image in [0,1] [B,C,H,W]."""

    def __init__(self, kind: str, b: int, c: int, h: int, w: int, decorrelate: bool, decay_power: float,
                 gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
        self.kind, self.shape = kind, (b, c, h, w)
        if kind == "fourier":
            fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
            fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
            freqs = torch.sqrt(fx * fx + fy * fy)
            self.scale = (1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power).to(device=device, dtype=dtype)
            init = torch.randn(b, c, h, w // 2 + 1, 2, generator=gen, dtype=torch.float64) * 0.01
        else:
            init = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * 0.01
        self.param = init.to(device=device, dtype=dtype).requires_grad_(True)
        self.colour: Tensor | None = None
        if decorrelate and c == 3:
            m = _COLOR_CORRELATION_SQRT / _COLOR_CORRELATION_SQRT.norm(dim=0).max()
            self.colour = m.to(device=device, dtype=dtype)

    def image(self) -> Tensor:
        h, w = self.shape[2:]
        if self.kind == "fourier":
            spectrum = torch.view_as_complex(self.param.contiguous()) * self.scale
            t = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho") / 4.0
        else:
            t = self.param
        if self.colour is not None:
            t = torch.einsum("ij,bjhw->bihw", self.colour, t)
        return torch.sigmoid(t)


def _random_affine(b: int, jitter: float, scale: tuple[float, float], rotate: float, size: tuple[int, int],
                   gen: torch.Generator) -> Tensor:
    """[b,2,3] affine matrices: shift ≤ ``jitter`` px, zoom in ``scale``, rotation ≤ ``rotate`` degrees."""
    h, w = size
    u = torch.rand(b, 4, generator=gen, dtype=torch.float64)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = math.radians(rotate) * (2 * u[:, 1] - 1)
    tx = torch.round((2 * u[:, 2] - 1) * jitter) * 2 / w
    ty = torch.round((2 * u[:, 3] - 1) * jitter) * 2 / h
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def maximize_activation(model: nn.Module, target: int | Sequence[int] | None = None, *, layer: str | None = None,
              unit: int | Sequence[int] | None = None, steps: int = 256, lr: float = 0.05,
              image_size: int | tuple[int, int] | None = None, channels: int | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              parameterization: str = "fourier", decorrelate: bool = True, decay_power: float = 1.0,
              jitter: float | None = None, scale: tuple[float, float] = (0.9, 1.1), rotate: float = 5.0,
              seed: int = 0) -> Visualization:
    """Optimise one image per objective: the logit of class ``target`` or, with ``layer`` (dotted
    module name), the mean activation of channel ``unit``. A list optimises a batch together.

    ``mean``/``std``/``image_size``/``channels`` default to what an xaudit ``Classifier`` stores
    from its data (else 0/1, 32 px, the first conv's channels). ``jitter`` defaults to 1/16 of the
    image side; ``scale`` and ``rotate`` (degrees) are the random zoom and rotation ranges.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise unknown_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if (target is None) == (layer is None):
        raise ConfigError("pass either target=<class index> (a logit) or layer=<dotted name> with unit=<channel>.")
    if layer is not None and unit is None:
        raise ConfigError(f"layer={layer!r} needs unit=<channel index> (which channel to maximise).")
    steps = positive_int(steps, "steps")
    if not float(lr) > 0:
        raise ConfigError(f"lr must be >0; got {lr}.")
    info = _data_info(model)
    c = channels or info.get("in_chans") or expected_channels(model) or 3
    size = image_size or info.get("image_size") or 32
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mean_t = torch.tensor(list(mean if mean is not None else info.get("mean", [0.0] * c)), dtype=torch.float64)
    std_t = torch.tensor(list(std if std is not None else info.get("std", [1.0] * c)), dtype=torch.float64)
    if mean_t.numel() != c or std_t.numel() != c:
        raise ConfigError(f"mean and std need {c} values (one per channel); got {mean_t.numel()} and {std_t.numel()}.")
    layer_name = resolve_layer(model, layer) if layer is not None else None
    objectives = _as_list("unit" if layer is not None else "target", unit if layer is not None else target)
    b = len(objectives)
    jitter = max(1.0, max(h, w) / 16) if jitter is None else float(jitter)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(int(seed))
    mean_d = mean_t.to(device=device, dtype=dtype).view(1, -1, 1, 1)
    std_d = std_t.to(device=device, dtype=dtype).view(1, -1, 1, 1)
    idx = torch.tensor(objectives, device=device)

    def objective(img01: Tensor) -> Tensor:
        x = (img01 - mean_d) / std_d
        if layer_name is None:
            logits = model(x)
            if bool((idx >= logits.shape[1]).any()):
                raise ConfigError(f"target class {int(idx.max())} does not exist: the model has {logits.shape[1]} "
                                  f"classes (0..{logits.shape[1] - 1}).")
            return logits.gather(1, idx[:, None]).squeeze(1)
        with record_output(model.get_submodule(layer_name), track_grad=True) as rec:
            model(x)
        acts = rec.output
        if acts is None:
            raise ConfigError(f"layer {layer_name!r} was not called in the model's forward.")
        check_units(objectives, acts.shape[1], layer_name)
        per_unit = acts.flatten(2).mean(2) if acts.ndim > 2 else acts
        return per_unit.gather(1, idx[:, None]).squeeze(1)

    history = torch.empty(steps, dtype=torch.float64)
    with _eval_mode(model), explain_mode(model):
        param = _Parameterization(parameterization, b, c, h, w, decorrelate, decay_power, gen, device, dtype)
        opt = torch.optim.Adam([param.param], lr=float(lr))
        for i in range(steps):
            img = param.image()
            theta = _random_affine(b, jitter, scale, rotate, (h, w), gen).to(device=device, dtype=dtype)
            grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
            seen = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            act = objective(seen)
            (grad,) = torch.autograd.grad(-act.sum(), param.param)
            param.param.grad = grad
            opt.step()
            history[i] = float(act.detach().mean())
        with torch.no_grad():
            display = param.image().detach()
            final = objective(display).detach()
    return Visualization(image=(display - mean_d) / std_d, display=display, activation=final, history=history)
