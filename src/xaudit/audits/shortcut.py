"""The shortcut ("wolf on snow") experiment: does the audit catch a model that looks at the background?

``python audit.py audit=shortcut`` (formerly ``experiment=shortcut``) trains two small CNNs on shapes — a clean one
(``spurious_p=0``: the background colour says nothing about the class) and a shortcut one
(``spurious_p=1``: the background colour always matches the class) — with the explanation
monitor on, then audits both with the cue kept and with the cue shuffled at test time
(``data.test_cue=shuffled``): test accuracy, Grad-CAM's mass inside the object mask and its
pointing game. The report states the gaps in words and plots the monitor's per-epoch Grad-CAM
scores of both models.

Everything lands in ``<out_dir>/shortcut/``: ``clean/`` and ``shortcut/`` (the training runs,
checkpoints, CSV logs), ``audits/<model>_<cue>/`` (evaluate audits, resumable), and the report.
A rerun reuses the trained models (``done.json``) and the finished audit cells.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from xaudit.audits.base import AuditContext, AuditMode
from xaudit.reporting import report as rep
from xaudit.training import train
from xaudit.utils.config import log
from xaudit.utils.io import atomic_write_json

MODELS = {"clean": 0.0, "shortcut": 1.0}
CUES = ("same", "shuffled")


class Shortcut(AuditMode):
    """Trains a clean and a shortcut model and audits both (``conf/audit/shortcut.yaml``; no checkpoint)."""

    name = "shortcut"
    default_target = "auto"  # its audits are evaluate audits
    needs_checkpoint = False
    needs_test = False
    resumable = False  # the two models and the four audits resume on their own

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """Train (or reuse) both models, audit each with the cue kept and shuffled; the report is written here."""
        assert ctx.audit is not None
        out = run_shortcut(ctx.cfg, ctx.audit, ctx.out_dir)
        ctx.extra.update(models=out["models"], report_paths=out["report"])
        return out["cells"]

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """Written by :meth:`run` already (it needs the models' training logs): its files by kind."""
        return {k: Path(v) for k, v in (ctx.extra.pop("report_paths", None) or {}).items()}


def compose_train(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, composed from the same config directory as this run."""
    gh = GlobalHydra.instance()
    if gh.is_initialized():
        return compose(config_name="train", overrides=overrides)
    sources = HydraConfig.get().runtime.config_sources
    conf = next(s.path for s in sources if s.provider == "main")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def train_model(name: str, spurious_p: float, sc: Any, root: Path, seed: int) -> dict[str, Any]:
    """Train (or reuse) one of the two models; returns its ``done.json`` record."""
    run = root / name
    done = run / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    last = run / "checkpoints" / "last.ckpt"
    overrides = [*list(sc.get("train") or []), f"data.spurious_p={spurious_p}", f"paths.output_dir={run}",
                 f"seed={seed}", "logger=csv", "callbacks.explanation_monitor.explainers=[grad_cam]",
                 f"data.cue={sc.get('cue', 'background')}"]
    if last.is_file():  # killed mid-training: resume from the last epoch
        overrides.append(f"ckpt_path={last}")
    out = train(compose_train(overrides))
    record = {"model": name, "spurious_p": spurious_p, "ckpt_path": out.get("last_ckpt_path") or str(last),
              "test_acc": out.get("test/acc"),
              "history": monitor_history(run / "csv" / "metrics.csv")}
    atomic_write_json(done, record)
    return record


def monitor_history(path: Path) -> list[dict[str, float]]:
    """Per-epoch ``explain/grad_cam/*`` and ``val/acc`` rows of a training run's CSV log."""
    if not path.is_file():
        return []
    rows: dict[int, dict[str, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            e = int(float(row["epoch"]))
            for k, v in row.items():
                if v not in ("", None) and (k.startswith("explain/grad_cam/") or k == "val/acc"):
                    rows.setdefault(e, {"epoch": float(e)})[k] = float(v)
    return [rows[e] for e in sorted(rows)]


def run_shortcut(cfg: DictConfig, audit_fn: Any, out_dir: Path) -> dict[str, Any]:
    """Train both models, audit each with the cue kept and shuffled, write the report."""
    sc = cfg.get("shortcut") or {}
    root = out_dir / "shortcut"
    models = {name: train_model(name, p, sc, root, int(cfg.get("seed") or 0)) for name, p in MODELS.items()}
    rows = []
    for name, info in models.items():
        for cue in CUES:
            sub = copy.deepcopy(cfg)
            with open_dict(sub):
                sub.audit = OmegaConf.create({"_target_": "xaudit.audits.evaluate.Evaluate", "mode": "evaluate"})
                sub.ckpt_path = info["ckpt_path"]
                sub.data = OmegaConf.create({**(OmegaConf.to_container(cfg.data) or {}), "test_cue": cue})
                sub.explainer = ["grad_cam"]
                sub.controls = []
                sub.explainer_kwargs = {}
                sub.evaluate = OmegaConf.create({"limit": sc.get("limit"), "metrics": OmegaConf.to_container(
                    sc.get("metrics"))})
                sub.out_dir = str(root / "audits" / f"{name}_{cue}")
                sub.logger = None
            res = audit_fn(sub)
            cells = res["cells"]
            gc = cells["evaluate|grad_cam"]["metrics"]
            rows.append({"cell": f"shortcut|{name}|{cue}", "model": name, "spurious_p": info["spurious_p"],
                         "test_cue": cue, "test_acc": cells["evaluate|model"]["test_acc"],
                         **{f"grad_cam_{k}": v for k, v in gc.items()}, "count": cells["evaluate|model"]["count"]})
    paths = write_shortcut_report(root, rows, models, {"out_dir": str(root), "cue": sc.get("cue", "background")})
    log.info("Shortcut experiment: report %s", paths["md"])
    return {"mode": "shortcut", "out_dir": str(out_dir), "mode_dir": str(root), "cells": {r["cell"]: r for r in rows},
            "models": models, "report": {k: str(v) for k, v in paths.items()}}


def shortcut_findings(rows: list[dict[str, Any]], models: dict[str, Any]) -> list[str]:
    """The gaps in words: accuracy under the shuffled cue, Grad-CAM mass on the object, pointing game."""
    at = {(r["model"], r["test_cue"]): r for r in rows}
    out = []
    for name in MODELS:
        same, shuf = at[(name, "same")]["test_acc"], at[(name, "shuffled")]["test_acc"]
        verb = "falls" if shuf < same - 0.05 else "holds"
        out.append(f"{name} model (spurious_p={MODELS[name]:g}): test accuracy {same:.3f} with the cue kept, "
                   f"{shuf:.3f} with it shuffled — it {verb}.")
    c, s = at[("clean", "same")], at[("shortcut", "same")]
    if "grad_cam_mass_in_mask" in c:
        out.append(f"Grad-CAM puts {100 * s['grad_cam_mass_in_mask']:.0f} % of its positive mass on the object for "
                   f"the shortcut model vs {100 * c['grad_cam_mass_in_mask']:.0f} % for the clean model.")
    if "grad_cam_pointing_game" in c:
        out.append(f"Its peak lands on the object in {100 * s['grad_cam_pointing_game']:.0f} % of the images for the "
                   f"shortcut model vs {100 * c['grad_cam_pointing_game']:.0f} % for the clean model.")
    hist = {n: m.get("history") or [] for n, m in models.items()}
    key = "explain/grad_cam/mass_in_mask"
    if all(h and key in h[0] for h in hist.values()):
        first = ", ".join(f"{n} {hist[n][0][key]:.2f}" for n in MODELS)
        out.append(f"The monitor shows the gap from the first epoch on (epoch 0 mass in mask: {first}).")
    return out


def write_shortcut_report(root: Path, rows: list[dict[str, Any]], models: dict[str, Any],
                          meta: dict[str, Any]) -> dict[str, Path]:
    """Table, monitor plot (per-epoch Grad-CAM scores of both models) and findings."""
    labels = [k for k in rows[0] if k.startswith("grad_cam_")]
    header = ["model", "spurious_p", "test cue", "test acc", *labels, "images"]
    table = [[r["model"], r["spurious_p"], r["test_cue"], r["test_acc"], *[r[k] for k in labels], r["count"]]
             for r in rows]
    plots = []
    keys = ["explain/grad_cam/mass_in_mask", "explain/grad_cam/pointing_game", "val/acc"]
    hist = {n: m.get("history") or [] for n, m in models.items()}
    if any(hist.values()):
        plt = rep.pyplot()
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for name, h in hist.items():
                pts = [(r["epoch"], r[key]) for r in h if key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{name} (p={MODELS[name]:g})")
            ax.set_title(key.replace("explain/", ""))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        plots.append(("Explanation monitor per epoch", rep.save_figure(fig, root / "shortcut_monitor.png")))
    return rep.write_tables_report(root, "shortcut", rows, meta, header, table, plots, shortcut_findings(rows, models))
