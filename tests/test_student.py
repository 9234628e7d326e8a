"""`make student`: exercise versions of every notebook, with no solution left."""

import json

import nbformat
import pytest

from course_utils.student import NOTEBOOK_DIR, SOLUTION_TAG, make_student_notebooks, student_notebook


def test_every_student_notebook_is_valid_and_has_no_solution_left(tmp_path):
    counts = make_student_notebooks(NOTEBOOK_DIR, tmp_path)
    sources = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert sorted(counts) == [p.name for p in sources]
    for source in sources:
        original = json.loads(source.read_text())["cells"]
        solutions = [c for c in original if SOLUTION_TAG in c.get("metadata", {}).get("tags", [])]
        student = nbformat.read(tmp_path / source.name, as_version=4)
        nbformat.validate(student)
        assert counts[source.name] == len(solutions) > 0
        assert not any(SOLUTION_TAG in c.metadata.get("tags", []) for c in student.cells)
        stubs = [c for c in student.cells if "stub" in c.metadata.get("tags", [])]
        assert len(stubs) == len(solutions)
        assert all("raise NotImplementedError" in c.source and not c.outputs for c in stubs)
        text = "\n".join(c.source for c in student.cells)
        assert "*Solution notes:*" not in text
        for solution in solutions:  # no solution code survives anywhere
            body = "".join(solution["source"]).strip()
            assert body not in text


def test_a_stub_carries_the_todo_hint_and_the_exercise_text_survives():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("**Exercise 1 — add.** Add two numbers."),
        nbformat.v4.new_code_cell("# TODO: return a + b"),
        nbformat.v4.new_code_cell("print(1 + 2)", metadata={"tags": [SOLUTION_TAG]}),
        nbformat.v4.new_markdown_cell("*Solution notes:* addition is easy.\n\n**Exercise 2 — more.** Keep this."),
    ])
    student, stubs = student_notebook(notebook)
    assert stubs == 1
    assert 'NotImplementedError("Exercise not solved yet. Hint: return a + b")' in student.cells[2].source
    assert student.cells[3].source == "**Exercise 2 — more.** Keep this."
    assert notebook.cells[2].source == "print(1 + 2)"  # the original is untouched
    with pytest.raises(NotImplementedError, match="a \\+ b"):
        exec(student.cells[2].source)


def test_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no course notebooks"):
        make_student_notebooks(tmp_path, tmp_path / "out")
