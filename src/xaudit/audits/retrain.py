"""``audit=roar`` / ``audit=kar``: remove (ROAR) or keep (KAR) each method's top pixels, retrain, test.

Hooker et al. (NeurIPS 2019). The sweep (:class:`xaudit.roar.runner.RoarSweep`) runs every
(method × fraction × seed) cell, sharing the attribution shards of ``<out_dir>/attributions``
between the two modes; this module turns the audit's config into the sweep and its protocol card.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from xaudit.audits.base import AuditContext, AuditMode, accepted_changes, plain
from xaudit.audits.evaluate import write_examples, write_table_report
from xaudit.data.base import dataset_fingerprint
from xaudit.data.tensor_split import TensorSplit
from xaudit.models.classifier import Classifier
from xaudit.ops.masking import check_fractions
from xaudit.reporting.protocol import PROTOCOL_VERSION, make_card, protocol_row, write_card
from xaudit.roar.runner import Recipe, RoarSweep, check_fill
from xaudit.roar.store import check_store_dtype
from xaudit.utils.config import instantiate
from xaudit.utils.distributed import is_global_zero
from xaudit.utils.errors import ConfigError
from xaudit.utils.results import ResultsLog


class Roar(AuditMode):
    """ROAR: the most important pixels removed, the model retrained (``conf/audit/roar.yaml``)."""

    name = "roar"

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """The sweep over ``roar.fractions`` × ``roar.seed`` for every method."""
        assert ctx.make_trainer is not None
        ctx.net.cpu()  # the sweep's trainers place it (and the shards' workers receive it)
        return run_retrain(ctx.cfg, self.name, ctx.classifier, ctx.datamodule, ctx.test, ctx.methods, ctx.identity,
                           ctx.out_dir, ctx.make_trainer, ctx.batch_size, ctx.target, ctx.trained, ctx.fit_trainer,
                           stream=ctx.stream)

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """``examples.png`` (inputs with the top pixels removed), then the curves, tables and card."""
        roar_cfg = ctx.cfg.get("roar") or {}
        write_examples(ctx, plain(roar_cfg.get("fractions")) or [], int(roar_cfg.get("tie_seed", 0)))
        return write_table_report(ctx, cells)


class Kar(Roar):
    """KAR: the least important pixels removed first (``conf/audit/kar.yaml``; the roar settings)."""

    name = "kar"


def check_seeds(value: Any) -> list[int]:
    """``roar.seed``: an int or a list of ints."""
    items = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    try:
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ConfigError(f"roar.seed={value!r} must be an int or a list of ints, e.g. roar.seed=[0,1,2].") from None
    if not seeds:
        raise ConfigError("roar.seed is an empty list; give at least one seed.")
    return list(dict.fromkeys(seeds))


def retrain_recipe(roar: Any, trained: dict[str, Any], datamodule: Any, eval_batch_size: int,
                   cfg: DictConfig) -> tuple[dict[str, Any], Recipe]:
    """The checkpoint's model config and training recipe, with the ``roar.*`` overrides applied."""
    model_cfg = dict(trained.get("model") or {})
    if "_target_" not in model_cfg:
        raise ConfigError("The checkpoint does not record its model config (model._target_), so it cannot be "
                          "retrained; audit a checkpoint written by `python train.py`.")
    if roar.get("lr") is not None:
        lr = float(roar.lr)
        model_cfg["optimizer"] = {**model_cfg.get("optimizer", {}), "lr": lr}
        if isinstance(model_cfg.get("scheduler"), dict) and "max_lr" in model_cfg["scheduler"]:
            model_cfg["scheduler"] = {**model_cfg["scheduler"], "max_lr": lr}
    epochs = roar.get("epochs") or (trained.get("trainer") or {}).get("max_epochs") or 10
    batch_size = roar.get("batch_size") or (trained.get("data") or {}).get("batch_size") or datamodule.batch_size
    augment = roar.get("augment")
    augment = bool(getattr(datamodule, "augment", False)) if augment is None else bool(augment)
    cl = roar.get("channels_last", "auto")
    if cl == "auto":
        accel = str(cfg.trainer.get("accelerator", "auto"))
        cl = torch.cuda.is_available() and accel in ("gpu", "cuda", "auto")
    return model_cfg, Recipe(int(epochs), int(batch_size), int(eval_batch_size), augment, bool(cl))


def effective_recipe(model_cfg: dict[str, Any], recipe: Recipe, trainer: pl.Trainer) -> dict[str, Any]:
    """What decides a retrained cell's value: the model config and the recipe as this run executes it.

    ``global_batch`` is batch × devices × nodes × gradient accumulation (what the optimiser sees);
    precision and memory format come from the fit trainer, after ``devices=auto`` is resolved.
    """
    world = int(trainer.world_size)
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return {"model": model_cfg, "epochs": recipe.epochs, "batch_size": recipe.batch_size,
            "global_batch": recipe.batch_size * world * accumulate, "world_size": world,
            "accumulate_grad_batches": accumulate, "precision": str(trainer.precision),
            "channels_last": recipe.channels_last, "augment": recipe.augment}


