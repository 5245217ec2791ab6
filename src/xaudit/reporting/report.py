"""The audit's outputs: results.csv / results.json, report.md / report.html with PNG plots, W&B.

Everything is rebuilt from the finished cells of ``results.jsonl`` (the source of truth), so a
report written after a resumed or multirun sweep shows every cell, and rewriting it is safe.
Files are written atomically. ROAR/KAR: results.csv holds one row per method × fraction (mean,
sample std and 95 % t-interval over the seeds, the Welch interval of the difference to the
``random`` control, the better-than-random decision); cells.csv one row per retrained model.
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

from xaudit.reporting.constants import BASELINE, RETRAIN_MODES
from xaudit.reporting.protocol import card_html, card_markdown, read_card
from xaudit.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

CONTROLS = ("random", "sobel")


# -- statistics ----------------------------------------------------------------------------------
#: two-sided level of every interval in the ROAR/KAR report
LEVEL = 0.95
#: results.csv of a ROAR/KAR audit: one row per (method, fraction)
POINT_COLUMNS = ("method", "fraction", "seeds", "test_acc_mean", "test_acc_std", "ci95_low", "ci95_high",
                 "diff_vs_random", "diff_ci95_low", "diff_ci95_high", "better_than_random")


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) of Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    from scipy.stats import t as student_t

    return float(student_t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Student t quantile; ``df`` may be fractional (Welch)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, df))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, float | int]:
    """n, mean, sample std (ddof=1) and the Student-t interval of the mean of ``values``
    (None/NaN dropped). std and the interval are NaN below two values: one retraining says
    nothing about how much retrainings vary."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "low": nan, "high": nan}
    mean = statistics.fmean(vals)
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "low": nan, "high": nan}
    std = statistics.stdev(vals)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def welch_interval(a: Sequence[float], b: Sequence[float],
                   level: float = LEVEL) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its Welch interval (unequal variances, Welch–Satterthwaite df).

    NaN bounds when either side has fewer than two values; zero spread on both sides gives the
    degenerate interval [diff, diff]."""
    sa, sb = mean_interval(a, level), mean_interval(b, level)
    diff = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return diff, float("nan"), float("nan")
    va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
    if va + vb == 0.0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1))
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def better_than_random(mode: str, low: float, high: float) -> bool:
    """Hooker et al.'s test: ROAR — removing the method's pixels lowers accuracy more than removing
    random ones (the interval of method − random lies below 0); KAR — keeping them keeps more
    (the interval lies above 0)."""
    return high < 0.0 if mode == "roar" else low > 0.0


# -- tables --------------------------------------------------------------------------------------
def _accuracies(cells: Sequence[dict[str, Any]]) -> dict[str, dict[float, list[float]]]:
    """method → fraction → test accuracies (one per seed); the baseline is every method's 0 %."""
    base = [c["test_acc"] for c in cells if c["method"] == BASELINE]
    methods = sorted({c["method_key"] for c in cells if c["method"] != BASELINE},
                     key=lambda m: (m in CONTROLS, m))
    out: dict[str, dict[float, list[float]]] = {}
    for m in methods:
        groups: dict[float, list[float]] = {0.0: list(base)} if base else {}
        for c in cells:
            if c["method_key"] == m and c["method"] != BASELINE:
                groups.setdefault(float(c["fraction"]), []).append(c["test_acc"])
        out[m] = dict(sorted(groups.items()))
    return out


