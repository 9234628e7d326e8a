"""report.claim: readings are rendered, recorded in the output's metadata, and raise at full settings when
they do not hold (never in quick mode)."""

import numpy as np
import pytest
import torch

from course_utils import report


def test_a_claim_that_holds_is_shown_and_returned():
    result = report.claim("RELAX beats the random map.", True, quick=False, display=False)
    assert result.holds and result.checked
    assert result.metadata() == {"course_claim": {"statement": "RELAX beats the random map.", "holds": True,
                                                  "checked": True}}
    assert "RELAX beats the random map." in result.markdown()


def test_a_false_claim_raises_at_full_settings_and_names_it():
    with pytest.raises(report.ClaimFailed, match="the map moves onto the background"):
        report.claim("the map moves onto the background", False, quick=False, display=False)


def test_a_false_claim_in_quick_mode_is_marked_unchecked_and_does_not_raise():
    result = report.claim("ρ < 0", False, quick=True, display=False)
    assert not result.checked and not result.holds
    assert "not checked in quick mode" in result.markdown()


def test_claims_binds_the_notebooks_quick_parameter(monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "0")
    claim = report.claims(quick=True)  # papermill -p QUICK True with COURSE_QUICK unset
    assert not claim("x", False, display=False).checked


def test_holds_accepts_one_element_tensors_and_rejects_ambiguous_values():
    assert report.claim("t", torch.tensor(True), quick=False, display=False).holds
    assert report.claim("n", np.bool_(True), quick=False, display=False).holds
    with pytest.raises(ValueError, match="single truth value"):
        report.claim("many", torch.tensor([True, False]), quick=False, display=False)
    with pytest.raises(TypeError, match="must be a bool"):
        report.claim("a number is not a test", 0.7, quick=False, display=False)


def test_in_a_notebook_the_claim_is_rendered_markdown_with_its_metadata(monkeypatch):
    shown = []
    import IPython
    import IPython.display

    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj, metadata=None: shown.append((obj, metadata)))
    report.claim("P@1 is 0.92.", True, quick=False)
    (obj, metadata), = shown
    assert isinstance(obj, IPython.display.Markdown) and "P@1 is 0.92." in obj.data
    assert metadata["course_claim"]["holds"] is True


def test_a_cell_ending_with_a_claim_shows_it_once_not_again_as_its_value():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    try:
        with capture_output() as captured:
            shell.run_cell("from course_utils import report\nreport.claim('RELAX beats the random map.', True, "
                           "quick=False)")
        shown = [output for output in captured.outputs if "RELAX beats the random map." in str(output.data)]
        assert len(shown) == 1, f"the reading appears {len(shown)} times"
        assert "Claim(" not in captured.stdout, "the claim's value is printed after its reading"
    finally:
        InteractiveShell.clear_instance()
