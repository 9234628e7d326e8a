import matplotlib

matplotlib.use("Agg")

NOTEBOOK_TIMES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_TIMES:
        terminalreporter.section("notebook run times (quick mode, papermill)")
        for name, seconds in NOTEBOOK_TIMES.items():
            terminalreporter.write_line(f"{name:<40} {seconds:6.1f} s")
