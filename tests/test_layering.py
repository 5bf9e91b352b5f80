"""No import runs back up the layers of docs/design.md §2.2.

Every ``import`` of the package's own modules — at the top of a file or inside a function, where a
lazy import would otherwise hide a dependency — is read from the source with ``ast`` and checked
against the table below, which is the one in docs/design.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "higanbana"

BOTTOM = {"errors", "safeio", "schema"}
#: what each top-level component may import from the package (besides itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "safeio": {"errors"},
    "schema": {"errors"},
    "algorithms": {"errors"},
    "presets": {"errors", "schema"},
    "models": {"errors", "safeio"},
    "network": {"algorithms", "presets"} | BOTTOM,
    "formats": {"algorithms", "network", "models"} | BOTTOM,
    "integrations": {"algorithms", "network", "formats", "models"} | BOTTOM,
    "kohya": {"integrations"},
    "tools": {"algorithms", "presets", "models", "network", "formats"} | BOTTOM,
    "train": {"algorithms", "presets", "models", "network", "formats"} | BOTTOM,
    "evaluate": {"algorithms", "presets", "models", "network", "formats"} | BOTTOM,
    "workflows": {"algorithms", "presets", "models", "network", "formats", "tools", "train", "evaluate"} | BOTTOM,
    "miniworld": {"algorithms", "presets", "models", "network", "formats", "train", "evaluate", "workflows"} | BOTTOM,
    "cli": {
        "algorithms",
        "presets",
        "models",
        "network",
        "formats",
        "tools",
        "train",
        "evaluate",
        "workflows",
        "miniworld",
    }
    | BOTTOM,
    "__init__": {"algorithms", "errors", "formats", "network"},
    "__main__": {"cli"},
}


def _component(parts: tuple[str, ...]) -> str:
    return parts[0] if parts else "__init__"


def _imports(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """``(line, module path inside the package)`` of every import of the package's own modules."""
    rel = path.relative_to(SRC).with_suffix("").parts
    package = rel[:-1]  # the package a relative import starts from (also for __init__.py)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = (*base, *(node.module.split(".") if node.module else ()))
                if not node.module:  # `from . import x`: x is a module of that package
                    found += [(node.lineno, (*target, alias.name)) for alias in node.names]
                    continue
            elif node.module and (node.module == "higanbana" or node.module.startswith("higanbana.")):
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            own = [a.name for a in node.names if a.name.startswith("higanbana.")]
            found += [(node.lineno, tuple(name.split(".")[1:])) for name in own]
    return found


def _files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_component_is_in_the_table():
    components = {_component(p.relative_to(SRC).with_suffix("").parts) for p in _files()}
    assert components <= set(ALLOWED), f"add to ALLOWED (and docs/design.md §2.2): {components - set(ALLOWED)}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path):
    rel = path.relative_to(SRC).with_suffix("").parts
    me = _component(rel if rel[-1] != "__init__" else rel[:-1])
    wrong = [
        f"line {line}: {'.'.join(target)}"
        for line, target in _imports(path)
        if _component(target) != me and _component(target) not in ALLOWED[me]
    ]
    assert not wrong, f"{me} may import only {sorted(ALLOWED[me])}; {path.name} imports {wrong}"


def test_the_check_sees_imports():
    """The reader finds relative, absolute and function-local imports (a check that sees nothing passes)."""
    found = {target for _, target in _imports(SRC / "formats" / "network_files.py")}
    assert ("network",) in found and ("algorithms",) in found
    assert sum(len(_imports(p)) for p in _files()) > 100
