"""DeepLIFT (rescale) and DeepSHAP against Captum's ``DeepLift`` / ``DeepLiftShap``, and
summation-to-delta.

Captum needs every nonlinearity as its own non-in-place module, so it gets a replica of each
model (same weights): fresh ``nn.ReLU()`` per use, torchvision blocks rewritten with one ReLU per
call, and a ``x * 1`` between a ReLU and a MaxPool. That last one works around a Captum bug: the
two hooks of adjacent nonlinear modules sit on one tensor, so the ReLU records its output
gradient *before* the MaxPool's hook rewrites it, which breaks summation-to-delta. Two more
Captum behaviours decide where exact parity can be tested:

- its max-pool rule falls back to ``grad_input[0]`` (the first row's gradient) where Δx = 0, so
  Captum runs one image at a time (for one row that is the right row);
- its unpooling overwrites where max-pool windows overlap (ResNet's 3×3/2 stem pool) instead of
  summing, which breaks summation-to-delta; ours sums. There only summation-to-delta is tested.

With those, ours and Captum agree to 1e-10 of the largest value in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import DeepLift as CaptumDeepLift
from captum.attr import DeepLiftShap as CaptumDeepLiftShap
from torch import nn
from torchvision.models.resnet import BasicBlock

import xaudit.explainers.relevance  # noqa: F401  (registers deeplift, deepshap)
from xaudit.data import ShapesDataModule
from xaudit.explainers import UnsupportedModelError, create

from explainer_helpers import images, make_model

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning")


class _Copy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class _CaptumBasicBlock(nn.Module):
    """torchvision's BasicBlock with one ReLU module per call and an out-of-place skip sum."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu2(out + identity)


