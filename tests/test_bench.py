import json

from course_utils import bench


def test_bench_reports_a_ratio_against_the_naive_pipeline(tmp_path, capsys):
    rows = bench.main(["--quick", "--only", "shapes", "--json", str(tmp_path / "bench.json")])
    assert [r.name for r in rows] == ["ShapesWorld generation"]
    assert rows[0].course > 0 and rows[0].naive > 0 and rows[0].ratio == rows[0].course / rows[0].naive
    out = capsys.readouterr().out
    assert "| ShapesWorld generation |" in out and "ratio" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"][0]["ratio"] == rows[0].ratio and saved["quick"]


def test_bench_measures_augmentation_and_training_against_the_tutorial_pipeline(tmp_path):
    rows = bench.main(["--quick", "--only", "augment", "training", "--json", str(tmp_path / "bench.json")])
    names = [r.name for r in rows]
    assert names == ["SimCLR augmentation", "SimCLR training (course vs tutorial)",
                     "SimCLR training (bf16+channels_last vs fp32)"]
    assert all(r.course > 0 and r.naive > 0 for r in rows)


def test_bench_measures_relax_against_plain_forwards_and_a_per_mask_loop(tmp_path):
    rows = bench.main(["--quick", "--only", "relax", "--json", str(tmp_path / "bench.json")])
    assert [r.name for r in rows] == ["RELAX (vs plain batched forwards)", "RELAX (vs one forward per mask)"]
    assert all(r.course > 0 and r.naive > 0 for r in rows)
    assert rows[0].course == rows[1].course  # one RELAX measurement against two naive pipelines


def test_bench_times_qscore_against_a_per_sample_loop(tmp_path):
    rows = bench.main(["--quick", "--only", "qscore", "--json", str(tmp_path / "bench.json")])
    assert [r.name for r in rows] == ["Q-Score"] and rows[0].course > rows[0].naive > 0


def test_bench_measures_batched_occlusion_against_a_per_patch_loop(tmp_path):
    rows = bench.main(["--quick", "--only", "occlusion", "--json", str(tmp_path / "bench.json")])
    assert [r.name for r in rows] == ["Conditional occlusion of a pair"]
    assert rows[0].course > rows[0].naive > 0  # about 3.5x on the reference CPU
