"""Benchmark rows for GradientSHAP, feature ablation, feature permutation and Shapley value sampling
next to Captum's classes, doing the same work: the same samples / features and the same number of
images per forward (Captum's ``perturbations_per_eval`` × batch = xaudit's ``internal_batch_size``;
GradientSHAP: Captum puts all n_samples × batch points in one pass, so does xaudit here).

``rows(model, x, target, args)`` returns :class:`explainers.Row` objects for
``benchmarks/explainers.py``; run this file to time them alone:

    python benchmarks/rows_sampling.py --device cpu --batch 8 --size 32
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from explainers import Row, close, one_pass, timed
from torch import nn

import xaudit.explainers.attribution_sampling  # noqa: F401  (registers the four methods)
from xaudit.explainers import create
from xaudit.models import build_backbone


def rows(model: nn.Module, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> list[Row]:
    """One row per method, each against its Captum class with the same work.

    ``args`` may carry ``internal_batch_size`` (images per forward, default 4·batch),
    ``sampling_cell`` (grid cell in px, default side/8), ``gradient_shap_samples`` (default 20),
    ``shapley_samples`` (default 10).
    """
    from captum.attr import FeatureAblation, FeaturePermutation, GradientShap, ShapleyValueSampling

    from xaudit.explainers.attribution_sampling import grid_features

    b, _, h, w = x.shape
    ibs = getattr(args, "internal_batch_size", None) or 4 * b
    ppe = max(1, ibs // b)  # Captum: perturbed copies of the batch per forward
    cell = getattr(args, "sampling_cell", None) or max(1, min(h, w) // 8)
    n_gs = getattr(args, "gradient_shap_samples", None) or 20
    n_sv = getattr(args, "shapley_samples", None) or 10
    mask = grid_features(1, h, w, cell, x.device)[0]
    cmask = mask[None, None]
    n_feat = int(mask.max()) + 1
    xg = x.detach().clone().requires_grad_(True)
    dist = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(1)).to(x.device)
    seed = 3

    def ours(name: str, **kw: object) -> Callable[[], object]:
        explainer = create(name, model, **kw)
        return lambda: explainer.attribute(x, target)

    def seeded(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed)
                return fn()
        return run

    return [
        Row(f"gradient_shap ({n_gs} samples, σ 0.1, 16 baselines)",
            ours("gradient_shap", n_samples=n_gs, stdevs=0.1, baselines=dist, internal_batch_size=n_gs * b),
            lambda: GradientShap(model).attribute(xg, baselines=dist, target=target, n_samples=n_gs,
                                                  stdevs=0.1).sum(1),
            "captum GradientShap (other random draws)", b, heavy=True),
        Row(f"feature_ablation ({cell} px cells, {n_feat} features)",
            ours("feature_ablation", cell=cell, internal_batch_size=ppe * b),
            lambda: FeatureAblation(model).attribute(x, target=target, feature_mask=cmask,
                                                     perturbations_per_eval=ppe)[:, 0],
            "captum FeatureAblation (same images per forward)", b, heavy=True, check=close(rtol=1e-4, atol=1e-5)),
        Row(f"feature_permutation ({cell} px cells, {n_feat} features)",
            ours("feature_permutation", cell=cell, seed=seed, internal_batch_size=ppe * b),
            seeded(lambda: FeaturePermutation(model).attribute(x, target=target, feature_mask=cmask,
                                                               perturbations_per_eval=ppe)[:, 0]),
            "captum FeaturePermutation (same seed, same images per forward)", b, heavy=True,
            check=close(rtol=1e-4, atol=1e-5)),
        Row(f"shapley_value_sampling ({n_sv} orders, {n_feat} features)",
            ours("shapley_value_sampling", n_samples=n_sv, cell=cell, internal_batch_size=ppe * b),
            lambda: ShapleyValueSampling(model).attribute(x, target=target, feature_mask=cmask, n_samples=n_sv,
                                                          perturbations_per_eval=ppe)[:, 0],
            "captum ShapleyValueSampling (other orders, same images per forward)", b, heavy=True),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--internal-batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_backbone(args.model, 10, image_size=args.size).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    target = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    pass_time = timed(one_pass(model, x, target), device, repeats=5, warmup=2)
    print(f"# {args.model}, {args.size} px, batch {args.batch}, {device} ({torch.get_num_threads()} threads); "
          f"one pass {pass_time * 1000:.1f} ms")
    print("| method | xaudit s (median) | captum s (median) | xaudit/captum time | anchor |")
    print("|---|---|---|---|---|")
    for row in rows(model, x, target, args):
        assert row.anchor is not None
        if row.check is not None:  # agreement first; these calls are the warm-up
            row.check(row.ours(), row.anchor())
        else:
            row.ours(), row.anchor()
        # ours and Captum alternate, so load from other processes on a shared machine hits both alike
        t_ours, t_anchor = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(row.ours, device, 1, 0))
            t_anchor.append(timed(row.anchor, device, 1, 0))
        mo, ma = statistics.median(t_ours), statistics.median(t_anchor)
        print(f"| {row.name} | {mo:.3f} | {ma:.3f} | {mo / ma:.2f} | {row.anchor_name} |")

if __name__ == "__main__":
    main()