def retrain_summary(cells: Sequence[dict[str, Any]], mode: str = "roar") -> list[dict[str, Any]]:
    """One row per (method, fraction) with the :data:`POINT_COLUMNS` (results.csv of ROAR/KAR).

    test_acc over the seeds: mean, sample std, 95 % t-interval of the mean; vs the ``random``
    control at the same fraction: difference of means with its 95 % Welch interval and
    ``better_than_random`` (``mode`` decides the side): "yes"/"no"; "n/a" where either side has
    one seed (no interval); "" for the random control itself and for the shared 0 % baseline.
    """
    acc = _accuracies(cells)
    rand = acc.get("random", {})
    rows: list[dict[str, Any]] = []
    for m, groups in acc.items():
        for f, vals in groups.items():
            st = mean_interval(vals)
            row: dict[str, Any] = {"method": m, "fraction": f, "seeds": st["n"], "test_acc_mean": st["mean"],
                                   "test_acc_std": st["std"], "ci95_low": st["low"], "ci95_high": st["high"],
                                   "diff_vs_random": float("nan"), "diff_ci95_low": float("nan"),
                                   "diff_ci95_high": float("nan"), "better_than_random": ""}
            if m != "random" and f > 0.0 and f in rand:
                diff, lo, hi = welch_interval(vals, rand[f])
                row.update(diff_vs_random=diff, diff_ci95_low=lo, diff_ci95_high=hi,
                           better_than_random="n/a" if math.isnan(lo) else
                           ("yes" if better_than_random(mode, lo, hi) else "no"))
            rows.append(row)
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


FAMILY_ORDER = ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic", "other")


