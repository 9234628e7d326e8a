"""Every notebook follows the course template and takes papermill parameters (execution: the nbval run)."""

import json
import re
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


# --------------------------------------------------------------------------
# Claims are code (course_utils.report): the committed readings hold, and Markdown quotes no measurement
# --------------------------------------------------------------------------

def claims_of(cells: list[dict]) -> list[dict]:
    """The ``course_claim`` records of a notebook's outputs, in order."""
    return [o["metadata"]["course_claim"] for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
            if "course_claim" in o.get("metadata", {})]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_draws_its_findings_as_claims_that_hold_at_full_settings(notebook):
    claims = claims_of(json.loads(notebook.read_text())["cells"])
    assert claims, "every notebook states its findings with report.claim"
    unchecked = [c["statement"] for c in claims if not c["checked"]]
    assert not unchecked, f"committed from a quick run (execute at full settings: make run): {unchecked[:2]}"
    false = [c["statement"] for c in claims if not c["holds"]]
    assert not false, f"committed claims that do not hold: {false}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_answers_its_question_before_the_recap(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    headings = [line.lstrip("#").strip().lower() for c in cells if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines() if line.startswith("#")]
    headings = [re.sub(r"^[\d.]+\s*", "", h) for h in headings]  # "7. Answer" counts
    answer = next((i for i, h in enumerate(headings) if h.startswith("answer")), None)
    recap = next((i for i, h in enumerate(headings) if "recap" in h), None)
    assert answer is not None and recap is not None and answer < recap, "an 'Answer' section comes before the recap"


# A measured number looks like 0.57, 89.7 % or ≈ 0.16 s.  Markdown may still hold section, figure and
# equation numbers (never two decimals), settings written as "symbol relation value", and this short list.
MEASURED_NUMBER = re.compile(r"(?<![\w.±])(?:\d*\.\d{2,}|\d+\.\d+\s?%|≈\s?\d+(?:\.\d+)?\s?(?:ms|s|min)\b)")
SETTING = re.compile(r"(?:\b[pqατβγλεσ]|WS)\s*(?:<|>|=|≥|≤|∈\s*\{)\s*[\d.,\s]*$")
ALLOWED_NUMBERS = {
    "12.5 %": "chance accuracy with 8 classes (1/8)",
    "0.35": "SimCLR's smallest crop scale (a setting, SCIENCE.md §1)",
    "1.10": "log 3, the chance value of a 3-way NT-Xent in notebook 01's worked example",
    "0.654": "the thesis' Q-Score AUROC on ImageNet (quoted from the paper, not measured here)",
    "90.83": "the thesis' CIFAR-10 accuracy without Q-Score regularisation (quoted)",
    "92.31": "the thesis' CIFAR-10 accuracy with Q-Score regularisation (quoted)",
}


def measured_numbers_in_markdown(cells: list[dict]) -> list[str]:
    """Numbers in Markdown cells that look measured, with their context; run-time lines are exempt (every
    notebook states its measured times in its header and the course map, DESIGN.md)."""
    found = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if "run time" in line.lower() or re.search(r"\d\s?(?:s|min) / \d", line):
                continue
            for match in MEASURED_NUMBER.finditer(line):
                if match.group().strip() in ALLOWED_NUMBERS or SETTING.search(line[:match.start()]):
                    continue
                found.append(f"cell {index}: …{line[max(0, match.start() - 40):match.end() + 10]}…")
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_cells_quote_no_measured_numbers(notebook):
    """Measured results come from claims (or printed outputs), so a re-run cannot leave a stale number."""
    found = measured_numbers_in_markdown(json.loads(notebook.read_text())["cells"])
    assert not found, "measured numbers typed into Markdown (state them with report.claim):\n" + "\n".join(found)


def test_the_markdown_number_check_catches_a_typed_measurement_and_spares_settings():
    def cell(text):
        return {"cell_type": "markdown", "source": [text]}

    assert measured_numbers_in_markdown([cell("RELAX reaches 0.73 on the pointing game.")])
    assert measured_numbers_in_markdown([cell("The probe reaches 89.7 % here.")])
    assert measured_numbers_in_markdown([cell("Each image takes ≈ 0.16 s.")])
    assert not measured_numbers_in_markdown([cell("Significant when p < 0.05; FALCON keeps WS ≥ 0.08.")])
    assert not measured_numbers_in_markdown([cell("See eq. 4.1, Fig. 3.6 and §10; chance is 12.5 %.")])
    assert not measured_numbers_in_markdown([cell("**Run time** (2-core CPU): quick ≈ 1 min, full ≈ 5 min")])


# --------------------------------------------------------------------------
# Run times: the course map, each header and the committed run agree
# --------------------------------------------------------------------------

COURSE_MAP_ROW = re.compile(r"^\| \[`(\d\d_\w+)`\]\([^)]+\) \| [^|]+ \| ([^|/]+?) / ([^|(]+?)(?: \([^|]*\))? \|", re.M)
DURATION = re.compile(r"^(\d+(?:\.\d+)?) (s|min)$")


def seconds(duration: str) -> float:
    """'35 s' -> 35, '5.5 min' -> 330."""
    match = DURATION.match(duration)
    assert match, f"a run time is written 'N s' or 'N min', got {duration!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def course_map() -> dict[str, tuple[str, str]]:
    readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
    return {stem: (quick.strip(), full.strip()) for stem, quick, full in COURSE_MAP_ROW.findall(readme)}


def test_the_course_map_and_each_notebook_header_state_the_same_run_times():
    times = course_map()
    assert set(times) == {p.stem for p in NOTEBOOKS}, "every notebook has one row in the README's course map"
    for notebook in NOTEBOOKS:
        header = "".join(json.loads(notebook.read_text())["cells"][0]["source"])
        quick, full = times[notebook.stem]
        assert f"quick ≈ {quick}" in header and f"full ≈ {full}" in header, (
            f"{notebook.stem}: the header must say 'quick ≈ {quick}' and 'full ≈ {full}', as the course map does")


def test_the_stated_full_run_time_is_that_of_the_committed_run():
    """Each committed notebook prints its run time in its last cell; the header's full time may round it but
    not contradict it (within a factor of 1.5 either way: CPU load varies between runs)."""
    times = course_map()
    for notebook in NOTEBOOKS:
        last = json.loads(notebook.read_text())["cells"][-1]
        printed = re.search(r"notebook run time: (\d+) s", "".join("".join(o.get("text", "")) for o in last.get("outputs", [])))
        assert printed, f"{notebook.stem}: the last cell prints 'notebook run time: N s'"
        measured, stated = float(printed.group(1)), seconds(times[notebook.stem][1])
        assert stated / 1.5 <= measured <= stated * 1.5, f"{notebook.stem}: header says {stated:.0f} s, the run took {measured:.0f} s"
