"""The notebooks in notebooks/ run top to bottom in a headless Jupyter kernel, at the sizes they are stored with.

Each is executed by nbclient in a fresh kernel whose working directory is notebooks/ (the notebooks find
the repository root from there and put it first on sys.path, and PYTHONPATH says the same). They read
../shared/data and, for stages 2 and 3, the converted SmolLM2 checkpoint; where those are absent the
test skips and says which. The stored copies carry no outputs, and their size setting is the smallest.

    SCRATCHGPT_NOTEBOOKS_EXPORT=docs/notebooks .venv/bin/python -m pytest tests/test_notebooks.py

also writes each executed notebook as Markdown, with its figures, into that folder: the copies in
docs/notebooks/ were made so.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import date
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the dev extra (nbformat, nbclient)")

from core.paths import models_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2 = "smollm2-135m-instruct"
# What each notebook reads besides the repository; a new notebook must be listed here to be run.
NEEDS = {
    "stage1_building_blocks.ipynb": ("data",),
    "stage2_pretraining.ipynb": ("data", "smollm2"),
    "stage3_finetuning.ipynb": ("data", "smollm2"),
}


def test_every_notebook_is_listed_stored_without_outputs_at_its_smallest_size():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NEEDS)
    for name in NEEDS:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{name} is stored with outputs: `jupyter nbconvert --clear-output --inplace notebooks/{name}`"
                )
        setup = next(cell.source for cell in nb.cells if cell.cell_type == "code")
        assert 'SIZE = "small"' in setup, f"{name}: store it with its smallest setting, SIZE = \"small\""


def _missing(needs: tuple[str, ...]) -> str | None:
    if "data" in needs and not SHARED_DATA.is_dir():
        return f"{SHARED_DATA} is not present"
    if "smollm2" in needs and not (models_dir() / SMOLLM2 / "config.json").is_file():
        return f"no SmolLM2 checkpoint in {models_dir() / SMOLLM2}: run `scratchgpt download {SMOLLM2}`"
    return None


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("name", sorted(NEEDS))
def test_notebook_runs_top_to_bottom(name, monkeypatch):
    from nbclient import NotebookClient

    reason = _missing(NEEDS[name])
    if reason:
        pytest.skip(reason)
    # The kernel inherits this environment: this checkout's code comes first.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()  # a cell that raises fails the test with the cell and its traceback
    seconds = time.perf_counter() - start
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
    export = os.environ.get("SCRATCHGPT_NOTEBOOKS_EXPORT")
    if export:
        _export_markdown(nb, Path(export), Path(name).stem, seconds)


def _export_markdown(nb, folder: Path, stem: str, seconds: float) -> None:
    from nbconvert import MarkdownExporter

    body, resources = MarkdownExporter().from_notebook_node(nb, resources={"output_files_dir": f"{stem}_files"})
    folder.mkdir(parents=True, exist_ok=True)
    for relative, data in resources.get("outputs", {}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    # The load says how much of the wall time was other jobs' on a shared machine.
    note = (f"*Executed {date.today().isoformat()} by `tests/test_notebooks.py` in {seconds:.0f} s "
            f"({os.cpu_count()} CPU cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end); "
            f"the notebook itself is [notebooks/{stem}.ipynb](../../notebooks/{stem}.ipynb).*\n\n")
    (folder / f"{stem}.md").write_text(note + body, encoding="utf-8")
