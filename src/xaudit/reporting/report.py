"""The audit's outputs: results.csv / results.json, report.md / report.html with PNG plots, W&B.

Everything is rebuilt from the finished cells of ``results.jsonl`` (the source of truth), so a
report written after a resumed or multirun sweep shows every cell, and rewriting it is safe.
Files are written atomically.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xaudit.roar.masking import MODES as RETRAIN_MODES
from xaudit.roar.runner import BASELINE
from xaudit.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

CONTROLS = ("random", "sobel")


# -- tables --------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def retrain_summary(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, fraction): mean/std test accuracy over seeds; the baseline is every method's 0 %."""
    base = [c for c in cells if c["method"] == BASELINE]
    methods = sorted({c["method_key"] for c in cells if c["method"] != BASELINE},
                     key=lambda m: (m in CONTROLS, m))
    rows: list[dict[str, Any]] = []
    for m in methods:
        groups: dict[float, list[float]] = {}
        if base:
            groups[0.0] = [c["test_acc"] for c in base]
        for c in cells:
            if c["method_key"] == m:
                groups.setdefault(float(c["fraction"]), []).append(c["test_acc"])
        for f in sorted(groups):
            mean, std = _mean_std(groups[f])
            rows.append({"method": m, "fraction": f, "test_acc": mean, "test_acc_std": std, "seeds": len(groups[f])})
    return rows


