"""Explainer speed: xaudit next to its anchors (Captum, pytorch-grad-cam) on the same model and batch.

For every method: images/s and cost in "passes" — the method's time divided by the time of one
forward + backward to the input (``torch.autograd.grad`` of the target logits w.r.t. x) for the
same batch — for xaudit and for the anchor, and the xaudit/anchor time ratio (< 1: xaudit is
faster). Defaults follow issue 5: ResNet-50, 224 px, batch 64 on a GPU; without one ResNet-18,
32 px, batch 64 on the CPU (random weights: speed does not depend on them).

    python benchmarks/explainers.py                 # auto: cuda if available, else cpu
    python benchmarks/explainers.py --device cpu --repeats 1 --methods saliency grad_cam

``--model vit_b_16`` (or ``--transformer``) times the vision-transformer rows instead, ViT-B/16 at
224 px (default batch 64 on a GPU, 4 on the CPU): saliency, integrated gradients (16 steps) and
token Grad-CAM on xaudit's ``vit_b_16`` backbone (torchvision) against Captum and pytorch-grad-cam
(with the ViT ``reshape_transform`` of its tutorial); attention rollout and Chefer et al.'s
relevance on timm's ``vit_base_patch16_224`` (the same architecture; those explainers read timm
attention modules) against loop-per-image references written below in the style of
jacobgil/vit-explain and hila-chefer/Transformer-Explainability. Every transformer row checks that
its map agrees with the anchor's on the first (warm-up) call before timing.

    python benchmarks/explainers.py --device cpu --model vit_b_16 --threads 2
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM draws progress bars

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xaudit.explainers import create, names
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
    # (ours' output, anchor's output) -> raises when the maps disagree; its two calls are the warm-up
    check: Callable[[object, object], None] | None = None
    model_key: str = ""  # which model's one-pass time the cost in passes divides by ("": the main model)


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
        Row("smoothgrad (25 × saliency)",
            ours("smoothgrad", base="saliency", n=25, sigma=0.15, internal_batch_size=ibs),
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


# -- vision transformers ---------------------------------------------------------------------------
TRANSFORMER_MODELS = ("vit_b_16",)
IG_STEPS_VIT = 16
ROLLOUT_FUSION, ROLLOUT_DISCARD = "mean", 0.9  # vit-explain's discard ratio


def _maps(out: object) -> torch.Tensor:
    """An explainer's or an anchor's output as a float32 CPU tensor [B,H,W]."""
    t = out if isinstance(out, torch.Tensor) else torch.as_tensor(out)
    return t.detach().float().cpu()


def _minmax(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return (t - lo) / (hi - lo + 1e-7)


def close(rtol: float = 1e-3, atol: float = 1e-5, normalize: bool = False,
          max_abs: float | None = None) -> Callable[[object, object], None]:
    """An agreement check: the maps equal within tolerance, or (``normalize``: each scaled to [0, 1])
    at most ``max_abs`` apart with a correlation ≥ 0.99 (different resizing of the same map)."""

    def check(ours: object, anchor: object) -> None:
        a, b = _maps(ours), _maps(anchor)
        assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        if not normalize:
            scale = float(b.abs().max())
            assert scale > 0, "the anchor's maps are all zero: nothing to compare"
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)  # atol relative to the largest value
            return
        a, b = _minmax(a), _minmax(b)
        diff = float((a - b).abs().max())
        assert diff <= (max_abs or 0.1), f"maps differ: max |Δ| {diff:.3g} after scaling each to [0, 1]"
        flat = [t.flatten(1) for t in (a, b)]
        live = (flat[0].std(1) > 0) & (flat[1].std(1) > 0)  # a ReLU'd map can be all zero (random weights)
        assert live.any(), "every map of this row is constant: nothing to compare"
        corr = float(torch.corrcoef(torch.stack([flat[0][live].flatten(), flat[1][live].flatten()]))[0, 1])
        assert corr >= 0.99, f"maps differ: correlation {corr:.4f} (max |Δ| {diff:.3g})"

    return check


@contextmanager
def timm_attention_probabilities(model: nn.Module, on_probs: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """vit-explain's hook: every module named ``*attn_drop`` reports its output — in eval mode the
    softmax probabilities [1, heads, T, T]. timm ≥ 0.9 fuses attention (``fused_attn``), which never
    forms them: switched off while inside, as vit-explain's timm of 2020 had it. (On a GPU the
    rollout anchor copies them to the CPU, as vit-explain does.)"""
    from timm.models.vision_transformer import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    flags = [m.fused_attn for m in attns]
    handles = [m.register_forward_hook(lambda _m, _i, out: on_probs(out))
               for name, m in model.named_modules() if name.endswith("attn_drop")]
    try:
        for m in attns:
            m.fused_attn = False
        yield
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(attns, flags):
            m.fused_attn = f


def _patch_row_to_pixels(rows: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Class-token rows over the patch tokens [T-1] per image → [B,H,W] (bilinear, half-pixel centres)."""
    r = torch.stack(rows)
    side = int(r.shape[-1] ** 0.5)
    return F.interpolate(r.reshape(-1, 1, side, side), size=size, mode="bilinear", align_corners=False)[:, 0]


