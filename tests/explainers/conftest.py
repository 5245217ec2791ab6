"""Fixtures for the explainer tests (helpers live in explainer_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from explainer_helpers import shared_model


@pytest.fixture
def get_model() -> Callable[[str], nn.Module]:
    """``get_model(name)`` → the session's shared eval-mode model of that backbone."""
    return shared_model


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """One intra-op thread for these tests (restored afterwards).

    Batches of 1–100 images of 32 px gain little from a second thread, while on a busy shared
    2-core runner OpenMP threads waiting on each other made the suite ~20× slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
