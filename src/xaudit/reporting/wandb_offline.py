"""Read an offline W&B run's transaction log (``run-*.wandb``) without the network.

W&B ≥0.2x writes no ``wandb-summary.json`` offline; history and summary live only in the
``.wandb`` file: a 7-byte header (``:W&B`` + ident + version), then LevelDB-style 32 KiB
blocks of records (7-byte record header: crc32c, length, type), each record a protobuf
``wandb_internal_pb2.Record``. This reader lets tests and reports check what a run logged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    """Reassemble record payloads from the block-structured log."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (missing ':W&B' header)")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block or file
            pos += left_in_block
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def read_records(path: str | Path) -> Iterator[Any]:
    """Yield the protobuf records of one ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """History rows, final summary and run config of an offline run directory (``offline-run-*``).

    Returns ``{"history": [ {key: value, ...}, ... ], "summary": {key: value}, "config": {key: value}}``.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for rec in read_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                summary[_key(i)] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                config[_key(i)] = json.loads(i.value_json)
    for row in history:  # the last logged value of each key, as W&B's summary shows it
        for k, v in row.items():
            summary.setdefault(k, v)
    return {"history": history, "summary": summary, "config": config}


def find_offline_runs(root: str | Path) -> list[Path]:
    """All ``offline-run-*`` directories below ``root`` (oldest first)."""
    return sorted(Path(root).rglob("offline-run-*"))
