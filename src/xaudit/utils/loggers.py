"""Logger fixes xaudit relies on."""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger as _PLCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Keeps the rows an earlier stage wrote instead of deleting ``metrics.csv``.

    Lightning's writer deletes an existing metrics file when it is created, and only knows the
    columns it logged itself. Under DDP spawn every stage (fit, then test) runs in fresh
    processes with a copy of the writer, so fit rows were lost or the header rewrite crashed.
    Here the file's header is merged in before every save.
    """

    def _check_log_dir_exists(self) -> None:
        pass  # never delete rows an earlier stage wrote

    def _record_new_keys(self) -> set[str]:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            # the file's columns are known; a key missing from the header is "new" → rewrite
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
        return super()._record_new_keys()


class CSVLogger(_PLCSVLogger):
    """Lightning's CSVLogger whose ``metrics.csv`` survives several stages and DDP spawn."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
