import json

from course_utils import bench


def test_bench_reports_a_ratio_against_the_naive_pipeline(tmp_path, capsys):
    rows = bench.main(["--quick", "--only", "shapes", "--json", str(tmp_path / "bench.json")])
    assert [r.name for r in rows] == ["ShapesWorld generation"]
    assert rows[0].course > 0 and rows[0].naive > 0 and rows[0].ratio == rows[0].course / rows[0].naive
    out = capsys.readouterr().out
    assert "| ShapesWorld generation |" in out and "ratio" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved[0]["ratio"] == rows[0].ratio
