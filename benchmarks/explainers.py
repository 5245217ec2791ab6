"""Explainer speed: xaudit next to its anchors (Captum, pytorch-grad-cam) on the same model and batch.

For every method: images/s and cost in "passes" — the method's time divided by the time of one
forward + backward to the input (``torch.autograd.grad`` of the target logits w.r.t. x) for the
same batch — for xaudit and for the anchor, and the xaudit/anchor time ratio (< 1: xaudit is
faster). Defaults follow issue 5: ResNet-50, 224 px, batch 64 on a GPU; without one ResNet-18,
32 px, batch 64 on the CPU (random weights: speed does not depend on them).

    python benchmarks/explainers.py                 # auto: cuda if available, else cpu
    python benchmarks/explainers.py --device cpu --repeats 1 --methods saliency grad_cam
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM draws progress bars

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from xaudit.explainers import create
from xaudit.models import build_backbone

warnings.filterwarnings("ignore")  # Captum warns about hooks on every call


@dataclass
class Row:
    """One method: how xaudit runs it, how the anchor does the same work, and on how many images."""

    name: str
    ours: Callable[[], object]
    anchor: Callable[[], object] | None
    anchor_name: str
    batch: int
    heavy: bool = False  # many passes: timed once after a warm-up of the same shapes
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """Device, threads and the GPU/CPU default model and size shared by the benchmark scripts."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or ("resnet50" if gpu else "resnet18")
    args.size = args.size or (224 if gpu else 32)
    if gpu:
        torch.backends.cudnn.benchmark = True
    return device, gpu


def one_pass(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    """The unit of cost: one forward and one backward to the input."""

    def run() -> torch.Tensor:
        xx = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xx).gather(1, target[:, None]).sum(), xx)
        return g

    return run


