"""Imports point one way (model -> engine -> cluster -> deploy); model/ and engine/ never import Ray or web stacks."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["model", "engine", "cluster", "deploy"]
FORBIDDEN = {"model": {"ray", "fastapi", "pydantic", "starlette", "deepspeed"},
             "engine": {"ray", "fastapi", "pydantic", "starlette", "deepspeed"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ORDER)
def test_imports_point_one_way(package):
    later = set(ORDER[ORDER.index(package) + 1:])
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no python files"
    for path in files:
        roots = imported_roots(path)
        assert not roots & later, f"{path.relative_to(ROOT)} imports {sorted(roots & later)}"
        assert not roots & FORBIDDEN.get(package, set()), f"{path.relative_to(ROOT)} imports {roots & FORBIDDEN[package]}"
