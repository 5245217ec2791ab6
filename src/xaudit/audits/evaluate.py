"""``audit=evaluate``: every (explainer × metric) on the test split → one table.

One cell per explainer (its metric means, standard errors and curves) plus the checkpoint's own
test accuracy (``evaluate|model``). Cells are appended as they finish, so a rerun resumes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from xaudit.audits.base import AuditContext, AuditMode, accepted_changes, plain
from xaudit.data.tensor_split import SplitDataModule, TensorSplit
from xaudit.metrics.evaluator import (
    ExplainerEvaluation,
    build_metrics,
    metric_specs,
    metric_target,
    needs_mask,
)
from xaudit.models.classifier import Classifier
from xaudit.reporting.protocol import PROTOCOL_VERSION, evaluate_card, write_card
from xaudit.roar.store import method_key
from xaudit.utils.distributed import broadcast, gpu_peak, is_global_zero, reset_gpu_peak
from xaudit.utils.errors import ConfigError
from xaudit.utils.progress import SweepProgress
from xaudit.utils.results import ResultsLog


def write_examples(ctx: AuditContext, fractions: list[float] | None = None, tie_seed: int = 0) -> None:
    """The report's ``examples.png`` (single-label data only): each method's maps, or (ROAR/KAR) the
    inputs with the top pixels removed at ``fractions``."""
    if ctx.test.labels.ndim != 1:
        return
    from xaudit.reporting.overlays import audit_examples

    audit_examples(ctx.mode, ctx.mode_dir, ctx.net, ctx.test, ctx.methods, fractions=fractions or [],
                   tie_seed=tie_seed, class_names=getattr(ctx.datamodule, "class_names", None))


def write_table_report(ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
    """The evaluate / ROAR / KAR report (:func:`xaudit.reporting.report.write_report`)."""
    from xaudit.reporting.report import write_report

    return write_report(ctx.mode_dir, ctx.mode, cells, ctx.meta(cells))


class Evaluate(AuditMode):
    """Faithfulness, localisation, robustness, ... metrics of every explainer (``conf/audit/evaluate.yaml``)."""

    name = "evaluate"
    default_target = "auto"  # each metric's paper decides (top-1 class for deletion/insertion, true class else)

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """Every (explainer × metric) cell, plus the checkpoint's accuracy."""
        assert ctx.make_trainer is not None
        return run_evaluate(ctx.cfg, ctx.classifier, ctx.datamodule, ctx.test, ctx.methods, ctx.identity,
                            ctx.mode_dir, ctx.make_trainer, ctx.batch_size, ctx.target)

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """``examples.png``, then the table, plots and protocol card."""
        write_examples(ctx)
        return write_table_report(ctx, cells)


def run_evaluate(cfg: DictConfig, classifier: Classifier, datamodule: Any, test: TensorSplit,
                 methods: dict[str, dict[str, Any]], identity: dict[str, Any], mode_dir: Path,
                 make_trainer: Callable[..., pl.Trainer], batch_size: int, target: str) -> dict[str, dict[str, Any]]:
    """Every (explainer × metric) on the test split; one cell per explainer plus the model's accuracy."""
    ev = cfg.get("evaluate") or {}
    specs = metric_specs(plain(ev.get("metrics")))
    if not specs:
        raise ConfigError("evaluate.metrics is empty; name at least one metric (see conf/audit/evaluate.yaml).")
    if not getattr(datamodule, "has_masks", False):
        dropped = [k for k, s in specs.items() if needs_mask(s)]
        if dropped:
            warnings.warn(f"audit: the data has no ground-truth masks; skipping {dropped}.", stacklevel=2)
            specs = {k: s for k, s in specs.items() if k not in dropped}
    limit = ev.get("limit")
    test = test.subset(None if limit is None else int(limit))
    built = build_metrics(specs, classifier.net)
    higher = {k: bool(getattr(m, "higher_is_better", True)) for k, m in built.items()}
    families = {k: getattr(m, "family", "") or "other" for k, m in built.items()}
    size = (int(datamodule.image_size), int(datamodule.image_size))
    card = evaluate_card(built, {k: str(s["name"]) for k, s in specs.items()}, size,
                         {k: metric_target(target, m) for k, m in built.items()}, target)
    results = ResultsLog(mode_dir)
    # the card (protocol version, every parameter as run) joins the fingerprint: a directory of
    # another protocol is refused instead of mixing its numbers with these
    results.check_config({**identity, "mode": "evaluate", "metrics": specs, "limit": limit, "protocol": card},
                         accept=accepted_changes(cfg))
    writer = is_global_zero()
    if writer:
        write_card(mode_dir, card)
    done = broadcast(results.read() if writer else None)
    data = SplitDataModule(test=test, eval_batch_size=batch_size,
                           num_workers=int(getattr(datamodule, "num_workers", 0)))
    keys = ["evaluate|model", *[f"evaluate|{method_key(n, kw)}" for n, kw in methods.items()]]
    progress = SweepProgress(len(keys), sum(k in done for k in keys), "evaluate", enabled=writer,
                             split=f"test ({len(test)} images)")
    if keys[0] not in done:
        progress.start("checkpoint accuracy")
        start = time.perf_counter()
        reset_gpu_peak()
        trainer = make_trainer("test")
        res = trainer.test(classifier, datamodule=data, verbose=False)[0]
        record = {"cell": keys[0], "mode": "evaluate", "method": "model", "method_key": "model",
                  "test_acc": float(res["test/acc"]), "test_loss": float(res["test/loss"]),
                  "count": int(res["test/count"]), "world_size": trainer.world_size,
                  "protocol_version": PROTOCOL_VERSION,
                  "seconds": round(time.perf_counter() - start, 3), **gpu_peak()}
        _append(results, record)
        progress.advance("checkpoint accuracy", f"test acc {record['test_acc']:.4f}", record["seconds"])
    for key, (name, kw) in zip(keys[1:], methods.items()):
        if key in done:
            continue
        start = time.perf_counter()
        reset_gpu_peak()
        mkey = method_key(name, kw)
        curves_path = mode_dir / "curves" / f"{mkey}.pt"
        progress.start(mkey)
        module = ExplainerEvaluation(classifier.net, name, kw, specs, target, curves_path)
        trainer = make_trainer("test")
        res = trainer.test(module, datamodule=data, verbose=False)[0]
        curves = {}
        if curves_path.is_file():
            stored = torch.load(curves_path, map_location="cpu", weights_only=True)["curves"]
            curves = {k: [round(float(v), 6) for v in t] for k, t in stored.items()}
        record = {"cell": key, "mode": "evaluate", "method": name, "method_key": mkey, "kwargs": kw,
                  "metrics": {k: float(res[f"eval/{k}"]) for k in specs}, "higher_is_better": higher,
                  "families": families,
                  "metrics_se": {k: float(res[f"eval_se/{k}"]) for k in specs},
                  "count": int(res["eval/count"]), "world_size": trainer.world_size,
                  "protocol_version": PROTOCOL_VERSION,
                  "seconds": round(time.perf_counter() - start, 3), "curves": curves, **gpu_peak()}
        _append(results, record)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in record["metrics"].items())
        progress.advance(mkey, shown, record["seconds"])
    return {k: v for k, v in results.read().items() if k in set(keys)}


def _append(results: ResultsLog, record: dict[str, Any]) -> None:
    if is_global_zero():
        results.append(record)
