"""Packaging: the two install paths (make setup, Binder) agree; CI and README use the same commands."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirements(path: Path) -> dict[str, str]:
    """package name -> version specifier (spaces removed), options and comments skipped."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].replace(" ", "")
        if not line or line.startswith("-"):
            continue
        name, specifier = re.match(r"([A-Za-z0-9_.\-]+)(.*)", line).groups()
        found[name.lower().replace("_", "-")] = specifier
    return found


def test_binder_and_top_level_requirements_list_the_same_packages_and_versions():
    top = requirements(ROOT / "requirements.txt")
    binder = requirements(ROOT / "binder" / "requirements.txt")
    assert top.keys() == binder.keys(), (f"only in requirements.txt: {top.keys() - binder.keys()}; "
                                         f"only in binder: {binder.keys() - top.keys()}")
    differ = {name: (top[name], binder[name]) for name in top if top[name] != binder[name]}
    assert not differ, f"version ranges differ (requirements.txt, binder): {differ}"
    for must in ("torch", "torchvision", "jupyterlab", "ipywidgets", "captum", "papermill", "nbval"):
        assert must in top


def test_binder_installs_the_package_and_pins_python():
    post_build = ROOT / "binder" / "postBuild"
    assert "pip install" in post_build.read_text()
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable (chmod +x; git keeps the mode)"
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
