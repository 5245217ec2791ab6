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

Every family vs Quantus (``--families``): one row per xaudit metric that has a Quantus class of the
same name (ROAD: pytorch-grad-cam's ``ROADCombined``; the cascading sanity check: ``MPRT``;
deletion+insertion: ``PixelFlipping`` twice), both timed on the same model, images, saliency maps,
masks and settings (samples, steps, patches); Quantus with ``disable_warnings=True``,
``return_aggregate=False`` and ``quantus.explain``/Captum ``Saliency`` where it re-explains.

    python benchmarks/metrics.py --families all --quick            # CPU: ResNet-18 @32 px, batch 16
    python benchmarks/metrics.py --families faithfulness robustness --quick
    python benchmarks/metrics.py --families all --model resnet50 --image-size 224   # the GPU setting

Images have one channel by default (``--channels``), so Quantus' features (channel values) are
xaudit's pixels and ``features_in_step`` means the same on both sides. A reference that raises is
reported as "fails" with its error, not timed.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
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


# -- every family vs Quantus ------------------------------------------------------------------------
FAMILIES = ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic")


@dataclass
class Case:
    """One row: an xaudit metric and its reference, run on the same model, images, maps and settings."""

    family: str
    name: str  # xaudit registered name
    reference: str  # the reference implementation's class
    xaudit: Callable[[], object]
    quantus: Callable[[], object]
    settings: str = ""


