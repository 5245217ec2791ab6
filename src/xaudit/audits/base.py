"""The audit-mode contract: what ``python audit.py audit=<mode>`` runs, and the registry of modes.

:func:`xaudit.tasks.audit.audit` owns the generic flow (compose the inputs, load the checkpoint
and its data, build an :class:`AuditContext`, call :meth:`AuditMode.run`, write the report with
:meth:`AuditMode.report`, log it). A mode only says what differs, through a few class flags and
the two methods. Adding a mode is one module and one YAML file::

    # mypkg/toy.py
    class Toy(AuditMode):
        name = "toy"
        def run(self, ctx): ...          # -> {cell key: record}, appended to ResultsLog(ctx.mode_dir)
        def report(self, ctx, cells): ... # -> {"md": path, "json": path, ...}

    # conf/audit/toy.yaml (or any directory on Hydra's search path)
    # @package _global_
    audit: {_target_: mypkg.toy.Toy, mode: toy}

A subclass with a ``name`` registers itself when its module is imported; the built-in modes are
registered by dotted path and imported on first use, so ``import xaudit.tasks.audit`` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.registry import Registry

#: the built-in modes, imported on first use (name → "module.Class")
BUILTIN: dict[str, str] = {
    "evaluate": "xaudit.audits.evaluate.Evaluate",
    "roar": "xaudit.audits.retrain.Roar",
    "kar": "xaudit.audits.retrain.Kar",
    "sanity": "xaudit.audits.sanity.Sanity",
    "shortcut": "xaudit.audits.shortcut.Shortcut",
    "concepts": "xaudit.audits.concepts.Concepts",
    "explain": "xaudit.audits.explain.Explain",
}
#: the modes whose module is imported (every AuditMode subclass with a ``name`` files itself here)
MODES: Registry[type[AuditMode]] = Registry("audit mode", key="audit.mode")


def plain(node: Any) -> Any:
    """A config node as plain containers (other values unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def accepted_changes(cfg: Any) -> list[str]:
    """``accept_changes``: fingerprint keys (or prefixes) whose change the user accepts on resume."""
    value = cfg.get("accept_changes") or []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


@dataclass
class AuditContext:
    """What the generic flow prepares for a mode (fields a mode does not need may stay ``None``).

    ``test`` is the test split as a :class:`~xaudit.data.tensor_split.TensorSplit` (modes with
    ``needs_test``), ``identity`` what decides the cells' values (checkpoint hash, data, target;
    resumable modes add their settings and pass it to ``ResultsLog.check_config``), ``make_trainer``
    builds quiet Lightning trainers (``make_trainer("test")`` runs in full precision), ``audit`` is
    the audit function itself (for modes that run other audits), ``extra`` holds keys a mode adds
    to the returned result.
    """

    cfg: DictConfig
    mode: str
    target: str
    out_dir: Path
    mode_dir: Path
    is_writer: bool = True
    classifier: Any = None
    datamodule: Any = None
    data_cfg: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, Any] = field(default_factory=dict)
    ckpt_path: str | None = None
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    test: Any = None
    stream: bool | None = None
    device: Any = None
    batch_size: int = 0
    make_trainer: Callable[..., Any] | None = None
    fit_trainer: Any = None
    audit: Callable[[DictConfig], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def net(self) -> Any:
        """The audited network (``classifier.net``)."""
        return self.classifier.net

    def meta(self, cells: list[dict[str, Any]]) -> dict[str, Any]:
        """The report's header: checkpoint, data, methods seen in ``cells``, target, counts."""
        return {"checkpoint": str(Path(self.ckpt_path).resolve()) if self.ckpt_path else "?",
                "data": self.data_cfg.get("_target_", "?"),
                "methods": ", ".join(sorted({str(c.get("method_key", "?")) for c in cells})),
                "target": self.target, "cells": len(cells),
                "num_classes": int(getattr(self.datamodule, "num_classes", 0) or 0)}


class AuditMode:
    """One audit mode: class flags for the generic flow, :meth:`run` and :meth:`report`.

    Flags (class attributes):

    - ``name``: the mode's name (``audit.mode``; the directory ``<out_dir>/<name>``).
    - ``uses_methods``: explains with the configured explainers (they are dry-run on two images first).
    - ``default_target``: what ``target=auto`` means here (``auto``: per metric; ``label``: the true class).
    - ``needs_checkpoint``: loads ``ckpt_path`` and its data; a mode without (shortcut: trains its own
      models) gets a context holding only the config, its directories and ``audit``.
    - ``needs_test``: the test split is materialised (``ctx.test``).
    - ``resumable``: cells live in ``ResultsLog(ctx.mode_dir)`` under a fingerprint; the report covers
      every cell of the directory (earlier runs, other seeds) and is logged to the configured loggers.
    """

    name: ClassVar[str] = ""
    uses_methods: ClassVar[bool] = True
    default_target: ClassVar[str] = "label"
    needs_checkpoint: ClassVar[bool] = True
    needs_test: ClassVar[bool] = True
    resumable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls)

    def __init__(self, mode: str | None = None, **options: Any) -> None:
        """``mode``: ``audit.mode`` as configured (must be this class's name); ``options``: other
        ``audit.*`` keys, kept in ``self.options``."""
        if mode is not None and str(mode) != self.name:
            raise ConfigError(f"audit.mode={mode} but audit._target_ builds the {self.name!r} mode; select a "
                              f"mode with audit=<name> (or set both keys to the same mode).")
        self.options = options

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """Compute (or resume) the mode's cells; returns {cell key: record}."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """Write the report of ``cells`` into ``ctx.mode_dir`` (rank 0 only); returns its files by kind.

        A resumable mode returns at least ``md`` and ``json`` (``json`` holding ``summary.header`` and
        ``summary.rows``: the table logged to the loggers)."""
        return {}


def register(cls: type[AuditMode]) -> type[AuditMode]:
    """File ``cls`` under ``cls.name`` in :data:`MODES` (subclasses with a ``name`` do this themselves)."""
    if not cls.name:
        raise ConfigError(f"{cls.__qualname__} has no name; set `name = \"...\"` on the class.")
    return MODES.register(cls.name)(cls)


def names() -> list[str]:
    """Every known mode: the built-in ones, then those registered by imported modules."""
    return list(dict.fromkeys([*BUILTIN, *MODES.names()]))


def mode_class(name: str) -> type[AuditMode]:
    """The class of the mode ``name`` (imports a built-in mode's module on first use)."""
    if name in MODES:
        return MODES.get(name)
    if name not in BUILTIN:
        raise unknown_choice("audit mode", name, names(), key="audit.mode")
    return _import_class(BUILTIN[name], "audit mode")


def _import_class(path: str, key: str) -> type[AuditMode]:
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot import {path} ({err}); check the module is on the Python path and the "
                          "class name is right.") from None
    if not (isinstance(cls, type) and issubclass(cls, AuditMode)):
        raise ConfigError(f"{key}: {path} is not an xaudit.audits.AuditMode subclass.")
    return cls


def build_mode(audit_cfg: Any) -> AuditMode:
    """The mode configured by the ``audit`` node: ``audit._target_`` (the class) and ``audit.mode`` (its name).

    Where ``audit.mode`` names another mode than ``_target_``'s class (``audit.mode=...`` overridden
    on the command line, or a config that sets only ``mode``), the registry's class of that name is used.
    """
    node = plain(audit_cfg) or {}
    if not isinstance(node, dict):
        raise ConfigError(f"audit must be a mapping (audit={node!r}); select a mode with audit=<name>, e.g. "
                          "audit=evaluate.")
    name = node.get("mode")
    target = node.get("_target_")
    options = {k: v for k, v in node.items() if k not in ("_target_", "mode")}
    if target:
        cls = _import_class(str(target), "audit._target_")
        if name is None or str(name) == cls.name:
            return cls(**options)
    if name is None:
        raise ConfigError(f"audit.mode is not set; choose one of {names()}, e.g. audit=evaluate.")
    return mode_class(str(name))(**options)
