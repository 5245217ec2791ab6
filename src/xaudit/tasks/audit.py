"""The body of ``python audit.py``: checkpoint + its data → the configured audit mode → report.

The modes (evaluate, roar, kar, sanity, concepts, shortcut, explain, or a user's) are plugins
(:mod:`xaudit.audits`): ``conf/audit/<mode>.yaml`` names the class (``audit._target_``) and this
module runs the generic flow around it — compose the inputs, load the checkpoint and its data,
build an :class:`~xaudit.audits.base.AuditContext`, ``mode.run(ctx)``, ``mode.report(ctx, cells)``,
log the report. It never branches on the mode's name.

Layout of an audit directory (``out_dir``; default ``<log_dir>/audit/results/<run>_<ckpt>``)::

    attributions/<method>/...     shards shared by the roar and kar sweeps (computed once)
    evaluate/ roar/ kar/          per mode: results.jsonl, audit_config.json, results.csv/json,
                                  report.md/html and the PNG plots

A rerun resumes: finished cells are skipped, stored shards reused; a rerun with settings that
change the values (another checkpoint, data, recipe, metrics) is refused with the differences.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from xaudit.audits.base import AuditContext, AuditMode, build_mode
from xaudit.audits.base import names as audit_mode_names
from xaudit.audits.base import plain as _plain
from xaudit.audits.evaluate import run_evaluate  # noqa: F401  (re-exported: the old import path)
from xaudit.audits.retrain import (  # noqa: F401  (re-exported: the old import path)
    ROAR_PAPER,
    check_seeds,
    effective_recipe,
    resolve_fill,
    retrain_card,
    retrain_recipe,
    run_retrain,
)
from xaudit.data.tensor_split import TensorSplit
from xaudit.explainers import create
from xaudit.explainers import names as explainer_names
from xaudit.metrics.base import evaluating
from xaudit.metrics.evaluator import check_target_mode
from xaudit.models.classifier import Classifier, classifier_from_checkpoint, load_checkpoint
from xaudit.reporting.protocol import read_card
from xaudit.reporting.report import log_report
from xaudit.utils.config import (
    finish_wandb,
    instantiate,
    instantiate_group,
    log,
    plain_config,
    resolve_last_checkpoint,
    seed,
)
from xaudit.utils.distributed import (
    broadcast,
    compute_device,
    init_distributed,
    is_global_zero,
)
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.io import check_writable, file_sha256
from xaudit.utils.progress import quiet_lightning
from xaudit.utils.results import ResultsLog

#: the built-in modes (a mode registered by a user's module joins :func:`xaudit.audits.base.names`)
AUDIT_MODES: tuple[str, ...] = tuple(audit_mode_names())
#: data keys that change how data is served, not what it is (left out of fingerprints)
SERVING_KEYS = ("batch_size", "eval_batch_size", "num_workers")
#: experiment=<name> configs that only select an audit mode (now audit=<name>)
DEPRECATED_EXPERIMENTS = ("sanity", "shortcut")


# -- configuration -------------------------------------------------------------------------------
def data_config(override: Any, trained: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's data config with the audit's ``data`` keys merged on top.

    An override with another ``_target_`` (``+data=cifar10``) replaces the checkpoint's.
    """
    override = _plain(override) or {}
    if not trained and "_target_" not in override:
        raise ConfigError("The checkpoint does not record its training data, so the audit cannot rebuild it; "
                          "choose the data explicitly, e.g. `python audit.py +data=shapes`.")
    if not trained or ("_target_" in override and override["_target_"] != trained.get("_target_")):
        return dict(override)
    merged = OmegaConf.merge(OmegaConf.create(trained), OmegaConf.create(override))
    return dict(OmegaConf.to_container(merged, resolve=True))  # type: ignore[arg-type]


