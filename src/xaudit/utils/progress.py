"""Progress of the audit's outer loops (cells, methods), printed with rich.

Lightning's own bars (``RichProgressBar``) show the inner loops (epochs, batches); a second live
display would fight them for the terminal, so the outer loop prints one line per finished step:
``[3/9] roar grad_cam 50%, seed 0 on train+test — test acc 0.6120 (4.1 s, ETA 25 s)``. Steps
that take long also announce themselves when they begin (:meth:`SweepProgress.start`), naming the
method and the split they compute: ``[4/9] computing grad_cam on test (512 images) …``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


class SweepProgress:
    """Counts finished steps of ``total`` (``done`` already finished before), with an ETA.

    ``split``: the data the steps compute on (e.g. "test (512 images)"), named in every line unless a
    step gives its own."""

    def __init__(self, total: int, done: int, title: str, enabled: bool = True, split: str | None = None) -> None:
        self.total, self.done, self.enabled = int(total), int(done), bool(enabled)
        self.split = split
        self.run_seconds = 0.0
        self.run_count = 0
        self.console = Console(stderr=True, highlight=False)
        if self.enabled:
            skipped = f", {done} already done (resumed)" if done else ""
            self.console.print(f"[bold]{title}[/bold]: {total} steps{skipped}", soft_wrap=True)

    def _where(self, split: str | None) -> str:
        where = split if split is not None else self.split
        return f" on {where}" if where else ""

    def start(self, label: str, split: str | None = None) -> None:
        """Announce the next step before it runs: which method (``label``) on which split."""
        if self.enabled:
            self.console.print(f"[cyan][{self.done + 1}/{self.total}][/cyan] computing {label}{self._where(split)} …",
                               soft_wrap=True)

    def advance(self, label: str, result: str, seconds: float, split: str | None = None) -> None:
        """One more step (``label``: the method or cell, on ``split`` or the sweep's split) finished in
        ``seconds``."""
        self.done += 1
        self.run_count += 1
        self.run_seconds += seconds
        if not self.enabled:
            return
        left = self.total - self.done
        eta = f", ETA {self.run_seconds / self.run_count * left:.0f} s" if left else ""
        self.console.print(f"[cyan][{self.done}/{self.total}][/cyan] {label}{self._where(split)} — "
                           f"{result} ({seconds:.1f} s{eta})",
                           soft_wrap=True)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners ("GPU available", tips) for loops that build many trainers."""
    names = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
             "pytorch_lightning.accelerators.cuda")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*predict returned None.*")
            warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
