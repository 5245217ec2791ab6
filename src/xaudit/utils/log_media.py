"""Images, tables and files for whichever Lightning logger is configured (W&B, TensorBoard, MLflow).

Scalars go through Lightning (``pl_module.log`` / ``logger.log_metrics``) and reach every logger;
media have no common Lightning API, so each function here dispatches on the logger type:

- W&B: ``log_image`` / ``log_table`` of :class:`~pytorch_lightning.loggers.WandbLogger` (media tab).
- TensorBoard: ``add_image`` (HWC uint8) and the table as a Markdown text (the Text tab renders it).
- MLflow: PNG / JSON artifacts of the run (``<key>/step_<step>.png``; a table as
  ``{"columns": [...], "data": [[...]]}``, the layout ``MlflowClient.log_table`` writes), files as
  artifacts under ``<key>/``.
- CSV and any other logger: nothing (they have no place for media); no error.

Callers call these on rank zero only (Lightning's loggers are rank-zero loggers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger


def _plain(v: Any) -> Any:
    """A JSON/Markdown-safe cell: NaN → None, numpy scalars → Python."""
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-style Markdown table (floats to ``digits`` significant places, NaN/None empty)."""

    def cell(v: Any) -> str:
        v = _plain(v)
        if v is None:
            return ""
        text = f"{v:.{digits}g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _artifact_name(key: str, step: int, suffix: str) -> str:
    return f"{key.strip('/')}/step_{int(step):06d}{suffix}"


def log_image(logger: Any, key: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    """Log one PIL image under ``key`` at ``step`` (W&B image, TensorBoard image, MLflow PNG artifact)."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image], caption=None if caption is None else [caption], step=step)
    elif isinstance(logger, TensorBoardLogger):
        # TensorBoard wants uint8 RGB; HWC is how PIL lays it out
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image.convert("RGB"),
                                    artifact_file=_artifact_name(key, step, ".png"))


def log_table(logger: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
    """Log a table (``rows`` of values in ``columns`` order) under ``key`` at ``step``.

    W&B: a Table; TensorBoard: a Markdown table in the Text tab; MLflow: a JSON artifact
    ``<key>/step_<step>.json`` (``{"columns", "data"}``: ``pandas.read_json(path, orient="split")``).
    """
    columns = [str(c) for c in columns]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"log_table({key!r}): a row has {len(row)} values for {len(columns)} columns {columns}.")
    if isinstance(logger, WandbLogger):
        logger.log_table(key=key, columns=columns, data=[list(r) for r in rows], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
    elif isinstance(logger, MLFlowLogger):
        table = {"columns": columns, "data": [[_plain(v) for v in r] for r in rows]}
        logger.experiment.log_dict(logger.run_id, table, _artifact_name(key, step, ".json"))


def log_text(logger: Any, key: str, text: str, step: int) -> None:
    """Log Markdown text (TensorBoard Text tab; MLflow ``<key>/step_<step>.md`` artifact; W&B: skipped)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, text, global_step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, _artifact_name(key, step, ".md"))


def log_file(logger: Any, path: str | Path, key: str) -> None:
    """Attach a file written in the run directory (MLflow: the artifact ``<key>/<file name>``).

    Only MLflow keeps arbitrary files; W&B and TensorBoard get the content through
    :func:`log_image` / :func:`log_table` instead, the other loggers nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log_file({key!r}): {path} does not exist; write it before logging it.")
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=key.strip("/") or None)


def log_outputs(logger: Any, key: str, files: Sequence[str | Path], step: int = 0) -> None:
    """Attach the files a task wrote to its run directory (reports, CSV, plots).

    MLflow keeps every file as an artifact under ``<key>/``; TensorBoard shows each PNG as an image
    ``<key>/<file stem>``; W&B (its callers log media themselves) and the other loggers: nothing.
    """
    for path in map(Path, files):
        if isinstance(logger, MLFlowLogger):
            log_file(logger, path, key)
        elif isinstance(logger, TensorBoardLogger) and path.suffix.lower() == ".png":
            with Image.open(path) as image:
                log_image(logger, f"{key.strip('/')}/{path.stem}", image, step)


def flush(logger: Any) -> None:
    """Write what a logger buffers (TensorBoard's event writer) so readers see it now."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.flush()


__all__ = ["flush", "log_file", "log_image", "log_outputs", "log_table", "log_text", "markdown_table"]
