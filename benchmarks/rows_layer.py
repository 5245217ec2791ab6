"""Layer and neuron attribution speed: xaudit next to Captum on the same model, batch and work.

One row per method — layer integrated gradients, layer conductance, layer gradient × activation,
neuron gradient, neuron integrated gradients — timing xaudit's raw attribution
(``attribute_layer`` for layer methods, ``attribute(reduce=None)`` for neuron methods) against the
Captum class doing the same work (same steps, Riemann method, baseline and images per forward).
Each row first checks that both agree (float32 tolerance) on its warm-up calls.

    python benchmarks/rows_layer.py --device cpu --batch 8 --threads 2
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
from explainers import Row, close, one_pass, resolve_device, timed
from torch import nn

import xaudit.explainers.layer_attribution  # noqa: F401  (registers the layer and neuron methods)
from xaudit.explainers import create
from xaudit.models import build_backbone

warnings.filterwarnings("ignore")  # Captum warns about hooks on every call


def _unit_shape(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    seen: list[tuple[int, ...]] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return seen[0]


def rows(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer_name: str,
         args: argparse.Namespace) -> list[Row]:
    """The five layer/neuron rows for ``model`` on ``x`` at ``layer_name`` (``args``: ``steps``,
    default 50, and ``internal_batch_size``, default 4 × batch)."""
    from captum.attr import (
        LayerConductance,
        LayerGradientXActivation,
        LayerIntegratedGradients,
        NeuronGradient,
        NeuronIntegratedGradients,
    )

    b = x.shape[0]
    steps = getattr(args, "steps", None) or 50
    ibs = getattr(args, "internal_batch_size", None) or 4 * b
    layer = model.get_submodule(layer_name)
    neuron = (0,) * len(_unit_shape(model, layer, x))  # a valid unit of any layer
    xg = x.detach().clone().requires_grad_(True)  # Captum wants an input that requires grad
    zero = torch.zeros_like(x)
    check = close(rtol=1e-4, atol=1e-5)

    def layer_ours(name: str, **kw: object) -> Callable[[], object]:
        e = create(name, model, target_layer=layer_name, **kw)
        return lambda: e.attribute_layer(x, target)  # type: ignore[attr-defined]

    def neuron_ours(name: str, **kw: object) -> Callable[[], object]:
        e = create(name, model, target_layer=layer_name, neuron=neuron, **kw)
        return lambda: e.attribute(x, target, reduce=None)

    def flat(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        return lambda: fn().detach()

    # Captum's internal_batch_size counts images per forward, as ours does; conductance runs
    # steps + 1 points, which Captum only chunks with internal_batch_size too
    ig_kw = {"n_steps": steps, "internal_batch_size": ibs}
    return [
        Row(f"layer_integrated_gradients ({steps} steps)",
            layer_ours("layer_integrated_gradients", steps=steps, internal_batch_size=ibs),
            flat(lambda: LayerIntegratedGradients(model, layer).attribute(
                xg, baselines=zero, target=target, method="riemann_middle", **ig_kw)),
            "captum LayerIntegratedGradients", b, heavy=True, check=check),
        Row(f"layer_conductance ({steps} steps)",
            layer_ours("layer_conductance", steps=steps, internal_batch_size=ibs),
            flat(lambda: LayerConductance(model, layer).attribute(
                xg, baselines=zero, target=target, method="riemann_trapezoid", **ig_kw)),
            "captum LayerConductance", b, heavy=True, check=check),
        Row("layer_gradient_x_activation", layer_ours("layer_gradient_x_activation"),
            flat(lambda: LayerGradientXActivation(model, layer).attribute(xg, target=target)),
            "captum LayerGradientXActivation", b, check=check),
        Row("neuron_gradient", neuron_ours("neuron_gradient"),
            flat(lambda: NeuronGradient(model, layer).attribute(xg, neuron)),
            "captum NeuronGradient", b, check=check),
        Row(f"neuron_integrated_gradients ({steps} steps)",
            neuron_ours("neuron_integrated_gradients", steps=steps, internal_batch_size=ibs),
            flat(lambda: NeuronIntegratedGradients(model, layer).attribute(
                xg, neuron, baselines=zero, method="riemann_middle", **ig_kw)),
            "captum NeuronIntegratedGradients", b, heavy=True, check=check),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default=None, help="backbone (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--size", type=int, default=None, help="default: 224 on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--layer", default=None, help="target layer (default: the backbone's default_target_layer)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--internal-batch-size", type=int, default=None, help="default: 4 × batch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per light method (median); heavy ones: 1")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    device, gpu = resolve_device(args)
    args.internal_batch_size = args.internal_batch_size or 4 * args.batch
    model = build_backbone(args.model, args.num_classes, image_size=args.size).to(device).eval()
    layer_name = args.layer or model.default_target_layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    target = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    pt = timed(one_pass(model, x, target), device, repeats=max(5, args.repeats), warmup=2)
    print(f"# device: {dev_name}; torch {torch.__version__}; {args.model}, {args.size} px, batch {args.batch}, "
          f"layer {layer_name}, internal_batch_size {args.internal_batch_size}; one pass {pt * 1000:.1f} ms")
    print("| method | xaudit img/s | captum img/s | xaudit passes | captum passes | xaudit/captum time | anchor |")
    print("|" + "---|" * 7)
    for row in rows(model, x, target, layer_name, args):
        assert row.anchor is not None
        if row.check is not None:  # agreement first; these calls are the warm-up
            row.check(row.ours(), row.anchor())
        reps = 1 if row.heavy else args.repeats
        t_ours = timed(row.ours, device, reps, 0)
        t_anchor = timed(row.anchor, device, reps, 0)
        print(f"| {row.name} | {row.batch / t_ours:,.1f} | {row.batch / t_anchor:,.1f} | {t_ours / pt:.2f} | "
              f"{t_anchor / pt:.2f} | {t_ours / t_anchor:.2f} | {row.anchor_name} |", flush=True)


if __name__ == "__main__":
    main()
