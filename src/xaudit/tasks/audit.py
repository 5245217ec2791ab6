"""The body of ``python audit.py``: checkpoint + its data → evaluate or a ROAR/KAR sweep → report.

Layout of an audit directory (``out_dir``; default ``<log_dir>/audit/results/<run>_<ckpt>``)::

    attributions/<method>/...     shards shared by the roar and kar sweeps (computed once)
    evaluate/ roar/ kar/          per mode: results.jsonl, audit_config.json, results.csv/json,
                                  report.md/html and the PNG plots

A rerun resumes: finished cells are skipped, stored shards reused; a rerun with settings that
change the values (another checkpoint, data, recipe, metrics) is refused with the differences.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from xaudit.data.base import dataset_fingerprint
from xaudit.explainers import create
from xaudit.explainers import names as explainer_names
from xaudit.metrics.base import evaluating
from xaudit.metrics.evaluator import (
    ExplainerEvaluation,
    build_metrics,
    check_target_mode,
    metric_specs,
    metric_target,
    needs_mask,
)
from xaudit.models.classifier import Classifier, classifier_from_checkpoint, load_checkpoint
from xaudit.reporting.protocol import (
    PROTOCOL_VERSION,
    evaluate_card,
    make_card,
    protocol_row,
    read_card,
    write_card,
)
from xaudit.reporting.report import log_report, write_report
from xaudit.roar.data import SplitDataModule, TensorSplit
from xaudit.roar.masking import MODES as RETRAIN_MODES
from xaudit.roar.masking import check_fractions
from xaudit.roar.results import ResultsLog
from xaudit.roar.runner import Recipe, RoarSweep, check_fill
from xaudit.roar.store import check_store_dtype, method_key
from xaudit.tasks.common import (
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
    gpu_peak,
    init_distributed,
    is_global_zero,
    reset_gpu_peak,
)
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.io import check_writable, file_sha256
from xaudit.utils.progress import SweepProgress, quiet_lightning

AUDIT_MODES: tuple[str, ...] = ("evaluate", *RETRAIN_MODES, "sanity", "shortcut", "concepts", "explain")
#: data keys that change how data is served, not what it is (left out of fingerprints)
SERVING_KEYS = ("batch_size", "eval_batch_size", "num_workers")


# -- configuration -------------------------------------------------------------------------------
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


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


def accepted_changes(cfg: DictConfig) -> list[str]:
    """``accept_changes``: fingerprint keys (or prefixes) whose change the user accepts on resume."""
    value = cfg.get("accept_changes") or []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


# -- the audit -----------------------------------------------------------------------------------
def audit(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured audit; return the cells, the directories and the report paths."""
    with quiet_lightning():
        return _audit(cfg)


