"""The Lightning module that trains a backbone, and safe checkpoint loading.

Checkpoints hold only plain data (tensors, numbers, strings, dicts): the backbone recipe and
the data description live under ``checkpoint["xaudit"]``, so ``torch.load(path,
weights_only=True)`` can rebuild the model without unpickling arbitrary objects.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
)

from xaudit.models.backbones import build_backbone, resolve_cifar_stem
from xaudit.utils.errors import ConfigError, NonFiniteLossError, count_or_auto

CHECKPOINT_KEY = "xaudit"
#: score thresholds of the multi-label mAP: binned, so its state is O(classes) whatever the split size
MAP_THRESHOLDS = 256
#: ``nan_check_every="auto"`` off the CPU: one host read of the loss flag per this many steps
NAN_CHECK_EVERY_GPU = 50


def _plain(obj: Any) -> Any:
    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, DictConfig) else obj


class Classifier(pl.LightningModule):
    """Image classifier: backbone + cross-entropy, accuracy per split, Hydra optimiser/scheduler.

    ``backbone`` is the keyword dict for :func:`xaudit.models.build_backbone` minus the data-given
    sizes; ``optimizer`` and ``scheduler`` are Hydra partials (``_partial_: true``). A scheduler
    whose signature has ``total_steps`` (OneCycleLR) gets the trainer's step count.

    Speed options, none of which changes the weights or the state-dict keys (so checkpoints, the
    monitor and the explainers see the same module): ``nan_check_every`` (the non-finite loss
    check runs on the device every step and is read on the host every N steps, "auto": every
    step on CPU where the read is free, ``NAN_CHECK_EVERY_GPU`` elsewhere), ``channels_last``
    (true, false or "auto": on CUDA only) and ``compile`` (false, true or ``torch.compile``
    options; only the training forward is compiled, evaluation and explanations run eagerly).

    ``multilabel=True`` (set by ``train.py`` from the datamodule's ``multilabel`` attribute, as
    ``num_classes``): batches carry a multi-hot ``label`` [B,K]; the loss is binary cross-entropy
    on the logits (each class an independent sigmoid; ``label_smoothing`` ε moves the targets to
    ε/2 and 1−ε/2), and ``<split>/acc`` is torchmetrics' micro ``MultilabelAccuracy`` (sigmoid ≥
    0.5 per class) with ``<split>/map`` its macro ``MultilabelAveragePrecision`` (mAP, over
    ``MAP_THRESHOLDS`` score bins). Single-label training is unchanged.

    Args:
        backbone: keywords of :func:`xaudit.models.build_backbone` (``name``, ``width``,
            ``pretrained``, ``cifar_stem``, ...); None: ``{"name": "small_cnn"}``.
        num_classes: number of classes (``train.py`` takes it from the datamodule).
        in_chans: input image channels (from the datamodule).
        image_size: input side in px (from the datamodule; decides ``cifar_stem: auto``).
        optimizer: Hydra partial ``params -> Optimizer``; required for training only.
        scheduler: Hydra partial ``optimizer -> LR scheduler``, or None.
        label_smoothing: cross-entropy label smoothing ε.
        nan_check_every: host read of the non-finite loss flag every N steps, or ``"auto"``.
        channels_last: channels-last memory format: true, false or ``"auto"`` (CUDA only).
        compile: ``torch.compile`` the training forward: false, true or its keyword options.
        multilabel: multi-hot labels, sigmoid/binary cross-entropy, multi-label accuracy and mAP.
    """

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        nan_check_every: int | str = "auto",
        channels_last: bool | str = False,
        compile: bool | dict[str, Any] = False,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        backbone = dict(_plain(backbone) or {"name": "small_cnn"})
        if "cifar_stem" in backbone:  # the checkpoint records the stem that was built, not "auto"
            backbone["cifar_stem"] = resolve_cifar_stem(backbone["cifar_stem"], image_size)
        # optimizer/scheduler are callables: kept out of hparams so checkpoints stay weights-only safe
        self.save_hyperparameters({"backbone": backbone, "num_classes": int(num_classes),
                                   "in_chans": int(in_chans), "image_size": image_size,
                                   "label_smoothing": float(label_smoothing), "multilabel": bool(multilabel)})
        self.net = build_backbone(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **backbone)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = float(label_smoothing)
        self.xaudit_info: dict[str, Any] = {}
        self.multilabel = bool(multilabel)
        splits = ("train_", "val_", "test_")
        if self.multilabel:
            self.acc = torch.nn.ModuleDict({s: MultilabelAccuracy(num_classes, average="micro") for s in splits})
            self.map: torch.nn.ModuleDict | None = torch.nn.ModuleDict(
                {s: MultilabelAveragePrecision(num_classes, average="macro", thresholds=MAP_THRESHOLDS)
                 for s in splits})
        else:
            self.acc = torch.nn.ModuleDict({s: MulticlassAccuracy(num_classes, average="micro") for s in splits})
            self.map = None
        self.loss_mean = torch.nn.ModuleDict({s: MeanMetric() for s in ("train_", "val_", "test_")})
        self.count = torch.nn.ModuleDict({s: SumMetric() for s in ("val_", "test_")})
        self.nan_check_every = count_or_auto(nan_check_every, "model.nan_check_every", 1,
                                             f"every step on CPU, every {NAN_CHECK_EVERY_GPU} on GPU")
        self.channels_last_option = _check_auto_bool(channels_last, "model.channels_last")
        self.compile_options = _compile_options(_plain(compile))
        self.channels_last = False  # resolved in setup, once the device is known
        self._check_every = 1
        self._unchecked_steps = 0
        # [step, epoch, loss] of the first non-finite training loss, -1 while none (on the device)
        self._nonfinite: torch.Tensor | None = None
        # kept out of nn.Module's registry: the compiled wrapper must not add `_orig_mod.` keys
        self.__dict__["_compiled_net"] = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_compiled_net"] = None  # rebuilt in setup; compiled graphs do not pickle (ddp_spawn)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        unshare_metric_states(self)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(dm, "multilabel", False) and not self.multilabel:
            raise ConfigError(
                f"{type(dm).__name__} is multi-label (multi-hot labels), but the model was built with "
                "multilabel=false (softmax + cross-entropy). Build it with multilabel=True "
                "(+model.multilabel=true; train.py sets it from the datamodule, as num_classes).")
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        self._check_every = (self.nan_check_every if isinstance(self.nan_check_every, int)
                             else 1 if device.type == "cpu" else NAN_CHECK_EVERY_GPU)
        self.channels_last = (self.channels_last_option if isinstance(self.channels_last_option, bool)
                              else device.type == "cuda")
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if stage == "fit" and self.compile_options is not None and self._compiled_net is None:
            self.__dict__["_compiled_net"] = torch.compile(self.net, **self.compile_options)

    # -- steps -----------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # a backbone with its own training objective (SENN's robustness regulariser) returns the
        # logits and the extra loss term from ``training_forward``
        extra = getattr(self.net, "training_forward", None) if split == "train" else None
        compiled = self._compiled_net if split == "train" else None
        if extra is not None:
            logits, extra_loss = extra(x, y)
        else:
            logits, extra_loss = (compiled(x) if compiled is not None else self(x)), None
        loss = self._loss(logits, y, self.label_smoothing if split == "train" else 0.0)
        if extra_loss is not None:
            self.log("train/extra_loss", extra_loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + extra_loss
        key = split + "_"
        self.acc[key].update(logits.detach(), y)
        if self.map is not None:
            self.map[key].update(logits.detach(), y)
        self.loss_mean[key].update(loss.detach(), weight=y.shape[0])
        if key in self.count:
            self.count[key].update(torch.tensor(float(y.shape[0]), device=x.device))
        return loss

    def _log_epoch(self, split: str) -> None:
        """Reduce this split's metrics across ranks once, log them, reset them.

        ``Metric.compute()`` all-reduces the states exactly once (ranks may have seen different
        numbers of batches: no padding), so the logged values need no further ``sync_dist``.
        """
        key = split + "_"
        values = {f"{split}/acc": self.acc[key].compute(), f"{split}/loss": self.loss_mean[key].compute()}
        metrics: list[Metric] = [self.acc[key], self.loss_mean[key]]
        if self.map is not None:
            with warnings.catch_warnings():  # a class absent from a small split: mAP skips it
                warnings.filterwarnings("ignore", ".*no positive samples.*")
                values[f"{split}/map"] = self.map[key].compute()
            metrics.append(self.map[key])
        if key in self.count:
            values[f"{split}/count"] = self.count[key].compute()
            metrics.append(self.count[key])
        for metric in metrics:
            metric.reset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*sync_dist=True.*")
            self.log_dict(values, prog_bar=split != "test", sync_dist=False)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Cross-entropy on class indices [B]; binary cross-entropy on multi-hot labels [B,K] (multi-label)."""
        if self.multilabel:
            if y.ndim != 2 or y.shape != logits.shape:
                raise ConfigError(
                    f"model.multilabel=true needs multi-hot labels [B,{logits.shape[1]}] (a multi-label datamodule, "
                    f"e.g. data=shapes_multilabel); got labels of shape {tuple(y.shape)}. Use model.multilabel=false "
                    "for single-label data.")
            target = y.to(logits.dtype)
            if smoothing:
                target = target * (1.0 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(logits, target)
        if y.ndim != 1:
            raise ConfigError(
                f"the batch labels have shape {tuple(y.shape)} (multi-hot, multi-label data) but the model was "
                "built with multilabel=false; build it with model.multilabel=true (train.py sets it from the "
                "datamodule's multilabel attribute).")
        return F.cross_entropy(logits, y, label_smoothing=smoothing)

    def on_train_epoch_end(self) -> None:
        # before the epoch-end checkpoint (ModelCheckpoint runs after the module's hook)
        self._raise_if_non_finite()
        self._log_epoch("train")

    def on_validation_start(self) -> None:
        # validation during fit ends in a checkpoint: never write one from weights a NaN step touched
        self._raise_if_non_finite()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._record_non_finite(loss)
        self._unchecked_steps += 1
        if self._unchecked_steps >= self._check_every:
            self._raise_if_non_finite()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # -- non-finite loss guard ----------------------------------------------------------------
    def _record_non_finite(self, loss: torch.Tensor) -> None:
        """Remember the first non-finite loss on the loss's device (no host sync)."""
        loss = loss.detach().float()
        if self._nonfinite is None or self._nonfinite.device != loss.device:
            self._nonfinite = torch.full((3,), -1.0, device=loss.device)
        state = self._nonfinite
        first = ~torch.isfinite(loss) & (state[0] < 0)
        row = torch.stack((torch.full_like(loss, float(self.global_step)),
                           torch.full_like(loss, float(self.current_epoch)), loss))
        self._nonfinite = torch.where(first, row, state)

    def _raise_if_non_finite(self) -> None:
        """Read the flag (the one host sync) and stop every rank together when a loss was non-finite."""
        self._unchecked_steps = 0
        state = self._nonfinite
        finite = state is None or bool(state[0] < 0)
        # every rank must stop together, otherwise the others would wait in all-reduce forever
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(self._non_finite_message(None if finite else state))

    def _non_finite_message(self, state: torch.Tensor | None) -> str:
        ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or getattr(
            self.trainer.checkpoint_callback, "best_model_path", "")
        where = f"Last good checkpoint (kept): {ckpt}" if ckpt else "No checkpoint was written yet."
        now = f"epoch {self.current_epoch}, step {self.global_step}"
        if state is None:
            what = f"Training loss became non-finite on another DDP rank (seen at {now})"
            touched = "training stopped on every rank"
        else:
            step, epoch, value = int(state[0]), int(state[1]), float(state[2])
            what = f"Training loss became {value} at epoch {epoch}, step {step}"
            touched = ("training stopped before this step touched the weights" if step == self.global_step
                       and epoch == self.current_epoch else
                       f"it was read at {now} (model.nan_check_every={self._check_every}: the loss is read on "
                       "the host every N steps), so the weights since then are not to be trusted")
        fix = ("lower model.optimizer.lr, set trainer.gradient_clip_val=1.0, or check the data for NaN/Inf")
        if str(self.trainer.precision) in ("16-true", "16"):
            # pure float16 has no loss scaling, and optimiser constants such as Adam's eps=1e-8 round to 0
            fix = ("train in trainer.precision=16-mixed (float16 with loss scaling) or bf16-mixed / bf16-true: "
                   "16-true keeps weights, gradients and optimiser state in float16, which under- and overflows; "
                   f"else {fix}")
        return f"{what}; {touched}. {where} Fix: {fix}."

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("Classifier has no optimizer: pass model.optimizer (a Hydra partial) to train.")
        opt = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return opt
        kwargs: dict[str, Any] = {}
        target = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        if "total_steps" in inspect.signature(target).parameters and "total_steps" not in getattr(
                self.scheduler_factory, "keywords", {}):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
            interval = "step"
        else:
            interval = "epoch"
        try:
            scheduler = self.scheduler_factory(opt, **kwargs)
        except ZeroDivisionError:
            # OneCycleLR divides by zero when pct_start * total_steps == 1 (tiny debug runs)
            kwargs["total_steps"] += 1
            scheduler = self.scheduler_factory(opt, **kwargs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"hparams": dict(self.hparams), **self.xaudit_info}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.xaudit_info = {k: v for k, v in checkpoint.get(CHECKPOINT_KEY, {}).items() if k != "hparams"}


def _check_auto_bool(value: bool | str, key: str) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(f"{key}={value!r}: use true, false or auto.")


def _compile_options(value: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments, or None when compiling is off."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"model.compile={value!r}: use false, true or a dict of torch.compile options "
                      "(e.g. {mode: max-autotune}).")


def unshare_metric_states(module: torch.nn.Module) -> None:
    """Give every torchmetrics state its own memory in this process.

    Under DDP spawn on CPU the module is pickled to the workers through torch.multiprocessing,
    which moves metric-state tensors to shared memory: all ranks then add into one tensor and the
    all-reduce counts everything twice. ``reset()`` replaces each state with a private copy.
    """
    for m in module.modules():
        if isinstance(m, Metric):
            m.reset()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong and what to do."""
    if not str(path):
        raise FileNotFoundError("No checkpoint path given (ckpt_path is empty). Train one with `python train.py`.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist (ckpt_path). "
                                "Train one with `python train.py`.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        msg = str(err)
        if "weights_only" in msg or "Unsupported global" in msg or "Weights only load failed" in msg:
            raise ValueError(
                f"Refusing to load {path}: it holds arbitrary Python objects, and xaudit only loads "
                "checkpoints with torch.load(..., weights_only=True) (unpickling can run code). "
                "Re-save it from trusted code as plain tensors/dicts (a checkpoint written by "
                "`python train.py` is already safe)."
            ) from err
        raise ValueError(f"Checkpoint {path} is unreadable (truncated or not a torch file): {msg}") from err


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """Rebuild a :class:`Classifier` from an xaudit checkpoint (weights-only, eval mode)."""
    return classifier_from_checkpoint(load_checkpoint(path), path).to(map_location).eval()


def classifier_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Classifier:
    """Rebuild the :class:`Classifier` held by a loaded xaudit checkpoint dict (on the CPU)."""
    info = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if info is None or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an xaudit checkpoint (no '{CHECKPOINT_KEY}' entry); "
                         "use a checkpoint written by `python train.py`.")
    hp = dict(info["hparams"])
    hp["backbone"] = {**hp["backbone"], "pretrained": False, "weights_path": None}
    model = Classifier(**hp)
    problem = state_dict_mismatch(model.state_dict(), ckpt["state_dict"])
    if problem:
        raise ValueError(f"{path} does not hold the weights of the model its own config describes "
                         f"({describe_backbone(hp['backbone'])}): {problem}. The file was edited or written by "
                         "other code; use a checkpoint written by `python train.py`.")
    model.load_state_dict(ckpt["state_dict"])
    model.xaudit_info = {k: v for k, v in info.items() if k != "hparams"}
    return model


def describe_backbone(backbone: dict[str, Any]) -> str:
    """``model.backbone.name=...`` plus the options that change the weights' shapes."""
    keys = ("name", "width", "in_chans", "cifar_stem")
    return ", ".join(f"model.backbone.{k}={backbone[k]}" for k in keys if k in backbone)


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any], show: int = 3) -> str | None:
    """None when ``found`` has exactly ``expected``'s keys and shapes, else a short description."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and isinstance(found[k], torch.Tensor) and found[k].shape != v.shape]
    parts = [f"{len(items)} {what} (e.g. {', '.join(items[:show])})" for what, items in (
        ("missing tensors", missing), ("unexpected tensors", extra), ("shape mismatches", shapes)) if items]
    return "; ".join(parts) or None
