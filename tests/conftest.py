"""Shared fixtures; the helpers they use live in xaudit_testing.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from xaudit_testing import FAST, compose_config


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, fast=True)`` → a composed train config writing under tmp_path."""

    def make(*overrides: str, fast: bool = True, out: Path | None = None) -> DictConfig:
        return compose_config([*(FAST if fast else []), *overrides], out or tmp_path)

    return make