class VitExplainRollout:
    """ANCHOR for attention_rollout — jacobgil/vit-explain's ``VITAttentionRollout``, one image per
    forward (as its example runs it), written here because vit-explain is not a package.

    Two deliberate departures, both needed to compute the map xaudit computes: the fused matrix is
    renormalised along rows (``a.sum(-1, keepdim=True)``; vit-explain's ``a / a.sum(dim=-1)``
    divides columns), and its map is not divided by its maximum nor resized with cv2 (the class row
    is upsampled bilinearly, raw values). With one image per call vit-explain's ``flat[0, indices]``
    discard applies to every image, as xaudit's does.
    """

    def __init__(self, model: nn.Module, head_fusion: str = "mean", discard_ratio: float = 0.9) -> None:
        self.model, self.head_fusion, self.discard_ratio = model, head_fusion, discard_ratio
        self.attentions: list[torch.Tensor] = []

    def rollout(self) -> torch.Tensor:
        result = torch.eye(self.attentions[0].size(-1))
        with torch.no_grad():
            for attention in self.attentions:
                if self.head_fusion == "mean":
                    fused = attention.mean(axis=1)
                elif self.head_fusion == "max":
                    fused = attention.max(axis=1)[0]
                else:
                    fused = attention.min(axis=1)[0]
                # drop the lowest attentions, but don't drop the class token
                flat = fused.view(fused.size(0), -1)
                _, indices = flat.topk(int(flat.size(-1) * self.discard_ratio), -1, False)
                indices = indices[indices != 0]
                flat[0, indices] = 0
                eye = torch.eye(fused.size(-1))
                a = (fused + 1.0 * eye) / 2
                a = a / a.sum(dim=-1, keepdim=True)
                result = torch.matmul(a, result)
        return result[0, 0, 1:]  # the class token's row over the image patches

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        with timm_attention_probabilities(self.model, lambda out: self.attentions.append(out.cpu())):
            for i in range(x.shape[0]):
                self.attentions = []
                with torch.no_grad():
                    self.model(x[i:i + 1])
                rows.append(self.rollout())
        return _patch_row_to_pixels(rows, (x.shape[-2], x.shape[-1]))


class CheferReference:
    """ANCHOR for chefer — hila-chefer/Transformer-Explainability's ``generate_relevance`` (the
    "Generic Attention-model Explainability" recurrence), one image per forward + ``backward()``:
    the attention maps are saved in the forward and their gradients by tensor hooks, then
    R = I, R += mean_heads[(∇A ⊙ A)⁺] · R over the blocks; the class row over the patches is
    upsampled bilinearly (raw values, as xaudit's)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def save(self, out: torch.Tensor) -> None:
        k = len(self.maps)
        self.maps.append(out)
        out.register_hook(lambda g: self.grads.__setitem__(k, g))

    def relevance(self, image: torch.Tensor, index: int) -> torch.Tensor:
        self.maps: list[torch.Tensor] = []
        self.grads: dict[int, torch.Tensor] = {}
        with timm_attention_probabilities(self.model, self.save):
            output = self.model(image)
            one_hot = output[0, index]
            self.model.zero_grad()
            one_hot.backward()
        r = torch.eye(self.maps[0].shape[-1], device=image.device)
        for k, cam in enumerate(self.maps):
            grad = self.grads[k][0]
            cam = (grad * cam[0].detach()).clamp(min=0).mean(dim=0)
            r = r + torch.matmul(cam, r)
        return r[0, 1:].cpu()

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = [self.relevance(x[i:i + 1], int(target[i])) for i in range(x.shape[0])]
        self.model.zero_grad(set_to_none=True)
        return _patch_row_to_pixels(rows, (x.shape[-2], x.shape[-1]))


def vit_reshape_transform(height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's ViT tutorial: drop the class token, tokens → [B,C,h,w]."""

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


