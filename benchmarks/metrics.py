"""Benchmark: xaudit deletion+insertion vs Quantus pixel-flipping vs the bare forward passes.

    python benchmarks/metrics.py                      # ResNet-18 @32 px, batch 64, 48 steps
    python benchmarks/metrics.py --batch 16 --repeats 1

One process, one model, one batch. Three timings of the same work:

- xaudit: ``DeletionInsertion`` deletion + insertion, ``steps`` each (2 × (steps+1) forwards per
  image: both curves include their unperturbed/fully-perturbed end points);
- bare forwards: the model alone on 2 × ``steps`` images per image (what the two curves need at
  the least: the image and the substrate are shared end points), in the same chunks, no metric;
- Quantus: ``PixelFlipping`` with ``steps`` steps, run twice (a deletion curve and a second curve
  on the reversed order standing in for insertion, which Quantus lacks — same cost).

Prints images/s for each (best of ``--repeats``), the speed-up over Quantus and xaudit's cost
relative to the bare forwards (medians of the per-repeat ratios). After a warm-up the three are
timed in turn within every repeat, so a ratio compares runs made under the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from xaudit.metrics import DeletionInsertion
from xaudit.models.backbones import build_backbone


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--internal-batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-quantus", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    size, steps, b = args.image_size, args.steps, args.batch
    features = 3 * size * size // steps  # Quantus counts channel values: steps = 3HW / features
    if not args.skip_quantus and (3 * size * size % steps or size * size % features):
        raise SystemExit(f"Quantus needs features_in_step = 3*{size}*{size}/steps to be an integer dividing "
                         f"{size}*{size}; --steps={steps} does not allow that (48 does at 32 px).")
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_backbone(args.model, num_classes=10, image_size=size).to(device).eval()
    x = torch.randn(b, 3, size, size, generator=g).to(device)
    attr = torch.rand(b, size, size, generator=g).to(device)
    target = torch.randint(0, 10, (b,), generator=g).to(device)
    chunk = args.internal_batch_size

    def xaudit_run() -> None:
        for mode in ("deletion", "insertion"):
            metric = DeletionInsertion(model, mode=mode, steps=steps, substrate="zero", internal_batch_size=chunk)
            metric.update(x, attr, target)
            metric.compute()

    bare_inputs = x.repeat(2 * steps, 1, 1, 1)  # the same number of images, no perturbation work

    @torch.no_grad()
    def bare_run() -> None:
        for start in range(0, bare_inputs.shape[0], chunk):
            model(bare_inputs[start:start + chunk]).softmax(-1)

    runs: dict[str, Callable[[], object]] = {"xaudit": xaudit_run, "bare": bare_run}
    if not args.skip_quantus:
        import quantus

        pixel_flipping = quantus.PixelFlipping(features_in_step=features, perturb_baseline=0.0, normalise=False,
                                               abs=False, disable_warnings=True)
        x_np, y_np = x.cpu().numpy(), target.cpu().numpy()
        a_np = attr[:, None].cpu().numpy()

        def quantus_run() -> None:
            for a in (a_np, 1.0 - a_np):  # two curves (the second in reverse order), like deletion + insertion
                pixel_flipping(model=model, x_batch=x_np, y_batch=y_np, a_batch=a, device=str(device),
                               batch_size=b)

        runs["quantus"] = quantus_run

    for fn in runs.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        fn()
    # interleaved repeats: the three timings of one repeat see the same machine load
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    best = {name: min(ts) for name, ts in times.items()}
    rows = [("xaudit deletion+insertion", best["xaudit"]), ("bare forwards (2 x steps)", best["bare"])]
    if "quantus" in best:
        rows.append(("Quantus PixelFlipping x2", best["quantus"]))

    print(f"device={device} ({torch.get_num_threads()} threads)  model={args.model} @{size}px  batch={b}  "
          f"steps={steps}  internal_batch_size={chunk}  torch={torch.__version__}")
    print(f"{'':28s} {'seconds':>9s} {'images/s':>10s}")
    for name, t in rows:
        print(f"{name:28s} {t:9.3f} {b / t:10.1f}")
    cost = statistics.median(tx / tb for tx, tb in zip(times["xaudit"], times["bare"]))
    print(f"xaudit cost / bare forwards: {cost:.3f}x  (median over repeats; floor {(steps + 1) / steps:.3f}x: "
          f"each curve also scores its unperturbed end point)")
    if "quantus" in times:
        speedup = statistics.median(tq / tx for tq, tx in zip(times["quantus"], times["xaudit"]))
        print(f"speed-up over Quantus:       {speedup:.2f}x  (median over repeats)")


if __name__ == "__main__":
    main()
