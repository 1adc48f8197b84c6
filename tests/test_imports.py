"""The house rules for imports, read from the source (every import statement, at any depth):

- ``core`` has no import circles;
- the book's path (``core.model``, ``core.generation``) never reaches the fast path (``core.fast``),
  not even through another room;
- ``core`` imports nothing of the service, the jobs or the CLI (``app``, ``training``,
  ``scratchgpt``), nor the web and database libraries (``fastapi``, ``starlette``, ``sqlalchemy``);
- ``app`` and ``training`` never import each other;
- in ``core`` an import inside a function says why beside it (an optional dependency, a slow import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOK_PATH = ("core.model", "core.generation")
WEB_AND_DB = ("fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, the source line) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested, lines[child.lineno - 1]) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # "from core.fast import fused_ops" imports the submodule core.fast.fused_ops.
                for alias in child.names:
                    found.append((f"{child.module}.{alias.name}", child.lineno, nested, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return found


def package_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (a name that is not a module counts as its module)."""
    modules = {module_name(p): p for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported, *_ in imports_of(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules, first repeated at the end; None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_checker_finds_a_planted_circle_and_reaches_through_rooms():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert reachable({"x": {"y"}, "y": {"z"}}, "x") == {"y", "z"}


def test_core_has_no_import_circles():
    assert find_cycle(package_graph("core")) is None


@pytest.mark.parametrize("room", BOOK_PATH)
def test_the_books_path_never_reaches_the_fast_path(room):
    graph = package_graph("core")
    for module in [m for m in graph if m == room or m.startswith(room + ".")]:
        fast = sorted(m for m in reachable(graph, module) if m == "core.fast" or m.startswith("core.fast."))
        assert not fast, f"{module} reaches {fast}"


def forbidden_imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {imported}"
        for path in sorted((REPO / package).rglob("*.py"))
        for imported, line, _, _ in imports_of(path)
        if imported.split(".")[0] in forbidden
    ]


def test_core_knows_nothing_of_the_service_the_jobs_or_the_web():
    assert forbidden_imports("core", ("app", "training", "scratchgpt") + WEB_AND_DB) == []


def test_the_service_and_the_jobs_do_not_import_each_other():
    assert forbidden_imports("app", ("training",)) == []
    assert forbidden_imports("training", ("app",)) == []


def test_an_import_inside_a_function_in_core_says_why():
    unexplained = [
        f"{path.relative_to(REPO)}:{line}: {source.strip()}"
        for path in sorted((REPO / "core").rglob("*.py"))
        for _, line, nested, source in imports_of(path)
        if nested and "#" not in source
    ]
    assert unexplained == []
