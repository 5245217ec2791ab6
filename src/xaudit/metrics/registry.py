"""Config names → metric classes, so a Hydra config can say ``name: deletion_insertion``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from xaudit.utils.errors import check_options
from xaudit.utils.registry import Registry

#: keyword options every torchmetrics Metric accepts through ``**kwargs``
TORCHMETRICS_OPTIONS = ("compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
                        "distributed_available_fn", "sync_on_compute", "compute_with_cache")

M = TypeVar("M", bound=type)

METRICS: Registry[type] = Registry("metric", key="metric.name")
_METRICS: dict[str, type] = METRICS.items  # the mapping itself


def register_metric(name: str) -> Callable[[M], M]:
    """Class decorator: make a metric constructible as ``create_metric(name, ...)`` (sets ``cls.name``)."""
    return METRICS.register(name)


def metric_names() -> list[str]:
    """Registered metric names, sorted."""
    return METRICS.names()


def metric_class(name: str) -> type:
    """The class registered under ``name``; unknown names list the choices."""
    return METRICS.get(name)


def create_metric(name: str, **kwargs: Any) -> Any:
    """Build the metric registered under ``name`` with its hyper-parameters (unknown ones listed)."""
    cls = metric_class(name)
    check_options(f"metric {name!r}", cls, kwargs, skip=("self",), extra=TORCHMETRICS_OPTIONS)
    return cls(**kwargs)
