"""The shared registry and the value checks (issue 31): one lookup and one argument order for all."""

from __future__ import annotations

import numpy as np
import pytest

from xaudit.utils.errors import ConfigError
from xaudit.utils.registry import Registry
from xaudit.utils.validation import choice, flag, fraction, positive_float, positive_int


def test_registry_registers_names_and_suggests_close_matches() -> None:
    reg: Registry[type] = Registry("widget", key="widget.name")

    @reg.register("round_widget")
    class Round:
        pass

    assert Round.name == "round_widget" and reg.get("round_widget") is Round
    assert reg.names() == ["round_widget"] and "round_widget" in reg and reg.contains("round_widget")
    reg.register("round_widget")(Round)  # the same class again: a no-op
    with pytest.raises(ConfigError, match=r"'round_widget' is already registered by Round"):
        reg.register("round_widget")(type("Square", (), {}))
    with pytest.raises(ValueError, match=r"Unknown widget 'round_widgt' \(widget\.name\)\. Did you mean "
                                         r"'round_widget'\?.*Choices: round_widget"):
        reg.get("round_widgt")


def test_explainer_and_metric_registries_share_it() -> None:
    from xaudit.explainers.registry import EXPLAINERS, get
    from xaudit.metrics.registry import METRICS, metric_class

    assert isinstance(EXPLAINERS, Registry) and isinstance(METRICS, Registry)
    assert get("saliency").name == "saliency" and metric_class("pointing_game").name == "pointing_game"
    with pytest.raises(ConfigError, match=r"Unknown metric 'pointing' \(metric\.name\)"):
        metric_class("pointing")


@pytest.mark.parametrize(("call", "match"), [
    (lambda: positive_int(0, "steps"), r"steps=0 must be an integer ≥1\."),
    (lambda: positive_int(True, "steps"), r"steps=True must be an integer"),
    (lambda: positive_int(2.5, "n", minimum=2), r"n=2\.5 must be an integer ≥2"),
    (lambda: positive_float(0.0, "radius", "the noise scale"), r"radius=0\.0 must be a number > 0 \(the noise scale\)"),
    (lambda: positive_float(float("inf"), "sigma"), r"sigma=inf must be a number > 0\."),
    (lambda: flag("yes", "abs", "take |a|"), r"abs='yes' must be true or false \(take \|a\|\)"),
    (lambda: choice("blurr", ("blur", "zero"), "substrate"),
     r"Unknown substrate 'blurr' \(substrate\)\. Did you mean 'blur'"),
    (lambda: fraction(1.5, "top_k", include_zero=False), r"top_k=1\.5 must be a fraction in \(0, 1\]"),
    (lambda: fraction(float("nan"), "p"), r"p=nan must be a fraction in \[0, 1\]"),
])
def test_checks_name_the_key_the_value_and_the_rule(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_checks_return_canonical_values() -> None:
    assert positive_int(np.int64(3), "n") == 3 and type(positive_int(np.int64(3), "n")) is int
    assert positive_float(2, "radius") == 2.0 and flag(False, "abs") is False
    assert choice("zero", ["blur", "zero"], "substrate") == "zero"
    assert fraction(0, "p") == 0.0 and fraction(1, "top_k", include_zero=False) == 1.0
