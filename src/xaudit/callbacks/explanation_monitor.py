"""Per-epoch explanation monitoring: what the model looks at while it trains.

Every ``every_n_epochs`` validation epochs the monitor explains a fixed, class-balanced probe
batch with each configured method, logs one overlay grid (rows = samples; columns = image |
one map per method; row captions = true/predicted label and probability), per-method quality
scalars under ``explain/<method>/<metric>`` and a table of per-sample values (W&B table, TensorBoard text,
MLflow JSON artifact).

It never changes training: the probe batch is drawn with its own generator, explainers and
metrics run in eval mode without touching ``param.grad``, BatchNorm statistics or the global RNG.
Under DDP every rank computes the same (small) probe batch, so no collective is needed and the
values equal a single-device run; only rank zero writes images, tables and files.

On multi-label data (``label`` multi-hot [B,K], ``mask`` [B,K,H,W]) the probe's images are
expanded to (image, present class) pairs: one grid row, one map per method and one score per
pair, captioned with the class and its sigmoid probability; the table's ``sample`` is the
probe image and ``class`` the explained class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from xaudit.data.base import dataset_labels
from xaudit.explainers import UnsupportedModelError, create
from xaudit.explainers import names as explainer_names
from xaudit.explainers.registry import is_signed
from xaudit.explainers.targets import present_pairs
from xaudit.metrics import spearman
from xaudit.metrics.base import (
    evaluating,
    forward_probs,
    model_device_dtype,
    model_logits,
    update_metric,
)
from xaudit.metrics.evaluator import build_metrics, needs_mask
from xaudit.metrics.registry import TORCHMETRICS_OPTIONS, metric_class, metric_names
from xaudit.reporting.overlays import grid_image
from xaudit.utils.errors import ConfigError, check_options, unknown_choice

KEY = "callbacks.explanation_monitor.metrics"
#: the monitor's short names (the list form of ``metrics``) → the registered metric each one runs;
#: deletion/insertion also take the monitor's ``steps``/``substrate`` (see :func:`legacy_spec`)
SHORT_NAMES: dict[str, dict[str, Any]] = {
    "deletion": {"name": "deletion_insertion", "mode": "deletion"},
    "insertion": {"name": "deletion_insertion", "mode": "insertion"},
    "mass_in_mask": {"name": "relevance_mass"},
    "pointing_game": {"name": "pointing_game"},
    "max_sensitivity": {"name": "max_sensitivity"},
    "local_lipschitz": {"name": "local_lipschitz"},
}
#: ``metrics: auto``: two curves and (on data with masks) two localisation scores
AUTO_METRICS: tuple[str, ...] = ("deletion", "insertion", "mass_in_mask", "pointing_game")
#: opt-in (not in ``auto``): each re-explains the probe batch ``n`` times under input noise
ROBUSTNESS_METRICS: tuple[str, ...] = ("max_sensitivity", "local_lipschitz")


def legacy_spec(label: str, steps: int | None, substrate: str | None, seed: int,
                robustness: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The spec ``{name: ..., **options}`` of one name of the list form of ``metrics``, with the
    monitor's defaults: deletion/insertion with its ``steps`` and ``substrate``, the robustness
    metrics with ``n=4``, ``seed`` and their ``robustness`` options. Any other registered metric name
    runs with its own defaults."""
    if label in ("deletion", "insertion"):
        return {**SHORT_NAMES[label], "steps": steps, "substrate": substrate}
    if label in ROBUSTNESS_METRICS:
        return {**SHORT_NAMES[label], "n": 4, "seed": int(seed), **dict((robustness or {}).get(label) or {})}
    if label in SHORT_NAMES:
        return dict(SHORT_NAMES[label])
    if label in metric_names():
        return {"name": label}
    raise unknown_choice("monitor metric", label, [*SHORT_NAMES, *metric_names()], key=KEY)


