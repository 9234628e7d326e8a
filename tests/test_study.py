"""The interpretability-vs-performance study: grid, cache, measurements and the closing figure."""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy.stats import spearmanr

from course_utils import study

TINY = study.StudySettings(n_train=300, n_test=200, n_explain=12, deletion_steps=4, relax_masks=30, falcon_probe=300,
                           tcav_classes=1, tcav_inputs=6, tcav_examples=12, tcav_random_sets=3)
TEST_GRID = [study.EncoderSpec("base", "base", checkpoint=study.BASE_CHECKPOINT),
             study.EncoderSpec("untrained", "untrained", epochs=0),
             study.EncoderSpec("not-trained-yet", "width", width=8)]


@pytest.fixture
def test_grid(monkeypatch, tmp_path):
    monkeypatch.setitem(study.GRIDS, "test", TEST_GRID)
    monkeypatch.setenv("COURSE_DATA_ROOT", str(tmp_path))  # grid folder and cache in a fresh place
    return "test"


def test_every_grid_encoder_is_committed_or_names_the_command_that_trains_it():
    for spec in study.GRIDS["cpu"]:
        path = study.checkpoint_path(spec, "cpu")
        assert path is None or path.is_file(), f"{spec.name}: {path} missing (python -m course_utils.study --train)"
    names = [spec.name for spec in study.GRIDS["gpu"]]
    assert len(names) == len(set(names))
    with pytest.raises(FileNotFoundError, match="--grid gpu --train"):
        study.load_encoder(study.GRIDS["gpu"][-1], "gpu")
    with pytest.raises(ValueError, match="unknown grid"):
        study.run_study("laptop")
    assert [spec.name for spec in study.select_encoders("cpu", ["r18-w16", "r10-w32"])] == ["r10-w32", "r18-w16"]
    with pytest.raises(ValueError, match="not in grid 'cpu': r50"):
        study.select_encoders("cpu", ["r50"])


def test_study_measures_trained_encoders_lists_missing_ones_and_reuses_its_cache(test_grid, monkeypatch):
    result = study.run_study(test_grid, TINY, progress=False)
    assert result.missing == ["not-trained-yet"]
    by_encoder = {name: [r for r in result.rows if r["encoder"] == name] for name in ("base", "untrained")}
    for rows in by_encoder.values():
        assert [r["explainer"] for r in rows] == study.SALIENCY_EXPLAINERS + ["FALCON", "TCAV"]
        for r in rows[:5]:
            assert 0 <= r["pointing game"] <= 1 and 0 <= r["mask IoU"] <= 1 and r["deletion AUC"] >= 0
    base_accuracy, untrained_accuracy = (rows[0]["probe accuracy"] for rows in by_encoder.values())
    assert base_accuracy > untrained_accuracy + 0.3  # measured: 0.8 vs 0.2 on 200 test images

    calls = []

    def measure(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("measured again")

    monkeypatch.setattr(study, "evaluate_encoder", measure)
    again = study.run_study(test_grid, TINY, progress=False)
    assert calls == [] and again.rows == result.rows  # both encoders came from the cache
    with pytest.raises(RuntimeError, match="measured again"):  # other settings miss the cache
        study.run_study(test_grid, dataclasses.replace(TINY, layer="layer2"), progress=False)
    assert len(calls) == 1


def test_spearman_matches_scipy_and_refuses_too_few_or_constant_values():
    x, y = [0.2, 0.5, 0.9, 0.7, 0.1], [1.0, 3.0, 2.0, 5.0, 0.0]
    assert study.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(study.spearman([0.1, 0.2], [1.0, 2.0]))
    assert np.isnan(study.spearman([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]))
    assert study.spearman([0.1, 0.2, None, 0.4], [1.0, 2.0, 5.0, 3.0]) == pytest.approx(1.0)  # None skipped


def test_tradeoff_figure_puts_each_explainers_signed_rank_correlation_in_its_cell():
    rows = []
    for k, accuracy in enumerate([0.3, 0.5, 0.7, 0.9]):
        for j, explainer in enumerate(study.SALIENCY_EXPLAINERS):
            rows.append({"encoder": f"e{k}", "factor": "width", "probe accuracy": accuracy, "explainer": explainer,
                         "pointing game": k / 4 if j == 0 else 1 - k / 4, "mask IoU": 0.1, "deletion AUC": 0.5})
        rows.append({"encoder": f"e{k}", "factor": "width", "probe accuracy": accuracy, "explainer": "FALCON",
                     "concept P@1": [0.5, 0.4, 0.9, 0.8][k], "features explained": 3})
        rows.append({"encoder": f"e{k}", "factor": "width", "probe accuracy": accuracy, "explainer": "TCAV",
                     "nuisance share": None})
    baselines = {"random map": {"pointing game": 0.1, "mask IoU": 0.05}, "centre prior": {"pointing game": 0.3,
                                                                                        "mask IoU": 0.1}}
    rows[1]["deletion AUC"] = 0.6  # the contrastive maps of e0 delete worst: deletion improves with accuracy
    fig, axes = study.tradeoff_figure(study.StudyResult(rows, baselines, TINY))
    correlations = np.ma.filled(axes[1, 2].images[0].get_array(), np.nan)
    assert axes.shape == (2, 3)
    assert correlations[0, 0] == pytest.approx(1.0) and correlations[1, 0] == pytest.approx(-1.0)
    assert np.isnan(correlations[0, 1])  # constant IoU: no correlation
    expected = spearmanr([0.3, 0.5, 0.7, 0.9], [0.6, 0.5, 0.5, 0.5]).statistic
    assert correlations[1, 2] == pytest.approx(-expected) and correlations[1, 2] > 0  # lower is better: sign flipped
    assert correlations[5, 0] == pytest.approx(spearmanr([0.3, 0.5, 0.7, 0.9], [0.5, 0.4, 0.9, 0.8]).statistic)
    assert np.isnan(correlations[6, 0])  # TCAV not measured
    plt.close(fig)


def test_the_committed_study_results_are_those_of_the_committed_encoders_at_full_settings():
    expected = {study.result_file(spec, "cpu", study.FULL) for spec in study.GRIDS["cpu"]}
    committed = {path.name for path in study.committed_results_dir().glob("*.json")}
    assert committed == expected, ("data/study is stale (an encoder, the settings or the version changed): "
                                   "rerun `python -m course_utils.study --commit` and delete the old files")