def family_cases(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace
                 ) -> list[Case]:
    """The side-by-side cases. Images are ``x`` [B,C,H,W]; with C = 1 (the default) Quantus' features (channel
    values) are xaudit's pixels, so ``features_in_step`` and subset sizes mean the same on both sides."""
    import quantus

    from xaudit.explainers import create
    from xaudit.metrics import metric_class

    b, _, h, w = x.shape
    device = x.device
    npix = h * w
    steps = args.feature_steps
    if npix % steps:
        raise SystemExit(f"--feature-steps={steps} must divide H*W={npix}")
    fis = npix // steps  # pixels (= Quantus features at C=1) per step
    n = args.samples
    explainer = create("saliency", model)
    attr = explainer.attribute(x, target).detach()  # [B,H,W]
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):  # a rectangle per image, about a sixth of it
        r0, c0 = torch.randint(0, h // 2, (2,), generator=g).tolist()
        mask[i, r0:r0 + h // 3, c0:c0 + w // 2] = True
    mask = mask.to(device)
    x_np, y_np = x.cpu().numpy(), target.cpu().numpy()
    a_np = attr[:, None].cpu().numpy()
    s_np = mask[:, None].cpu().numpy().astype(np.float32)
    dev = str(device)
    q_common = {"disable_warnings": True, "return_aggregate": False}
    explain = {"explain_func": quantus.explain, "explain_func_kwargs": {"method": "Saliency", "device": dev}}

    def ours(name: str, inputs: tuple[str, ...] = ("x", "attr", "target"), **kw: object) -> Callable[[], object]:
        given = {"x": x, "attr": attr, "target": target, "mask": mask, "explainer": explainer}

        def run() -> object:
            cls = metric_class(name)
            metric = cls(**kw) if "model" not in inspect.signature(cls.__init__).parameters else cls(model, **kw)
            metric.update(*(given[k] for k in inputs))
            return metric.compute()
        return run

    def theirs(cls: str, call: dict[str, object] | None = None, **kw: object) -> Callable[[], object]:
        def run() -> object:
            metric = getattr(quantus, cls)(**q_common, **kw)
            return metric(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np, device=dev, batch_size=b,
                          **(call or {}))
        return run

    xet = ("x", "attr", "target", "explainer")
    ch = {"abs": True, "normalise": True}  # Quantus' complexity/mask defaults, stated on both sides
    road_p = [20, 40, 60, 80] if args.quick else list(range(10, 100, 10))

    def grad_cam_road() -> object:
        from pytorch_grad_cam.metrics.road import ROADCombined
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

        targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target]
        return ROADCombined(percentiles=road_p)(x, attr.cpu().numpy(), targets, model)

    def pixel_flipping_twice() -> object:  # deletion + a reversed-order curve standing in for insertion
        pf = quantus.PixelFlipping(features_in_step=fis, perturb_baseline=0.0, normalise=False, abs=False,
                                   **q_common)
        return [pf(model=model, x_batch=x_np, y_batch=y_np, a_batch=a, device=dev, batch_size=b, softmax=True)
                for a in (a_np, a_np.max() - a_np)]

    def deletion_insertion() -> object:
        return [ours("deletion_insertion", mode=m, steps=steps, substrate="zero")() for m in ("deletion", "insertion")]

    sim = quantus.similarity_func.correlation_spearman
    # a leaf layer: Quantus' get_hidden_representations skips container blocks (e.g. ResNet's "layer4")
    layer = args.layer or [k for k, v in model.named_modules() if isinstance(v, torch.nn.Conv2d)][-1]
    cases = [
        # faithfulness
        Case("faithfulness", "deletion_insertion", "PixelFlipping ×2", deletion_insertion, pixel_flipping_twice,
             f"{steps} steps, zero baseline, both curves"),
        Case("faithfulness", "faithfulness_correlation", "FaithfulnessCorrelation",
             ours("faithfulness_correlation", nr_runs=n, subset_size=fis, substrate="zero", output="prob"),
             theirs("FaithfulnessCorrelation", {"softmax": True}, nr_runs=n, subset_size=fis, perturb_baseline=0.0,
                    normalise=False, abs=False), f"{n} runs × {fis} px"),
        Case("faithfulness", "faithfulness_estimate", "FaithfulnessEstimate",
             ours("faithfulness_estimate", features_in_step=fis), theirs("FaithfulnessEstimate", features_in_step=fis),
             f"{steps} steps"),
        Case("faithfulness", "monotonicity", "Monotonicity",
             ours("monotonicity", features_in_step=fis),
             theirs("Monotonicity", {"softmax": True}, features_in_step=fis), f"{steps} steps"),
        Case("faithfulness", "monotonicity_correlation", "MonotonicityCorrelation",
             ours("monotonicity_correlation", nr_samples=n, features_in_step=fis),
             theirs("MonotonicityCorrelation", {"softmax": True}, nr_samples=n, features_in_step=fis),
             f"{steps} steps × {n} samples"),
        Case("faithfulness", "region_perturbation", "RegionPerturbation",
             ours("region_perturbation", patch_size=args.patch, regions_evaluation=steps),
             theirs("RegionPerturbation", {"softmax": True}, patch_size=args.patch, regions_evaluation=steps),
             f"patch {args.patch}, {steps} regions"),
        Case("faithfulness", "selectivity", "Selectivity",
             ours("selectivity", patch_size=2 * args.patch),
             theirs("Selectivity", {"softmax": True}, patch_size=2 * args.patch),
             f"patch {2 * args.patch} ({npix // (2 * args.patch) ** 2} patches)"),
        Case("faithfulness", "irof", "IROF", ours("irof"), theirs("IROF", {"softmax": True}),
             "SLIC, 100 segments asked, mean baseline"),
        Case("faithfulness", "infidelity", "Infidelity",
             ours("infidelity", perturb_patch_sizes=[args.patch]),
             theirs("Infidelity", perturb_patch_sizes=[args.patch], n_perturb_samples=1), f"patch {args.patch}"),
        Case("faithfulness", "sensitivity_n", "SensitivityN",
             ours("sensitivity_n", features_in_step=fis), theirs("SensitivityN", features_in_step=fis),
             f"{int(0.8 * steps)} of {steps} steps"),
        Case("faithfulness", "sufficiency", "Sufficiency", ours("sufficiency"), theirs("Sufficiency"),
             "threshold 0.6"),
        Case("faithfulness", "road", "grad-cam ROADCombined", ours("road", percentiles=road_p, noise=0.01),
             grad_cam_road, f"{len(road_p)} percentiles, MoRF+LeRF"),
        # robustness
        Case("robustness", "max_sensitivity", "MaxSensitivity", ours("max_sensitivity", xet, n=n, radius=0.05),
             theirs("MaxSensitivity", explain, nr_samples=n, lower_bound=0.05), f"{n} samples"),
        Case("robustness", "avg_sensitivity", "AvgSensitivity", ours("avg_sensitivity", xet, n=n, radius=0.2),
             theirs("AvgSensitivity", explain, nr_samples=n, lower_bound=0.2), f"{n} samples"),
        Case("robustness", "local_lipschitz", "LocalLipschitzEstimate",
             ours("local_lipschitz", xet, n=n, sigma=0.1),
             theirs("LocalLipschitzEstimate", explain, nr_samples=n, perturb_std=0.1), f"{n} samples"),
        Case("robustness", "continuity", "Continuity", ours("continuity", xet, nr_steps=args.continuity_steps),
             theirs("Continuity", explain, nr_steps=args.continuity_steps), f"{args.continuity_steps} steps"),
        Case("robustness", "consistency", "Consistency", ours("consistency", ("x", "attr")), theirs("Consistency"),
             "top-5 / first-n-sign labels"),
        Case("robustness", "relative_input_stability", "RelativeInputStability",
             ours("relative_input_stability", xet, n=n),
             theirs("RelativeInputStability", explain, nr_samples=n), f"{n} samples"),
        Case("robustness", "relative_output_stability", "RelativeOutputStability",
             ours("relative_output_stability", xet, n=n),
             theirs("RelativeOutputStability", explain, nr_samples=n), f"{n} samples"),
        Case("robustness", "relative_representation_stability", "RelativeRepresentationStability",
             ours("relative_representation_stability", xet, n=n, layer=layer),
             theirs("RelativeRepresentationStability", explain, nr_samples=n, layer_names=[layer]),
             f"{n} samples, layer {layer}"),
        # localisation
        Case("localisation", "pointing_game", "PointingGame", ours("pointing_game", ("attr", "mask"), tolerance=0),
             theirs("PointingGame", {"s_batch": s_np}, normalise=False, abs=False), ""),
        Case("localisation", "attribution_localisation", "AttributionLocalisation",
             ours("attribution_localisation", ("attr", "mask"), **ch), theirs("AttributionLocalisation",
                                                                             {"s_batch": s_np}, **ch), ""),
        Case("localisation", "auc", "AUC", ours("auc", ("attr", "mask")), theirs("AUC", {"s_batch": s_np}), ""),
        Case("localisation", "relevance_rank_accuracy", "RelevanceRankAccuracy",
             ours("relevance_rank_accuracy", ("attr", "mask")), theirs("RelevanceRankAccuracy", {"s_batch": s_np}),
             ""),
        Case("localisation", "top_k_intersection", "TopKIntersection",
             ours("top_k_intersection", ("attr", "mask"), k=npix // 10),
             theirs("TopKIntersection", {"s_batch": s_np}, k=npix // 10), f"k={npix // 10}"),
        Case("localisation", "relevance_mass", "RelevanceMassAccuracy", ours("relevance_mass", ("attr", "mask")),
             theirs("RelevanceMassAccuracy", {"s_batch": s_np}, normalise=False, abs=False), ""),
        # complexity
        Case("complexity", "sparseness", "Sparseness", ours("sparseness", ("attr",), **ch),
             theirs("Sparseness", **ch), ""),
        Case("complexity", "complexity", "Complexity", ours("complexity", ("attr",), **ch),
             theirs("Complexity", **ch), ""),
        Case("complexity", "effective_complexity", "EffectiveComplexity",
             ours("effective_complexity", ("attr",), eps=1e-5, **ch), theirs("EffectiveComplexity", eps=1e-5, **ch),
             ""),
        # randomisation
        Case("randomisation", "sanity_check", "MPRT",
             ours("sanity_check", explainer="saliency", mode="cascading", similarity="spearman"),
             theirs("MPRT", explain, layer_order="top_down", similarity_func=sim, abs=True, normalise=False),
             "cascading, top-down, Spearman"),
        Case("randomisation", "efficient_mprt", "EfficientMPRT", ours("efficient_mprt", explainer="saliency"),
             theirs("EfficientMPRT", explain), ""),
        Case("randomisation", "smooth_mprt", "SmoothMPRT",
             ours("smooth_mprt", explainer="saliency", nr_samples=args.smooth_samples),
             theirs("SmoothMPRT", explain, nr_samples=args.smooth_samples), f"{args.smooth_samples} samples"),
        Case("randomisation", "random_logit", "RandomLogit",
             ours("random_logit", explainer="saliency", num_classes=args.num_classes),
             theirs("RandomLogit", explain, num_classes=args.num_classes), "SSIM"),
        # axiomatic
        Case("axiomatic", "completeness", "Completeness", ours("completeness"), theirs("Completeness"),
             "zero/black baseline"),
        Case("axiomatic", "input_invariance", "InputInvariance", ours("input_invariance", xet),
             theirs("InputInvariance", explain), "shift −1"),
        Case("axiomatic", "non_sensitivity", "NonSensitivity", ours("non_sensitivity", features_in_step=fis),
             theirs("NonSensitivity", features_in_step=fis), f"{steps} steps"),
    ]
    return [case for case in cases if case.family in args.families]


def run_families(args: argparse.Namespace) -> None:
    import quantus

    if not hasattr(np, "trapz"):  # Quantus 0.6 calls np.trapz, removed in numpy 2.4: the same rule renamed
        np.trapz = np.trapezoid  # type: ignore[attr-defined]
    device = torch.device(args.device)
    size, b = args.image_size, args.batch
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_backbone(args.model, num_classes=args.num_classes, in_chans=args.channels,
                               image_size=size).to(device).eval()
    x = torch.randn(b, args.channels, size, size, generator=g).to(device)
    target = torch.randint(0, args.num_classes, (b,), generator=g).to(device)
    cases = family_cases(model, x, target, args)
    with torch.no_grad():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        model(x)
    print(f"device={device} ({torch.get_num_threads()} threads)  model={args.model} @{size}px C={args.channels}  "
          f"batch={b}  samples={args.samples}  feature steps={args.feature_steps}  torch={torch.__version__}  "
          f"quantus={quantus.__version__}  numpy={np.__version__}", flush=True)
    rows = []
    for case in cases:
        row = {"case": case}
        for side in ("xaudit", "quantus"):
            best, note = float("inf"), ""
            for _ in range(args.repeats):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.manual_seed(0)  # the same global draws for every repeat
                        np.random.seed(0)
                        best = min(best, timed(getattr(case, side), device))
                except Exception as err:  # a failing reference is reported, not fatal
                    note = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
                    best = float("nan")
                    break
            row[side], row[side + "_note"] = best, note
        rows.append(row)
        q, o = row["quantus"], row["xaudit"]
        ratio = q / o if q == q and o == o else float("nan")
        print(f"{case.family:13s} {case.name:34s} xaudit {o:8.3f}s  {case.reference:31s} {q:8.3f}s  "
              f"{ratio:7.2f}x  {case.settings}  {row['xaudit_note']}{row['quantus_note']}", flush=True)
    print("\n| family | xaudit metric | reference | settings | xaudit (s) | reference (s) | speed-up |")
    print("|---|---|---|---|---:|---:|---:|")
    for row in rows:
        case, q, o = row["case"], row["quantus"], row["xaudit"]
        if q != q or o != o:
            note = row["quantus_note"] or row["xaudit_note"]
            qs = "fails" if q != q else f"{q:.3f}"
            os_ = "fails" if o != o else f"{o:.3f}"
            print(f"| {case.family} | {case.name} | {case.reference} | {case.settings} | {os_} | {qs} | skipped: "
                  f"{note.replace('|', '/')} |")
        else:
            print(f"| {case.family} | {case.name} | {case.reference} | {case.settings} | {o:.3f} | {q:.3f} | "
                  f"{q / o:.1f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=None, help="default 64; 16 with --families")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--internal-batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="default 3; 1 with --families")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-quantus", action="store_true")
    fam = parser.add_argument_group("every family vs Quantus (--families)")
    fam.add_argument("--families", nargs="+", choices=("all", *FAMILIES),
                     help="time every xaudit metric of these families next to its Quantus class instead")
    fam.add_argument("--quick", action="store_true", help="small counts for a CPU: the whole table in minutes")
    fam.add_argument("--channels", type=int, default=1,
                     help="image channels; 1 makes Quantus' features (channel values) xaudit's pixels")
    fam.add_argument("--num-classes", type=int, default=10)
    fam.add_argument("--layer", default=None, help="RelativeRepresentationStability's layer (default: the last "
                     "Conv2d)")
    fam.add_argument("--samples", type=int, default=None,
                     help="noise samples / runs / draws per image (default 50; 10 with --quick)")
    fam.add_argument("--feature-steps", type=int, default=None,
                     help="perturbation steps over the H*W pixels (default 64; 16 with --quick)")
    fam.add_argument("--patch", type=int, default=None, help="patch size (default 8; 4 with --quick)")
    fam.add_argument("--continuity-steps", type=int, default=None, help="default 28; 8 with --quick")
    fam.add_argument("--smooth-samples", type=int, default=None, help="SmoothMPRT samples (default 10; 3 with "
                     "--quick)")
    args = parser.parse_args()
    if args.families:
        quick = args.quick
        defaults = {"batch": 16, "repeats": 1, "samples": 10 if quick else 50, "feature_steps": 16 if quick else 64,
                    "patch": 4 if quick else 8, "continuity_steps": 8 if quick else 28,
                    "smooth_samples": 3 if quick else 10}
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if "all" in args.families:
            args.families = list(FAMILIES)
        run_families(args)
        return
    args.batch = 64 if args.batch is None else args.batch
    args.repeats = 3 if args.repeats is None else args.repeats

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