def build_transformer_rows(model: nn.Module, timm_vit: nn.Module, x: torch.Tensor, target: torch.Tensor,
                           args: argparse.Namespace) -> list[Row]:
    """ViT rows: gradients and token Grad-CAM on ``model`` (xaudit's vit_b_16), attention methods on
    ``timm_vit`` (timm's ViT-B/16; Row.model_key "timm")."""
    from captum.attr import IntegratedGradients, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer_name = args.layer or model.default_target_layer
    layer = model.get_submodule(layer_name)
    b = x.shape[0]
    ibs = args.internal_batch_size
    xg = x.detach().clone().requires_grad_(True)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    gh, gw = model.patch_grid

    def ours(name: str, m: nn.Module = model, **kw: object) -> Callable[[], object]:
        explainer = create(name, m, **kw)
        return lambda: explainer.attribute(x, target)

    def grad_cam_anchor() -> object:
        with GradCAM(model, [layer], reshape_transform=vit_reshape_transform(gh, gw)) as cam:
            out = cam(x, targets)
        model.zero_grad(set_to_none=True)
        return out

    rollout_ref = VitExplainRollout(timm_vit, ROLLOUT_FUSION, ROLLOUT_DISCARD)
    chefer_ref = CheferReference(timm_vit)
    rows = [
        Row("saliency", ours("saliency"),
            lambda: Saliency(model).attribute(xg, target=target, abs=True).amax(1), "captum Saliency", b,
            check=close()),
        Row(f"integrated_gradients ({IG_STEPS_VIT} steps)",
            ours("integrated_gradients", steps=IG_STEPS_VIT, internal_batch_size=ibs),
            lambda: IntegratedGradients(model).attribute(xg, target=target, n_steps=IG_STEPS_VIT,
                                                         method="riemann_middle", internal_batch_size=ibs).sum(1),
            "captum IntegratedGradients", b, heavy=True, check=close(rtol=1e-3, atol=1e-4)),
        Row(f"grad_cam (tokens, {layer_name})", ours("grad_cam", target_layer=layer_name), grad_cam_anchor,
            "pytorch-grad-cam GradCAM + ViT reshape_transform", b, check=close(normalize=True, max_abs=0.1)),
        Row(f"attention_rollout (timm, {ROLLOUT_FUSION}, discard {ROLLOUT_DISCARD})",
            ours("attention_rollout", timm_vit, head_fusion=ROLLOUT_FUSION, discard_ratio=ROLLOUT_DISCARD),
            lambda: rollout_ref(x), "vit-explain-style rollout, loop per image (in this file)", b,
            # batched vs one image: float rounding can move a near-tie across the discard threshold
            check=close(rtol=1e-2, atol=1e-3), model_key="timm"),
        Row("chefer (timm)", ours("chefer", timm_vit), lambda: chefer_ref(x, target),
            "Transformer-Explainability-style loop per image (in this file)", b,
            check=close(rtol=1e-3, atol=1e-4), model_key="timm"),
    ]
    # AttnLRP (xaudit.explainers.transformer_lrp; reaches torchvision's attention too): no anchor here
    if "attn_lrp" in names():
        rows.append(Row("attn_lrp", ours("attn_lrp"), None, "", b))
    if args.methods:
        rows = [r for r in rows if r.name.split(" ")[0] in args.methods]
    return rows


