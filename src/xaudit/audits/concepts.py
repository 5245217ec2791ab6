"""``audit=concepts``: TCAV scores of concepts for every class, against random concepts.

Concept sets come from the data (on shapes: "class k's cue" — its background colour, corner mark
or stripe orientation — drawn over every shape, which is exactly what a shortcut model learns)
and from user folders of example images. Random sets are images of the same kind with nothing
in common (shapes with uniformly drawn cues, or random test images). One results cell per
(concept, class), appended as it is computed, so a killed audit resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xaudit.audits.base import AuditContext, AuditMode, accepted_changes
from xaudit.concepts.sources import (
    Draw,
    class_images,
    concept_sources,
    concepts_int,
    cue_effects,
    default_concept_layer,
)
from xaudit.concepts.tcav import (
    check_alternative,
    concept_tcav,
    layer_activations,
    random_baseline,
)
from xaudit.data.shapes import ShapesDataModule
from xaudit.data.tensor_split import TensorSplit
from xaudit.explainers.hooks import resolve_layer
from xaudit.reporting import report as rep
from xaudit.utils.errors import ConfigError
from xaudit.utils.results import ResultsLog


class Concepts(AuditMode):
    """TCAV (Kim et al., 2018) of concepts for every class (``conf/audit/concepts.yaml``)."""

    name = "concepts"
    uses_methods = False  # explains with concepts, not with the explainers

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """One cell per (concept, class)."""
        return run_concepts(ctx.cfg, ctx.net, ctx.datamodule, ctx.test, ctx.mode_dir, ctx.identity, ctx.is_writer)

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """Table (concept × class), TCAV bar plot, findings."""
        meta = {**ctx.meta(cells), "methods": ", ".join(sorted({c["concept"] for c in cells}))}
        alpha = float((ctx.cfg.get("concepts") or {}).get("alpha", 0.05))
        return write_concepts_report(ctx.mode_dir, cells, meta, alpha)


def run_concepts(cfg: Any, net: nn.Module, datamodule: Any, test: TensorSplit, mode_dir: Path,
                 identity: dict[str, Any], is_writer: bool = True) -> dict[str, dict[str, Any]]:
    """One cell per (concept, class): TCAV score, random baseline, Bonferroni p-value, CAV accuracy."""
    cc = cfg.get("concepts") or {}
    alpha = float(cc.get("alpha", 0.05))
    if not 0 < alpha < 1:
        raise ConfigError(f"concepts.alpha={alpha} must lie in (0, 1).")
    seed = int(cc.get("seed", 0))
    alternative = check_alternative(str(cc.get("alternative", "greater")))
    runs = concepts_int(cc.get("num_random", 50), "num_random", 2)
    per_class = concepts_int(cc.get("images_per_class", 64), "images_per_class", 1)
    num_classes = int(test.labels.max()) + 1
    classes = [int(k) for k in (cc.get("classes") or range(num_classes))]
    for k in classes:
        if not 0 <= k < num_classes:
            raise ConfigError(f"concepts.classes holds {k}; valid classes are 0..{num_classes - 1}.")
    probe = test.normalise(test.images[:1])
    layer = str(cc.get("layer") or default_concept_layer(net, probe))
    layer_activations(net, layer, probe)  # an unknown or non-spatial layer fails here, before any work
    layer = resolve_layer(net, layer)
    sources, random_draw = concept_sources(cc, datamodule, test)
    names = getattr(datamodule, "class_names", None) or [str(k) for k in range(num_classes)]
    concepts = [*sources, "random"]
    results = ResultsLog(mode_dir)
    results.check_config({**identity, "mode": "concepts", "layer": layer, "concepts": concepts, "classes": classes,
                          "seed": seed, "alpha": alpha, "alternative": alternative,
                          "examples": int(cc.get("examples", 64)), "num_random": runs,
                          "images_per_class": per_class, "cue": cc.get("cue"),
                          "folders": {k: str(v) for k, v in dict(cc.get("folders") or {}).items()}},
                         accept=accepted_changes(cfg))
    done = results.read()
    keys = {(c, k): f"concepts|{c}|{names[k]}" for c in concepts for k in classes}
    if all(key in done for key in keys.values()):
        return {key: done[key] for key in keys.values()}
    start = time.perf_counter()
    effects: dict[tuple[str, int], float] = {}
    if isinstance(datamodule, ShapesDataModule) and cc.get("builtin", True):
        effects = cue_effects(net, cc, datamodule, classes, per_class, test.normalise)

    def acts(images: Tensor) -> Tensor:
        return layer_activations(net, layer, test.normalise(images))[0]

    idx = class_images(test, classes, per_class)
    grads: dict[int, Tensor] = {}
    for k, rows in idx.items():
        _, g = layer_activations(net, layer, test.normalise(test.images[rows]), torch.full((len(rows),), k))
        assert g is not None
        grads[k] = g
    # random draws: 0..R-1 negatives (shared by every concept), R..2R-1 the random control's
    # examples, 2R..4R-1 the random-vs-random baseline pairs
    negatives = [acts(random_draw(r)) for r in range(runs)]
    baseline = random_baseline([(acts(random_draw(2 * runs + r)), acts(random_draw(3 * runs + r)))
                                for r in range(runs)], seed)
    draws: dict[str, Draw] = {**sources, "random": lambda r: random_draw(runs + r)}
    for name in concepts:
        if all(keys[(name, k)] in done for k in classes):
            continue
        pairs = [(acts(draws[name](r)), negatives[r]) for r in range(runs)]
        for res in concept_tcav(name, pairs, baseline, grads, len(keys), alpha, seed, alternative):
            record = {"cell": keys[(name, res.class_index)], "mode": "concepts", "method": name, "method_key": name,
                      "class": names[res.class_index], "layer": layer, "count": len(idx[res.class_index]),
                      **res.record(), "cue_effect": effects.get((name, res.class_index)),
                      "seconds": round(time.perf_counter() - start, 3)}
            if is_writer:
                results.append(record)
            done[record["cell"]] = record
    return {key: done[key] for key in keys.values()}


def concepts_findings(cells: list[dict[str, Any]], alpha: float) -> list[str]:
    """Which concepts matter for which class, in words."""
    sig = [c for c in cells if c["significant"] and c["concept"] != "random"]
    out = []
    if sig:
        out.append("Significant concepts (Bonferroni p < " + f"{alpha:g}): " + "; ".join(
            f"{c['concept']} for {c['class']} (TCAV {c['tcav']:.2f} vs random {c['random_tcav']:.2f}, "
            f"p={c['p_value']:.2g}{_effect(c)})" for c in sorted(sig, key=lambda c: c["p_value"])) + ".")
    else:
        out.append(f"No concept is significant for any class (Bonferroni p < {alpha:g}).")
    own = [c for c in cells if c.get("cue_effect") is not None and c["concept"].endswith(":" + c["class"])]
    if own:
        out.append("Setting a class's own cue on its images moves its log-probability by " + ", ".join(
            f"{c['cue_effect']:+.3f} ({c['class']})" for c in sorted(own, key=lambda c: c["class_index"]))
            + " nats: TCAV counts the sign of a derivative, this is the size of the change.")
    rnd = [c for c in cells if c["concept"] == "random"]
    if rnd:
        bad = [c for c in rnd if c["significant"]]
        if bad:
            out.append("The random control concept is significant for " + ", ".join(
                f"{c['class']} (p={c['p_value']:.2g})" for c in bad) + f": Bonferroni keeps such a chance hit to at "
                f"most {alpha:g} of audits; if it recurs with other concepts.seed values, the random sets are "
                "too small (raise concepts.examples or concepts.num_random).")
        else:
            out.append("The random control concept is not significant for any class, as it should be.")
    return out


def _effect(cell: dict[str, Any]) -> str:
    return "" if cell.get("cue_effect") is None else f", cue effect {cell['cue_effect']:+.3f} nats"


def write_concepts_report(mode_dir: Path, cells: list[dict[str, Any]], meta: dict[str, Any],
                          alpha: float) -> dict[str, Path]:
    """Table (concept × class), a bar plot of TCAV scores with the random baseline, findings."""
    cells = sorted(cells, key=lambda c: (c["concept"] == "random", c["concept"], c["class_index"]))
    header = ["concept", "class", "TCAV", "± std", "random TCAV", "p (Bonferroni)", "significant", "CAV accuracy",
              "cue effect (nats)"]
    table = [[c["concept"], c["class"], round(c["tcav"], 3), round(c["tcav_std"], 3), round(c["random_tcav"], 3),
              f"{c['p_value']:.2g}", "yes" if c["significant"] else "no", round(c["cav_accuracy"], 3),
              float("nan") if c.get("cue_effect") is None else round(c["cue_effect"], 3)]
             for c in cells]
    plt = rep.pyplot()
    classes = list(dict.fromkeys(c["class"] for c in sorted(cells, key=lambda c: c["class_index"])))
    concepts = list(dict.fromkeys(c["concept"] for c in cells))
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes) + 1, 3.6), squeeze=False, sharey=True)
    for ax, cls in zip(axes[0], classes):
        row = {c["concept"]: c for c in cells if c["class"] == cls}
        xs = np.arange(len(concepts))
        means = [row[n]["tcav"] if n in row else np.nan for n in concepts]
        errs = [row[n]["tcav_std"] if n in row else 0 for n in concepts]
        colours = ["tab:red" if n in row and row[n]["significant"] else "tab:grey" for n in concepts]
        ax.bar(xs, means, yerr=errs, color=colours, capsize=2)
        rnd = [row[n]["random_tcav"] for n in concepts if n in row]
        if rnd:
            ax.axhline(float(np.mean(rnd)), color="black", ls="--", lw=0.8, label="random CAVs")
        for x_, n in zip(xs, concepts):
            if n in row and row[n]["significant"]:
                ax.text(x_, min(1.0, means[int(x_)] + errs[int(x_)]) + 0.02, "*", ha="center")
        ax.set_xticks(xs, concepts, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"class {cls}", fontsize=9)
    axes[0][0].set_ylabel("TCAV score")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"TCAV at {cells[0]['layer'] if cells else '?'} (red *: significant)", fontsize=10)
    plots = [("TCAV scores per class (bars: concepts; dashed: random CAVs)",
              rep.save_figure(fig, mode_dir / "tcav_scores.png"))]
    return rep.write_tables_report(mode_dir, "concepts", cells, meta, header, table, plots,
                                   concepts_findings(cells, alpha))
