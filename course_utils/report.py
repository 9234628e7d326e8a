"""Claims are code: the readings a notebook draws from its own outputs.

A notebook never types a measured number or a finding into Markdown.  It states it with ``claim``::

    claim = report.claims(quick=QUICK)     # once, after the parameters cell
    claim(f"RELAX beats Grad-CAM on the pointing game by {gap} on the test split.", gap.above(0))

* ``statement`` is an f-string of computed values; it is shown as a rendered Markdown *reading* and
  recorded in the output's metadata as ``{"course_claim": {"statement": ..., "holds": ..., "checked": ...}}``
  (``tests/test_notebooks.py`` reads them back from the committed notebooks).
* ``holds`` is the test of the finding (with the margin or interval it needs).  At full settings a claim
  that does not hold raises ``ClaimFailed`` naming it, so ``make run`` stops instead of committing a false
  sentence; in quick mode (tiny sizes, where findings need not hold) it is shown as "not checked in quick
  mode" and never raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from course_utils.runtime import quick_mode

METADATA_KEY = "course_claim"


class ClaimFailed(AssertionError):
    """A claim that a full-settings run contradicts: fix the text (or the code), never the check."""


@dataclass(frozen=True)
class Claim:
    """One reading: its sentence, whether its test held, and whether it was checked (full settings)."""

    statement: str
    holds: bool
    checked: bool
    shown: bool = field(default=False, compare=False, repr=False)  # displayed once already by ``claim``

    def markdown(self) -> str:
        if not self.checked:
            return f"**Reading** *(not checked in quick mode)*: {self.statement}"
        return f"**Reading** ✔: {self.statement}"

    def metadata(self) -> dict:
        return {METADATA_KEY: {"statement": self.statement, "holds": self.holds, "checked": self.checked}}

    def _ipython_display_(self) -> None:
        """A cell ending in ``claim(...)`` shows the reading once: ``claim`` displayed it already."""
        if not self.shown:
            _show(self)


def _as_bool(holds: object) -> bool:
    """``holds`` as a Python bool; a tensor or array must have exactly one element."""
    if isinstance(holds, (torch.Tensor, np.ndarray)):
        if (holds.numel() if isinstance(holds, torch.Tensor) else holds.size) != 1:
            raise ValueError(f"a claim's `holds` must be a single truth value, got shape {tuple(holds.shape)}")
        return bool(holds.item())
    if not isinstance(holds, (bool, np.bool_)):
        raise TypeError(f"a claim's `holds` must be a bool (the test of the finding), got {type(holds).__name__}")
    return bool(holds)


def claim(statement: str, holds: object, quick: bool | None = None, display: bool = True) -> Claim:
    """Show ``statement`` as a reading and record whether ``holds``; raise at full settings when it does not.

    Args:
        statement: the sentence, an f-string of computed values (Markdown allowed).
        holds: the finding's test, e.g. ``gap.above(0)`` or ``rho.p < 0.05`` (a bool or one-element tensor).
        quick: whether this is a quick-mode run (None: ``runtime.quick_mode()``); pass the notebook's
            ``QUICK`` parameter so that ``papermill -p QUICK True`` counts as quick too.
        display: show it (in a notebook: rendered Markdown with the claim in the output's metadata;
            elsewhere: printed).

    Raises:
        ClaimFailed: at full settings, when ``holds`` is false.
    """
    if not isinstance(statement, str) or not statement.strip():
        raise ValueError("a claim needs a non-empty statement")
    quick = quick_mode() if quick is None else bool(quick)
    result = Claim(statement.strip(), _as_bool(holds), checked=not quick, shown=display)
    if display:
        _show(result)
    if result.checked and not result.holds:
        raise ClaimFailed(f"this claim does not hold at full settings: {result.statement!r}. A re-run changed "
                          "the result: rewrite the sentence (and its test) to say what the outputs now show.")
    return result


def claims(quick: bool | None = None) -> Callable[..., Claim]:
    """``claim`` with the notebook's ``QUICK`` bound: ``claim = report.claims(quick=QUICK)``."""
    return partial(claim, quick=quick)


def _show(result: Claim) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython is a course requirement
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(result.markdown()), metadata=result.metadata())
    else:
        print(result.markdown())
