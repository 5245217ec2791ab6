"""Tiny models and inputs for the explainer tests, and the per-method settings that keep them fast.

A plain module (imported by the tests; conftest.py turns the shared model cache into a fixture).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xaudit.explainers import names
from xaudit.models import build_backbone

MODELS = ("small_cnn", "resnet18", "vgg11_bn")
# vgg11_bn with the CIFAR head (GAP → linear): the ImageNet head is a 100M-parameter MLP that a
# 2-core CI machine should not build for every test; the feature extractor (inplace ReLUs) is the same.
MODEL_KW: dict[str, dict[str, Any]] = {"small_cnn": {"width": 8}, "resnet18": {}, "vgg11_bn": {"cifar_stem": True},
                                       "senn": {"width": 8, "num_concepts": 5}}
SIZE = 32  # vgg11_bn and resnet18 (ImageNet stem) need ≥32 px

#: explainers that read one kind of model (method → backbone); the rest explain any classifier
MODEL_SPECIFIC: dict[str, str] = {"senn": "senn"}
#: transformer-only explainers (refuse CNNs); their contract (hooks, state, batch independence) is tested in
#: tests/explainers/test_attention_explainers.py on a timm ViT
TRANSFORMER_ONLY: frozenset[str] = frozenset({"attention_rollout", "chefer"})
GENERIC_METHODS: list[str] = [n for n in names() if n not in MODEL_SPECIFIC and n not in TRANSFORMER_ONLY]
#: (method, model) pairs for the model-specific explainers, plus post-hoc methods on those models
SPECIFIC_CASES: list[tuple[str, str]] = [
    *MODEL_SPECIFIC.items(),
    *((m, "senn") for m in ("grad_cam", "saliency", "integrated_gradients", "smoothgrad", "occlusion")),
]


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters.

    Freshly initialised BN (mean 0, var 1, weight 1, bias 0) makes a bias-free conv net positively
    homogeneous, so gradients are constant along rays and several methods coincide by accident.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def make_model(name: str, num_classes: int = 4, **kw: Any) -> nn.Module:
    """A seeded, eval-mode backbone with randomised BatchNorm."""
    torch.manual_seed(0)
    model = build_backbone(name, num_classes, image_size=SIZE, **{**MODEL_KW.get(name, {}), **kw})
    return randomize_batchnorm(model).eval()


_CACHE: dict[str, nn.Module] = {}


def shared_model(name: str) -> nn.Module:
    """A model built once per session; tests must not change it (the contract test checks that
    explainers do not)."""
    if name not in _CACHE:
        _CACHE[name] = make_model(name)
    return _CACHE[name]


def images(n: int = 2, size: int = SIZE, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Seeded normalised-looking images [n,C,size,size]."""
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# Small hyper-parameters so that every method runs in well under a second on these models.
FAST_KW: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"n": 4},
    "rise": {"n_masks": 24},
    "occlusion": {"window": 8, "stride": 8},
    # pattern methods refuse to explain before their signal directions are fitted
    "pattern_net": {"fit_data": images(8, seed=3)},
    "pattern_attribution": {"fit_data": images(8, seed=3)},
    "lime": {"segmentation": "slic", "n_segments": 8, "n_samples": 24, "score": "logit"},
    "kernel_shap": {"n_segments": 8, "n_samples": 24},
    "xrai": {"steps": 4, "n_segments": (4, 8)},
    "layer_integrated_gradients": {"steps": 8},
    "layer_conductance": {"steps": 8},
    "neuron_integrated_gradients": {"steps": 8},
    # the property tests draw 12-24 px images: superpixels, since no grid cell divides them all
    "gradient_shap": {"n_samples": 4, "stdevs": 0.1},
    "feature_ablation": {"features": "superpixels", "n_segments": 8},
    "feature_permutation": {"features": "superpixels", "n_segments": 8},
    "shapley_value_sampling": {"features": "superpixels", "n_segments": 8, "n_samples": 2},
}
#: maps that depend on the rest of the batch by definition (permutation importance permutes a feature
#: across the batch); tests/explainers/test_captum_sampling.py checks that behaviour directly
BATCH_DEPENDENT: frozenset[str] = frozenset({"feature_permutation"})
# score_cam forwards one masked image per (sample, channel): use a narrow layer on vgg11_bn
MODEL_METHOD_KW: dict[tuple[str, str], dict[str, Any]] = {
    ("vgg11_bn", "score_cam"): {"target_layer": "features.2"},
    # CAM needs the layer that feeds the GAP: the final max-pool of the CIFAR VGG
    ("vgg11_bn", "cam"): {"target_layer": "features.28"},
}


def method_kw(method: str, model: str) -> dict[str, Any]:
    """Fast keyword arguments for ``create(method, <model>, **kw)``."""
    return {**FAST_KW.get(method, {}), **MODEL_METHOD_KW.get((model, method), {})}


_TRAINED: dict[str, Any] = {}


def trained_shapes_cnn() -> dict[str, Any]:
    """A width-8 small CNN trained on 1024 shape images (6 epochs of a plain torch loop, ~3 s on
    one CPU thread), built once per session, and a held-out split: ``model`` (eval mode),
    ``images`` [256,3,32,32] normalised, ``labels``, ``masks`` (object masks), ``accuracy``."""
    if not _TRAINED:
        from xaudit.data import ShapesDataModule

        dm = ShapesDataModule(num_classes=4, image_size=32, n_train=1024, n_val=1, n_test=256, seed=0)
        mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
        train, test = dm.split("train"), dm.split("test")
        x_train = (train.images.float() / 255 - mean) / std
        x_test = (test.images.float() / 255 - mean) / std
        rng = torch.get_rng_state()
        torch.manual_seed(0)
        model = build_backbone("small_cnn", 4, image_size=32, width=8)
        torch.set_rng_state(rng)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(6):
            perm = torch.randperm(x_train.shape[0], generator=gen)
            for i in range(0, x_train.shape[0], 32):
                idx = perm[i:i + 32]
                loss = nn.functional.cross_entropy(model(x_train[idx]), train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == test.labels).float().mean())
        _TRAINED.update(model=model, images=x_test, labels=test.labels, masks=test.masks, accuracy=accuracy,
                        mean=dm.mean, std=dm.std)
    return _TRAINED
