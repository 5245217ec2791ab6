"""Metric families: ``evaluate.metrics=<family>`` shortcuts, the metric card columns and the report's
section per family."""

from __future__ import annotations

from pathlib import Path

import pytest

from xaudit.metrics.evaluator import FAMILIES, metric_specs
from xaudit.metrics.registry import metric_class, metric_names
from xaudit.reporting.protocol import card_rows, make_card
from xaudit.reporting.report import family_sections, write_report
from xaudit.utils.errors import ConfigError


def test_every_registered_metric_has_a_family_and_a_card_line() -> None:
    for name in metric_names():
        cls = metric_class(name)
        assert cls.family in FAMILIES, (name, cls.family)
        assert cls.measures and cls.paper, name


def test_family_shortcuts_expand_to_the_registered_metrics() -> None:
    faith = metric_specs("faithfulness")
    assert faith["deletion"] == {"name": "deletion_insertion", "mode": "deletion"}
    assert faith["insertion"] == {"name": "deletion_insertion", "mode": "insertion"}
    assert {s["name"] for s in faith.values()} == {n for n in metric_names()
                                                   if metric_class(n).family == "faithfulness"}
    both = metric_specs("faithfulness+localisation")
    assert set(faith) < set(both) and "pointing_game" in both and both["mass_in_mask"] == {"name": "relevance_mass"}
    assert metric_specs("localisation, pointing_game") == metric_specs("localisation")
    every = metric_specs("all")
    assert {s["name"] for s in every.values()} == set(metric_names())
    mapping = {"d": {"name": "deletion_insertion", "mode": "deletion"}}
    assert metric_specs(mapping) == mapping


def test_unknown_family_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"Unknown metric family.*'faithfulnes'.*faithfulness"):
        metric_specs("faithfulnes")
    with pytest.raises(ConfigError, match="mapping"):
        metric_specs(3)


def _cells() -> list[dict]:
    fam = {"deletion": "faithfulness", "insertion": "faithfulness", "pointing_game": "localisation"}
    hib = {"deletion": False, "insertion": True, "pointing_game": True}
    return [{"cell": f"evaluate|{m}", "mode": "evaluate", "method": m, "method_key": m, "count": 8,
             "metrics": {"deletion": d, "insertion": i, "pointing_game": p}, "families": fam, "higher_is_better": hib}
            for m, d, i, p in (("grad_cam", 0.2, 0.6, 0.9), ("random", 0.4, 0.4, 0.3))]


def test_report_has_a_section_per_family_with_directions(tmp_path: Path) -> None:
    sections = family_sections(_cells())
    assert [s[0] for s in sections] == ["Faithfulness", "Localisation"]
    assert sections[0][1] == ["method", "deletion ↓", "insertion ↑"]
    assert sections[0][2][0] == ["grad_cam", 0.2, 0.6]
    paths = write_report(tmp_path, "evaluate", _cells(), {"checkpoint": "x"})
    md = paths["md"].read_text()
    assert "### Faithfulness" in md and "### Localisation" in md and "| deletion ↓ | insertion ↑ |" in md
    assert "<h3>Localisation</h3>" in paths["html"].read_text()


def test_card_shows_family_measures_and_direction() -> None:
    from xaudit.metrics import PointingGame
    from xaudit.reporting.protocol import metric_row

    card = make_card("evaluate", "auto", (32, 32), {"pointing_game": metric_row("pointing_game", PointingGame(),
                                                                                (32, 32), "label")})
    header, rows = card_rows(card)
    assert header[:3] == ["metric", "family", "measures"]
    assert rows[0][1] == "localisation" and rows[0][2].startswith("↑ whether the map")
