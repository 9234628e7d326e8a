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


# layering (DESIGN.md "Package map"): the face (notebook-facing figures, widgets, the study and the command-line
# tools) sits on top; the explainers, metrics and models below it never reach up; the input guard and the image
# operations sit at the bottom and import nothing from the package.
FACE = {"widgets", "plots", "study", "bench", "student", "report"}
TOOLS = {"bench", "study"}  # run as commands or by notebook 08 only: nothing else imports them
BOTTOM = {"inputs", "imageops"}


def _package_imports() -> dict[str, set[str]]:
    """Every module of course_utils (dotted, without the "course_utils." prefix) -> the course_utils modules it
    imports anywhere in its source (top level or inside functions), relative imports resolved."""
    import ast

    package = ROOT / "course_utils"
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        here = ["course_utils", *parts[:-1]]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
                base = base.rstrip(".")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            imported |= {t.removeprefix("course_utils.") for t in targets
                         if t == "course_utils" or t.startswith("course_utils.")}
        found[name] = imported
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_layering_nothing_below_the_face_imports_plots_or_widgets():
    imports = _package_imports()
    assert {"metrics", "imageops", "inputs", "explain.relax", "widgets"} <= imports.keys()
    reaching_up = {name: sorted(m for m in found if _top(m) in {"plots", "widgets"})
                   for name, found in imports.items() if _top(name) not in FACE}
    assert not {k: v for k, v in reaching_up.items() if v}, reaching_up


def test_layering_nothing_imports_the_bench_or_the_study():
    imports = _package_imports()
    users = {name: sorted(m for m in found if _top(m) in TOOLS)
             for name, found in imports.items() if _top(name) not in TOOLS and name != "__main__"}
    assert not {k: v for k, v in users.items() if v}, users


def test_layering_the_input_guard_and_image_operations_import_nothing_from_the_package():
    imports = _package_imports()
    assert imports["metrics"] >= {"imageops", "inputs"} and "imageops" in imports["explain.pairs"]  # parser works
    for name in BOTTOM:
        assert not imports[name], f"{name} imports {sorted(imports[name])} from course_utils"
