"""Audit modes are plugins: a new mode is one module + one YAML, and tasks/audit.py never names a mode.

Uses a deliberately tiny checkpoint (64 shapes, width 8, one epoch): these tests check the
plumbing (config → class → cells → report), not what the model learned.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from xaudit.audits import base
from xaudit.audits.sanity import Sanity
from xaudit.audits.shortcut import Shortcut
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError

from xaudit_testing import FAST, QUIET, ROOT, compose_config

TINY_TRAIN = [*[o for o in FAST if not o.startswith("callbacks.")], "callbacks=model_checkpoint",
              "data.n_train=64", "data.n_val=32", "data.n_test=32", "data.batch_size=32"]

TOY_MODULE = '''
"""A user's audit mode: the mean |attribution| of each method on the first few test images."""
from pathlib import Path
from typing import Any

from xaudit.audits import AuditContext, AuditMode
from xaudit.utils.results import ResultsLog
from xaudit.explainers import create
from xaudit.metrics.base import evaluating
from xaudit.reporting import report as rep


class Toy(AuditMode):
    name = "toy"

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        n = int(ctx.cfg.toy.images)
        results = ResultsLog(ctx.mode_dir)
        results.check_config({**ctx.identity, "mode": self.name, "images": n})
        done = results.read()
        x = ctx.test.normalise(ctx.test.images[:n]).to(ctx.device)
        y = ctx.test.labels[:n].to(ctx.device)
        for method, kw in ctx.methods.items():
            key = f"toy|{method}"
            if key in done:
                continue
            with evaluating(ctx.net, grad=True):
                value = float(create(method, ctx.net, **kw).attribute(x, y).abs().mean())
            results.append({"cell": key, "mode": self.name, "method": method, "method_key": method,
                            "mean_abs": value, "count": n})
        return {k: v for k, v in results.read().items() if k.startswith("toy|")}

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        table = [[c["method"], round(c["mean_abs"], 6)] for c in cells]
        return rep.write_tables_report(ctx.mode_dir, self.name, cells, ctx.meta(cells), ["method", "mean |a|"],
                                       table, [], [f"{len(cells)} methods"])
'''

TOY_YAML = """\
# @package _global_
audit:
  _target_: toy_audit_mode.Toy
  mode: toy
toy:
  images: 4
"""


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tiny")
    return train(compose_config(TINY_TRAIN, out))["last_ckpt_path"]


@pytest.fixture
def toy_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's module on sys.path and their config dir (conf/audit/toy.yaml); returns the config dir."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "toy_audit_mode.py").write_text(textwrap.dedent(TOY_MODULE))
    conf = tmp_path / "user_conf"
    (conf / "audit").mkdir(parents=True)
    (conf / "audit" / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setattr(base.MODES, "items", dict(base.MODES.items))  # the toy mode is forgotten afterwards
    return conf


def _string_constants(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_tasks_audit_never_branches_on_a_mode_name() -> None:
    source = (ROOT / "src" / "xaudit" / "tasks" / "audit.py").read_text()
    modes = set(base.names())
    assert {"evaluate", "roar", "kar", "sanity", "shortcut", "concepts", "explain"} <= modes
    offending = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            named = _string_constants(node) & modes
            if named:
                offending.append(f"line {node.lineno}: compares with {sorted(named)}")
        if isinstance(node, ast.Match):
            offending.append(f"line {node.lineno}: match statement")
    assert not offending, offending


def test_a_new_mode_is_one_module_and_one_yaml(tiny_ckpt: str, toy_plugin: Path, tmp_path: Path) -> None:
    overrides = [*QUIET, f"hydra.searchpath=[file://{toy_plugin}]", "audit=toy", f"ckpt_path={tiny_ckpt}",
                 f"out_dir={tmp_path / 'audit'}", "explainer=[saliency]", "controls=[sobel]"]
    result = audit(compose_config(overrides, tmp_path, config_name="audit"))
    assert result["mode"] == "toy" and set(result["cells"]) == {"toy|saliency", "toy|sobel"}
    assert all(c["count"] == 4 and c["mean_abs"] > 0 for c in result["cells"].values())
    mode_dir = tmp_path / "audit" / "toy"
    assert Path(result["mode_dir"]) == mode_dir
    lines = (mode_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    fingerprint = json.loads((mode_dir / "audit_config.json").read_text())
    assert fingerprint["mode"] == "toy" and fingerprint["target"] == "label" and len(fingerprint["checkpoint"]) == 64
    report = (mode_dir / "report.md").read_text()
    assert "saliency" in report and "2 methods" in report
    summary = json.loads((mode_dir / "results.json").read_text())["summary"]
    assert summary["header"] == ["method", "mean |a|"] and len(summary["rows"]) == 2
    assert result["report"]["md"] == str(mode_dir / "report.md")
    logged = (tmp_path / "run" / "csv" / "hparams.yaml").read_text()  # the generic flow logged the run (CSV)
    assert "toy_audit_mode.Toy" in logged
    # a rerun resumes through the same generic flow: nothing recomputed, nothing written twice
    again = audit(compose_config(overrides, tmp_path, config_name="audit"))
    assert again["cells"] == result["cells"]
    assert (mode_dir / "results.jsonl").read_text().splitlines() == lines


def test_audit_sanity_and_shortcut_compose(tmp_path: Path) -> None:
    for name, cls, key in (("sanity", Sanity, "num_images"), ("shortcut", Shortcut, "cue")):
        cfg = compose_config([*QUIET, f"audit={name}"], tmp_path, config_name="audit")
        assert cfg.audit.mode == name and key in cfg[name]
        assert type(base.build_mode(cfg.audit)) is cls
    assert not Shortcut.needs_checkpoint and Sanity.needs_checkpoint


def test_experiment_sanity_still_works_and_warns(tiny_ckpt: str, tmp_path: Path) -> None:
    common = [*QUIET, f"ckpt_path={tiny_ckpt}", "explainer=[saliency]", "controls=[random]", "sanity.num_images=4"]
    with pytest.warns(DeprecationWarning, match=r"experiment=sanity is deprecated.*audit=sanity"):
        old = audit(compose_config([*common, "experiment=sanity", f"out_dir={tmp_path / 'old'}"], tmp_path,
                                   config_name="audit"))
    new = audit(compose_config([*common, "audit=sanity", f"out_dir={tmp_path / 'new'}"], tmp_path,
                               config_name="audit"))

    def values(res: dict[str, Any]) -> dict[str, Any]:
        return {k: (c["layers"], c["spearman"]) for k, c in res["cells"].items()}

    assert set(old["cells"]) == {"sanity|saliency", "sanity|random"}
    assert values(old) == values(new), "the alias runs the same audit"
    assert (tmp_path / "new" / "sanity" / "report.md").is_file()


def test_bad_mode_class_names_the_key(tmp_path: Path) -> None:
    cfg = compose_config([*QUIET, "audit._target_=no_such_module.Mode"], tmp_path, config_name="audit")
    with pytest.raises(ConfigError, match=r"audit\._target_: cannot import no_such_module\.Mode"):
        audit(cfg)
    cfg = compose_config([*QUIET, "audit._target_=xaudit.tasks.audit.audit_dir"], tmp_path, config_name="audit")
    with pytest.raises(ConfigError, match=r"not an xaudit\.audits\.AuditMode subclass"):
        audit(cfg)
