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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xaudit.metrics.base import deviations
from xaudit.utils.io import atomic_write_json

PROTOCOL_VERSION: int = 2
CARD_FILE = "protocol.json"


def protocol_row(name: str, paper: str, params: Mapping[str, Any], paper_params: Mapping[str, Any],
                 notes: Sequence[str] = ()) -> dict[str, Any]:
    """One entry of a card: the parameters as run next to the paper's, their deviations and notes."""
    return {"name": name, "paper": paper, "params": dict(params), "paper_params": dict(paper_params),
            "deviations": deviations(params, paper_params), "notes": list(notes)}


def make_card(mode: str, target: str | None, size: Sequence[int], rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """A protocol card: the version, the audit mode, the explained class, the image size and the rows."""
    return {"version": PROTOCOL_VERSION, "mode": mode, "target": target, "image_size": list(size),
            "metrics": dict(rows)}


def metric_row(name: str, metric: Any, size: tuple[int, int], target: str) -> dict[str, Any]:
    """One metric's card entry: its registered ``name``, family, what it measures and its direction
    (↑ higher is better, ↓ lower), paper, parameters as run on ``size`` images (the explained class
    ``target`` included), the paper's values and the deviations."""
    row = protocol_row(name, metric.paper, {**metric.protocol_params(size), "target": target},
                       {**metric.paper_params(size), "target": metric.protocol_target}, metric.protocol_notes)
    return {**row, "family": getattr(metric, "family", ""), "measures": getattr(metric, "measures", ""),
            "direction": "↑" if getattr(metric, "higher_is_better", True) else "↓"}


def evaluate_card(metrics: Mapping[str, Any], names: Mapping[str, str], size: tuple[int, int],
                  targets: Mapping[str, str], target_mode: str) -> dict[str, Any]:
    """The card of an ``evaluate`` audit: ``metrics`` {label: instance}, ``names`` {label: registered
    name}, ``targets`` {label: class explained for it}, the images' H×W ``size``."""
    return make_card("evaluate", target_mode, size,
                     {label: metric_row(names[label], m, size, targets[label]) for label, m in metrics.items()})


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
    entries = card.get("metrics", {})
    carded = any("measures" in row for row in entries.values())  # metric cards (evaluate) add two columns
    header = ["metric", *(["family", "measures"] if carded else []), "parameters", "paper", "deviations from the paper"]
    rows = []
    for label, row in entries.items():
        dev = "; ".join([*row.get("deviations", []), *[f"note: {n}" for n in row.get("notes", [])]]) or "none"
        name = f"{label} ({row['name']})" if row["name"] != label else label
        card_cols = [row.get("family") or "—", f"{row.get('direction', '')} {row.get('measures') or '—'}".strip()]
        rows.append([name, *(card_cols if carded else []), _params(row["params"]), row.get("paper") or "—", dev])
    return header, rows


#: what the protocol card's numbers are (its table caption)
CARD_CAPTION = "Each metric as run: its parameters, the paper it follows and where this run deviates from it."


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a Markdown section."""
    header, rows = card_rows(card)
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["## Protocol", "", f"Protocol version {card.get('version')}; images {card.get('image_size')}; "
             f"explained class: {card.get('target')}.", "", f"*{CARD_CAPTION}*", "",
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
            f"</p><table><caption>{CARD_CAPTION}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")
