"""Layering of the xaudit package: imports only go down, and no module takes another's private names.

Every module of ``src/xaudit`` and of the top-level ``callbacks/`` package (installed as
``xaudit.callbacks``) is read with :mod:`ast` — module-level and function-level imports, absolute,
relative and ``importlib.import_module("…")`` alike — and each imported name is followed through
re-exports to the module that defines it, so a shim left at an old path counts as its new home
(``xaudit.explainers.fills.make_fill`` is ``xaudit.ops.fills``). A module that is only a shim (a
docstring, imports, ``__all__``) sits in the layer of the family it re-exports.

The layers, lowest first (a family may import its own modules and any lower layer; families on one
layer are independent and do not import each other):

==========  ================================================================================
xaudit      the package root: the OmegaConf resolvers (runs before any submodule)
utils       errors, io, distributed helpers, loggers, the registry machinery
ops         tensor operations the explainers, metrics and ROAR share: fills, per-image seeds
data        datamodules and the split machinery (``data.tensor_split``) | models
explainers  attribution methods (use data/models, never metrics or the task layer)
metrics     evaluation of explainers (create explainers by name, use ops)
reporting   the protocol card, shared result names (``reporting.constants``), the report
concepts    concept probes (TCAV) | roar: ROAR/KAR retraining and the attribution store
audits      the audit modes (plugins) built on the layers below
tasks       Hydra entry points: train, audit, explain, sanity, shortcut
callbacks   Lightning callbacks (the explanation monitor)
==========  ================================================================================

Besides, the library layers ``ops``, ``explainers`` and ``concepts`` import no training stack
(Lightning, Hydra, W&B, MLflow): they are usable on a bare model. (This test replaces
``tests/explainers/test_layering.py``, which checked the explainers alone.)

Both allowlists are empty: every import goes down. An exception would be listed in :data:`ALLOWED` /
:data:`ALLOWED_PRIVATE` with its owner and the fix; an entry no longer needed fails the test.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "xaudit"
CALLBACKS = ROOT / "callbacks"

#: lowest first; a tuple holds independent families of one layer
LAYERS: tuple[tuple[str, ...], ...] = (
    ("xaudit",),
    ("utils",),
    ("ops",),
    ("data", "models"),
    ("explainers",),
    ("metrics",),
    ("reporting",),
    ("concepts", "roar", "training"),
    ("audits",),
    ("tasks",),
    ("callbacks",),
)
RANK: dict[str, int] = {family: i for i, layer in enumerate(LAYERS) for family in layer}

#: families that import no training stack (usable on a bare ``nn.Module``)
FRAMEWORK_FREE = ("ops", "explainers", "concepts")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "wandb", "mlflow")

#: upward or sideways imports not fixed yet: (importer, home of the imported name) -> owner and fix
ALLOWED: dict[tuple[str, str], str] = {
}

#: private names still taken from another module: (importer, "module.name") -> owner and fix
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {
}


# -- the walk ------------------------------------------------------------------------------------


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for src/xaudit and callbacks/ (as ``xaudit.callbacks``)."""
    found: dict[str, Path] = {}
    for base, prefix in ((SRC, ("xaudit",)), (CALLBACKS, ("xaudit", "callbacks"))):
        for f in sorted(base.rglob("*.py")):
            parts = [*prefix, *f.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.setdefault(".".join(parts), f)
    return found


MODULES = _module_files()


@dataclass(frozen=True)
class Import:
    """One imported thing: ``module`` (absolute), and ``name`` for ``from module import name``."""

    line: int
    module: str
    name: str | None = None


def _package_of(module: str, path: Path) -> list[str]:
    """The package a module's relative imports start from."""
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _absolute(node: ast.ImportFrom, package: list[str]) -> str:
    if not node.level:
        return node.module or ""
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@cache
def _imports(module: str) -> tuple[Import, ...]:
    return tuple(imports_of(module))


def imports_of(module: str, source: str | None = None, path: Path | None = None) -> list[Import]:
    """Every import of ``module`` at any depth of its tree (``source``/``path`` replace its file)."""
    path = path or MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source, filename=str(path))
    package = _package_of(module, path)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [Import(node.lineno, _absolute(node, package), alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append(Import(node.lineno, node.args[0].value))
    return found


@cache
def _module_level(module: str) -> tuple[dict[str, tuple[str, str]], bool]:
    """A module's module-level ``from x import y`` bindings (name -> (x, y)), and whether it is only a
    shim (nothing but a docstring, imports, ``__all__`` and calls such as a deprecation warning)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(module, path)
    bindings: dict[str, tuple[str, str]] = {}
    shim = path.name != "__init__.py"
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bindings[alias.asname or alias.name] = (_absolute(node, package), alias.name)
        elif not (isinstance(node, ast.Import | ast.Expr) or (isinstance(node, ast.Assign)
                  and [getattr(t, "id", None) for t in node.targets] == ["__all__"])):
            shim = False
    return bindings, shim


def home(module: str, name: str | None = None) -> str:
    """The module that defines ``module.name`` (a submodule, or followed through re-exports)."""
    for _ in range(50):
        if name is not None and f"{module}.{name}" in MODULES:
            return f"{module}.{name}"
        if module not in MODULES or name is None:
            return module
        source = _module_level(module)[0].get(name)
        if source is None or not source[0].startswith("xaudit"):
            return module
        module, name = source
    raise AssertionError(f"re-export cycle at {module}.{name}")


def family(module: str) -> str:
    """The layer family of a module (``xaudit.explainers.relevance.lrp`` -> ``explainers``); a pure
    shim belongs to the family it re-exports."""
    parts = module.split(".")
    own = parts[1] if len(parts) > 1 else "xaudit"
    if module in MODULES and _module_level(module)[1]:
        targets = {family(home(m, n)) for m, n in _module_level(module)[0].values() if m.startswith("xaudit.")}
        if len(targets) == 1:
            return targets.pop()
    return own


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@cache
def layer_violations() -> dict[tuple[str, str], list[str]]:
    """(importer, home) -> ``file:line`` of every import that goes up or sideways."""
    bad: dict[tuple[str, str], list[str]] = {}
    for module, path in MODULES.items():
        mine = family(module)
        for imp in _imports(module):
            if imp.module != "xaudit" and not imp.module.startswith("xaudit."):
                continue
            target = home(imp.module, imp.name)
            theirs = family(target)
            if theirs == mine or (theirs in RANK and RANK[theirs] < RANK[mine]):
                continue
            where = f"{path.relative_to(ROOT)}:{imp.line}"
            bad.setdefault((module, target), []).append(where)
    return bad


@cache
def private_violations() -> dict[tuple[str, str], list[str]]:
    """(importer, "module.name") -> ``file:line`` of every private name taken from another module."""
    bad: dict[tuple[str, str], list[str]] = {}
    for module, path in MODULES.items():
        for imp in _imports(module):
            if imp.name is None or not _is_private(imp.name) or not imp.module.startswith("xaudit"):
                continue
            if home(imp.module, imp.name) == module:
                continue
            bad.setdefault((module, f"{imp.module}.{imp.name}"), []).append(f"{path.relative_to(ROOT)}:{imp.line}")
    return bad


def _report(bad: dict[tuple[str, str], list[str]], allowed: dict[tuple[str, str], str]) -> list[str]:
    return [f"{', '.join(where)}: {importer} -> {target}" for (importer, target), where in sorted(bad.items())
            if (importer, target) not in allowed]


# -- the tests -----------------------------------------------------------------------------------


def test_every_family_has_a_layer() -> None:
    assert len(MODULES) > 100 and "xaudit.explainers.relevance.lrp" in MODULES
    assert "xaudit.callbacks.explanation_monitor" in MODULES
    families = {family(m) for m in MODULES}
    assert {"explainers", "metrics", "ops", "roar", "callbacks"} <= families
    assert not families - set(RANK), f"families without a layer: {sorted(families - set(RANK))}; add them to LAYERS"


def test_the_walk_sees_function_level_relative_and_importlib_imports() -> None:
    code = ("def f():\n    import wandb\n    from ...tasks import common\n    from .core import _secret\n"
            "    import importlib\n    importlib.import_module('xaudit.reporting.overlays')\n")
    path = SRC / "explainers" / "relevance" / "x.py"
    found = imports_of("xaudit.explainers.relevance.x", code, path)
    assert Import(2, "wandb") in found and Import(3, "xaudit.tasks", "common") in found
    assert Import(4, "xaudit.explainers.relevance.core", "_secret") in found
    assert Import(6, "xaudit.reporting.overlays") in found


def test_shims_count_as_their_new_home() -> None:
    assert home("xaudit.explainers.fills", "make_fill") == "xaudit.ops.fills"
    assert home("xaudit.explainers.baselines", "image_seeds") == "xaudit.ops.seeds"
    assert home("xaudit.roar.data", "TensorSplit") == "xaudit.data.tensor_split"
    assert home("xaudit.roar.data", "MapKeep") == "xaudit.roar.data"
    assert home("xaudit.explainers", "registry") == "xaudit.explainers.registry"
    assert family("xaudit.explainers.fills") == "ops" and family("xaudit.explainers.gradient") == "explainers"
    assert family("xaudit.tcav") == "concepts"


def test_imports_only_go_down_the_layers() -> None:
    bad = _report(layer_violations(), ALLOWED)
    order = " < ".join(", ".join(layer) for layer in LAYERS)
    assert not bad, f"imports that go up or sideways (layers: {order}):\n" + "\n".join(bad)


def test_no_private_names_cross_modules() -> None:
    bad = _report(private_violations(), ALLOWED_PRIVATE)
    assert not bad, "private names imported from another module (make them public or move them):\n" + "\n".join(bad)


def test_library_layers_import_no_training_stack() -> None:
    bad = [f"{MODULES[m].relative_to(ROOT)}:{imp.line}: {imp.module}" for m in MODULES if family(m) in FRAMEWORK_FREE
           for imp in _imports(m) if imp.module.split(".")[0] in FRAMEWORKS]
    assert not bad, f"{', '.join(FRAMEWORK_FREE)} must not import {', '.join(FRAMEWORKS)}:\n" + "\n".join(bad)


def test_the_allowlists_only_hold_what_is_still_needed() -> None:
    stale = [f"{k}: {v}" for k, v in ALLOWED.items() if k not in layer_violations()]
    stale += [f"{k}: {v}" for k, v in ALLOWED_PRIVATE.items() if k not in private_violations()]
    assert not stale, "fixed — remove from the allowlist in tests/test_layering.py:\n" + "\n".join(stale)


def test_old_import_paths_still_work() -> None:
    """The moves left re-exports: the old paths give the very same objects."""
    from xaudit.data import tensor_split
    from xaudit.explainers import baselines, fills, fit_data, rerouting
    from xaudit.explainers.relevance import core
    from xaudit.ops import fills as ops_fills
    from xaudit.ops import seeds
    from xaudit.reporting import constants
    from xaudit.roar import data as roar_data
    from xaudit.roar import masking, runner

    assert fills.make_fill is ops_fills.make_fill and fills.FILLS is ops_fills.FILLS
    assert baselines.image_seeds is seeds.image_seeds
    assert core.reroute is rerouting.reroute and core.iter_images is fit_data.iter_images
    assert roar_data.TensorSplit is tensor_split.TensorSplit and roar_data.StreamBatches is tensor_split.StreamBatches
    assert runner.BASELINE == constants.BASELINE == "baseline" and masking.MODES == constants.RETRAIN_MODES