def data_identity(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """What decides the data's content (serving options such as batch sizes left out)."""
    return {k: v for k, v in data_cfg.items() if k not in SERVING_KEYS}


def check_data_fits(classifier: Classifier, datamodule: Any, ckpt_path: str) -> None:
    """The checkpoint and the data must agree on classes and channels."""
    hp = classifier.hparams
    for key, name in (("num_classes", "classes"), ("in_chans", "input channels")):
        want, got = int(hp[key]), int(getattr(datamodule, key))
        if want != got:
            raise ConfigError(
                f"The checkpoint {ckpt_path} was trained with {want} {name}, but the audit data has {got} "
                f"(data.{key}). Audit it on the data it was trained on (drop the data overrides), or pass the "
                "checkpoint trained on this data.")


def resolve_methods(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The explainers to audit, controls last, each with its options (names checked)."""
    chosen = cfg.get("explainer")
    chosen = [chosen] if isinstance(chosen, str) else list(chosen or [])
    controls = list(cfg.get("controls") or [])
    known = explainer_names()
    for key, names in (("explainer", chosen), ("controls", controls)):
        for name in names:
            if name not in known:
                raise unknown_choice("explainer", name, known, key=key)
    kwargs = _plain(cfg.get("explainer_kwargs")) or {}
    methods = {str(n): dict(kwargs.get(n) or {}) for n in dict.fromkeys([*chosen, *controls])}
    for name in kwargs:
        if name not in methods:
            raise ConfigError(f"explainer_kwargs.{name} is given but {name!r} is not audited "
                              f"(explainer={chosen}, controls={controls}); add it to explainer or fix the name.")
    if not methods:
        raise ConfigError("Nothing to audit: explainer and controls are both empty; e.g. explainer=[grad_cam].")
    return methods


def audit_dir(cfg: DictConfig, ckpt_path: str) -> Path:
    """``out_dir``, or ``<log_dir>/audit/results/<train run>_<checkpoint stem>``."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir)).expanduser().resolve()
    p = Path(ckpt_path).resolve()
    run = p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name
    return (Path(str(cfg.paths.log_dir)) / "audit" / "results" / f"{run}_{p.stem}").resolve()


def writable_audit_dir(cfg: DictConfig, ckpt_path: str) -> Path:
    """:func:`audit_dir`, created and checked writable with ``min_free_mb`` free before any work starts."""
    return check_writable(audit_dir(cfg, ckpt_path), key="out_dir", min_free_mb=float(cfg.get("min_free_mb", 0)))


def trainer_factory(cfg: DictConfig) -> Callable[..., pl.Trainer]:
    """Trainers from the audit's ``trainer`` group: no logger, no checkpoints, Lightning's rich bars.

    Attribution and evaluation trainers run in full precision (explanations and metrics are
    measured, not approximated); retraining uses the configured precision (bf16-mixed on GPU).
    """

    def make(stage: str, **overrides: Any) -> pl.Trainer:
        callbacks: list[pl.Callback] = []
        if cfg.trainer.get("enable_progress_bar", True):
            from pytorch_lightning.callbacks import RichProgressBar

            callbacks.append(RichProgressBar(leave=False))
        callbacks += list(overrides.pop("callbacks", None) or [])
        kwargs: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                                  "callbacks": callbacks, "num_sanity_val_steps": 0, "limit_val_batches": 0}
        if stage != "fit":
            kwargs["precision"] = "32-true"
        kwargs.update(overrides)
        return instantiate(cfg.trainer, **kwargs)

    return make


def dry_run(net: torch.nn.Module, methods: dict[str, dict[str, Any]], split: TensorSplit) -> None:
    """Explain two images with every method now, so a wrong layer or option fails before long loops.

    Runs where ``net``'s parameters are (the audit's device)."""
    device = next(net.parameters()).device
    x = split.normalise(split.images[:2]).to(device)
    y = split.labels[:2].to(device)
    with evaluating(net, grad=True):
        for name, kw in methods.items():
            create(name, net, **kw).attribute(x, y)


def _is_writer() -> bool:
    """Rank 0 of the process group (decided after :func:`init_distributed`, not from env variables)."""
    return is_global_zero()


def data_path(cfg: DictConfig) -> bool | None:
    """``data_path``: auto (None: in-memory tensor datasets stay in memory, any other dataset is
    streamed per batch), ``stream`` (True) or ``memory`` (False: decode every split once)."""
    value = str(cfg.get("data_path", "auto"))
    choices = {"auto": None, "stream": True, "memory": False}
    if value not in choices:
        raise unknown_choice("data_path", value, list(choices), key="data_path")
    return choices[value]


def deprecated_experiment(cfg: DictConfig) -> str | None:
    """``experiment=sanity`` / ``experiment=shortcut`` (which now only select ``audit=<name>``), else None.

    Read from the composed Hydra choices (``cfg.hydra`` when composed with the Hydra config, else
    the running Hydra app's)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = cfg.get("hydra") if isinstance(cfg, DictConfig) else None
    if hydra_cfg is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices") if hydra_cfg is not None else None
    chosen = choices.get("experiment") if choices is not None else None
    return str(chosen) if chosen in DEPRECATED_EXPERIMENTS else None


def warn_deprecated_experiment(cfg: DictConfig) -> None:
    """A DeprecationWarning (and a log line) pointing ``experiment=sanity|shortcut`` to ``audit=...``."""
    name = deprecated_experiment(cfg)
    if name:
        message = (f"experiment={name} is deprecated: it is now an audit mode, run `python audit.py audit={name}` "
                   "(same settings, same results).")
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        log.warning(message)


# -- the audit -----------------------------------------------------------------------------------
def audit(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured audit; return the cells, the directories and the report paths."""
    warn_deprecated_experiment(cfg)
    with quiet_lightning():
        return _audit(cfg)


def experiments_dir(cfg: DictConfig) -> Path:
    """Where a mode without a checkpoint writes: ``out_dir``, or ``<log_dir>/audit/experiments``."""
    base = Path(str(cfg.out_dir)) if cfg.get("out_dir") else Path(str(cfg.paths.log_dir)) / "audit" / "experiments"
    return base.expanduser().resolve()


def _audit(cfg: DictConfig) -> dict[str, Any]:
    seed(cfg)
    mode = build_mode(cfg.get("audit"))
    target = check_target_mode(str(cfg.get("target", "auto")))
    if target == "auto":
        target = mode.default_target  # evaluate: per metric (its paper); ROAR/KAR/sanity: the true class
    if mode.needs_checkpoint:
        ctx = checkpoint_context(cfg, mode, target)
    else:  # trains its own models (shortcut), then audits them through `audit`
        out_dir = experiments_dir(cfg)
        ctx = AuditContext(cfg=cfg, mode=mode.name, target=target, out_dir=out_dir, mode_dir=out_dir / mode.name,
                           is_writer=_is_writer(), audit=_audit)
    cells = mode.run(ctx)
    out: dict[str, Any] = {"mode": mode.name, "out_dir": str(ctx.out_dir), "mode_dir": str(ctx.mode_dir),
                           "cells": cells, "report": {}, **ctx.extra}
    if _is_writer():
        # a resumable mode's report shows every cell of its directory (other seeds of a multirun, earlier runs)
        every = list(ResultsLog(ctx.mode_dir).read().values()) if mode.resumable else list(cells.values())
        paths = mode.report(ctx, every)
        if mode.resumable:
            log_to_loggers(cfg, mode.name, ctx.mode_dir, every, paths)
        out["report"] = {k: str(v) for k, v in paths.items()}
        log.info("Audit (%s): %d cells; report %s", mode.name, len(cells), paths.get("md", "-"))
    return out


def checkpoint_context(cfg: DictConfig, mode: AuditMode, target: str) -> AuditContext:
    """Load the checkpoint and its data, check them, and prepare what ``mode`` asks for (its flags)."""
    make_trainer = trainer_factory(cfg)
    fit_trainer = make_trainer("fit")
    init_distributed(fit_trainer)  # before anything is read: rank 0 decides, the ranks follow
    device = compute_device(fit_trainer)
    ckpt_path = broadcast(resolve_last_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir) if _is_writer() else None)
    if not ckpt_path:
        raise ConfigError("ckpt_path is not set: pass ckpt_path=/path/to/file.ckpt, or ckpt_path=last for the "
                          "newest checkpoint written by `python train.py`.")
    classifier = classifier_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path).eval()
    trained = classifier.xaudit_info.get("config") or {}
    data_cfg = data_config(cfg.get("data"), trained.get("data"))
    datamodule = instantiate(OmegaConf.create(data_cfg))
    check_data_fits(classifier, datamodule, ckpt_path)
    methods = resolve_methods(cfg)
    out_dir = writable_audit_dir(cfg, ckpt_path)
    ctx = AuditContext(cfg=cfg, mode=mode.name, target=target, out_dir=out_dir, mode_dir=out_dir / mode.name,
                       is_writer=_is_writer(), classifier=classifier, datamodule=datamodule, data_cfg=data_cfg,
                       trained=trained, ckpt_path=str(ckpt_path), methods=methods, device=device,
                       make_trainer=make_trainer, fit_trainer=fit_trainer, audit=_audit)
    if mode.resumable:
        ctx.identity = {"checkpoint": file_sha256(ckpt_path), "data": data_identity(data_cfg), "target": target}
    if mode.needs_test:
        datamodule.setup("test")
        ctx.stream = data_path(cfg)
        ctx.test = TensorSplit.from_dataset(datamodule.test_set, datamodule.mean, datamodule.std, stream=ctx.stream)
        classifier.net.to(device)
        if mode.uses_methods:
            dry_run(classifier.net, methods, ctx.test)
    ctx.batch_size = int(cfg.get("batch_size") or datamodule.eval_batch_size)
    return ctx


def log_to_loggers(cfg: DictConfig, mode: str, mode_dir: Path, cells: list[dict[str, Any]],
                   paths: dict[str, Path]) -> None:
    """The report to the configured loggers (W&B, TensorBoard, MLflow, CSV): config + protocol card,
    the summary table and the plots; each run is closed afterwards."""
    loggers = instantiate_group(cfg.get("logger"))
    try:
        card = read_card(mode_dir)
        for lg in loggers:
            lg.log_hyperparams({**plain_config(cfg), **({"protocol": card} if card else {})})
        stored = json.loads(paths["json"].read_text())["summary"]
        log_report(loggers, mode, cells, paths, (stored["header"], stored["rows"]))
        for lg in loggers:
            lg.finalize("success")  # MLflow run → FINISHED, TensorBoard event file closed
    finally:
        finish_wandb(loggers)
