"""One explainer × many metrics over a whole split, as a LightningModule run by ``trainer.test``.

The audit's ``evaluate`` mode: under DDP every rank explains its own (unpadded) slice of the
test split and updates the metrics; ``compute()`` reduces the per-sample states exactly once, so
the table does not depend on the number of devices. Each metric's mean is logged as
``eval/<metric>`` (returned by ``trainer.test`` in the main process, ``ddp_spawn`` included);
the mean deletion/insertion curves are written by rank 0 to ``curves_path`` for the plots.

Multi-label data (a batch ``label`` long [B,K] multi-hot and ``mask`` bool [B,K,H,W], e.g.
``data=shapes_multilabel``) is scored per (image, class) pair: target ``label`` explains every
class present in an image (with that class's mask for the localisation metrics), ``predicted``
every class the model predicts (sigmoid ≥ 0.5; its top-1 class when none is), and ``auto`` picks
one of the two per metric as for single-label data. Each pair is one sample of every metric, and
``eval/count`` counts the pairs scored (those of ``label`` when a metric uses it).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from xaudit.explainers import create
from xaudit.explainers.targets import present_pairs
from xaudit.metrics.base import XAuditMetric, update_metric
from xaudit.metrics.registry import create_metric, metric_class
from xaudit.models.classifier import unshare_metric_states
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.io import atomic_torch_save

TARGETS: tuple[str, ...] = ("auto", "label", "predicted")


def check_target_mode(target: str) -> str:
    """``target`` names which class is explained: ``auto`` (each metric's paper: the model's top-1
    for deletion/insertion as in RISE, the true class for localisation), the true ``label`` or the
    ``predicted`` one for every metric. On multi-label data ``label`` means every present class and
    ``predicted`` every predicted one (:func:`multilabel_pairs`)."""

    if target not in TARGETS:
        raise ConfigError(f"target={target!r} is unknown; choose one of {list(TARGETS)} (auto: the class each "
                          "metric's paper explains; label: the true class; predicted: the model's top-1).")
    return target


def metric_target(mode: str, metric: XAuditMetric) -> str:
    """The class explained for ``metric`` under the audit's ``target`` mode: ``label`` or ``predicted``."""
    return str(getattr(metric, "protocol_target", "label")) if mode == "auto" else mode


