"""Relevance methods: xaudit next to zennit (LRP) and Captum (DeepLIFT, DeepSHAP), same model and batch.

For every method: images/s, cost in "passes" — the method's time divided by the time of one
forward + backward to the input (``torch.autograd.grad`` of the target logits w.r.t. x) for the
same batch — for xaudit and for the anchor, and the xaudit/anchor time ratio (< 1: xaudit is
faster). Defaults: ResNet-50, 224 px, batch 64 on a GPU; without one ResNet-18, 32 px, batch 64
on the CPU (random weights: speed does not depend on them).

- LRP: ``create("lrp", model, composite=...)`` against zennit's composite of the same name with
  ``ResNetCanonizer``/``VGGCanonizer`` (both canonize and restore on every call).
- DeepLIFT / DeepSHAP: Captum needs one non-in-place ReLU module per call, so both libraries run
  on a replica of the model built that way (same weights; ``x * 1`` between ReLU and max-pool,
  where Captum's hooks would otherwise record the wrong gradient). Zero baseline; DeepSHAP with
  ``--background`` images.

    python benchmarks/relevance.py                   # auto: cuda if available, else cpu
    python benchmarks/relevance.py --device cpu --repeats 1 --methods lrp deeplift
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# the same timing rules as the explainer benchmark beside this file (python benchmarks/relevance.py)
from explainers import one_pass, resolve_device, timed
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import xaudit.explainers.pattern  # registers pattern_net, pattern_attribution
import xaudit.explainers.relevance  # noqa: F401  (registers lrp, deep_taylor, deeplift, deepshap)
from xaudit.explainers import create
from xaudit.models import build_backbone

warnings.filterwarnings("ignore")  # Captum warns about hooks on every call


@dataclass
class Row:
    name: str
    ours: Callable[[], object]
    anchor: Callable[[], object] | None
    anchor_name: str
    heavy: bool = False


class _Copy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class _CaptumBlock(nn.Module):
    """A torchvision BasicBlock/Bottleneck with one ReLU module per call and an out-of-place sum."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.bottleneck = isinstance(block, Bottleneck)
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(3 if self.bottleneck else 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        out = self.relus[0](b.bn1(b.conv1(x)))
        out = b.bn2(b.conv2(out))
        if self.bottleneck:
            out = b.bn3(b.conv3(self.relus[1](out)))
        identity = b.downsample(x) if b.downsample is not None else x
        return self.relus[-1](out + identity)


def captum_replica(model: nn.Module) -> nn.Module:
    """The same function built the way Captum's DeepLift needs it."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BasicBlock | Bottleneck):
                setattr(parent, name, _CaptumBlock(child))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, nn.ReLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.Sequential(_Copy(), child))
    return model.eval()


def build_rows(model: nn.Module, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> list[Row]:
    from captum.attr import DeepLift, DeepLiftShap
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    num_classes = model(x[:1]).shape[1]
    onehot = torch.eye(num_classes, device=x.device)[target]
    low = x.amin((2, 3), keepdim=True).expand_as(x)
    high = x.amax((2, 3), keepdim=True).expand_as(x)
    canonizer = VGGCanonizer if args.model.startswith("vgg") else ResNetCanonizer
    zennit_composites = {
        "epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=[canonizer()]),
        "epsilon_gamma_box": lambda: EpsilonGammaBox(low=low, high=high, canonizers=[canonizer()]),
        "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(canonizers=[canonizer()]),
    }

    def ours(name: str, net: nn.Module = model, **kw: object) -> Callable[[], object]:
        explainer = create(name, net, **kw)
        return lambda: explainer.attribute(x, target)

    def zennit(composite: str) -> Callable[[], object]:
        def run() -> object:
            with Gradient(model=model, composite=zennit_composites[composite]()) as attributor:
                return attributor(x, onehot)[1].sum(1)
        return run

    replica = captum_replica(model)
    xg = x.detach().clone().requires_grad_(True)
    zero = torch.zeros_like(x[:1])
    gen = torch.Generator().manual_seed(1)
    background = torch.randn(args.background, *x.shape[1:], generator=gen).to(x.device)
    rows = [Row(f"lrp {c}", ours("lrp", composite=c), zennit(c), f"zennit {c}") for c in zennit_composites]
    rows += [
        Row("deep_taylor", ours("deep_taylor"), None, ""),
        Row("deeplift (zero baseline)", ours("deeplift", replica),
            lambda: DeepLift(replica).attribute(xg, baselines=zero.expand_as(x), target=target).sum(1),
            "captum DeepLift"),
        Row(f"deepshap ({args.background} background images)",
            ours("deepshap", replica, baselines=background, internal_batch_size=args.internal_batch_size),
            lambda: DeepLiftShap(replica).attribute(xg, baselines=background, target=target).sum(1),
            "captum DeepLiftShap (all rows in one batch)", heavy=True),
        Row("pattern_net (patterns fitted on the batch)", ours("pattern_net", fit_data=x), None, ""),
        Row("pattern_attribution", ours("pattern_attribution", fit_data=x), None, ""),
    ]
    if args.methods:
        rows = [r for r in rows if r.name.split(" ")[0] in args.methods]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default=None, help="backbone (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--size", type=int, default=None, help="image side (default: 224 on GPU, 32 on CPU)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--background", type=int, default=8, help="DeepSHAP background images")
    p.add_argument("--internal-batch-size", type=int, default=None, help="DeepSHAP rows per forward (default 8·batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median); heavy ones: 1")
    p.add_argument("--methods", nargs="*", default=None, help="only these methods (first word of the row name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()

    device, gpu = resolve_device(args)
    args.internal_batch_size = args.internal_batch_size or 8 * args.batch

    torch.manual_seed(0)
    model = build_backbone(args.model, args.num_classes, image_size=args.size).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    target = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device: {dev_name}; torch {torch.__version__}; {args.model}, {args.size} px, batch {args.batch}")
    pass_time = timed(one_pass(model, x, target), device, repeats=max(5, args.repeats), warmup=2)
    print(f"# one pass (forward + backward to input): {pass_time * 1000:.1f} ms")
    print("| method | xaudit img/s | anchor img/s | xaudit passes | anchor passes | xaudit/anchor time | anchor |")
    print("|" + "---|" * 7)
    b = args.batch
    for row in build_rows(model, x, target, args):
        reps = 1 if row.heavy else args.repeats
        t_ours = timed(row.ours, device, reps)
        t_anchor = timed(row.anchor, device, reps) if row.anchor is not None else None
        cells = [row.name, f"{b / t_ours:,.1f}", f"{b / t_anchor:,.1f}" if t_anchor else "—",
                 f"{t_ours / pass_time:.2f}", f"{t_anchor / pass_time:.2f}" if t_anchor else "—",
                 f"{t_ours / t_anchor:.2f}" if t_anchor else "—", row.anchor_name or "—"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
