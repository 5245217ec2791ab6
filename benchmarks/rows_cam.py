"""Speed rows for the CAM variants: xaudit next to pytorch-grad-cam's class of the same name.

``rows(model, x, target, layer_name, args)`` returns one :class:`Row` (``benchmarks/explainers.py``)
per method — HiResCAM, XGrad-CAM, LayerCAM, Eigen-CAM, Eigen-Grad-CAM, Grad-CAM element-wise,
Ablation-CAM and FullGrad — with the same model, images, targets and layer on both sides
(Ablation-CAM: ``internal_batch_size`` ablated copies per forward, pytorch-grad-cam's
``batch_size`` set to the same). Every row checks, on its warm-up call, that the two [0,1] maps
agree. Standalone:

    python benchmarks/rows_cam.py --size 64 --batch 8 --threads 2
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Ablation-CAM draws progress bars

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explainers import Row, timed

from xaudit.explainers import create

#: xaudit name → pytorch-grad-cam class name
METHODS = {"hires_cam": "HiResCAM", "xgrad_cam": "XGradCAM", "layer_cam": "LayerCAM", "eigen_cam": "EigenCAM",
           "eigen_grad_cam": "EigenGradCAM", "grad_cam_elementwise": "GradCAMElementWise",
           "ablation_cam": "AblationCAM", "full_grad": "FullGrad"}


def _agree(ours: object, anchor: object) -> None:
    a = torch.as_tensor(np.asarray(anchor))
    o = torch.as_tensor(ours).to(a.dtype).cpu()
    err = float((o - a).abs().max())
    if err > 1e-4:  # the parity tests bound it at ~1e-5; this only guards the timing
        raise AssertionError(f"maps disagree with the anchor by {err:.2e}")


def rows(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer_name: str,
         args: argparse.Namespace) -> list[Row]:
    """One row per CAM variant on ``layer_name`` (FullGrad: every bias layer, as pytorch-grad-cam)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.get_submodule(layer_name)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    ibs = int(getattr(args, "internal_batch_size", None) or 128)

    def ours(name: str, **kw: object) -> Callable[[], object]:
        if name != "full_grad":
            kw["target_layer"] = layer_name
        explainer = create(name, model, normalize=True, **kw)
        return lambda: explainer.attribute(x, target)

    def anchor(cls_name: str, **attrs: object) -> Callable[[], object]:
        cls = getattr(pytorch_grad_cam, cls_name)

        def run() -> object:
            with cls(model, [] if cls_name == "FullGrad" else [layer]) as cam:
                for k, v in attrs.items():
                    setattr(cam, k, v)
                out = cam(x, targets)
            model.zero_grad(set_to_none=True)  # pytorch-grad-cam's loss.backward() filled param.grad
            return out
        return run

    out = []
    for name, cls_name in METHODS.items():
        if name == "ablation_cam":
            out.append(Row(name, ours(name, internal_batch_size=ibs), anchor(cls_name, batch_size=ibs),
                           f"pytorch-grad-cam {cls_name} (batch_size {ibs})", x.shape[0], heavy=True, check=_agree))
        else:
            out.append(Row(name, ours(name), anchor(cls_name), f"pytorch-grad-cam {cls_name}", x.shape[0],
                           check=_agree))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--internal-batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="*", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BatchNorm (fresh BN makes FullGrad's bias terms all zero)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    target = torch.randint(0, 10, (args.batch,), generator=gen)
    print(f"# CPU, {torch.get_num_threads()} threads; torchvision resnet18 (random), {args.size} px, "
          f"batch {args.batch}, layer {args.layer}, internal_batch_size {args.internal_batch_size}")
    print("| method | xaudit s | anchor s | xaudit/anchor | anchor |\n|---|---|---|---|---|")
    for row in rows(model, x, target, args.layer, args):
        if args.methods and row.name not in args.methods:
            continue
        reps = 1 if row.heavy else args.repeats
        if row.check is not None and row.anchor is not None:
            row.check(row.ours(), row.anchor())
        t_ours = timed(row.ours, torch.device("cpu"), reps, warmup=0)
        t_anchor = timed(row.anchor, torch.device("cpu"), reps, warmup=0) if row.anchor else float("nan")
        print(f"| {row.name} | {t_ours:.3f} | {t_anchor:.3f} | {t_ours / t_anchor:.2f} | {row.anchor_name} |",
              flush=True)


if __name__ == "__main__":
    main()
