"""Layering: the explainers are a library below the task layer. No module under
``src/xaudit/explainers`` imports the tasks, reporting or callbacks of xaudit, nor Lightning, Hydra
or W&B — at module level or inside a function, absolute, relative or through ``importlib``."""

from __future__ import annotations

import ast
from pathlib import Path

EXPLAINERS = Path(__file__).resolve().parents[2] / "src" / "xaudit" / "explainers"
FORBIDDEN = ("xaudit.tasks", "xaudit.reporting", "xaudit.callbacks", "lightning", "pytorch_lightning", "hydra",
             "wandb")


def _package(path: Path) -> list[str]:
    """The dotted package a file's relative imports start from (``xaudit.explainers.relevance``)."""
    return ["xaudit", "explainers", *path.relative_to(EXPLAINERS).parent.parts]


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, at any depth of the tree.

    ``from a import b`` yields ``a`` and ``a.b`` (b may be a submodule); a relative import is
    resolved against the file's package; ``importlib.import_module("…")`` and ``__import__("…")``
    with a constant name count too. ``source`` replaces the file's text (for testing the walk)."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    pkg = _package(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_the_walk_sees_function_level_relative_and_importlib_imports() -> None:
    code = ("def f():\n    import wandb\n    from ...tasks import common\n"
            "    import importlib\n    importlib.import_module('xaudit.reporting.overlays')\n")
    mods = [m for _, m in imported_modules(EXPLAINERS / "relevance" / "x.py", code)]
    assert "wandb" in mods and "xaudit.tasks" in mods and "xaudit.reporting.overlays" in mods
    assert all(_forbidden(m) for m in ("wandb", "xaudit.tasks", "xaudit.reporting.overlays", "lightning.pytorch"))
    assert not any(_forbidden(m) for m in ("xaudit.explainers.base", "hydrangea", "torch", "xaudit.models"))


def test_explainers_never_import_the_task_layer() -> None:
    files = sorted(EXPLAINERS.rglob("*.py"))
    assert len(files) > 20 and EXPLAINERS / "relevance" / "lrp.py" in files
    bad = [f"{f.relative_to(EXPLAINERS.parent.parent)}:{line}: {module}"
           for f in files for line, module in imported_modules(f) if _forbidden(module)]
    assert not bad, "explainers must not import the task layer:\n" + "\n".join(bad)