def plain(value: Any) -> Any:
    """A Hydra ``DictConfig``/``ListConfig`` as plain dicts and lists (other values unchanged)."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def monitor_specs(metrics: Any, robustness: dict[str, Any] | None, steps: int | None, substrate: str | None,
                  seed: int) -> dict[str, dict[str, Any]]:
    """``metrics`` (``auto``, a list of names, or evaluate-style specs ``{label: {name: ..., **options}}``)
    and ``robustness`` (options by robustness metric; options for a metric ask for it) → specs."""
    metrics, robustness = plain(metrics), plain(robustness)
    options = {str(m): dict(kw or {}) for m, kw in dict(robustness or {}).items()}
    for m in options:
        if m not in ROBUSTNESS_METRICS:
            raise unknown_choice("robustness metric", m, ROBUSTNESS_METRICS,
                                 key="callbacks.explanation_monitor.robustness")
    if metrics == "auto":
        metrics = list(AUTO_METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, dict):
        specs = {}
        for label, spec in metrics.items():
            if not isinstance(spec, dict) or "name" not in spec:
                raise ConfigError(f"{KEY}.{label} must be a mapping with a 'name' key (a registered metric) and "
                                  f"its options, e.g. {{name: deletion_insertion, mode: deletion}}; got {spec!r}.")
            specs[str(label)] = {**dict(spec), **options.get(str(label), {})}
    else:
        specs = {str(m): legacy_spec(str(m), steps, substrate, seed, options) for m in metrics}
    for m in options:
        if m not in specs:
            specs[m] = legacy_spec(m, steps, substrate, seed, options)
    return specs


def check_spec(label: str, spec: dict[str, Any]) -> None:
    """Refuse an unknown metric or option now, and a bad value when the metric can be built without the
    real model (else the model-dependent check runs when the monitor is prepared, before epoch 0)."""
    name = str(spec["name"])
    cls = metric_class(name) if name in metric_names() else None
    if cls is None:
        raise unknown_choice("metric", name, metric_names(), key=f"{KEY}.{label}.name")
    check_options(f"monitor metric {label!r}", cls, {k: v for k, v in spec.items() if k != "name"},
                  extra=TORCHMETRICS_OPTIONS)
    stand_in = nn.Identity()
    try:
        build_metrics({label: {"name": name}}, stand_in, key=KEY)
    except (ConfigError, ValueError, TypeError):
        return  # needs the real model to be built: checked in _prepare
    build_metrics({label: spec}, stand_in, key=KEY)


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices taking classes in turn (a seeded shuffle within each class)."""
    g = torch.Generator().manual_seed(int(seed))
    per_class = [torch.nonzero(labels == c).flatten() for c in labels.unique(sorted=True)]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for idx in per_class:
            if depth < len(idx) and len(picked) < n:
                picked.append(int(idx[depth]))
        depth += 1
    return torch.tensor(picked)


