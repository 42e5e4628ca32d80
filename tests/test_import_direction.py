"""Imports only run downwards: scripts -> training -> privacy -> models -> data -> common.

Every import statement of every module (including imports inside functions and
relative imports) is read with `ast`; a lower floor importing a higher one fails
with the file, line and imported name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what each floor may import from the project's packages (besides itself)
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "data": {"common"},
    "models": {"common", "data"},
    "privacy": {"common", "data", "models"},
    "training": {"common", "data", "models", "privacy"},
}
PROJECT_PACKAGES = set(ALLOWED) | {"scripts", "benchmarks", "tests"}


def imported_modules(path: Path, module: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import statement in the file `path` (module name `module`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if node.module is None or node.level:
                # `from . import x` / `from .. import training`: the names may be modules
                found += [(f"{name}.{alias.name}" if name else alias.name, node.lineno) for alias in node.names]
            else:
                found.append((name, node.lineno))
    return found


def upward_imports(root: Path) -> list[str]:
    """`path:line: <floor> imports <module>` for every import of a floor that ALLOWED forbids."""
    problems = []
    for floor, allowed in ALLOWED.items():
        for path in sorted((root / floor).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts)
            for name, line in imported_modules(path, module):
                top = name.split(".")[0]
                if top in PROJECT_PACKAGES and top != floor and top not in allowed:
                    problems.append(f"{rel}:{line}: {floor}/ imports {name}")
    return problems


def test_no_module_imports_a_higher_floor():
    problems = upward_imports(ROOT)
    assert problems == [], "imports must run downwards (scripts -> training -> privacy -> models -> data -> common):\n" + "\n".join(problems)


def test_every_floor_is_checked():
    # a package added beside these would escape the check: name its floor in ALLOWED
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - PROJECT_PACKAGES == set()


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_reports_every_kind_of_upward_import(tmp_path):
    for floor in ALLOWED:
        _write(tmp_path, f"{floor}/__init__.py", "")
    _write(tmp_path, "data/fine.py", "import numpy\nfrom common.files import atomic_write\nfrom data import manifest\n")
    _write(tmp_path, "data/bad_toplevel.py", "import training.config\n")
    _write(tmp_path, "data/sub/__init__.py", "")
    _write(tmp_path, "data/sub/bad_lazy.py", "def f():\n    from training.stage import Stage\n    return Stage\n")
    _write(tmp_path, "models/bad_relative.py", "from ..privacy import masks\n")
    _write(tmp_path, "privacy/bad_relative_module.py", "from .. import training\n")
    _write(tmp_path, "common/bad.py", "from data.media import read_wav\n")
    assert upward_imports(tmp_path) == [
        "common/bad.py:1: common/ imports data.media",
        "data/bad_toplevel.py:1: data/ imports training.config",
        "data/sub/bad_lazy.py:2: data/ imports training.stage",
        "models/bad_relative.py:1: models/ imports privacy.masks",
        "privacy/bad_relative_module.py:1: privacy/ imports training",
    ]


@pytest.mark.parametrize("floor, module", [("data", "models.heads"), ("models", "training.loop"), ("privacy", "scripts.demo")])
def test_checker_fails_on_a_new_upward_import(tmp_path, floor, module):
    _write(tmp_path, f"{floor}/new.py", f"import {module}\n")
    assert upward_imports(tmp_path) == [f"{floor}/new.py:1: {floor}/ imports {module}"]