def _audit(cfg: DictConfig) -> dict[str, Any]:
    seed(cfg)
    mode = str(cfg.audit.mode)
    if mode not in AUDIT_MODES:
        raise unknown_choice("audit mode", mode, AUDIT_MODES, key="audit.mode")
    target = check_target_mode(str(cfg.get("target", "auto")))
    if target == "auto" and mode not in ("evaluate", "shortcut"):
        target = "label"  # ROAR/KAR/sanity explain one class per image: the true one (per-metric choice is evaluate's)
    if mode == "shortcut":  # trains its own two models, then audits each (evaluate mode)
        from xaudit.tasks.shortcut import run_shortcut

        base = Path(str(cfg.out_dir)) if cfg.get("out_dir") else Path(str(cfg.paths.log_dir)) / "audit" / "experiments"
        return run_shortcut(cfg, _audit, base.expanduser().resolve())
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
    if mode == "explain":  # the user's own images: no test split, no resumable cells
        from xaudit.tasks.explain import run_explain

        classifier.net.to(device)
        batch_size = int(cfg.get("batch_size") or datamodule.eval_batch_size)
        out = run_explain(cfg, classifier.net, datamodule, methods, out_dir / mode, device, batch_size, _is_writer())
        if _is_writer():
            log.info("Explained %d images; table %s", out["images"], out["files"]["csv"])
        return out
    identity = {"checkpoint": file_sha256(ckpt_path), "data": data_identity(data_cfg), "target": target}
    datamodule.setup("test")
    stream = data_path(cfg)
    test = TensorSplit.from_dataset(datamodule.test_set, datamodule.mean, datamodule.std, stream=stream)
    classifier.net.to(device)
    if mode != "concepts":  # TCAV explains with concepts, not with the methods
        dry_run(classifier.net, methods, test)
    batch_size = int(cfg.get("batch_size") or datamodule.eval_batch_size)
    mode_dir = out_dir / mode
    if mode == "sanity":
        from xaudit.tasks.sanity import run_sanity

        cells = run_sanity(cfg, classifier.net, test, methods, mode_dir, identity, _is_writer())
    elif mode == "concepts":
        from xaudit.tasks.concepts import run_concepts

        cells = run_concepts(cfg, classifier.net, datamodule, test, mode_dir, identity, _is_writer())
    elif mode == "evaluate":
        cells = run_evaluate(cfg, classifier, datamodule, test, methods, identity, mode_dir, make_trainer,
                             batch_size, target)
    else:
        classifier.net.cpu()  # the sweep's trainers place it (and the shards' workers receive it)
        cells = run_retrain(cfg, mode, classifier, datamodule, test, methods, identity, out_dir, make_trainer,
                            batch_size, target, trained, fit_trainer)
    out: dict[str, Any] = {"mode": mode, "out_dir": str(out_dir), "mode_dir": str(mode_dir), "cells": cells,
                           "report": {}}
    if _is_writer():
        if mode in ("evaluate", "roar", "kar") and test.labels.ndim == 1:  # examples.png, embedded by the report
            from xaudit.reporting.overlays import audit_examples

            roar_cfg = cfg.get("roar") or {}
            audit_examples(mode, mode_dir, classifier.net, test, methods,
                           fractions=[] if mode == "evaluate" else _plain(roar_cfg.get("fractions")) or [],
                           tie_seed=int(roar_cfg.get("tie_seed", 0)),
                           class_names=getattr(datamodule, "class_names", None))
        # the report shows every cell of this directory (other seeds of a multirun, earlier runs)
        every = list(ResultsLog(mode_dir).read().values())
        meta = {"checkpoint": str(Path(ckpt_path).resolve()), "data": data_cfg.get("_target_", "?"),
                "methods": ", ".join(sorted({c["method_key"] for c in every})), "target": target,
                "cells": len(every), "num_classes": int(datamodule.num_classes)}
        if mode == "sanity":
            from xaudit.tasks.sanity import write_sanity_report

            paths = write_sanity_report(mode_dir, every, test, meta)
        elif mode == "concepts":
            from xaudit.tasks.concepts import write_concepts_report

            meta["methods"] = ", ".join(sorted({c["concept"] for c in every}))
            paths = write_concepts_report(mode_dir, every, meta, float((cfg.get("concepts") or {}).get("alpha", 0.05)))
        else:
            paths = write_report(mode_dir, mode, every, meta)
        loggers = instantiate_group(cfg.get("logger"))
        try:
            card = read_card(mode_dir)
            for lg in loggers:
                lg.log_hyperparams({**plain_config(cfg), **({"protocol": card} if card else {})})
            stored = json.loads(paths["json"].read_text())["summary"]
            log_report(loggers, mode, every, paths, (stored["header"], stored["rows"]))
            for lg in loggers:
                lg.finalize("success")  # MLflow run → FINISHED, TensorBoard event file closed
        finally:
            finish_wandb(loggers)
        out["report"] = {k: str(v) for k, v in paths.items()}
        log.info("Audit (%s): %d cells; report %s", mode, len(cells), paths["md"])
    return out


def data_path(cfg: DictConfig) -> bool | None:
    """``data_path``: auto (None: in-memory tensor datasets stay in memory, any other dataset is
    streamed per batch), ``stream`` (True) or ``memory`` (False: decode every split once)."""
    value = str(cfg.get("data_path", "auto"))
    choices = {"auto": None, "stream": True, "memory": False}
    if value not in choices:
        raise unknown_choice("data_path", value, list(choices), key="data_path")
    return choices[value]


def run_evaluate(cfg: DictConfig, classifier: Classifier, datamodule: Any, test: TensorSplit,
                 methods: dict[str, dict[str, Any]], identity: dict[str, Any], mode_dir: Path,
                 make_trainer: Callable[..., pl.Trainer], batch_size: int, target: str) -> dict[str, dict[str, Any]]:
    """Every (explainer × metric) on the test split; one cell per explainer plus the model's accuracy."""
    ev = cfg.get("evaluate") or {}
    specs = metric_specs(_plain(ev.get("metrics")))
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
    if _is_writer():
        write_card(mode_dir, card)
    done = broadcast(results.read() if _is_writer() else None)
    data = SplitDataModule(test=test, eval_batch_size=batch_size, num_workers=int(getattr(datamodule, "num_workers", 0)))
    keys = ["evaluate|model", *[f"evaluate|{method_key(n, kw)}" for n, kw in methods.items()]]
    progress = SweepProgress(len(keys), sum(k in done for k in keys), "evaluate", enabled=_is_writer(),
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
    if _is_writer():
        results.append(record)


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
                trained: dict[str, Any], fit_trainer: pl.Trainer | None = None) -> dict[str, dict[str, Any]]:
    """A ROAR or KAR sweep over ``roar.fractions`` × ``roar.seed`` for every method."""
    roar = cfg.get("roar")
    if roar is None:
        raise ConfigError(f"audit.mode={mode} needs the roar settings; select the mode with audit={mode}.")
    fractions = check_fractions(_plain(roar.fractions))
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
    if _is_writer():
        write_card(out_dir / mode, retrain_card(mode, fractions, seeds, fill, datamodule, tie_seed, target, effective,
                                                str(roar.store_dtype)))
    datamodule.setup("fit")
    plain_train = datamodule.plain_train_set()
    train = TensorSplit.from_dataset(plain_train, datamodule.mean, datamodule.std, stream=data_path(cfg))
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
                      is_writer=_is_writer(), claim_stale_s=float(claims.get("stale_s", 300)),
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