def expand_probe(probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multi-label probe (``label`` multi-hot [N,K], ``mask`` [N,K,H,W]) as (image, present class)
    rows: ``label`` the class [P], ``mask`` that class's mask [P,H,W], ``image_index`` the probe image
    [P] and ``labels`` its multi-hot row; other keys repeated per row."""
    image, cls = present_pairs(probe["label"])
    out = {k: v[image] for k, v in probe.items() if k not in ("label", "mask")}
    out.update(label=cls, image_index=image, labels=probe["label"][image])
    if "mask" in probe:
        out["mask"] = probe["mask"][image, cls]
    return out


#: the monitor's methods with ``explainers="auto"``: CAM needs a GAP→linear head (skipped otherwise)

CNN_EXPLAINERS: tuple[str, ...] = ("cam", "grad_cam", "saliency")
#: on a vision transformer: Grad-CAM on the last block's tokens, saliency, attention rollout
TRANSFORMER_EXPLAINERS: tuple[str, ...] = ("grad_cam", "saliency", "attention_rollout")


def has_timm_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds timm-style attention blocks (a ``fused_attn`` flag): a ViT/DeiT."""
    return any(hasattr(m, "fused_attn") and hasattr(m, "qkv") for m in model.modules())


class ExplanationMonitor(pl.Callback):
    """Explain a fixed probe batch every N epochs and log grids and quality scalars.

    Args:
        explainers: ``"auto"`` (CAM, Grad-CAM and saliency on CNNs; Grad-CAM on tokens, saliency and
            attention rollout on a timm ViT/DeiT), names from :func:`xaudit.explainers.names`, or a
            mapping name → keyword arguments for :func:`xaudit.explainers.create` (e.g.
            ``{"grad_cam": {"target_layer": "layer3"}}``). ``cam`` on a backbone without a GAP→linear head is
            skipped with one warning.
        every_n_epochs: run after validation of every N-th epoch (epoch 0 included).
        num_samples: probe batch size, drawn class-balanced from the validation set (on multi-label
            data: images, balanced by their first class, each giving one row per present class).
        metrics: evaluate-style specs ``{label: {name: <registered metric>, **options}}`` (as
            ``evaluate.metrics``; scalars ``explain/<method>/<label>``), or a list of names:
            ``deletion, insertion, mass_in_mask, pointing_game, max_sensitivity, local_lipschitz``
            (with the monitor's defaults, see :func:`legacy_spec`) or any registered metric, or
            ``"auto"`` (the first four; the mask metrics are skipped with a warning on data without
            masks). The robustness metrics are opt-in: each costs ``n`` extra explanations of the
            probe batch per method.
        robustness: keyword options of the robustness metrics by name (e.g. ``{"max_sensitivity":
            {"radius": 0.05, "n": 4}}``); ``n`` defaults to 4 here and the noise is seeded by ``seed``.
        steps: deletion/insertion steps (16: a cheap per-epoch curve; RISE's protocol is min(H, W),
            ``steps=null``; the audit's evaluate mode uses that).
        substrate: deletion/insertion substrate; null: RISE's (zeros for deletion, its blur for
            insertion). The monitor explains and scores the true class of each probe image.
        seed: seeds the probe-batch choice (a private generator).
        log_images / log_table: turn off the grid image / per-sample table.
    """

    def __init__(
        self,
        explainers: Sequence[str] | dict[str, dict[str, Any]] | str = "auto",
        every_n_epochs: int = 1,
        num_samples: int = 16,
        metrics: Sequence[str] | dict[str, dict[str, Any]] | str = "auto",
        robustness: dict[str, dict[str, Any]] | None = None,
        steps: int | None = 16,
        substrate: str | None = None,
        seed: int = 0,
        log_images: bool = True,
        log_table: bool = True,
        cell: int = 96,
    ) -> None:
        super().__init__()
        self.auto_explainers = explainers == "auto"
        if self.auto_explainers:  # resolved per model in _prepare: CNN_EXPLAINERS or TRANSFORMER_EXPLAINERS
            explainers = CNN_EXPLAINERS
        specs = dict(explainers) if isinstance(explainers, dict) else {str(n): {} for n in explainers}
        self.specs = {name: dict(kw or {}) for name, kw in specs.items()}
        for name in self.specs:
            if name not in explainer_names():
                raise unknown_choice("explainer", name, explainer_names(),
                                     key="callbacks.explanation_monitor.explainers")
        if not self.specs:
            raise ConfigError("callbacks.explanation_monitor.explainers is empty; name at least one method.")
        if int(every_n_epochs) < 1 or int(num_samples) < 1 or (steps is not None and int(steps) < 1):
            raise ConfigError("every_n_epochs, num_samples and steps of the explanation monitor must be ≥1; got "
                              f"{every_n_epochs}, {num_samples}, {steps}.")
        self.auto = metrics == "auto"
        #: ``{label: {name: ..., **options}}``, built with the metric registry at every monitor epoch
        self.metric_specs = monitor_specs(metrics, robustness, steps, substrate, int(seed))
        for label, spec in self.metric_specs.items():
            check_spec(label, spec)  # bad values (radius ≤ 0, n < 1) fail here, not mid-run
        self.every_n_epochs = int(every_n_epochs)
        self.num_samples = int(num_samples)
        self.steps = None if steps is None else int(steps)
        self.substrate = substrate
        self.seed = int(seed)
        self.log_images = bool(log_images)
        self.log_table = bool(log_table)
        self.cell = int(cell)
        self.probe: dict[str, torch.Tensor] | None = None
        self.explainers: dict[str, Any] = {}
        self._prepared: nn.Module | None = None  # the model the explainers were created and dry-run for
        self.previous: dict[str, torch.Tensor] = {}
        self.class_names: list[str] | None = None
        self.history: list[dict[str, float]] = []
        self.multilabel = False  # set from the probe's labels in _build

    @property
    def metric_names(self) -> list[str]:
        """The labels of the configured metrics (the ``<label>`` of ``explain/<method>/<label>``)."""
        return list(self.metric_specs)

    # -- setup: everything that can be wrong fails here, before the first epoch -------------------
    # The probe is drawn in ``setup`` (config errors surface before anything runs), but the dry run
    # waits for ``on_fit_start``: Lightning moves the module to its device and converts it for
    # ``*-true`` precision in ``strategy.setup``, which runs after callbacks' ``setup``.
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dataset = self._val_dataset(trainer)
        if dataset is not None:
            self._build(trainer, dataset)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            self._prepare(pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None and not trainer.sanity_checking:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            self._build(trainer, loader.dataset)

    @staticmethod
    def _val_dataset(trainer: pl.Trainer) -> Dataset | None:
        dm = trainer.datamodule
        return getattr(dm, "val_set", None) if dm is not None else None

    def _build(self, trainer: pl.Trainer, dataset: Dataset) -> None:
        """Draw the probe batch (kept float32 on the CPU; moved and cast where it is used)."""
        n = len(dataset)  # type: ignore[arg-type]
        if self.num_samples > n:
            raise ConfigError(
                f"callbacks.explanation_monitor.num_samples={self.num_samples} exceeds the {n} validation "
                f"samples; use num_samples ≤{n}.")
        labels = dataset_labels(dataset)
        self.multilabel = labels.ndim == 2
        # multi-label: balanced by each image's first present class (argmax of the multi-hot row)
        idx = balanced_indices(labels.argmax(1) if self.multilabel else labels, self.num_samples, self.seed)
        items = [dataset[int(i)] for i in idx]
        probe = {k: torch.stack([torch.as_tensor(it[k]) for it in items]).cpu() for k in items[0]}
        probe["image"] = probe["image"].float()
        if self.multilabel:
            probe = expand_probe(probe)
        has_mask = "mask" in probe
        wanted_masks = [m for m, spec in self.metric_specs.items() if needs_mask(spec)]
        if wanted_masks and not has_mask:
            if not self.auto:
                raise ConfigError(
                    f"explanation monitor metrics {wanted_masks} need ground-truth masks, but the validation data "
                    "has none. Drop them from callbacks.explanation_monitor.metrics or use metrics=auto.")
            warnings.warn(f"ExplanationMonitor: the data has no masks; skipping {wanted_masks}.", stacklevel=2)
            self.metric_specs = {m: spec for m, spec in self.metric_specs.items() if m not in wanted_masks}
        self.probe = probe
        self._prepared = None
        dm = trainer.datamodule
        self.class_names = list(getattr(dm, "class_names", []) or []) or None
        self._denorm = getattr(dm, "denormalize", None)

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        """Create the explainers for this model and dry-run each on two probe images, once per model.

        Wrong layers and unsupported heads fail here (at fit start), not at epoch 3. The explainers
        read the model's device and dtype at every call, so a later move or conversion is followed.
        """
        model = self._model(pl_module)
        if self._prepared is model:
            return
        probe = self._probe_on(model)
        x, y = probe["image"][:2], probe["label"][:2]
        self.explainers = {}
        if self.auto_explainers:
            names = TRANSFORMER_EXPLAINERS if has_timm_attention(model) else CNN_EXPLAINERS
            self.specs = {name: {} for name in names}
        with evaluating(model, grad=True):
            for name, kw in self.specs.items():
                explainer = create(name, model, **kw)
                try:
                    explainer.attribute(x, y)
                except UnsupportedModelError as err:
                    if name != "cam":
                        raise
                    warnings.warn(f"ExplanationMonitor: skipping cam ({err})", stacklevel=2)
                    continue
                self.explainers[name] = explainer
        for name in self.explainers:  # the metrics' model-dependent checks, before the first epoch
            self._metrics(model, name)
        self._prepared = model

    def _probe_on(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The probe batch on the model's current device (images stay float32)."""
        assert self.probe is not None
        device, _ = model_device_dtype(model, self.probe["image"])
        return {k: v.to(device) for k, v in self.probe.items()}

    @staticmethod
    def _model(pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "net", pl_module)

    # -- every N epochs ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.probe is None:
            return
        epoch = trainer.current_epoch
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs - 1:
            return
        result = self.explain(pl_module)
        # NaN marks samples where a metric is undefined (e.g. a map with no positive mass)
        scalars = {f"explain/{m}/{k}": float(v.float().nanmean())
                   for m, vals in result["values"].items() for k, v in vals.items()}
        for key, value in scalars.items():
            pl_module.log(key, value, sync_dist=False)  # identical on every rank: nothing to reduce
        self.history.append({"epoch": float(epoch), **scalars})
        if trainer.is_global_zero:
            self._write(trainer, epoch, result)

    def explain(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Maps, predictions and per-sample metric values for the probe batch (no logging)."""
        assert self.probe is not None
        self._prepare(pl_module)
        model = self._model(pl_module)
        # float32 images on the model's device: explainers and metrics cast them to the model's dtype
        # for its forwards; maps come back in float32, probabilities and scores in ≥ float32
        probe = self._probe_on(model)
        x, y, mask = probe["image"], probe["label"], probe.get("mask")
        maps: dict[str, torch.Tensor] = {}
        values: dict[str, dict[str, torch.Tensor]] = {}
        with evaluating(model, grad=True):
            with torch.no_grad():
                # multi-label: independent classes, each with its own sigmoid
                probs = model_logits(model, x).float().sigmoid() if self.multilabel else forward_probs(model, x)
            for name, explainer in self.explainers.items():
                attr = explainer.attribute(x, y)
                maps[name] = attr
                values[name] = self._scores(model, x, attr, y, mask, explainer, name)
                prev = self.previous.get(name)
                if prev is not None:
                    values[name]["rank_corr_prev"] = spearman(attr.flatten(1).float(), prev.flatten(1).float())
                self.previous[name] = attr.detach().clone()
        return {"maps": maps, "values": values, "probs": probs, "pred": probs.argmax(-1)}

    def _metrics(self, model: nn.Module, method: str) -> dict[str, Any]:
        """Fresh metrics of :attr:`metric_specs` for ``method`` (local computation only: every rank
        holds the same probe batch, so nothing is synced)."""
        specs = {label: {"sync_on_compute": False, **spec} for label, spec in self.metric_specs.items()}
        return build_metrics(specs, model, method, self.specs.get(method), key=KEY)

    def _scores(self, model: nn.Module, x: torch.Tensor, attr: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None, explainer: Any, method: str | None = None) -> dict[str, torch.Tensor]:
        """Per-sample values of every configured metric for the maps ``attr`` of ``method``."""
        out: dict[str, torch.Tensor] = {}
        for label, metric in self._metrics(model, method or str(explainer.name)).items():
            update_metric(metric, x=x, attr=attr, target=y, mask=mask, explainer=explainer)
            out[label] = metric.per_sample().to(x.device)
        return out

    # -- output -----------------------------------------------------------------------------------
    def _caption(self, i: int, result: dict[str, Any]) -> str:
        assert self.probe is not None
        if self.multilabel:
            c = int(self.probe["label"][i])
            return (f"image {int(self.probe['image_index'][i])}: {self._class_name(c)}\n"
                    f"p({self._class_name(c)}) = {float(result['probs'][i, c]):.2f}")
        y, p = int(self.probe["label"][i]), int(result["pred"][i])
        prob = float(result["probs"][i, p])
        return f"true: {self._class_name(y)}\npred: {self._class_name(p)} ({prob:.2f})"

    def _class_name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)

    def grid(self, result: dict[str, Any], epoch: int | None = None) -> Any:
        """The overlay grid (a PIL image) of one :meth:`explain` result: the explained class named
        per row, misclassified rows in red (multi-label: a present class scored below 0.5), the
        ground-truth mask outlined, a colour bar per method and epoch + probe accuracy on top.
        Signed methods (:func:`~xaudit.explainers.registry.is_signed`) keep their sign on a
        diverging colormap."""
        assert self.probe is not None
        x = self.probe["image"]
        images = self._denorm(x) if callable(self._denorm) else (x - x.amin()) / (x.amax() - x.amin() + 1e-7)
        captions = [self._caption(i, result) for i in range(x.shape[0])]
        methods = list(result["maps"])
        y = self.probe["label"]
        probs = result["probs"]
        if self.multilabel:  # row i explains present class y[i]: detected when its sigmoid is ≥ 0.5
            correct = (probs.gather(1, y.to(probs.device).view(-1, 1)).squeeze(1) >= 0.5).tolist()
            what = "present classes detected"
        else:
            correct = (result["pred"].to(y.device) == y).tolist()
            what = "probe accuracy"
        acc = sum(correct) / max(len(correct), 1)
        title = (f"epoch {epoch} - " if epoch is not None else "") + f"{what} {acc:.2f}"
        return grid_image(images, list(result["maps"].values()), methods, captions, cell=self.cell,
                          signed=[is_signed(m) for m in methods], explained=[self._class_name(int(c)) for c in y],
                          correct=correct, masks=self.probe.get("mask"), colorbar=True, title=title)

    def _write(self, trainer: pl.Trainer, epoch: int, result: dict[str, Any]) -> None:
        out_dir = Path(trainer.default_root_dir) / "explanations"
        out_dir.mkdir(parents=True, exist_ok=True)
        image = self.grid(result, epoch) if self.log_images else None
        if image is not None:
            image.save(out_dir / f"epoch_{epoch:03d}.png")
        from xaudit.utils import log_media  # local: this method is the only user

        table = self._table(epoch, result) if self.log_table else None
        for logger in trainer.loggers:  # W&B, TensorBoard, MLflow; CSV and others: scalars only
            if image is not None:
                log_media.log_image(logger, "explain/grid", image, trainer.global_step, caption=f"epoch {epoch}")
            if table is not None:
                log_media.log_table(logger, "explain/per_sample", *table, step=trainer.global_step)
            log_media.flush(logger)

    def _table(self, epoch: int, result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        assert self.probe is not None
        keys = sorted({k for vals in result["values"].values() for k in vals})
        rows = []
        if self.multilabel:  # one row per (image, present class) pair and method
            for name, vals in result["values"].items():
                for i in range(self.probe["image"].shape[0]):
                    c = int(self.probe["label"][i])
                    rows.append([epoch, int(self.probe["image_index"][i]), self._class_name(c), name,
                                 float(result["probs"][i, c]),
                                 *[float(vals[k][i]) if k in vals else None for k in keys]])
            return ["epoch", "sample", "class", "method", "prob", *keys], rows
        for name, vals in result["values"].items():
            for i in range(self.probe["image"].shape[0]):
                p = int(result["pred"][i])
                rows.append([epoch, i, name, int(self.probe["label"][i]), p, float(result["probs"][i, p]),
                             *[float(vals[k][i]) if k in vals else None for k in keys]])
        return ["epoch", "sample", "method", "true", "pred", "prob", *keys], rows