def build_rows(model: nn.Module, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> list[Row]:
    from captum.attr import (
        Deconvolution,
        GuidedBackprop,
        GuidedGradCam,
        InputXGradient,
        IntegratedGradients,
        NoiseTunnel,
        Occlusion,
        Saliency,
    )
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer_name = args.layer or model.default_target_layer
    layer = model.get_submodule(layer_name)
    b = x.shape[0]
    ibs = args.internal_batch_size
    xg = x.detach().clone().requires_grad_(True)  # Captum wants an input that requires grad
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    window, stride = args.occlusion_window, args.occlusion_window // 2

    def ours(name: str, xb: torch.Tensor = x, tb: torch.Tensor = target, **kw: object) -> Callable[[], object]:
        explainer = create(name, model, **kw)
        return lambda: explainer.attribute(xb, tb)

    def grad_cam_anchor(cls: type, lay: nn.Module = layer, xb: torch.Tensor = x,
                        tl: list | None = None, **attrs: object) -> Callable[[], object]:
        def run() -> object:
            with cls(model, [lay]) as cam:
                for k, v in attrs.items():
                    setattr(cam, k, v)
                out = cam(xb, tl if tl is not None else targets)
            model.zero_grad(set_to_none=True)  # pytorch-grad-cam's loss.backward() filled param.grad
            return out
        return run

    # Score-CAM runs one forward per (image, channel): a smaller batch keeps the CPU run short
    sb = min(b, args.score_cam_batch)
    xs, ts = x[:sb], target[:sb]
    sc_targets = targets[:sb]
    rng = float((x.flatten(1).amax(1) - x.flatten(1).amin(1)).mean())
    rows = [
        Row("saliency", ours("saliency"),
            lambda: Saliency(model).attribute(xg, target=target, abs=True).amax(1), "captum Saliency", b),
        Row("gradient_x_input", ours("gradient_x_input"),
            lambda: InputXGradient(model).attribute(xg, target=target).sum(1), "captum InputXGradient", b),
        Row("integrated_gradients (50 steps)", ours("integrated_gradients", steps=50, internal_batch_size=ibs),
            lambda: IntegratedGradients(model).attribute(xg, target=target, n_steps=50, method="riemann_middle",
                                                         internal_batch_size=ibs).sum(1),
            "captum IntegratedGradients", b, heavy=True),
        Row("integrated_gradients (200 steps)", ours("integrated_gradients", steps=200, internal_batch_size=ibs),
            (lambda: IntegratedGradients(model).attribute(xg, target=target, n_steps=200, method="riemann_middle",
                                                          internal_batch_size=ibs).sum(1)) if args.ig200_anchor
            else None, "captum IntegratedGradients" if args.ig200_anchor else "", b, heavy=True),
        Row("guided_backprop", ours("guided_backprop"),
            lambda: GuidedBackprop(model).attribute(xg, target=target).abs().amax(1), "captum GuidedBackprop", b),
        Row("deconvnet", ours("deconvnet"),
            lambda: Deconvolution(model).attribute(xg, target=target).abs().amax(1), "captum Deconvolution", b),
        Row("smoothgrad (25 × saliency)", ours("smoothgrad", base="saliency", n=25, sigma=0.15, internal_batch_size=ibs),
            lambda: NoiseTunnel(Saliency(model)).attribute(xg, nt_type="smoothgrad", nt_samples=25,
                                                           nt_samples_batch_size=max(1, ibs // b),
                                                           stdevs=0.15 * rng, target=target).amax(1),
            "captum NoiseTunnel(Saliency)", b, heavy=True),
        Row("cam", ours("cam", target_layer=layer_name), None, "", b),
        Row("grad_cam", ours("grad_cam", target_layer=layer_name), grad_cam_anchor(GradCAM),
            "pytorch-grad-cam GradCAM", b),
        Row("grad_cam_pp", ours("grad_cam_pp", target_layer=layer_name), grad_cam_anchor(GradCAMPlusPlus),
            "pytorch-grad-cam GradCAMPlusPlus", b),
        Row(f"score_cam ({layer_name})", ours("score_cam", xs, ts, target_layer=layer_name),
            grad_cam_anchor(ScoreCAM, xb=xs, tl=sc_targets), "pytorch-grad-cam ScoreCAM (batch_size 16)", sb,
            heavy=True),
    ]
    if args.score_cam_layer:
        lay2 = model.get_submodule(args.score_cam_layer)
        rows.append(Row(f"score_cam ({args.score_cam_layer})",
                        ours("score_cam", xs, ts, target_layer=args.score_cam_layer),
                        grad_cam_anchor(ScoreCAM, lay=lay2, xb=xs, tl=sc_targets),
                        "pytorch-grad-cam ScoreCAM (batch_size 16)", sb, heavy=True))
    rows += [
        Row("guided_grad_cam", ours("guided_grad_cam", target_layer=layer_name),
            lambda: GuidedGradCam(model, layer).attribute(xg, target=target).abs().amax(1),
            "captum GuidedGradCam", b),
        Row("feature_maps", ours("feature_maps", target_layer=layer_name), None, "", b),
        Row(f"occlusion ({window} px, stride {stride})",
            ours("occlusion", window=window, stride=stride, internal_batch_size=ibs),
            lambda: Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], window, window),
                                               strides=(x.shape[1], stride, stride), target=target,
                                               perturbations_per_eval=max(1, ibs // b)),
            "captum Occlusion (same images per forward)", b, heavy=True),
        Row(f"rise ({args.rise_masks} masks)", ours("rise", n_masks=args.rise_masks, internal_batch_size=ibs),
            None, "", b, heavy=True),
        Row("random", ours("random"), None, "", b),
        Row("sobel", ours("sobel"), None, "", b),
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
    p.add_argument("--layer", default=None, help="CAM target layer (default: the backbone's default_target_layer)")
    p.add_argument("--score-cam-layer", default=None,
                   help="an extra Score-CAM row on this layer (default on CPU: layer3, since layer4 is 1×1 at 32 px)")
    p.add_argument("--score-cam-batch", type=int, default=8,
                   help="images for the Score-CAM rows (pytorch-grad-cam materialises every masked image at once: "
                        "64 images × 2048 channels of ResNet-50 at 224 px would need 79 GB)")
    p.add_argument("--internal-batch-size", type=int, default=None,
                   help="images per forward for IG/SmoothGrad/occlusion/RISE, both libraries (default: 4·batch)")
    p.add_argument("--occlusion-window", type=int, default=None, help="default: size/4 (stride: half of it)")
    p.add_argument("--rise-masks", type=int, default=None, help="default: 1000 on GPU, 200 on CPU")
    p.add_argument("--ig200-anchor", action="store_true", help="also time Captum's IG-200 (slow on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per light method (median); heavy ones: 1")
    p.add_argument("--methods", nargs="*", default=None, help="only these methods (first word of the row name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()

    device, gpu = resolve_device(args)
    args.internal_batch_size = args.internal_batch_size or 4 * args.batch
    args.occlusion_window = args.occlusion_window or max(2, args.size // 4)
    args.rise_masks = args.rise_masks or (1000 if gpu else 200)
    if args.score_cam_layer is None and not gpu and args.model.startswith("resnet") and args.size <= 32:
        args.score_cam_layer = "layer3"

    torch.manual_seed(0)
    model = build_backbone(args.model, args.num_classes, image_size=args.size).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    target = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device: {dev_name}; torch {torch.__version__}; {args.model}, {args.size} px, batch {args.batch}, "
          f"internal_batch_size {args.internal_batch_size}, CAM layer {args.layer or model.default_target_layer}")
    pass_time = {}
    for b in sorted({args.batch, min(args.batch, args.score_cam_batch)}):
        pass_time[b] = timed(one_pass(model, x[:b], target[:b]), device, repeats=max(5, args.repeats), warmup=2)
        print(f"# one pass (forward + backward to input) at batch {b}: {pass_time[b] * 1000:.1f} ms")

    header = ("| method | xaudit img/s | anchor img/s | xaudit passes | anchor passes | xaudit/anchor time | anchor |")
    print(header)
    print("|" + "---|" * 7)
    peaks = []
    for row in build_rows(model, x, target, args):
        reps, warm = (1, 1) if row.heavy else (args.repeats, 1)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t_ours = timed(row.ours, device, reps, warm)
        if gpu:
            peaks.append(f"{row.name}: {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB")
        t_anchor = timed(row.anchor, device, reps, warm) if row.anchor is not None else None
        pt = pass_time[row.batch]
        cells = [row.name, f"{row.batch / t_ours:,.1f}",
                 f"{row.batch / t_anchor:,.1f}" if t_anchor else "—",
                 f"{t_ours / pt:.2f}", f"{t_anchor / pt:.2f}" if t_anchor else "—",
                 f"{t_ours / t_anchor:.2f}" if t_anchor else "—", row.anchor_name or "—"]
        if row.batch != args.batch:
            cells[0] += f" (batch {row.batch})"
        print("| " + " | ".join(cells) + " |", flush=True)
    if peaks:
        print("# peak GPU memory of the xaudit runs: " + "; ".join(peaks))


if __name__ == "__main__":
    main()