def explain_for_targets(explainer: Any, x: Tensor, label: Tensor, pred: Tensor | None,
                        kinds: set[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Maps for each needed kind of target (``label`` / ``predicted``): {kind: (attr, target)}.

    When both are needed, the predicted-class maps reuse the label maps where the model is right
    and re-explain only the misclassified images (each image's map does not depend on the rest of
    its batch, an explainer contract), so ``auto`` costs one pass plus the error rate.
    """
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if "label" in kinds:
        out["label"] = (explainer.attribute(x, label), label)
    if "predicted" in kinds:
        assert pred is not None
        if "label" in out:
            attr = out["label"][0].clone()
            wrong = (pred != label).nonzero().flatten()
            if wrong.numel():
                attr[wrong] = explainer.attribute(x[wrong], pred[wrong]).to(attr.dtype)
            out["predicted"] = (attr, pred)
        else:
            out["predicted"] = (explainer.attribute(x, pred), pred)
    return out


def multilabel_pairs(labels: Tensor, logits: Tensor | None, kind: str) -> tuple[Tensor, Tensor]:
    """(image index, class index) long [P] explained on multi-label data for target ``kind``.

    ``label``: every class present in the multi-hot ``labels`` [B,K]; ``predicted``: every class with
    a positive logit (sigmoid ≥ 0.5), or the top-1 class of an image where none is, so every image
    is scored.
    """
    if kind == "label":
        return present_pairs(labels)
    assert logits is not None
    chosen = logits > 0
    top = torch.zeros_like(chosen).scatter_(1, logits.argmax(1, keepdim=True), True)
    return present_pairs(chosen | (top & ~chosen.any(1, keepdim=True)))


FAMILIES: tuple[str, ...] = ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic")
#: the labels and settings a shortcut gives metrics that conf/audit/evaluate.yaml configures by name
_SHORTCUT_SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "deletion_insertion": {"deletion": {"name": "deletion_insertion", "mode": "deletion"},
                           "insertion": {"name": "deletion_insertion", "mode": "insertion"}},
    "relevance_mass": {"mass_in_mask": {"name": "relevance_mass"}},
    "mask_iou": {"mask_iou": {"name": "mask_iou", "top_k": 0.2}},
    # Quantus' one-pixel steps cost H·W forwards per image (×100 samples for MonotonicityCorrelation): a
    # shortcut groups 16 pixels per step and draws 10 samples (written on the protocol card; set the metric
    # by name for the paper's values)
    **{n: {n: {"name": n, "features_in_step": 16}}
       for n in ("faithfulness_estimate", "monotonicity", "non_sensitivity", "sensitivity_n")},
    "monotonicity_correlation": {"monotonicity_correlation": {"name": "monotonicity_correlation",
                                                              "features_in_step": 16, "nr_samples": 10}},
    "smooth_mprt": {"smooth_mprt": {"name": "smooth_mprt", "nr_samples": 10}},
}


def metric_specs(value: Any) -> dict[str, dict[str, Any]]:
    """``evaluate.metrics`` → ``{label: {name: ..., **options}}``.

    A mapping is taken as it is. A string names families (``faithfulness``, ``robustness``,
    ``localisation``, ``complexity``, ``randomisation``, ``axiomatic``, or ``all``) or registered
    metrics, joined by ``+`` or ``,`` (``evaluate.metrics=faithfulness+localisation``): every
    registered metric of those families with its paper's defaults (deletion and insertion both), except
    Quantus' one-pixel-per-step metrics, which step 16 pixels at a time (MonotonicityCorrelation and
    SmoothMPRT: 10 samples) so a family runs in minutes; the card lists these settings.
    """
    if value is None or isinstance(value, dict):
        return {str(k): dict(v) if isinstance(v, dict) else v for k, v in (value or {}).items()}
    if not isinstance(value, str):
        raise ConfigError(f"evaluate.metrics must be a mapping {{label: {{name: ..., options}}}} or a family name "
                          f"({', '.join(FAMILIES)}, all); got {value!r}.")
    from xaudit.metrics.registry import metric_names

    out: dict[str, dict[str, Any]] = {}
    for part in (p.strip() for p in value.replace(",", "+").split("+")):
        if part == "all" or part in FAMILIES:
            chosen = [n for n in metric_names() if part == "all" or metric_class(n).family == part]
        elif part in metric_names():
            chosen = [part]
        else:
            raise unknown_choice("metric family (or metric)", part, [*FAMILIES, "all", *metric_names()],
                                 key="evaluate.metrics")
        for name in chosen:
            out.update(_SHORTCUT_SPECS.get(name, {name: {"name": name}}))
    return out


def needs_mask(spec: dict[str, Any]) -> bool:
    """Whether the metric configured by ``spec`` (``{name: ..., **kwargs}``) needs ground-truth masks."""
    return "mask" in metric_class(str(spec["name"])).update_inputs


def build_metrics(specs: dict[str, dict[str, Any]], net: nn.Module, method: str | None = None,
                  method_kwargs: dict[str, Any] | None = None,
                  key: str = "evaluate.metrics") -> dict[str, XAuditMetric]:
    """``{label: {name: <registered metric>, **kwargs}}`` → metric instances (model given where needed).

    A metric that re-explains with an explainer of its own (``sanity_check``: it randomises the
    model and explains again) is given the evaluated ``method`` and ``method_kwargs`` unless its
    spec names an explainer: it must compare the method's map with the *same* method's map on the
    randomised model (Adebayo et al.), not with another method's. ``key`` is the config key named in
    errors (``evaluate.metrics``, ``callbacks.explanation_monitor.metrics``).
    """
    out: dict[str, XAuditMetric] = {}
    for label, spec in specs.items():
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{key}.{label} must be a mapping with a 'name' key (a registered "
                              f"metric) and its options, e.g. {{name: deletion_insertion, mode: deletion}}; "
                              f"got {spec!r}.")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        cls = metric_class(str(spec["name"]))
        if "model" in inspect.signature(cls).parameters:  # metrics that run the classifier themselves
            kwargs["model"] = net
        if method is not None and "explainer" not in kwargs and "explainer" in inspect.signature(cls).parameters:
            kwargs["explainer"] = method
            kwargs.setdefault("explainer_kwargs", dict(method_kwargs or {}))
        try:
            out[label] = create_metric(str(spec["name"]), **kwargs)
        except TypeError as err:
            raise ConfigError(f"{key}.{label}: {err}") from None
    return out


class ExplainerEvaluation(pl.LightningModule):
    """Explains every test batch with one method and feeds the maps to every metric (per image, or
    per (image, present class) pair on multi-label data)."""

    def __init__(self, net: nn.Module, method: str, kwargs: dict[str, Any], metrics: dict[str, dict[str, Any]],
                 target: str = "auto", curves_path: str | Path | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.method = method
        self.explainer = create(method, self.net, **kwargs)
        self.metrics = nn.ModuleDict(build_metrics(metrics, self.net, method, kwargs))
        self.target = check_target_mode(target)
        self.targets = {label: metric_target(self.target, m) for label, m in self.metrics.items()}
        self.curves_path = None if curves_path is None else str(curves_path)
        self.seen = SumMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        unshare_metric_states(self)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        kinds = set(self.targets.values())
        if y.ndim == 2:
            self._multilabel_step(x, y, batch.get("mask"), kinds)
            return
        pred = None
        if "predicted" in kinds:
            with torch.no_grad():
                pred = self.net(x).argmax(-1)
        maps = explain_for_targets(self.explainer, x, y, pred, kinds)
        for label, metric in self.metrics.items():
            attr, target = maps[self.targets[label]]
            update_metric(metric, x=x, attr=attr, target=target, mask=batch.get("mask"), explainer=self.explainer)
        self.seen.update(torch.tensor(float(y.shape[0]), device=x.device))

    def _multilabel_step(self, x: Tensor, labels: Tensor, mask: Tensor | None, kinds: set[str]) -> None:
        """Score every (image, class) pair of the batch (see the module docstring), ``len(x)`` rows per
        explanation call so memory stays that of one batch."""
        logits = None
        if "predicted" in kinds:
            with torch.no_grad():
                logits = self.net(x)
        if mask is not None and mask.ndim != 4:
            raise ConfigError(f"multi-label data needs one mask per class (bool [B,K,H,W]); got shape "
                              f"{tuple(mask.shape)}. Give the datamodule per-class masks or drop the localisation "
                              "metrics.")
        counted = "label" if "label" in kinds else "predicted"
        for kind in sorted(kinds):
            image, cls = multilabel_pairs(labels, logits, kind)
            image, cls = image.to(x.device), cls.to(x.device)
            for s in range(0, image.numel(), x.shape[0]):
                ii, cc = image[s:s + x.shape[0]], cls[s:s + x.shape[0]]
                xs = x[ii]
                attr = self.explainer.attribute(xs, cc)
                rows_mask = None if mask is None else mask[ii, cc]
                for label, metric in self.metrics.items():
                    if self.targets[label] == kind:
                        update_metric(metric, x=xs, attr=attr, target=cc, mask=rows_mask, explainer=self.explainer)
            if kind == counted:
                self.seen.update(torch.tensor(float(image.numel()), device=x.device))

    def on_test_epoch_end(self) -> None:
        values = {f"eval/{label}": metric.compute().float() for label, metric in self.metrics.items()}
        curves = {label: metric.curves().float().mean(0).cpu() for label, metric in self.metrics.items()
                  if hasattr(metric, "curves")}  # gathered on every rank (a collective), saved by rank 0
        if self.curves_path and self.trainer.is_global_zero:
            atomic_torch_save(self.curves_path, {"curves": curves})
        for label, metric in self.metrics.items():  # the standard error over images (per_sample: a collective)
            per = metric.per_sample().double()
            per = per[~per.isnan()]
            se = per.std() / per.numel() ** 0.5 if per.numel() > 1 else torch.tensor(float("nan"))
            values[f"eval_se/{label}"] = se.float()
        values["eval/count"] = self.seen.compute().float()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*sync_dist=True.*")
            self.log_dict(values, sync_dist=False)  # already reduced by Metric.compute()
