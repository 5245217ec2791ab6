"""Audit modes as plugins: ``python audit.py audit=<mode>`` runs the :class:`AuditMode` its YAML names.

Built-in modes: evaluate, roar, kar (:mod:`.retrain`), sanity, concepts, shortcut, explain, one
module each. A mode of your own is a module with an :class:`AuditMode` subclass plus a YAML file
(``audit: {_target_: your.module.Class, mode: <name>}``) in a config directory on Hydra's search
path; see :mod:`xaudit.audits.base` for the contract.
"""

from xaudit.audits.base import AuditContext, AuditMode, build_mode, mode_class, names, register

__all__ = ["AuditContext", "AuditMode", "build_mode", "mode_class", "names", "register"]
