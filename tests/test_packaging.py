"""pyproject.toml ships every package and every asset: a wheel lists its packages by hand.

The wheel carries templates/, static/ and migrations/ inside the app package (see
``[tool.setuptools]`` in pyproject.toml), so the package list cannot be found
automatically; these checks fail when a new directory or a new kind of asset file
would be left out of ``pip install .``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGES = ["scratchgpt", "core", "training", "app"]


def setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def source_dirs() -> dict[str, Path]:
    """Package name -> directory, for every directory a wheel must carry."""
    mapping = {name: REPO / name for name in ROOT_PACKAGES}
    mapping.update({name: REPO / path for name, path in setuptools_config()["package-dir"].items()})
    found: dict[str, Path] = {}
    for name, top in mapping.items():
        for directory in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
            rel = directory.relative_to(top).parts
            if any(part == "__pycache__" or part.startswith(".") for part in rel):
                continue
            if any(f.is_file() for f in directory.iterdir()):
                found[".".join([name, *rel])] = directory
    return found


def test_every_package_and_asset_directory_is_listed():
    listed = set(setuptools_config()["packages"])
    found = set(source_dirs())
    assert not found - listed, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert not listed - found, f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"


def test_every_data_file_matches_a_package_data_pattern():
    patterns = setuptools_config()["package-data"]["*"]
    missed = [
        str(f.relative_to(REPO))
        for directory in source_dirs().values()
        for f in directory.iterdir()
        if f.is_file() and f.suffix not in (".py", ".pyc") and not any(fnmatch.fnmatch(f.name, p) for p in patterns)
    ]
    assert not missed, f"add a pattern for these to [tool.setuptools.package-data] in pyproject.toml: {missed}"


def test_the_vendored_gpt2_ranks_and_the_web_assets_are_there():
    dirs = source_dirs()
    assert (dirs["core.assets"] / "gpt2.tiktoken").is_file()
    assert (dirs["app.templates"] / "base.html").is_file()
    assert (dirs["app.static.js"] / "markdown.js").is_file()
    assert (dirs["app.migrations"] / "env.py").is_file()
