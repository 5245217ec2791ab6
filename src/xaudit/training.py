"""The body of ``python train.py``: data + model + callbacks + loggers → fit → test."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from xaudit.models.classifier import (
    CHECKPOINT_KEY,
    Classifier,
    describe_backbone,
    load_checkpoint,
    state_dict_mismatch,
)
from xaudit.utils.config import (
    finish_wandb,
    instantiate,
    instantiate_group,
    log,
    plain_config,
    resolve_last_checkpoint,
    run_dir,
    seed,
)
from xaudit.utils.errors import ConfigError


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, Classifier]:
    """Instantiate the datamodule, then the model sized from it (classes, channels, image size)."""
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_chans=datamodule.in_chans,
                        image_size=datamodule.image_size,
                        multilabel=bool(getattr(datamodule, "multilabel", False)))
    # plain data only: the checkpoint stays loadable with torch.load(weights_only=True)
    model.xaudit_info = {"data": datamodule.describe(), "config": plain_config(cfg)}
    return datamodule, model


def train(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train (and test) a classifier as configured; return metrics and paths.

    ``callbacks`` are added to the configured ones (for programmatic use).
    The returned dict holds every logged metric as a float plus ``ckpt_path`` (best checkpoint),
    ``last_ckpt_path`` and ``run_dir``.
    """
    if cfg.get("audit") is not None:
        raise ConfigError(
            f"experiment sets audit.mode={cfg.audit.get('mode')!r}: it is an audit experiment, not a training "
            "one. Run it with `python audit.py audit=<name>` (the old `experiment=<name>` still works there).")
    seed(cfg)
    datamodule, model = build(cfg)
    # a bad resume fails before any logger starts a run (a W&B run left open would be reused by the
    # next run in this process)
    ckpt_path = resolve_last_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir) or requeued_checkpoint(cfg)
    if ckpt_path:
        check_resumable(ckpt_path, model)
    all_callbacks = [*instantiate_group(cfg.get("callbacks")), *callbacks]
    loggers = instantiate_group(cfg.get("logger"))
    try:
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=all_callbacks, logger=loggers or False)
        for lg in loggers:
            lg.log_hyperparams(plain_config(cfg))
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") or ""
        if cfg.get("test") and not trainer.fast_dev_run:
            results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    finally:
        finish_wandb(loggers)
    out = {**metrics, "ckpt_path": best, "last_ckpt_path": _last_checkpoint(ckpt_cb), "run_dir": str(run_dir(cfg))}
    if trainer.is_global_zero:
        acc = metrics.get("test/acc")
        log.info("Test accuracy: %s", f"{acc:.4f}" if acc is not None else "n/a (test=false)")
        log.info("Checkpoint: %s", best or "(none written)")
        log.info("Run directory: %s", out["run_dir"])
    return out


def requeued_checkpoint(cfg: DictConfig) -> str | None:
    """This run's own ``last.ckpt`` when Slurm requeued the job (timeout or preemption), else None.

    A requeued job (``SLURM_RESTART_COUNT`` ≥ 1) runs the same sweep point in the same output
    directory; resuming there continues the run from its last finished epoch instead of
    starting over. Only ``ckpt_path: null`` resumes this way; an explicit ckpt_path wins, and so
    does an ``hpc_ckpt_*.ckpt`` that Lightning's own SLURM requeue wrote (Lightning loads it itself).
    """
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    if any(Path(str(cfg.trainer.get("default_root_dir") or run_dir(cfg))).glob("hpc_ckpt_*.ckpt")):
        return None
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    last = Path(str(dirpath or run_dir(cfg) / "checkpoints")) / "last.ckpt"
    if not last.is_file():
        return None
    log.info("Requeued Slurm job (restart %s): resuming from %s", os.environ["SLURM_RESTART_COUNT"], last)
    return str(last)


def check_resumable(ckpt_path: str, model: Classifier) -> None:
    """Refuse to resume from a checkpoint of another architecture, naming both (before Lightning
    fails with a list of state-dict keys)."""
    ckpt = load_checkpoint(ckpt_path)
    problem = state_dict_mismatch(model.state_dict(), ckpt.get("state_dict") or {})
    if problem:
        info = ckpt.get(CHECKPOINT_KEY) or {}
        was = describe_backbone(info["hparams"]["backbone"]) if "hparams" in info else "another model"
        raise ConfigError(
            f"ckpt_path={ckpt_path} cannot be resumed by this run: it holds {was}, but this run builds "
            f"{describe_backbone(model.hparams['backbone'])} ({problem}). Pass the model options it was trained "
            "with (they are in the checkpoint's run directory, .hydra/config.yaml) or another ckpt_path.")


def _last_checkpoint(ckpt_cb: Any) -> str:
    """Path of ``last.ckpt`` (DDP spawn does not send ``last_model_path`` back to the main process)."""
    path = getattr(ckpt_cb, "last_model_path", "") or ""
    if not path and getattr(ckpt_cb, "dirpath", None):
        candidate = Path(ckpt_cb.dirpath) / f"{ckpt_cb.CHECKPOINT_NAME_LAST}{ckpt_cb.FILE_EXTENSION}"
        path = str(candidate) if candidate.is_file() else ""
    return path
