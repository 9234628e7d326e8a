"""Student versions of the course notebooks: ``python -m course_utils.student`` (``make student``).

Every code cell tagged ``solution`` becomes a stub that raises ``NotImplementedError`` with a hint (the
``# TODO`` line of the exercise cell before it), and the "*Solution notes:*" paragraphs of the Markdown
cells are removed; everything else — prose, figures, the exercise cells — stays.  Students work in the
exercise cell and delete the stub when they are done.  The output goes to ``notebooks/student/`` (not
committed; regenerate it after editing a notebook).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
SOLUTION_TAG = "solution"
_NOTES = re.compile(r"^\*Solution notes:\*.*?(?:\n\s*\n|\Z)", re.DOTALL | re.MULTILINE)


def _hint(cells: list, index: int) -> str:
    """The ``# TODO`` line of the nearest code cell before ``index``, or a generic hint."""
    for cell in reversed(cells[:index]):
        if cell.cell_type == "code" and SOLUTION_TAG not in cell.metadata.get("tags", []):
            todo = [line.lstrip("# ").strip() for line in cell.source.splitlines() if line.lstrip().startswith("# TODO")]
            if todo:
                return todo[0].removeprefix("TODO:").strip()
            break
    return "see the exercise text above"


def student_notebook(notebook: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """A copy of ``notebook`` with its solutions replaced by stubs; returns (copy, number of stubs)."""
    student = nbformat.from_dict(notebook)
    stubs = 0
    for index, cell in enumerate(student.cells):
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and SOLUTION_TAG in tags:
            hint = _hint(student.cells, index).replace('"', "'")
            cell.source = ("# Solution removed: write yours in the exercise cell above, then delete this cell.\n"
                           f'raise NotImplementedError("Exercise not solved yet. Hint: {hint}")')
            cell.outputs = []
            cell.execution_count = None
            cell.metadata["tags"] = [t for t in tags if t != SOLUTION_TAG] + ["stub"]
            stubs += 1
        elif cell.cell_type == "markdown":
            cell.source = _NOTES.sub("", cell.source).rstrip()
    student.cells = [c for c in student.cells if c.cell_type != "markdown" or c.source.strip()]
    return student, stubs


def make_student_notebooks(source: Path = NOTEBOOK_DIR, target: Path | None = None) -> dict[str, int]:
    """Write the student version of every ``NN_*.ipynb`` in ``source`` to ``target`` (default
    ``source/student``); returns notebook name -> number of stubs."""
    target = source / "student" if target is None else target
    notebooks = sorted(source.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no course notebooks (NN_*.ipynb) in {source}")
    target.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in notebooks:
        student, stubs = student_notebook(nbformat.read(path, as_version=4))
        nbformat.validate(student)
        nbformat.write(student, target / path.name)
        counts[path.name] = stubs
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=NOTEBOOK_DIR, help="folder of the course notebooks")
    parser.add_argument("--target", type=Path, help="output folder (default <source>/student)")
    args = parser.parse_args(argv)
    counts = make_student_notebooks(args.source, args.target)
    for name, stubs in counts.items():
        print(f"{name}: {stubs} solution(s) replaced by stubs")
    return counts


if __name__ == "__main__":
    main()
