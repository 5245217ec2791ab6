"""Helpers shared by the train and audit tasks: instantiation from config groups, run paths."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from xaudit.utils.errors import ConfigError

log = logging.getLogger("xaudit")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets xaudit's own errors through unwrapped.

    Hydra wraps every constructor error in an InstantiationException; for errors that already
    name the problem and the fix (ValueError, FileNotFoundError and subclasses) the wrapper only
    adds noise, so the original is raised instead. Lightning's own configuration errors (a GPU
    trainer without a GPU, more devices than there are) become a ConfigError naming the keys.
    """
    try:
        return _hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MisconfigurationException):
            raise ConfigError(_trainer_message(str(cause))) from None
        if isinstance(cause, ValueError) and str(cause).startswith("Precision "):
            raise ConfigError(f"trainer.precision: {cause}. Use 32-true (full), bf16-mixed or 16-mixed (GPU "
                              "speed), bf16-true, 16-true or 64-true.") from None
        if isinstance(cause, (ValueError, FileNotFoundError, RuntimeError)):
            raise cause from None
        raise


def _trainer_message(message: str) -> str:
    """Lightning's message, with what to change in the config when it is about a missing GPU."""
    if "No supported gpu backend" in message or "can not run on your system" in message:
        return (f"{message} The trainer asks for a GPU (trainer=gpu or ddp, or trainer.accelerator=gpu/cuda) but "
                "torch sees none here (torch.cuda.is_available() is False). Use trainer=cpu, or trainer=default "
                "(accelerator=auto uses a GPU where there is one).")
    return f"{message} (trainer.* settings: trainer.accelerator, trainer.devices, trainer.precision, trainer.strategy)"


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def run_dir(cfg: DictConfig) -> Path:
    """The run directory (Hydra's output dir when launched by Hydra)."""
    return Path(str(cfg.paths.output_dir)).resolve()


def resolve_last_checkpoint(value: str | None, log_dir: str | Path) -> str | None:
    """``"last"`` → the newest ``checkpoints/last.ckpt`` under ``log_dir/train``; else unchanged."""
    if value is None or str(value) != "last":
        return None if value is None else str(value)
    candidates = glob.glob(str(Path(log_dir) / "train" / "**" / "checkpoints" / "last.ckpt"), recursive=True)
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {Path(log_dir) / 'train'}. "
            "Run `python train.py` first, or pass ckpt_path=/path/to/file.ckpt."
        )
    return max(candidates, key=os.path.getmtime)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (safe to store in a weights-only checkpoint)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return container


def seed(cfg: DictConfig) -> None:
    """Seed python, numpy and torch (and dataloader workers) when ``cfg.seed`` is set."""
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)


def finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run so its offline files are complete (and a next run starts fresh)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
