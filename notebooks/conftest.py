"""pytest settings of the nbval run (`make test`): every notebook executed once, in quick mode.

Prints the run time of each notebook (the sum of its cells) at the end, the figures the notebooks'
headers quote as "quick".
"""

from collections import defaultdict
from pathlib import Path

_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = Path(report.nodeid.split("::")[0])
    if path.suffix == ".ipynb":
        _SECONDS[path.stem] += report.duration


def pytest_terminal_summary(terminalreporter):
    if _SECONDS:
        terminalreporter.section("notebook run times (quick mode, nbval)")
        for name, seconds in sorted(_SECONDS.items()):
            terminalreporter.write_line(f"{name:<40} {seconds:6.1f} s")
