"""Cascading model-parameter randomisation (Adebayo et al., "Sanity checks for saliency maps", 2018).

``python audit.py audit=sanity`` (formerly ``experiment=sanity``): a copy of the checkpoint's network is randomised
block by block from the output down; after each block every method re-explains the same test images and
the maps are compared with the trained model's by Spearman rank correlation of |map| (and SSIM).
A method whose maps stay similar while the weights are destroyed does not explain the model.
The ``random`` control draws fresh noise at every step (its similarity is ≈0 by construction).

Outputs in ``<out_dir>/sanity/``: one cell per method in ``results.jsonl`` (resumable),
``results.csv``/``results.json``, ``sanity_curves.png`` (similarity vs blocks randomised),
``sanity_grid.png`` (the maps of one image as blocks are randomised) and ``report.md``/``.html``.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xaudit.audits.base import AuditContext, AuditMode, accepted_changes
from xaudit.data.tensor_split import TensorSplit
from xaudit.explainers import create
from xaudit.metrics.randomisation import (
    block_layers,
    check_steps,
    randomise_step_,
    spearman,
    ssim,
)
from xaudit.reporting import report as rep
from xaudit.reporting.overlays import grid_image
from xaudit.reporting.protocol import PROTOCOL_VERSION, make_card, protocol_row, write_card
from xaudit.roar.store import method_key
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import atomic_torch_save, atomic_write_bytes
from xaudit.utils.progress import SweepProgress
from xaudit.utils.results import ResultsLog

GRADIENT_METHODS = ("saliency", "integrated_gradients", "smoothgrad", "gradient_x_input")


class Sanity(AuditMode):
    """Cascading model-parameter randomisation of every method (``conf/audit/sanity.yaml``)."""

    name = "sanity"

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """One cell per method: its similarity curve as blocks are randomised."""
        return run_sanity(ctx.cfg, ctx.net, ctx.test, ctx.methods, ctx.mode_dir, ctx.identity, ctx.is_writer)

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """Table, curves, the grid of maps and findings."""
        return write_sanity_report(ctx.mode_dir, cells, ctx.test, ctx.meta(cells))


def cascade(net: nn.Module, method: str, kwargs: dict[str, Any], x: Tensor, y: Tensor, layers: list[str],
            seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """(maps of the trained net, maps after randomising layers[0], layers[0:2], ...) on a copy.

    ``layers``: module names (randomised with their sub-modules) or parameter names (that parameter
    alone), as :func:`block_layers` gives them."""
    model = copy.deepcopy(net).eval()
    check_steps(model, layers, key="sanity.layers")  # all checked before any work

    def explain(step: int) -> Tensor:
        kw = {**kwargs, "seed": int(kwargs.get("seed", 0)) + step} if method == "random" else kwargs
        return create(method, model, **kw).attribute(x, y).detach().float()

    original = explain(0)
    after = []
    for step, name in enumerate(layers, 1):
        randomise_step_(model, name, seed + step)
        after.append(explain(step))
    return original, after


def run_sanity(cfg: Any, net: nn.Module, test: TensorSplit, methods: dict[str, dict[str, Any]], mode_dir: Path,
               identity: dict[str, Any], is_writer: bool = True) -> dict[str, dict[str, Any]]:
    """One cell per method: mean Spearman / SSIM of |maps| after each cascading step."""
    sc = cfg.get("sanity") or {}
    n = int(sc.get("num_images", 32))
    if n < 1 or n > len(test):
        raise ConfigError(f"sanity.num_images={n} must lie in [1, {len(test)}] (the test split's size).")
    layers = list(sc.get("layers") or block_layers(net))
    seed = int(sc.get("seed", 0))
    results = ResultsLog(mode_dir)
    results.check_config({**identity, "mode": "sanity", "num_images": n, "layers": layers, "seed": seed,
                          "protocol_version": PROTOCOL_VERSION}, accept=accepted_changes(cfg))
    if is_writer:
        size = [int(v) for v in test.images.shape[-2:]]
        method = {"order": "top block first, cascading", "similarity": "Spearman and SSIM of |maps|"}
        row = protocol_row("cascading model randomisation",
                           "Adebayo et al., Sanity checks for saliency maps, NeurIPS 2018",
                           {"images": n, "blocks": len(layers), **method, "seed": seed}, method,
                           ["randomises whole blocks (the paper: every layer)"])
        write_card(mode_dir, make_card("sanity", identity.get("target"), size, {"sanity": row}))
    done = results.read()
    device = next(net.parameters()).device  # the audit's device (the trainer's)
    x, y = test.normalise(test.images[:n]).to(device), test.labels[:n].to(device)
    keys = {name: f"sanity|{method_key(name, kw)}" for name, kw in methods.items()}
    progress = SweepProgress(len(keys), sum(k in done for k in keys.values()), "sanity check", enabled=is_writer)
    for name, kw in methods.items():
        if keys[name] in done:
            continue
        start = time.perf_counter()
        original, after = cascade(net, name, kw, x, y, layers, seed)
        a = original.abs().flatten(1)
        rank = [float(spearman(a, m.abs().flatten(1)).nanmean()) for m in after]
        struct = ([float(ssim(original.abs(), m.abs()).nanmean()) for m in after]
                  if min(x.shape[-2:]) >= 7 else [math.nan] * len(after))
        if is_writer:
            atomic_torch_save(mode_dir / "maps" / f"{method_key(name, kw)}.pt",
                              {"maps": torch.stack([original[:4], *[m[:4] for m in after]], 1).half().cpu()})
        record = {"cell": keys[name], "mode": "sanity", "method": name, "method_key": method_key(name, kw),
                  "layers": layers, "spearman": rank, "ssim": struct, "count": n,
                  "seconds": round(time.perf_counter() - start, 3)}
        if is_writer:
            results.append(record)
        progress.advance(method_key(name, kw), f"rank corr after all blocks {rank[-1]:.3f}", record["seconds"])
    return {k: v for k, v in results.read().items() if k in set(keys.values())}


def write_sanity_report(mode_dir: Path, cells: list[dict[str, Any]], test: TensorSplit,
                        meta: dict[str, Any]) -> dict[str, Path]:
    """Table (method × blocks randomised), curves, the grid of maps and findings."""
    cells = sorted(cells, key=lambda c: (c["method"] in rep.CONTROLS, c["method"]))
    layers = cells[0]["layers"] if cells else []
    header = ["method", *[f"→{name}" for name in layers]]
    table = [[c["method_key"], *[round(v, 4) for v in c["spearman"]]] for c in cells]
    plt = rep.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in cells:
        style = "--" if c["method"] in rep.CONTROLS else "-"
        ax.plot(range(len(layers) + 1), [1.0, *c["spearman"]], marker="o", linestyle=style, label=c["method_key"])
    ax.set_xticks(range(len(layers) + 1), ["trained", *layers], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Spearman of |map| vs trained model")
    ax.set_title("Cascading randomisation (output → input)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    plots = [("Rank correlation as blocks are randomised", rep.save_figure(fig, mode_dir / "sanity_curves.png"))]
    maps = {c["method_key"]: torch.load(mode_dir / "maps" / f"{c['method_key']}.pt", weights_only=True)["maps"]
            for c in cells if (mode_dir / "maps" / f"{c['method_key']}.pt").is_file()}
    if maps:
        img = test.images[:1].float() / 255.0 if not test.images.is_floating_point() else test.images[:1]
        rows = list(maps)
        images = img.expand(len(rows), -1, -1, -1)
        columns = [torch.stack([maps[r][0, s].float().abs() for r in rows]) for s in range(len(layers) + 1)]
        grid = grid_image(images, columns, ["trained", *[n.rsplit(".", 1)[-1] for n in layers]], rows, cell=72)
        import io

        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        atomic_write_bytes(mode_dir / "sanity_grid.png", buf.getvalue())
        plots.append(("Maps of one test image as blocks are randomised", mode_dir / "sanity_grid.png"))
    facts = sanity_findings(cells)
    return rep.write_tables_report(mode_dir, "sanity", cells, meta, header, table, plots, facts)


def sanity_findings(cells: list[dict[str, Any]]) -> list[str]:
    """What the curves show, in words (the published finding: gradients decorrelate, guided backprop less).

    Methods are compared by their mean rank correlation over the cascade (the area under the
    curve, Quantus' "average correlation"), which one noisy last step cannot flip.
    """
    final = {c["method_key"]: c["spearman"][-1] for c in cells if c["spearman"]}
    mean = {c["method_key"]: sum(c["spearman"]) / len(c["spearman"]) for c in cells if c["spearman"]}
    if not final:
        return []
    out = ["Mean rank correlation with the trained model's maps over the cascade: "
           + ", ".join(f"{m} {v:.2f}" for m, v in sorted(mean.items(), key=lambda kv: kv[1]))
           + "; after randomising every block: "
           + ", ".join(f"{m} {v:.2f}" for m, v in sorted(final.items(), key=lambda kv: kv[1])) + "."]
    grads = [m for m in mean if m in GRADIENT_METHODS]
    if "guided_backprop" in mean and grads:
        top = max(grads, key=mean.get)
        if mean["guided_backprop"] > mean[top]:
            out.append(f"Guided backprop stays more similar ({mean['guided_backprop']:.2f}) than every gradient "
                       f"method (at most {top} {mean[top]:.2f}) as the weights are destroyed: its maps depend "
                       "less on the model (the finding of Adebayo et al. 2018).")
        else:
            out.append(f"Guided backprop ({mean['guided_backprop']:.2f}) is not more similar than {top} "
                       f"({mean[top]:.2f}) here, unlike the published finding.")
    if "sobel" in mean:
        out.append(f"The sobel control ignores the model: similarity {mean['sobel']:.2f} (fails the check by design).")
    if "random" in mean:
        out.append(f"The random control is uncorrelated ({mean['random']:.2f}), as it must be.")
    return out
