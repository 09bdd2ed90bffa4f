"""Imports go one way: gateway -> (routing_policies | adapters | budgets), never back or across."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAVES = ("routing_policies", "adapters", "budgets")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", LEAVES)
def test_leaf_packages_do_not_import_each_other_or_gateway(package: str) -> None:
    forbidden = {"gateway", *LEAVES} - {package}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_adapters_http_imports_aiohttp() -> None:
    users = [
        path.relative_to(ROOT).as_posix()
        for package in ("gateway", *LEAVES)
        for path in sorted((ROOT / package).rglob("*.py"))
        if "aiohttp" in imported_packages(path)
    ]
    assert users == ["adapters/http.py"]
