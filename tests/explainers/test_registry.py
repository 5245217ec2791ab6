"""Registry: names, create, helpful errors for unknown names, options and layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xaudit.explainers import Explainer, create, names, register
from xaudit.explainers.registry import _REGISTRY
from xaudit.models import Classifier
from xaudit.utils.errors import ConfigError

from explainer_helpers import images

EXPECTED = {"saliency", "gradient_x_input", "integrated_gradients", "guided_backprop", "deconvnet", "smoothgrad",
            "cam", "grad_cam", "grad_cam_pp", "score_cam", "guided_grad_cam", "feature_maps", "occlusion", "rise",
            "random", "sobel", "lrp", "deep_taylor", "deeplift", "deepshap", "pattern_net", "pattern_attribution"}


def test_names_lists_every_method() -> None:
    # ⊆, not ==: other method families (e.g. relevance propagation) register more names
    assert set(names()) >= EXPECTED and names() == sorted(names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_create_builds_each(name: str, get_model: Any) -> None:
    e = create(name, get_model("small_cnn"))
    assert isinstance(e, Explainer) and e.name == name


def test_unknown_name_lists_the_choices(get_model: Any) -> None:
    with pytest.raises(ConfigError,
                       match=r"Unknown explainer 'gradcam'.*Did you mean 'grad_cam'.*"
                             r"Choices: ablation_cam, attention_rollout, attn_lrp, cam, "):
        create("gradcam", get_model("small_cnn"))


def test_unknown_option_lists_the_valid_ones(get_model: Any) -> None:
    with pytest.raises(ConfigError, match=r"'step'.*Did you mean 'steps'.*Choices:.*internal_batch_size"):
        create("integrated_gradients", get_model("small_cnn"), step=10)
    with pytest.raises(ConfigError, match="Unknown smoothgrad variant"):
        create("smoothgrad", get_model("small_cnn"), variant="sg3")
    with pytest.raises(ConfigError, match="Unknown explainer 'salency'"):
        create("smoothgrad", get_model("small_cnn"), base="salency")


def test_target_layer_is_a_dotted_path_and_unknown_ones_list_the_layers(get_model: Any) -> None:
    model = get_model("resnet18")
    assert create("grad_cam", model).target_layer == "layer4"  # the backbone's default_target_layer
    assert create("grad_cam", model, target_layer="layer3.1.conv2").target_layer == "layer3.1.conv2"
    with pytest.raises(ConfigError, match=r"Unknown target_layer 'layer5'.*Did you mean.*Choices:.*layer4\.1\.bn2"):
        create("grad_cam", model, target_layer="layer5")


def test_lightning_module_and_backbone_relative_layer_names() -> None:
    torch.manual_seed(0)
    module = Classifier(backbone={"name": "small_cnn", "width": 8}, num_classes=4, image_size=32).eval()
    x = images(2)
    by_default = create("grad_cam", module)
    assert by_default.target_layer == "net.features.block5"
    relative = create("grad_cam", module, target_layer="features.block5")
    assert relative.target_layer == "net.features.block5"
    direct = create("grad_cam", module.net)
    torch.testing.assert_close(by_default.attribute(x, 1), direct.attribute(x, 1), rtol=0, atol=0)


def test_register_decorator_adds_a_method(get_model: Any) -> None:
    @register("test_constant")
    class Constant(Explainer):
        def _attribute(self, x: torch.Tensor, target: Any) -> torch.Tensor:
            return torch.full(x.shape[:1] + x.shape[2:], 3.0)

    try:
        assert "test_constant" in names()
        out = create("test_constant", get_model("small_cnn")).attribute(images(2), 0)
        assert torch.equal(out, torch.full((2, 32, 32), 3.0))
        with pytest.raises(ConfigError, match="already registered"):
            register("test_constant")(type("Other", (Explainer,), {}))
    finally:
        _REGISTRY.pop("test_constant", None)


def test_bad_fill_is_caught_at_construction(get_model: Any) -> None:
    with pytest.raises(ConfigError, match=r"Unknown baseline 'blurred'.*Did you mean 'blur'"):
        create("integrated_gradients", get_model("small_cnn"), baseline="blurred")
    with pytest.raises(ConfigError, match=r"Unknown fill 'grey'.*Did you mean 'gray'"):
        create("occlusion", get_model("small_cnn"), fill="grey")
