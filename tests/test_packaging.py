"""Packaging: the two install paths (make setup, Binder) agree; CI and README use the same commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        names.add(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_binder_and_top_level_requirements_list_the_same_packages():
    top = requirement_names(ROOT / "requirements.txt")
    binder = requirement_names(ROOT / "binder" / "requirements.txt")
    assert top == binder, f"only in requirements.txt: {top - binder}; only in binder: {binder - top}"
    for must in ("torch", "torchvision", "jupyterlab", "ipywidgets", "captum", "papermill", "nbval"):
        assert must in top


def test_binder_installs_the_package_and_pins_python():
    assert "pip install" in (ROOT / "binder" / "postBuild").read_text()
    assert (ROOT / "binder" / "runtime.txt").read_text().startswith("python-3.11")


def test_requirements_cap_torch_at_the_tested_release():
    text = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch[^\n]*<=2\.14\.1", text, re.M)


def test_ci_runs_make_test_and_readme_gives_the_two_commands():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup:", "run:", "test:", "lab:", "bench:", "clean:"):
        assert f"\n{target}" in makefile
