import json

import torch

from course_utils import bench
from course_utils.runtime import process_memory


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


def test_the_table_shows_peak_memory_where_measured_and_a_dash_elsewhere():
    rows = [bench.BenchRow("old row", "w", "items/s", 2000.0, 1000.0, ">= 2x"),
            bench.BenchRow("new row", "w", "items/s", 5.25, 2.5, "faster", 1.5e9, 64e6)]
    table = bench.format_table(rows).splitlines()
    assert table[0].endswith("| peak memory (course / naive) |")
    assert table[2] == "| old row | w | 2,000 items/s | 1,000 items/s | 2.0x | >= 2x | — |"
    assert table[3] == "| new row | w | 5.2 items/s | 2.5 items/s | 2.1x | faster | 1.5 GB / 64 MB |"
    assert bench.format_bytes(None) == "—" and bench.format_bytes(2048) == "2 kB" and bench.format_bytes(12) == "12 B"


def test_peak_memory_sees_an_allocation_on_linux():
    import sys

    device = torch.device("cpu")
    with bench.PeakMemory(device) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if sys.platform.startswith("linux"):
        assert peak.bytes is not None and peak.bytes >= 0.9 * 64 * 2**20
    else:
        assert peak.bytes is None or peak.bytes >= 0


def test_bench_measures_the_explainers_at_224_px_with_their_peak_memory(tmp_path):
    rows = bench.main(["--quick", "--only", "224", "--json", str(tmp_path / "bench.json")])
    assert [r.name for r in rows] == [
        "Grad-CAM at 224 px (batched vs one image at a time)",
        "RELAX at 224 px (vs plain batched forwards)",
        "RELAX at 224 px (vs one forward per mask)",
        "Conditional occlusion at 224 px (batched vs one forward per patch)",
    ]
    assert all(r.course > 0 and r.naive > 0 and "ResNet-50 (random weights), 224 px" in r.workload for r in rows)
    assert rows[1].course == rows[2].course  # one RELAX measurement against two naive pipelines
    if process_memory("VmRSS") is not None:  # Linux: the batched runs hold more than one image's activations
        assert all(r.peak_memory is not None and r.peak_memory > 10e6 for r in rows)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"][0]["peak_memory"] == rows[0].peak_memory