def _rate(images_per_s: float) -> str:
    """img/s with one decimal, or three significant digits below 1 (a ViT on the CPU)."""
    return f"{images_per_s:,.1f}" if images_per_s >= 1 else f"{images_per_s:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default=None, help="backbone (default: resnet50 on GPU, resnet18 on CPU); "
                   f"{' | '.join(TRANSFORMER_MODELS)}: the vision-transformer rows")
    p.add_argument("--transformer", action="store_true", help="the vision-transformer rows (= --model vit_b_16)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (default: 224 on GPU, 32 on CPU; 224 for the transformer rows)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (transformer rows on the CPU: 4)")
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
    vit = args.transformer or args.model in TRANSFORMER_MODELS
    if vit:
        args.model = args.model or TRANSFORMER_MODELS[0]
        if args.model not in TRANSFORMER_MODELS:
            p.error(f"--transformer runs {' | '.join(TRANSFORMER_MODELS)}, not --model {args.model}")
        args.size = args.size or 224

    device, gpu = resolve_device(args)
    args.batch = args.batch or (4 if vit and not gpu else 64)
    args.internal_batch_size = args.internal_batch_size or 4 * args.batch
    args.occlusion_window = args.occlusion_window or max(2, args.size // 4)
    args.rise_masks = args.rise_masks or (1000 if gpu else 200)
    if args.score_cam_layer is None and not gpu and args.model.startswith("resnet") and args.size <= 32:
        args.score_cam_layer = "layer3"

    torch.manual_seed(0)
    model = build_backbone(args.model, args.num_classes, image_size=args.size).to(device).eval()
    models = {"": model}
    if vit and isinstance(getattr(getattr(model, "heads", None), "head", None), nn.Linear):
        # torchvision initialises ViT's head to zeros: every logit is the bias and every gradient map
        # zero, which would leave the agreement checks nothing to compare (the time is the same)
        with torch.no_grad():
            nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
    if vit:  # timm's ViT-B/16 for the attention explainers (they read timm Attention modules)
        import timm

        models["timm"] = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=args.num_classes,
                                           img_size=args.size).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    target = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device: {dev_name}; torch {torch.__version__}; {args.model}, {args.size} px, batch {args.batch}, "
          f"internal_batch_size {args.internal_batch_size}, CAM layer {args.layer or model.default_target_layer}")
    if vit:
        from importlib.metadata import version

        print(f"# timm {version('timm')} (attention rows: vit_base_patch16_224), captum {version('captum')}, "
              f"pytorch-grad-cam {version('grad-cam')}; random weights")
    pass_time = {}
    batches = [args.batch] if vit else sorted({args.batch, min(args.batch, args.score_cam_batch)})
    for key, m in models.items():
        for b in batches:
            pass_time[key, b] = timed(one_pass(m, x[:b], target[:b]), device, repeats=max(5, args.repeats), warmup=2)
            what = f" of {key}" if key else ""
            print(f"# one pass{what} (forward + backward to input) at batch {b}: {pass_time[key, b] * 1000:.1f} ms")

    header = ("| method | xaudit img/s | anchor img/s | xaudit passes | anchor passes | xaudit/anchor time | anchor |")
    print(header)
    print("|" + "---|" * 7)
    peaks = []
    rows = build_transformer_rows(model, models["timm"], x, target, args) if vit else build_rows(model, x, target, args)
    for row in rows:
        reps, warm = (1, 1) if row.heavy else (args.repeats, 1)
        if row.check is not None and row.anchor is not None:  # agreement first; these calls are the warm-up
            row.check(row.ours(), row.anchor())
            _sync(device)
            warm = 0
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t_ours = timed(row.ours, device, reps, warm)
        if gpu:
            peaks.append(f"{row.name}: {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB")
        t_anchor = timed(row.anchor, device, reps, warm) if row.anchor is not None else None
        pt = pass_time[row.model_key, row.batch]
        cells = [row.name, _rate(row.batch / t_ours),
                 _rate(row.batch / t_anchor) if t_anchor else "—",
                 f"{t_ours / pt:.2f}", f"{t_anchor / pt:.2f}" if t_anchor else "—",
                 f"{t_ours / t_anchor:.2f}" if t_anchor else "—", row.anchor_name or "—"]
        if row.batch != args.batch:
            cells[0] += f" (batch {row.batch})"
        print("| " + " | ".join(cells) + " |", flush=True)
    if peaks:
        print("# peak GPU memory of the xaudit runs: " + "; ".join(peaks))


if __name__ == "__main__":
    main()
