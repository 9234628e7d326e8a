"""Every notebook executes in quick mode, and follows the course template."""

import json
import time
from pathlib import Path

import papermill
import pytest

from conftest import NOTEBOOK_TIMES

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_the_course_has_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_quick_mode(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "1")
    monkeypatch.setenv("COURSE_FIGURES_DIR", str(tmp_path / "figures"))
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook),
        str(tmp_path / notebook.name),
        parameters={"QUICK": True},
        kernel_name="python3",
        cwd=str(NOTEBOOK_DIR),
        progress_bar=False,
    )
    NOTEBOOK_TIMES[notebook.stem] = time.perf_counter() - start


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_template(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in cells]
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown").lower()
    code_cells = [c for c in cells if c["cell_type"] == "code"]
    assert sum("parameters" in t for t in tags) == 1, "exactly one cell tagged 'parameters'"
    assert any("solution" in t for t in tags), "exercises need solution cells tagged 'solution'"
    for heading in ("learning goals", "run time", "exercise", "recap"):
        assert heading in markdown, f"missing section: {heading}"
    outputs = [o for c in code_cells for o in c.get("outputs", [])]
    assert outputs, "commit notebooks executed (with outputs)"
    assert not any(o.get("output_type") == "error" for o in outputs), "committed with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), "figures should be committed as PNG outputs"
    assert notebook.stat().st_size < 2_000_000, "keep committed notebooks under 2 MB"
