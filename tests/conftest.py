import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture
def isolated_data_root(tmp_path_factory, monkeypatch):
    """An empty COURSE_DATA_ROOT and no Debian Fashion-MNIST folder (outside the test's tmp_path), so a
    test never reads the real data.  Not autouse: a module opts in with
    ``pytestmark = pytest.mark.usefixtures("isolated_data_root")``; returns the empty root."""
    from course_utils.data import datasets

    empty = tmp_path_factory.mktemp("empty_data_root")
    monkeypatch.setenv("COURSE_DATA_ROOT", str(empty))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", empty / "no_debian_package")
    return empty