def evaluate_summary(cells: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(metric labels, one row per method) of an ``evaluate`` audit."""
    labels: list[str] = []
    rows = []
    for c in cells:
        if c["method"] == "model":
            continue
        for label in c.get("metrics", {}):
            if label not in labels:
                labels.append(label)
        rows.append({"method": c["method_key"], **c.get("metrics", {}), "count": c.get("count")})
    rows.sort(key=lambda r: (r["method"] in CONTROLS, r["method"]))
    return labels, rows


def _noise_margin(acc: float, n: int) -> float:
    """Two binomial standard errors of an accuracy measured on ``n`` images (at least one point)."""
    if n <= 0 or math.isnan(acc):
        return 0.01
    return max(0.01, 2.0 * math.sqrt(max(acc * (1.0 - acc), 1e-12) / n))


def findings(mode: str, cells: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language statements of what the numbers show."""
    out: list[str] = []
    if mode in RETRAIN_MODES:
        rows = retrain_summary(cells)
        base = [r for r in rows if r["fraction"] == 0.0]
        if base:
            out.append(f"Unmasked baseline: test accuracy {base[0]['test_acc']:.3f}.")
        fractions = sorted({r["fraction"] for r in rows if r["fraction"] > 0})
        counts: dict[float, int] = {}
        for c in cells:
            if c.get("method_key") == "random":
                counts[float(c["fraction"])] = counts.get(float(c["fraction"]), 0) + int(c.get("test_count") or 0)
        for f in fractions:
            at = {r["method"]: r["test_acc"] for r in rows if r["fraction"] == f}
            if "random" not in at:
                continue
            verb = "lower" if mode == "roar" else "higher"
            margin = _noise_margin(at["random"], counts.get(f, 0))
            better = [m for m, v in at.items() if m != "random" and (v < at["random"] - margin if mode == "roar"
                                                                     else v > at["random"] + margin)]
            worse = [m for m in at if m not in better and m != "random"]
            parts = ", ".join(f"{m} {v:.3f}" for m, v in sorted(at.items(), key=lambda kv: kv[1]))
            txt = f"{'Removing' if mode == 'roar' else 'Keeping only'} {f:.0%}: {parts}."
            if mode == "kar":
                txt = f"Removing the least important {f:.0%} (keeping {1 - f:.0%}): {parts}."
            if better:
                txt += f" Accuracy {verb} than with random pixels (more informative than random): {', '.join(better)}."
            if worse:
                txt += f" Not clearly better than random (within {margin:.3f}): {', '.join(worse)}."
            out.append(txt)
        for m in dict.fromkeys(r["method"] for r in rows):
            curve = sorted((r["fraction"], r["test_acc"]) for r in rows if r["method"] == m and r["fraction"] > 0)
            rises = [(a, b) for (a, va), (b, vb) in itertools.pairwise(curve) if vb > va + 0.05]
            if rises:
                a, b = rises[0]
                out.append(f"{m}: accuracy rises from {a:.0%} to {b:.0%} removed — the removal pattern itself "
                           "reveals the class (the retrained model reads the shape of the mask), a known ROAR "
                           "caveat; compare methods at the smaller fractions.")
    else:
        labels, rows = evaluate_summary(cells)
        model = [c for c in cells if c["method"] == "model"]
        if model:
            out.append(f"Checkpoint test accuracy: {model[0]['test_acc']:.3f} on {int(model[0]['count'])} images.")
        hib = {}
        for c in cells:
            hib.update(c.get("higher_is_better", {}))
        for label in labels:
            vals = {r["method"]: r.get(label) for r in rows if r.get(label) is not None and not math.isnan(r[label])}
            if len(vals) < 2:
                continue
            best = (max if hib.get(label, True) else min)(vals, key=vals.get)
            out.append(f"Best {label}: {best} ({vals[best]:.3f}; {'higher' if hib.get(label, True) else 'lower'} "
                       f"is better; random gives {vals['random']:.3f})." if "random" in vals else
                       f"Best {label}: {best} ({vals[best]:.3f}).")
    return out


# -- plots ---------------------------------------------------------------------------------------
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically, close it, return ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_retrain(mode: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test accuracy vs fraction removed, one line per method (error bars: std over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m]
        style = "--" if m in ("random", "sobel") else "-"
        ax.errorbar([100 * r["fraction"] for r in pts], [r["test_acc"] for r in pts],
                    yerr=[r["test_acc_std"] for r in pts], label=m, marker="o", linestyle=style, capsize=3)
    ax.set_xlabel("% of pixels removed (" + ("most" if mode == "roar" else "least") + " important first)")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(f"{mode.upper()}: accuracy vs fraction removed")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_evaluate(labels: Sequence[str], rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One bar group per metric, one bar per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels) + 2), 4))
    n = max(len(rows), 1)
    width = 0.8 / n
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(labels))], [r.get(lb, float("nan")) for lb in labels],
               width=width, label=r["method"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("score (mean over test images)")
    ax.set_title("Explanation quality per method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(cells: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Mean deletion / insertion curves per method (probability vs fraction perturbed)."""
    curves = [(c["method_key"], label, vals) for c in cells for label, vals in (c.get("curves") or {}).items()]
    if not curves:
        return None
    labels = list(dict.fromkeys(lb for _, lb, _ in curves))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for method, lb, vals in curves:
            if lb == label:
                ax.plot([i / (len(vals) - 1) for i in range(len(vals))], vals, label=method)
        ax.set_title(f"{label} curve")
        ax.set_xlabel("fraction of pixels perturbed")
        ax.set_ylabel("p(explained class)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# -- files ---------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flat(cell: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cell.items():
        if k == "curves":
            continue
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def summary_table(mode: str, cells: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The report's main table: methods × fractions (ROAR/KAR) or methods × metrics (evaluate)."""
    if mode in RETRAIN_MODES:
        rows = retrain_summary(cells)
        fractions = sorted({r["fraction"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        seeds = max((r["seeds"] for r in rows), default=1)
        header = ["method", *[f"{f:.0%}" for f in fractions]]
        table = []
        for m in methods:
            at = {r["fraction"]: r for r in rows if r["method"] == m}
            table.append([m, *[(f"{at[f]['test_acc']:.4f}" + (f" ± {at[f]['test_acc_std']:.4f}" if seeds > 1 else ""))
                               if f in at else "—" for f in fractions]])
        return header, table
    labels, rows = evaluate_summary(cells)
    hib: dict[str, bool] = {}
    for c in cells:
        hib.update(c.get("higher_is_better", {}))
    header = ["method", *[f"{lb} {'↑' if hib.get(lb, True) else '↓'}" for lb in labels], "images"]
    return header, [[r["method"], *[r.get(lb, float("nan")) for lb in labels], r.get("count")] for r in rows]


def write_report(directory: str | Path, mode: str, cells: Sequence[dict[str, Any]],
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write results.csv/json, the plots and report.md/html into ``directory``; return their paths."""
    d = Path(directory)
    cells = sorted(cells, key=lambda c: c["cell"])
    header, table = summary_table(mode, cells)
    plots: list[tuple[str, Path]] = []
    if mode in RETRAIN_MODES:
        rows = retrain_summary(cells)
        if rows:
            plots.append(("Accuracy vs fraction removed", plot_retrain(mode, rows, d / f"{mode}_accuracy.png")))
    else:
        labels, rows = evaluate_summary(cells)
        if rows and labels:
            plots.append(("Scores per method", plot_evaluate(labels, rows, d / "evaluate_scores.png")))
        curve = plot_curves(cells, d / "evaluate_curves.png")
        if curve is not None:
            plots.append(("Deletion / insertion curves", curve))
    return write_tables_report(d, mode, cells, meta, header, table, plots, findings(mode, cells))


def write_tables_report(directory: Path, mode: str, cells: Sequence[dict[str, Any]], meta: dict[str, Any],
                        header: Sequence[str], table: Sequence[Sequence[Any]], plots: Sequence[tuple[str, Path]],
                        facts: Sequence[str]) -> dict[str, Path]:
    """results.csv (one row per cell), results.json, report.md and report.html with the plots."""
    d = Path(directory)
    paths: dict[str, Path] = {}
    flat = [_flat(c) for c in cells]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    paths["csv"] = d / "results.csv"
    atomic_write_text(paths["csv"], buf.getvalue())
    paths["json"] = d / "results.json"
    atomic_write_json(paths["json"], {"mode": mode, "meta": meta, "cells": list(cells),
                                      "summary": {"header": list(header), "rows": [list(r) for r in table]},
                                      "findings": list(facts)})
    for i, (_, p) in enumerate(plots):
        paths[f"plot{i}"] = p
    meta_rows = [[k, v] for k, v in meta.items()]
    md = [f"# xaudit {mode} report", "", _md_table(["", ""], meta_rows), "", "## Results", "",
          _md_table(header, table), "", "## Findings", "", *[f"- {f}" for f in facts], ""]
    md += [f"![{t}]({p.name})\n" for t, p in plots]
    paths["md"] = d / "report.md"
    atomic_write_text(paths["md"], "\n".join(md))
    body = [f"<h1>xaudit {html.escape(mode)} report</h1>", _html_table(["", ""], meta_rows), "<h2>Results</h2>",
            _html_table(header, table), "<h2>Findings</h2><ul>",
            *[f"<li>{html.escape(f)}</li>" for f in facts], "</ul>",
            *[f"<h3>{html.escape(t)}</h3><img src='{html.escape(p.name)}' alt='{html.escape(t)}'>" for t, p in plots]]
    style = ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}img{max-width:100%}</style>")
    paths["html"] = d / "report.html"
    atomic_write_text(paths["html"], f"<!doctype html><html><head><meta charset='utf-8'><title>xaudit {mode}"
                                     f"</title>{style}</head><body>{''.join(body)}</body></html>\n")
    return paths


def log_report(loggers: Sequence[Any], mode: str, cells: Sequence[dict[str, Any]], paths: dict[str, Path],
               summary: tuple[Sequence[str], Sequence[Sequence[Any]]] | None = None) -> None:
    """Send the tables (and line plots / images) to the configured loggers (W&B; others get scalars)."""
    header, table = summary or summary_table(mode, cells)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            payload: dict[str, Any] = {f"audit/{mode}/table": wandb.Table(columns=header, data=table)}
            flat = [_flat(c) for c in cells]
            cols = list(dict.fromkeys(k for row in flat for k in row))
            payload[f"audit/{mode}/cells"] = wandb.Table(columns=cols, data=[[row.get(k) for k in cols] for row in flat])
            if mode in RETRAIN_MODES:
                rows = retrain_summary(cells)
                methods = list(dict.fromkeys(r["method"] for r in rows))
                fractions = sorted({r["fraction"] for r in rows})
                ys = [[next((r["test_acc"] for r in rows if r["method"] == m and r["fraction"] == f), float("nan"))
                       for f in fractions] for m in methods]
                payload[f"audit/{mode}/accuracy_vs_fraction"] = wandb.plot.line_series(
                    xs=fractions, ys=ys, keys=methods, title=f"{mode.upper()} accuracy vs fraction removed",
                    xname="fraction removed")
            for key, p in paths.items():
                if key.startswith("plot"):
                    payload[f"audit/{mode}/{p.stem}"] = wandb.Image(str(p))
            lg.experiment.log(payload)
        elif hasattr(lg, "log_metrics") and mode in (*RETRAIN_MODES, "evaluate"):
            scalars: dict[str, float] = {}
            if mode in RETRAIN_MODES:
                for r in retrain_summary(cells):
                    scalars[f"audit/{mode}/{r['method']}/{r['fraction']:g}"] = float(r["test_acc"])
            else:
                labels, rows = evaluate_summary(cells)
                for r in rows:
                    scalars.update({f"audit/evaluate/{r['method']}/{lb}": float(r[lb]) for lb in labels if lb in r})
            lg.log_metrics(scalars)
            if hasattr(lg, "save"):
                lg.save()