def family_sections(cells: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """One (title, header, rows) table per metric family of an ``evaluate`` audit (Quantus' grouping):
    methods × that family's metrics, each column marked ↑ (higher is better) or ↓. Empty when the
    cells carry no families (audits written before families existed)."""
    families: dict[str, str] = {}
    higher: dict[str, bool] = {}
    for c in cells:
        families.update(c.get("families") or {})
        higher.update(c.get("higher_is_better") or {})
    if not families:
        return []
    labels, rows = evaluate_summary(cells)
    out = []
    for fam in sorted(set(families.values()), key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else 99):
        cols = [lb for lb in labels if families.get(lb) == fam]
        header = ["method", *[f"{lb} {'↑' if higher.get(lb, True) else '↓'}" for lb in cols]]
        table = [[r["method"], *[r.get(lb, float("nan")) for lb in cols]] for r in rows]
        out.append((fam.capitalize(), header, table))
    return out


def _noise_margin(acc: float, n: int) -> float:
    """Two binomial standard errors of an accuracy measured on ``n`` images (at least one point)."""
    if n <= 0 or math.isnan(acc):
        return 0.01
    return max(0.01, 2.0 * math.sqrt(max(acc * (1.0 - acc), 1e-12) / n))


def _pm(row: dict[str, Any], digits: int = 3) -> str:
    """``mean ± std`` (just the mean where one seed leaves the std undefined)."""
    if math.isnan(row["test_acc_std"]):
        return f"{row['test_acc_mean']:.{digits}f}"
    return f"{row['test_acc_mean']:.{digits}f} ± {row['test_acc_std']:.{digits}f}"


def _ci(low: float, high: float, digits: int = 3, signed: bool = False) -> str:
    fmt = f"{'+' if signed else ''}.{digits}f"
    return f"[{low:{fmt}}, {high:{fmt}}]"


def retrain_findings(mode: str, cells: Sequence[dict[str, Any]]) -> list[str]:
    """ROAR/KAR in words: the seeds behind each point, the baseline and the random control with
    their intervals, and per fraction which methods beat random (difference, 95 % Welch interval)."""
    out: list[str] = []
    rows = retrain_summary(cells, mode)
    if not rows:
        return out
    seeds = sorted({r["seeds"] for r in rows})
    n_txt = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    if seeds[-1] >= 2:
        out.append(f"Each point: test accuracy of {n_txt} retrained models (one per seed), mean ± sample std and "
                   f"the {LEVEL:.0%} interval of the mean (Student t, [low, high]); a method is better than random "
                   f"when the {LEVEL:.0%} Welch interval of its difference to the random control excludes 0 on the "
                   f"{'negative (accuracy lower)' if mode == 'roar' else 'positive (accuracy higher)'} side "
                   "(Hooker et al., 2019: 5 seeds, roar.seed=[0,1,2,3,4]).")
    if seeds[0] < 2:
        out.append(f"{'Every point has' if seeds[-1] < 2 else 'Some points have'} one seed: a single retraining gives "
                   "no interval (std and CI n/a), so differences to random are judged only against the test "
                   "set's binomial noise margin (two standard errors), which ignores how much retraining varies. "
                   "Run roar.seed=[0,1,2] (Hooker et al.: roar.seed=[0,1,2,3,4]).")
    base = next((r for r in rows if r["fraction"] == 0.0), None)
    if base is not None:
        txt = f"Unmasked baseline: test accuracy {_pm(base)}"
        if base["seeds"] >= 2:
            txt += f", {LEVEL:.0%} CI {_ci(base['ci95_low'], base['ci95_high'])} ({base['seeds']} seeds)"
        out.append(txt + ".")
    counts: dict[float, int] = {}
    for c in cells:
        if c.get("method_key") == "random":
            counts[float(c["fraction"])] = int(c.get("test_count") or 0)
    verb, other = ("lower", "higher") if mode == "roar" else ("higher", "lower")
    for f in sorted({r["fraction"] for r in rows if r["fraction"] > 0}):
        at = {r["method"]: r for r in rows if r["fraction"] == f}
        parts = ", ".join(f"{m} {_pm(r)}" for m, r in sorted(at.items(), key=lambda kv: kv[1]["test_acc_mean"]))
        txt = (f"Removing {f:.0%}: {parts}." if mode == "roar"
               else f"Removing the least important {f:.0%} (keeping {1 - f:.0%}): {parts}.")
        rnd = at.get("random")
        if rnd is None:
            out.append(txt)
            continue
        if rnd["seeds"] >= 2:
            txt += f" Random control {LEVEL:.0%} CI {_ci(rnd['ci95_low'], rnd['ci95_high'])} ({rnd['seeds']} seeds)."
        better, unclear, worse, single = [], [], [], []
        for m, r in at.items():
            if m == "random":
                continue
            if r["better_than_random"] == "n/a":
                single.append(m)
                continue
            shown = f"{m} {r['diff_vs_random']:+.3f} {_ci(r['diff_ci95_low'], r['diff_ci95_high'], signed=True)}"
            if r["better_than_random"] == "yes":
                better.append(shown)
            elif better_than_random("kar" if mode == "roar" else "roar", r["diff_ci95_low"], r["diff_ci95_high"]):
                worse.append(shown)
            else:
                unclear.append(shown)
        if better:
            txt += (f" Better than random (accuracy {verb}; difference to random with its {LEVEL:.0%} Welch "
                    f"interval): {', '.join(better)}.")
        if unclear:
            txt += f" Not distinguishable from random (the interval contains 0): {', '.join(unclear)}."
        if worse:
            txt += f" Worse than random (accuracy clearly {other}): {', '.join(worse)}."
        if single:
            margin = _noise_margin(rnd["test_acc_mean"], counts.get(f, 0))
            ahead = [m for m in single if (at[m]["test_acc_mean"] < rnd["test_acc_mean"] - margin if mode == "roar"
                                           else at[m]["test_acc_mean"] > rnd["test_acc_mean"] + margin)]
            behind = [m for m in single if m not in ahead]
            txt += f" One seed, no interval (binomial test-set margin ±{margin:.3f} only):"
            if ahead:
                txt += f" accuracy {verb} than random: {', '.join(ahead)};"
            if behind:
                txt += f" within the margin or {other}: {', '.join(behind)};"
            txt = txt.rstrip(";") + "."
        out.append(txt)
    for m in dict.fromkeys(r["method"] for r in rows):
        curve = sorted((r["fraction"], r["test_acc_mean"]) for r in rows if r["method"] == m and r["fraction"] > 0)
        rises = [(a, b) for (a, va), (b, vb) in itertools.pairwise(curve) if vb > va + 0.05]
        if rises:
            a, b = rises[0]
            out.append(f"{m}: accuracy rises from {a:.0%} to {b:.0%} removed — the removal pattern itself "
                       "reveals the class (the retrained model reads the shape of the mask), a known ROAR "
                       "caveat; compare methods at the smaller fractions.")
    return out


def findings(mode: str, cells: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language statements of what the numbers show."""
    out: list[str] = []
    if mode in RETRAIN_MODES:
        out = retrain_findings(mode, cells)
    else:
        labels, rows = evaluate_summary(cells)
        model = [c for c in cells if c["method"] == "model"]
        if model:
            out.append(f"Checkpoint test accuracy: {model[0]['test_acc']:.3f} on {int(model[0]['count'])} images.")
        hib = {}
        for c in cells:
            hib.update(c.get("higher_is_better", {}))
        se = {c["method_key"]: c.get("metrics_se") or {} for c in cells if c["method"] != "model"}

        def pm(method: str, label: str) -> str:
            v = se.get(method, {}).get(label)
            return "" if v is None or math.isnan(v) else f" ± {1.96 * v:.3f}"

        if any(se.values()):
            out.append("Scores are means over the test images ± the 95% half-width (1.96 standard errors over "
                       "images; metrics_se.* in results.csv).")
        for label in labels:
            vals = {r["method"]: r.get(label) for r in rows if r.get(label) is not None and not math.isnan(r[label])}
            if len(vals) < 2:
                continue
            best = (max if hib.get(label, True) else min)(vals, key=vals.get)
            out.append(f"Best {label}: {best} ({vals[best]:.3f}{pm(best, label)}; "
                       f"{'higher' if hib.get(label, True) else 'lower'} is better; random gives "
                       f"{vals['random']:.3f}{pm('random', label)})." if "random" in vals else
                       f"Best {label}: {best} ({vals[best]:.3f}{pm(best, label)}).")
    return out


# -- plots ---------------------------------------------------------------------------------------
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


#: fixed colours of the controls, and the palette the explanation methods draw from (matplotlib's tab10
#: without its gray and olive, which the controls resemble)
CONTROL_COLOURS = {"random": "#7f7f7f", "sobel": "#bcbd22", BASELINE: "#000000"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5")


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """A stable method → colour map for every plot of a report: controls get fixed grays, each other
    method its preferred palette slot (a CRC of its name, the same in every run and every plot),
    moved to the next free slot on a clash (the 8 strong colours first, then their pale twins), the
    methods taken in sorted order. Pass the map of all
    the report's methods to each plot so a method keeps its colour across them."""
    import zlib

    out: dict[str, str] = {m: CONTROL_COLOURS[m] for m in methods if m in CONTROL_COLOURS}
    used: set[int] = set()
    for m in sorted(set(methods) - set(out)):
        strong = len(PALETTE) // 2
        first = zlib.crc32(m.encode()) % strong
        order = [(first + k) % strong for k in range(strong)] + [strong + (first + k) % strong for k in range(strong)]
        slot = next((k for k in order if k not in used), first)
        used.add(slot)
        out[m] = PALETTE[slot]
    return out


def arrow(higher_is_better: bool | None) -> str:
    """"↑" (higher is better), "↓" (lower is better) or "" (direction unknown)."""
    return "" if higher_is_better is None else ("↑" if higher_is_better else "↓")


def directions(cells: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """metric label → higher_is_better, merged over the cells."""
    out: dict[str, bool] = {}
    for c in cells:
        out.update(c.get("higher_is_better") or {})
    return out


def num_classes_of(cells: Sequence[dict[str, Any]], meta: dict[str, Any]) -> int | None:
    """The number of classes when the meta or a cell records it (``num_classes``), else None."""
    for source in (meta, *cells):
        n = source.get("num_classes")
        if n:
            return int(n)
    return None


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically, close it, return ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_retrain(mode: str, rows: Sequence[dict[str, Any]], path: Path, num_classes: int | None = None,
                 colors: dict[str, str] | None = None) -> Path:
    """Mean test accuracy vs fraction removed, one line per method (rows of :func:`retrain_summary`).

    Error bars: the 95 % t-interval of the mean over seeds; the random control's interval is also
    a shaded band, so a method whose bars clear the band is visibly better (or worse) than random.
    One seed: no bars (a single retraining has no interval), said in the title. The y axis spans
    0..1 (accuracy, never truncated); with ``num_classes`` a dotted chance line at 1/num_classes.
    ``colors``: :func:`method_colors` of the report (default: of these rows)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = colors or method_colors(methods)
    top = 1.0
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        xs = [100 * r["fraction"] for r in pts]
        ys = [r["test_acc_mean"] for r in pts]
        defined = [not math.isnan(r["ci95_low"]) for r in pts]
        yerr = [[y - r["ci95_low"] if ok else 0.0 for y, r, ok in zip(ys, pts, defined)],
                [r["ci95_high"] - y if ok else 0.0 for y, r, ok in zip(ys, pts, defined)]]
        top = max([top, *[r["ci95_high"] for r, ok in zip(pts, defined) if ok]])
        style = "--" if m in CONTROLS else "-"
        color = colors.get(m) or method_colors([m])[m]
        ax.errorbar(xs, ys, yerr=yerr if any(defined) else None, label=m, marker="o", linestyle=style,
                    capsize=3, color=color)
        if m == "random" and any(defined):
            band = [(x, r["ci95_low"], r["ci95_high"]) for x, r, ok in zip(xs, pts, defined) if ok]
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                            color=color, alpha=0.15, label=f"random {LEVEL:.0%} CI")
    if num_classes:
        ax.axhline(1.0 / num_classes, color="black", linestyle=":", linewidth=1.2, gid="chance",
                   label=f"chance (1/{num_classes} = {1.0 / num_classes:.2f})")
    ax.set_ylim(0.0, min(top, 1.1) + 0.02)
    seeds = sorted({r["seeds"] for r in rows})
    n_txt = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    bars = (f"bars: {LEVEL:.0%} CI of the mean over {n_txt} seeds" if seeds and seeds[-1] >= 2
            else "1 seed: no interval")
    ax.set_xlabel("% of pixels removed (" + ("most" if mode == "roar" else "least") + " important first)")
    # ROAR: a lower accuracy means the removed pixels mattered (better explanation); KAR: the kept ones did
    better = f"{arrow(mode != 'roar')} {'lower' if mode == 'roar' else 'higher'} = better explanation"
    ax.set_ylabel(f"test accuracy after retraining\n(mean, {LEVEL:.0%} CI; {better})" if seeds and seeds[-1] >= 2
                  else f"test accuracy after retraining\n({better})")
    ax.set_title(f"{mode.upper()}: accuracy vs fraction removed ({bars})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_evaluate(labels: Sequence[str], rows: Sequence[dict[str, Any]], path: Path,
                  higher: dict[str, bool] | None = None, colors: dict[str, str] | None = None) -> Path:
    """One bar group per metric (its name with ↑/↓ from ``higher``: metric → higher_is_better), one bar
    per method in its :func:`method_colors` colour."""
    plt = pyplot()
    higher = higher or {}
    colors = colors or method_colors([r["method"] for r in rows])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels) + 2), 4))
    n = max(len(rows), 1)
    width = 0.8 / n
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(labels))], [r.get(lb, float("nan")) for lb in labels],
               width=width, label=r["method"],
               color=colors.get(r["method"]) or method_colors([r["method"]])[r["method"]])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))],
                  [f"{lb} {arrow(higher.get(lb))}".strip() for lb in labels])
    ax.set_ylabel("score (mean over test images)")
    ax.set_title("Explanation quality per method (↑ higher is better, ↓ lower is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(cells: Sequence[dict[str, Any]], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    """Mean deletion / insertion curves per method (probability vs fraction perturbed); the panel title
    says whether a low (↓, deletion) or high (↑, insertion) area under the curve is better."""
    curves = [(c["method_key"], label, vals) for c in cells for label, vals in (c.get("curves") or {}).items()]
    if not curves:
        return None
    higher = directions(cells)
    colors = colors or method_colors(list(dict.fromkeys(m for m, _, _ in curves)))
    labels = list(dict.fromkeys(lb for _, lb, _ in curves))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for method, lb, vals in curves:
            if lb == label:
                ax.plot([i / (len(vals) - 1) for i in range(len(vals))], vals, label=method,
                        color=colors.get(method) or method_colors([method])[method],
                        linestyle="--" if method in CONTROLS else "-")
        hib = higher.get(label, None if label not in ("deletion", "insertion") else label == "insertion")
        ax.set_title(f"{label} curve" + (f" (area {arrow(hib)})" if hib is not None else ""))
        ax.set_xlabel("fraction of pixels perturbed")
        ax.set_ylabel("p(explained class)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# -- files ---------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """A Markdown table, preceded by its caption (an italic line saying what its numbers are)."""
    lines = [f"*{caption}*", ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """An HTML table with a ``<caption>`` saying what its numbers are."""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


#: the metadata table's row names for the keys the audit writes (other keys: capitalised, "_" → " ")
META_LABELS = {"checkpoint": "Checkpoint", "data": "Dataset", "methods": "Methods", "target": "Class explained",
               "cells": "Results (cells)", "num_classes": "Classes"}
#: readable values of the ``target`` setting
TARGET_LABELS = {"auto": "each metric's paper (top-1 or true class)", "label": "true class",
                 "predicted": "predicted class (top-1)"}


def meta_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of the report's metadata table in words: no config keys or class paths."""
    rows = []
    for key, value in meta.items():
        name = META_LABELS.get(key, str(key).replace("_", " ").capitalize())
        text = str(value)
        if key == "data" and "." in text and " " not in text:
            text = text.rsplit(".", 1)[-1]  # xaudit.data.synthetic.ShapesDataModule → ShapesDataModule
        elif key == "target":
            text = TARGET_LABELS.get(text, text)
        elif key == "methods":  # the checkpoint's accuracy ("model") and the unmasked baseline are not methods
            text = ", ".join(m for m in text.split(", ") if m not in ("model", BASELINE))
        rows.append((name, text))
    return rows


def _meta_md(meta: dict[str, Any]) -> str:
    return _md_table(["Setting", "Value"], meta_rows(meta), "Audit settings: what was audited and how.")


def _meta_html(meta: dict[str, Any]) -> str:
    """The metadata as a two-column table with row headers and no empty header row."""
    body = "".join(f"<tr><th scope='row'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in meta_rows(meta))
    return ("<table class='meta'><caption>Audit settings: what was audited and how.</caption>"
            f"<tbody>{body}</tbody></table>")


#: the example image a report embeds when it lies in the mode directory (see
#: :func:`xaudit.reporting.overlays.example_overlays` / :func:`~xaudit.reporting.overlays.masked_examples`)
EXAMPLES_FILE = "examples.png"


def table_caption(mode: str, cells: Sequence[dict[str, Any]]) -> str:
    """What the numbers of the main results table are."""
    if mode in RETRAIN_MODES:
        seeds = {c.get("seed") for c in cells}
        better = "lower" if mode == "roar" else "higher"
        return (f"Test accuracy {arrow(mode != 'roar')} of models retrained after removing the given fraction of "
                f"pixels ({'most' if mode == 'roar' else 'least'} important first): mean ± sample std over "
                f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} [{LEVEL:.0%} CI of the mean]; {better} "
                "accuracy than random = the method found the pixels that matter.")
    if mode == "evaluate":
        return ("Explanation quality: each metric's mean over the test images per method (↑ higher is better, "
                "↓ lower is better); images: how many were scored.")
    return f"Results of the {mode} audit, one row per result."


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN → None (strict JSON has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


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
    """The report's main table: methods × fractions (ROAR/KAR: "mean ± std [95 % CI]" per cell) or
    methods × metrics (evaluate)."""
    if mode in RETRAIN_MODES:
        # a cell: "mean ± std [95 % CI]" over the seeds; the mean alone where one seed gives no interval
        rows = retrain_summary(cells, mode)
        fractions = sorted({r["fraction"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        header = ["method", *[f"{f:.0%}" for f in fractions]]
        table = []
        for m in methods:
            at = {r["fraction"]: r for r in rows if r["method"] == m}
            table.append([m, *[(_pm(at[f], 4) + ("" if math.isnan(at[f]["ci95_low"])
                                                 else " " + _ci(at[f]["ci95_low"], at[f]["ci95_high"], 4)))
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
    """Write results.csv/json, the plots and report.md/html into ``directory``; return their paths.

    Every plot colours a method the same (:func:`method_colors` of all the cells); ROAR/KAR plots draw
    the chance line when ``meta`` or the cells give ``num_classes``; ``examples.png`` in ``directory``
    (example overlays / masked inputs) is embedded when present."""
    d = Path(directory)
    cells = sorted(cells, key=lambda c: c["cell"])
    header, table = summary_table(mode, cells)
    plots: list[tuple[str, Path]] = []
    points: list[dict[str, Any]] | None = None
    colors = method_colors([c["method_key"] for c in cells if c.get("method") not in (BASELINE, "model")])
    if mode in RETRAIN_MODES:
        points = retrain_summary(cells, mode)
        if points:
            plots.append(("Accuracy vs fraction removed", plot_retrain(mode, points, d / f"{mode}_accuracy.png",
                                                                       num_classes_of(cells, meta), colors)))
    else:
        labels, rows = evaluate_summary(cells)
        if rows and labels:
            plots.append(("Scores per method", plot_evaluate(labels, rows, d / "evaluate_scores.png",
                                                             directions(cells), colors)))
        curve = plot_curves(cells, d / "evaluate_curves.png", colors)
        if curve is not None:
            plots.append(("Deletion / insertion curves", curve))
    if (d / EXAMPLES_FILE).is_file():
        plots.append(("Masked inputs the retrained models see" if mode in RETRAIN_MODES
                      else "Example explanations per method", d / EXAMPLES_FILE))
    sections = family_sections(cells) if mode == "evaluate" else []
    return write_tables_report(d, mode, cells, meta, header, table, plots, findings(mode, cells), points=points,
                               sections=sections, caption=table_caption(mode, cells))


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns or dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables_report(directory: Path, mode: str, cells: Sequence[dict[str, Any]], meta: dict[str, Any],
                        header: Sequence[str], table: Sequence[Sequence[Any]], plots: Sequence[tuple[str, Path]],
                        facts: Sequence[str], points: Sequence[dict[str, Any]] | None = None,
                        sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
                        caption: str | None = None) -> dict[str, Path]:
    """results.csv, results.json, report.md and report.html with the plots.

    Every table has a caption: ``caption`` for the main one (default: :func:`table_caption`), one per
    metric-family section; the metadata is a settings table in words (:func:`meta_rows`).

    results.csv holds one row per cell; with ``points`` (ROAR/KAR: :func:`retrain_summary`) it holds
    those per-point statistics instead (also under "points" in results.json) and the per-cell rows
    go to cells.csv, so the file a reader opens first shows mean, std and intervals over seeds.
    """
    d = Path(directory)
    paths: dict[str, Path] = {}
    flat = [_flat(c) for c in cells]
    paths["csv"] = d / "results.csv"
    atomic_write_text(paths["csv"], _csv_text(flat) if points is None else
                      _csv_text([{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in points],
                                POINT_COLUMNS))
    if points is not None:
        paths["cells_csv"] = d / "cells.csv"
        atomic_write_text(paths["cells_csv"], _csv_text(flat))
    paths["json"] = d / "results.json"
    atomic_write_json(paths["json"], {"mode": mode, "meta": meta, "cells": list(cells),
                                      "summary": {"header": list(header), "rows": [list(r) for r in table]},
                                      "findings": list(facts),
                                      **({} if points is None else {"points": [_json_safe(r) for r in points]})})
    for i, (_, p) in enumerate(plots):
        paths[f"plot{i}"] = p
    caption = caption or table_caption(mode, cells)

    def sec_caption(title: str) -> str:
        return f"{title} metrics: mean over the test images per method (↑ higher is better, ↓ lower is better)."

    md = [f"# xaudit {mode} report", "", _meta_md(meta), "", "## Results", "",
          _md_table(header, table, caption), ""]
    for title, sec_header, sec_rows in sections:  # one table per metric family (evaluate)
        md += [f"### {title}", "", _md_table(list(sec_header), [list(r) for r in sec_rows], sec_caption(title)), ""]
    md += ["## Findings", "", *[f"- {f}" for f in facts], ""]
    card = read_card(d)  # the protocol card (every metric's parameters, paper, deviations)
    if card:
        md += [card_markdown(card)]
    md += [f"![{t}]({p.name})\n" for t, p in plots]
    paths["md"] = d / "report.md"
    atomic_write_text(paths["md"], "\n".join(md))
    body = [f"<h1>xaudit {html.escape(mode)} report</h1>", _meta_html(meta), "<h2>Results</h2>",
            _html_table(header, table, caption),
            *[f"<h3>{html.escape(t)}</h3>{_html_table(list(h), [list(r) for r in rs], sec_caption(t))}"
              for t, h, rs in sections],
            "<h2>Findings</h2><ul>",
            *[f"<li>{html.escape(f)}</li>" for f in facts], "</ul>", card_html(card) if card else "",
            *[f"<h3>{html.escape(t)}</h3><img src='{html.escape(p.name)}' alt='{html.escape(t)}'>" for t, p in plots]]
    style = ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}img{max-width:100%}"
             "caption{caption-side:top;text-align:left;font-style:italic;color:#444;padding:.3em 0}"
             "table.meta th{text-align:left;background:#f4f4f4}table.meta td{text-align:left}</style>")
    paths["html"] = d / "report.html"
    atomic_write_text(paths["html"], f"<!doctype html><html><head><meta charset='utf-8'><title>xaudit {mode}"
                                     f"</title>{style}</head><body>{''.join(body)}</body></html>\n")
    return paths


def _wandb_value(v: Any) -> Any:
    """NaN → None: a W&B table cell without a value."""
    return None if isinstance(v, float) and math.isnan(v) else v


def log_report(loggers: Sequence[Any], mode: str, cells: Sequence[dict[str, Any]], paths: dict[str, Path],
               summary: tuple[Sequence[str], Sequence[Sequence[Any]]] | None = None) -> None:
    """Send the tables, plots and scalars to the configured loggers.

    W&B: tables, a line plot and the plot images; TensorBoard: the scalars, the tables as Markdown
    text and the PNG plots as images; MLflow: the scalars, the tables as JSON and every report file
    (results.csv/json, report.md/html, the PNG plots) as artifacts under ``audit/<mode>/``; other
    loggers (CSV): the scalars.
    """
    from xaudit.utils import log_media  # local: log_report is its only user in this module

    header, table = summary or summary_table(mode, cells)
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":  # W&B gets its richer payload below
            log_media.log_table(lg, f"audit/{mode}/table", list(header), table, step=0)
            if mode in RETRAIN_MODES:
                log_media.log_table(lg, f"audit/{mode}/points", list(POINT_COLUMNS),
                                    [[r[k] for k in POINT_COLUMNS] for r in retrain_summary(cells, mode)], step=0)
            log_media.log_outputs(lg, f"audit/{mode}", [p for p in paths.values() if Path(p).is_file()], step=0)
            log_media.flush(lg)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            payload: dict[str, Any] = {f"audit/{mode}/table": wandb.Table(columns=header, data=table)}
            flat = [_flat(c) for c in cells]
            cols = list(dict.fromkeys(k for row in flat for k in row))
            payload[f"audit/{mode}/cells"] = wandb.Table(columns=cols,
                                                         data=[[row.get(k) for k in cols] for row in flat])
            if mode in RETRAIN_MODES:
                rows = retrain_summary(cells, mode)
                # the per-point statistics of results.csv (mean, std, intervals, vs random)
                payload[f"audit/{mode}/points"] = wandb.Table(
                    columns=list(POINT_COLUMNS), data=[[_wandb_value(r[k]) for k in POINT_COLUMNS] for r in rows])
                methods = list(dict.fromkeys(r["method"] for r in rows))
                fractions = sorted({r["fraction"] for r in rows})
                ys = [[next((r["test_acc_mean"] for r in rows if r["method"] == m and r["fraction"] == f),
                            float("nan")) for f in fractions] for m in methods]
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
                for r in retrain_summary(cells, mode):
                    key = f"audit/{mode}/{r['method']}/{r['fraction']:g}"
                    scalars[key] = float(r["test_acc_mean"])
                    for col in ("test_acc_std", "ci95_low", "ci95_high", "diff_vs_random", "diff_ci95_low",
                                "diff_ci95_high"):
                        if not math.isnan(r[col]):
                            scalars[f"{key}/{col}"] = float(r[col])
            else:
                labels, rows = evaluate_summary(cells)
                for r in rows:
                    scalars.update({f"audit/evaluate/{r['method']}/{lb}": float(r[lb]) for lb in labels if lb in r})
            lg.log_metrics(scalars)
            if hasattr(lg, "save"):
                lg.save()
