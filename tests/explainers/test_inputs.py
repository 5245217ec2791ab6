"""Bad input gives an error that names the problem and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xaudit.explainers import ExplainerInputError, ExplainerTypeError, create
from xaudit.utils.errors import ConfigError

from explainer_helpers import GENERIC_METHODS, images


@pytest.fixture
def saliency(get_model: Any) -> Any:
    return create("saliency", get_model("small_cnn"))


def test_wrong_rank(saliency: Any) -> None:
    with pytest.raises(ExplainerInputError, match=r"\[B,C,H,W\].*unsqueeze\(0\)"):
        saliency.attribute(images(1)[0], 0)
    with pytest.raises(ExplainerInputError, match="rank 4"):
        saliency.attribute(torch.zeros(2, 3, 32), 0)


def test_wrong_channel_count(saliency: Any) -> None:
    with pytest.raises(ExplainerInputError, match="1 channels but the model's first conv expects 3"):
        saliency.attribute(images(2, channels=1), 0)


def test_integer_images(saliency: Any) -> None:
    with pytest.raises(ExplainerTypeError, match=r"float tensor.*x.float\(\) / 255"):
        saliency.attribute(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 0)
    with pytest.raises(ExplainerTypeError, match=r"torch\.Tensor"):
        saliency.attribute([[0.0]], 0)


def test_non_finite_input(saliency: Any) -> None:
    x = images(3)
    x[1, 0, 3, 3] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    with pytest.raises(ExplainerInputError, match=r"2 non-finite values.*sample\(s\) \[1, 2\]"):
        saliency.attribute(x, 0)


def test_target_errors(saliency: Any) -> None:
    x = images(2)
    with pytest.raises(ExplainerInputError, match="target has 3 entries but x has batch size 2"):
        saliency.attribute(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ExplainerInputError, match="class index 7 but the model has 4 classes"):
        saliency.attribute(x, torch.tensor([0, 7]))
    with pytest.raises(ExplainerInputError, match="class index 4"):
        saliency.attribute(x, 4)
    with pytest.raises(ExplainerInputError, match="negative"):
        saliency.attribute(x, -1)
    with pytest.raises(ExplainerTypeError, match=r"target\.argmax"):
        saliency.attribute(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ExplainerInputError, match="'predicted'"):
        saliency.attribute(x, "argmax")
    with pytest.raises(ExplainerInputError, match="1-D"):
        saliency.attribute(x, torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("method", GENERIC_METHODS)
def test_every_method_checks_input_and_target(method: str, get_model: Any) -> None:
    explainer = create(method, get_model("small_cnn"), target_layer="features.block5") if method in (
        "cam", "grad_cam", "grad_cam_pp", "score_cam", "guided_grad_cam", "feature_maps") else create(
        method, get_model("small_cnn"))
    with pytest.raises(ExplainerInputError):
        explainer.attribute(images(2, channels=1), 0)
    with pytest.raises(ExplainerInputError):
        explainer.attribute(images(2), torch.tensor([0, 1, 2]))
    bad = images(2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExplainerInputError):
        explainer.attribute(bad, 0)
    if method not in ("random", "sobel"):  # model-free controls never see the logits
        with pytest.raises(ExplainerInputError, match="classes"):
            explainer.attribute(images(2), 9)


def test_unknown_reduce(saliency: Any) -> None:
    with pytest.raises(ConfigError, match=r"Unknown reduce 'maxabs'.*Did you mean 'max_abs'"):
        saliency.attribute(images(1), 0, reduce="maxabs")
