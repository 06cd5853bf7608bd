"""The import rules of docs/architecture.md, checked on the source: ``data`` and ``models`` import
none of the four packages, ``rewards`` only the leaves ``data.readers`` and ``data.records``, and nothing imports ``grpo`` but
``grpo`` itself, the examples, bench and tests."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"grpo", "models", "rewards", "data"}
ALLOWED = {  # package -> modules of the other packages it may import
    "data": set(),
    "models": set(),
    "rewards": {"data.readers", "data.records"},
    "grpo": None,  # any
}


def imported_modules(path: Path) -> set[str]:
    """Absolute modules a file imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_follow_the_rules(package):
    allowed = ALLOWED[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != package and allowed is not None and module not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)