def captum_replica(model: nn.Module) -> nn.Module:
    """The same function, built the way Captum's DeepLift needs it (see the module docstring)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BasicBlock):
                setattr(parent, name, _CaptumBasicBlock(child))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, nn.ReLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.Sequential(_Copy(), child))
    return model.eval()


def delta(model: nn.Module, x: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, target[:, None])[:, 0] - model(base).gather(1, target[:, None])[:, 0]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# (backbone, build options, image side): the CIFAR-stem ResNet keeps full resolution, 16 px suffice
PARITY_MODELS = [("small_cnn", {}, 32), ("vgg11_bn", {"cifar_stem": True}, 32), ("vgg16", {"cifar_stem": True}, 32),
                 ("resnet18", {"cifar_stem": True}, 16)]


@pytest.mark.parametrize(("name", "kw", "size"), PARITY_MODELS)
def test_deeplift_matches_captum_float64(name: str, kw: dict, size: int) -> None:
    model = make_model(name, **kw).double()
    replica = captum_replica(model)
    x = images(2, size=size).double()
    base = (0.5 * images(2, size=size, seed=5)).double()
    target = torch.tensor([1, 3])
    ours = create("deeplift", model, baseline=base).attribute(x, target, reduce=None)
    for i in range(2):
        theirs = CaptumDeepLift(replica).attribute(x[i:i + 1].clone().requires_grad_(), baselines=base[i:i + 1],
                                                   target=target[i:i + 1])
        assert rel_diff(ours[i:i + 1], theirs.detach()) < 1e-10
    # summation-to-delta: the map sums to f(x) − f(x₀)
    torch.testing.assert_close(ours.sum((1, 2, 3)), delta(model, x, base, target), rtol=1e-10, atol=1e-10)


def test_summation_to_delta_with_overlapping_pools_and_reused_in_place_relus() -> None:
    # torchvision resnet18 as built: one in-place ReLU module reused per block, 3×3/2 stem max-pool
    model = make_model("resnet18")
    x, base = images(3), images(3, seed=8)
    target = torch.tensor([0, 1, 2])
    attr = create("deeplift", model, baseline=base).attribute(x, target, reduce=None)
    d = delta(model, x, base, target)
    torch.testing.assert_close(attr.sum((1, 2, 3)), d, rtol=1e-4, atol=1e-4 * float(d.abs().max()))
    # and the replica (separate non-in-place ReLUs) gives the same multipliers
    torch.testing.assert_close(create("deeplift", captum_replica(model), baseline=base).attribute(
        x, target, reduce=None), attr, rtol=1e-5, atol=1e-6)


def test_deepshap_matches_captum_deepliftshap() -> None:
    # no max-pool here, so Captum's own DeepLiftShap (N rows per image) is exact
    model = make_model("resnet18", cifar_stem=True).double()
    x, background = images(2, size=16).double(), images(4, size=16, seed=11).double()
    target = torch.tensor([2, 0])
    ours = create("deepshap", model, baselines=background).attribute(x, target, reduce=None)
    theirs = CaptumDeepLiftShap(captum_replica(model)).attribute(x.clone().requires_grad_(), baselines=background,
                                                                target=target)
    assert rel_diff(ours, theirs.detach()) < 1e-10
    torch.testing.assert_close(ours.sum((1, 2, 3)), delta(model, x, background, target).new_tensor(
        [float(delta(model, x[i:i + 1].expand(4, -1, -1, -1), background, target[i].expand(4)).mean())
         for i in range(2)]), rtol=1e-9, atol=1e-9)


def test_deepshap_is_the_mean_of_deeplift_over_the_background() -> None:
    # vgg11_bn has max-pools: the reference is Captum's DeepLift per (image, baseline), averaged
    model = make_model("vgg11_bn", cifar_stem=True).double()
    replica = captum_replica(model)
    x, background = images(2).double(), images(3, seed=12).double()
    target = torch.tensor([1, 2])
    ours = create("deepshap", model, baselines=background, internal_batch_size=4).attribute(x, target, reduce=None)
    for i in range(2):
        per_baseline = [CaptumDeepLift(replica).attribute(x[i:i + 1].clone().requires_grad_(),
                                                          baselines=background[j:j + 1], target=target[i:i + 1])
                        for j in range(3)]
        assert rel_diff(ours[i:i + 1], torch.stack(per_baseline).mean(0).detach()) < 1e-10


def test_constant_baseline_shortcut_equals_an_explicit_tensor() -> None:
    model = make_model("small_cnn")
    x = images(3)
    zero = create("deeplift", model).attribute(x, 2, reduce=None)
    explicit = create("deeplift", model, baseline=torch.zeros_like(x)).attribute(x, 2, reduce=None)
    torch.testing.assert_close(zero, explicit, rtol=1e-5, atol=1e-7)
    one_shap = create("deepshap", model, baselines=torch.zeros(1, 3, 32, 32)).attribute(x, 2, reduce=None)
    torch.testing.assert_close(one_shap, zero, rtol=1e-5, atol=1e-7)


def test_default_deepshap_needs_no_data_and_is_reproducible() -> None:
    model = make_model("small_cnn")
    x = images(3)
    rng = torch.get_rng_state()
    e = create("deepshap", model, n_baselines=4)
    a = e.attribute(x, 1)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(e.attribute(x, 1), a, rtol=0, atol=0)
    torch.testing.assert_close(e.attribute(x[1:2], 1)[0], a[1], rtol=1e-4, atol=1e-6)  # batch invariant
    assert e.baselines_for(x).shape == (4, 3, 3, 32, 32)


def test_deepshap_fit_samples_a_background_from_a_datamodule() -> None:
    dm = ShapesDataModule(n_train=16, n_val=2, n_test=2, batch_size=8, image_size=32)
    rng = torch.get_rng_state()
    e = create("deepshap", make_model("small_cnn")).fit(dm, n=10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert e.baselines.shape == (10, 3, 32, 32)
    again = create("deepshap", make_model("small_cnn")).fit(dm, n=10)
    assert torch.equal(again.baselines, e.baselines)
    attr = e.attribute(images(2), 0)
    assert attr.shape == (2, 32, 32) and torch.isfinite(attr).all()


class Branchy(nn.Module):
    """Runs a second ReLU only for bright inputs: the input and the baseline take different paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if bool(x.mean() > 0):
            h = torch.relu(h - 0.1)
        return self.fc(h.mean((2, 3)))


def test_data_dependent_control_flow_is_refused() -> None:
    model = Branchy().eval()
    with pytest.raises(UnsupportedModelError, match="control flow"):
        create("deeplift", model).attribute(torch.ones(1, 3, 8, 8), 0)