def run_retrain(cfg: DictConfig, mode: str, classifier: Classifier, datamodule: Any, test: TensorSplit,
                methods: dict[str, dict[str, Any]], identity: dict[str, Any], out_dir: Path,
                make_trainer: Callable[..., pl.Trainer], batch_size: int, target: str,
                trained: dict[str, Any], fit_trainer: pl.Trainer | None = None,
                stream: bool | None = None) -> dict[str, dict[str, Any]]:
    """A ROAR or KAR sweep over ``roar.fractions`` × ``roar.seed`` for every method.

    ``stream``: the audit's ``data_path`` (None: auto, True: stream per batch, False: in memory)."""
    roar = cfg.get("roar")
    if roar is None:
        raise ConfigError(f"audit.mode={mode} needs the roar settings; select the mode with audit={mode}.")
    fractions = check_fractions(plain(roar.fractions))
    seeds = check_seeds(roar.seed)
    store_dtype = check_store_dtype(str(roar.get("store_dtype", "float16")))
    model_cfg, recipe = retrain_recipe(roar, trained, datamodule, batch_size, cfg)
    tie_seed = int(roar.get("tie_seed", 0))
    fill = resolve_fill(str(roar.get("fill", "auto")), datamodule)
    effective = effective_recipe(model_cfg, recipe, fit_trainer or make_trainer("fit"))
    results = ResultsLog(out_dir / mode)
    identity_roar = {**identity, "mode": mode, "tie_seed": tie_seed, "store_dtype": str(roar.store_dtype),
                     "recipe": effective}
    if fill != "normalisation":  # recorded only where it changes the cells
        identity_roar["fill"] = fill
    identity_roar["protocol_version"] = PROTOCOL_VERSION
    results.check_config(identity_roar, accept=accepted_changes(cfg))
    if is_global_zero():
        write_card(out_dir / mode, retrain_card(mode, fractions, seeds, fill, datamodule, tie_seed, target, effective,
                                                str(roar.store_dtype)))
    datamodule.setup("fit")
    plain_train = datamodule.plain_train_set()
    train = TensorSplit.from_dataset(plain_train, datamodule.mean, datamodule.std, stream=stream)
    sizes = {"num_classes": datamodule.num_classes, "in_chans": datamodule.in_chans,
             "image_size": datamodule.image_size}

    def build_model() -> pl.LightningModule:
        return instantiate(OmegaConf.create(model_cfg), **sizes)

    claims = cfg.get("claims") or {}
    sweep = RoarSweep(mode=mode, methods=methods, fractions=fractions, seeds=seeds, recipe=recipe, train=train,
                      test=test, net=classifier.net, build_model=build_model, make_trainer=make_trainer, log=results,
                      store_root=str(out_dir / "attributions"),
                      store_fingerprint={**identity, "store_dtype": str(roar.store_dtype),
                                         "content": {"train": dataset_fingerprint(plain_train, labels=train.labels),
                                                     "test": dataset_fingerprint(datamodule.test_set,
                                                                                 labels=test.labels)}},
                      attr_batch_size=batch_size, target=target, store_dtype=store_dtype, tie_seed=tie_seed,
                      is_writer=is_global_zero(), claim_stale_s=float(claims.get("stale_s", 300)),
                      claim_heartbeat_s=float(claims.get("heartbeat_s", 15)),
                      poll_s=float(claims.get("poll_s", 5)),
                      recipe_record={k: v for k, v in effective.items() if k != "model"},
                      num_workers=int(getattr(datamodule, "num_workers", 0)), fill=fill)
    return sweep.run()


#: Hooker et al. (NeurIPS 2019): 10..90 % removed, 5 retrained models per point, removed pixels → the
#: training split's per-channel mean
ROAR_PAPER = {"fractions": [0.1, 0.3, 0.5, 0.7, 0.9], "seeds": 5, "fill": "train_mean"}


def retrain_card(mode: str, fractions: list[float], seeds: list[int], fill: str, datamodule: Any, tie_seed: int,
                 target: str, recipe: dict[str, Any], store_dtype: str) -> dict[str, Any]:
    """The protocol card of a ROAR/KAR sweep: its settings next to Hooker et al.'s."""
    same_mean = fill == "train_mean" or bool(getattr(datamodule, "mean_is_train_mean", False))
    params = {"fractions": fractions, "seeds": len(seeds), "fill": "train_mean" if same_mean else fill,
              "tie_seed": tie_seed, "ties": "seeded random", "target": target, "store_dtype": store_dtype,
              "epochs": recipe.get("epochs"), "global_batch": recipe.get("global_batch")}
    size = int(datamodule.image_size)
    row = protocol_row(mode, "Hooker, Erhan, Kindermans & Kim, A benchmark for interpretability methods in deep "
                       "neural networks, NeurIPS 2019", params, ROAR_PAPER,
                       ["fill train_mean: the normalisation's mean where the data is normalised by its own training "
                        "mean (shapes, CIFAR-10), else the mean computed from the training split",
                        "the paper does not fix the retraining recipe; the checkpoint's recipe is reused"])
    return make_card(mode, target, [size, size], {mode: row})


def resolve_fill(fill: str, datamodule: Any) -> str:
    """``roar.fill``: ``auto`` is ``normalisation`` where the data is normalised by its training
    split's own mean (shapes, CIFAR-10: the two are the same value), else ``train_mean`` (an
    ImageFolder normalised with ImageNet's mean gets its own training split's mean, Hooker et al.)."""
    if fill == "auto":
        return "normalisation" if getattr(datamodule, "mean_is_train_mean", False) else "train_mean"
    return check_fill(fill)
