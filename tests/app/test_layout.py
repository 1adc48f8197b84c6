"""The app's layout holds (app/__init__.py): routes reach app state only through deps, no module
imports another's private names, and the services and the database never import the HTTP layer."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def modules(folder: Path | None = None) -> dict[str, ast.Module]:
    files = sorted((folder or APP).rglob("*.py"))
    return {str(p.relative_to(APP.parent)): ast.parse(p.read_text(), str(p)) for p in files}


def imported(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import, ``import x`` giving (x, [])."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def test_routes_read_app_state_only_through_deps():
    readers = [
        f"{path}:{node.lineno}"
        for path, tree in modules(APP / "api" / "routes").items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "state"
        and isinstance(node.value, ast.Attribute) and node.value.attr == "app"
    ]
    assert readers == [], "read app state through app.api.deps instead"


def test_no_module_imports_private_names():
    private = [
        f"{path}: from {module} import {name}"
        for path, tree in modules().items()
        for module, names in imported(tree)
        for name in names
        if name.startswith("_") and module != "__future__"
    ]
    assert private == []


def test_services_and_db_never_import_the_http_layer():
    upward = [
        f"{path}: {module}"
        for folder in ("services", "db")
        for path, tree in modules(APP / folder).items()
        for module, _ in imported(tree)
        if module.startswith(("app.api", "app.main", "app.server"))
    ]
    assert upward == []
