"""The protocol card: what each metric of an audit ran with, the paper it follows, every deviation.

A number from xaudit can only be put next to a published one when the protocol matches. Every
audit writes its card to ``<mode dir>/protocol.json``; the report (md/html) shows it and the W&B
run config carries it. The card holds :data:`PROTOCOL_VERSION`, which joins the audit's
fingerprint, so a directory holding numbers of an older protocol is refused on resume instead of
mixing old and new numbers in one table.

Version history: 1 — deletion and insertion both on the wide blur (σ = side/8), the true label
explained, position-ordered ties, pointing-game tolerance 0, one ROAR seed. 2 — the papers'
defaults (RISE zeros / blur, top-1 class, seeded random ties everywhere, TorchRay's 15 px at 224,
3 ROAR seeds, SmoothGrad family on signed gradients, LIME as the lime package).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xaudit.utils.io import atomic_write_json

PROTOCOL_VERSION: int = 2
CARD_FILE = "protocol.json"


def metric_row(name: str, metric: Any, size: tuple[int, int], target: str) -> dict[str, Any]:
    """One metric's card entry: its registered ``name``, paper, parameters as run on ``size`` images
    (the explained class ``target`` included), the paper's values and the deviations."""
    row = {"name": name, **metric.protocol(size)}
    row["params"] = {**row["params"], "target": target}
    row["paper_params"] = {**row["paper_params"], "target": metric.protocol_target}
    if target != metric.protocol_target:
        row["deviations"] = [*row["deviations"], f"target={target!r} (paper: {metric.protocol_target!r})"]
    return row


def evaluate_card(metrics: Mapping[str, Any], names: Mapping[str, str], size: tuple[int, int],
                  targets: Mapping[str, str], target_mode: str) -> dict[str, Any]:
    """The card of an ``evaluate`` audit: ``metrics`` {label: instance}, ``names`` {label: registered
    name}, ``targets`` {label: class explained for it}, the images' H×W ``size``."""
    return {"version": PROTOCOL_VERSION, "mode": "evaluate", "target": target_mode, "image_size": list(size),
            "metrics": {label: metric_row(names[label], m, size, targets[label]) for label, m in metrics.items()}}


def write_card(directory: str | Path, card: dict[str, Any]) -> Path:
    """Write ``protocol.json`` atomically into ``directory``."""
    path = Path(directory) / CARD_FILE
    atomic_write_json(path, card)
    return path


def read_card(directory: str | Path) -> dict[str, Any] | None:
    """The card of ``directory`` (None when the audit wrote none)."""
    path = Path(directory) / CARD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "—"


def card_rows(card: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the card as a table: one row per metric (or ROAR sweep)."""
    header = ["metric", "parameters", "paper", "deviations from the paper"]
    rows = []
    for label, row in card.get("metrics", {}).items():
        dev = "; ".join([*row.get("deviations", []), *[f"note: {n}" for n in row.get("notes", [])]]) or "none"
        rows.append([f"{label} ({row['name']})" if row["name"] != label else label, _params(row["params"]),
                     row.get("paper") or "—", dev])
    return header, rows


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a Markdown section."""
    header, rows = card_rows(card)
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["## Protocol", "", f"Protocol version {card.get('version')}; images {card.get('image_size')}; "
             f"explained class: {card.get('target')}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *["| " + " | ".join(r) + " |" for r in esc], ""]
    return "\n".join(lines)


def card_html(card: Mapping[str, Any]) -> str:
    """The card as an HTML section."""
    header, rows = card_rows(card)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return (f"<h2>Protocol</h2><p>Protocol version {html.escape(str(card.get('version')))}; images "
            f"{html.escape(str(card.get('image_size')))}; explained class: {html.escape(str(card.get('target')))}."
            f"</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
