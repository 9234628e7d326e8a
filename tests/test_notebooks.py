"""Every notebook follows the course template and takes papermill parameters (execution: the nbval run)."""

import json
from pathlib import Path

import papermill
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_the_course_has_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_overrides_the_parameters_cell(notebook, tmp_path):
    """papermill finds QUICK, DEVICE and SEED in the tagged cell and injects overrides right after it.
    (The notebooks themselves are executed once, in quick mode, by the nbval run of `make test`.)"""
    assert {"DEVICE", "SEED"} <= set(papermill.inspect_notebook(str(notebook)))  # literal defaults
    out = tmp_path / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters={"QUICK": True, "SEED": 1}, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    cells = json.loads(out.read_text())["cells"]
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    position = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[position + 1]
    assert "QUICK = quick_mode()" in "".join(cells[position]["source"])
    assert "SEED = 1" in "".join(cells[position + 1]["source"])


def _settings(cells: list[dict], quick_by_environment: bool) -> dict:
    """Run the parameters cell, papermill's injected cell (if any) and the sizes cell after them."""
    namespace = {"quick_mode": lambda: quick_by_environment}
    for cell in cells:
        source = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags or source.startswith("# Sizes that follow QUICK"):
            exec(source, namespace)
    return {k: v for k, v in namespace.items() if k.isupper()}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_quick_true_gives_the_same_sizes_as_course_quick(notebook, tmp_path):
    """`papermill -p QUICK True` must shrink every size, as COURSE_QUICK=1 does: the sizes that depend on
    QUICK live after the parameters cell, where papermill injects its values."""
    out = tmp_path / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters={"QUICK": True}, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    injected = _settings(json.loads(out.read_text())["cells"], quick_by_environment=False)
    by_environment = _settings(json.loads(notebook.read_text())["cells"], quick_by_environment=True)
    assert injected == by_environment


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
