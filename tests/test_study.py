"""The interpretability-vs-performance study: grid, cache, measurements and the closing figure."""

import dataclasses
import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from course_utils import study

TINY = study.StudySettings(n_train=300, n_test=200, n_explain=12, deletion_steps=4, relax_masks=30, falcon_probe=300,
                           tcav_classes=1, tcav_inputs=6, tcav_examples=12, tcav_random_sets=3)
TINY_PROTOPNET = study.ProtoPNetSettings(warm_epochs=1, last_layer_epochs=1)
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
    result = study.run_study(test_grid, TINY, progress=False, protopnet=TINY_PROTOPNET)
    assert result.missing == ["not-trained-yet"]
    by_encoder = {name: [r for r in result.rows if r["encoder"] == name] for name in ("base", "untrained")}
    for rows in by_encoder.values():
        assert [r["explainer"] for r in rows] == study.SALIENCY_EXPLAINERS + ["FALCON", "TCAV", study.PROTOPNET]
        for r in rows[:5]:
            assert r["deletion AUC"] >= 0
    base_accuracy, untrained_accuracy = (rows[0]["probe accuracy"] for rows in by_encoder.values())
    assert base_accuracy > untrained_accuracy + 0.3  # measured: 0.8 vs 0.2 on 200 test images
    for name in ("base", "untrained"):  # per-image values, for paired intervals: their mean is the row's value
        for r in by_encoder[name][:5]:
            hits = result.values(name, r["explainer"], "pointing game")
            assert hits.shape == (TINY.n_explain,) and hits.mean() == pytest.approx(r["pointing game"], abs=1e-6)
    assert result.values("centre prior", "baseline", "pointing game").mean() == pytest.approx(
        result.baselines["centre prior"]["pointing game"])
    assert len(result.tcav_pairs["base"]) == TINY.tcav_classes * len(study.NUISANCE_CONCEPTS)
    assert by_encoder["base"][-2]["nuisance share"] == pytest.approx(
        np.mean([pair["significant"] for pair in result.tcav_pairs["base"]]))
    # the RELAX row is the pointing game and mask IoU of RELAX maps, recomputed here by hand from the definitions
    # (argmax within pg_tolerance px of the object; IoU of the mask-sized top of the map with the mask)
    from course_utils.explain.relax import relax_batch

    base = study.load_encoder(TEST_GRID[0], test_grid)
    test_world = study._test_world(TINY)
    images = test_world.images[:TINY.n_explain].float() / 255
    maps = relax_batch(base.encoder, images, TINY.relax_masks, normalize=True, progress=False,
                       generator=torch.Generator().manual_seed(TINY.seed)).importance
    hits, ious = [], []
    for saliency, mask in zip(maps, test_world.masks[:TINY.n_explain]):
        y, x = divmod(int(saliency.argmax()), saliency.shape[1])
        inside = mask.nonzero().float()
        hits.append(float(((inside - torch.tensor([y, x])).norm(dim=1) <= TINY.pg_tolerance).any()))
        top = torch.zeros(mask.numel(), dtype=torch.bool)
        top[saliency.flatten().topk(int(mask.sum())).indices] = True
        ious.append(float((top & mask.flatten()).sum() / (top | mask.flatten()).sum()))
    np.testing.assert_allclose(result.values("base", "RELAX", "pointing game"), hits, atol=1e-6)
    np.testing.assert_allclose(result.values("base", "RELAX", "mask IoU"), ious, atol=1e-5)
    assert 0 < np.mean(hits) < 1  # not a degenerate case in which any map would agree
    # the cheap Grad-CAM-only measurement (notebook 08's layer exercise) reproduces the study's maps
    cheap = study.gradcam_pointing(study.load_encoder(TEST_GRID[0], test_grid), TINY)
    for name, hits in cheap.items():
        np.testing.assert_allclose(hits, result.values("base", name, "pointing game"), atol=1e-6)

    # the ProtoPNet row: its own accuracy and map scores are the means of its per-image values, paired with
    # the probe's correctness on the same test images
    for name, rows in by_encoder.items():
        proto, correct = rows[-1], result.correct[name]
        assert len(correct["ProtoPNet"]) == len(correct["linear probe"]) == TINY.n_test
        assert proto["model accuracy"] == pytest.approx(np.mean(correct["ProtoPNet"]))
        assert np.mean(correct["linear probe"]) == pytest.approx(proto["probe accuracy"], abs=0.02)
        for metric in ("pointing game", "mask IoU", "deletion AUC"):
            assert result.values(name, study.PROTOPNET, metric).mean() == pytest.approx(proto[metric], abs=1e-6)

    calls = []

    def measure(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("measured again")

    monkeypatch.setattr(study, "evaluate_encoder", measure)
    monkeypatch.setattr(study, "evaluate_protopnet", measure)
    again = study.run_study(test_grid, TINY, progress=False, protopnet=TINY_PROTOPNET)
    assert calls == [] and again.rows == result.rows  # both encoders came from the cache
    with pytest.raises(RuntimeError, match="measured again"):  # other settings miss the cache
        study.run_study(test_grid, dataclasses.replace(TINY, layer="layer2"), progress=False)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="measured again"):  # other ProtoPNet settings miss its cache only
        study.run_study(test_grid, TINY, progress=False, protopnet=dataclasses.replace(TINY_PROTOPNET, warm_epochs=2))
    assert len(calls) == 2


def test_spearman_is_the_exact_permutation_test_and_skips_unmeasured_or_constant_values():
    x, y = [0.2, 0.5, 0.9, 0.7, 0.1], [1.0, 3.0, 2.0, 5.0, 0.0]
    test = study.spearman(x, y)
    assert test.rho == pytest.approx(spearmanr(x, y).statistic) and test.n == 5 and test.exact
    # exact two-sided p: the share of the 5! pairings whose |ρ| reaches the observed one
    orderings = list(itertools.permutations(range(5)))
    at_least = sum(abs(spearmanr(x, [y[i] for i in order]).statistic) >= abs(test.rho) - 1e-12 for order in orderings)
    assert test.p == pytest.approx(at_least / len(orderings))
    # a perfect ranking of five encoders: only the identity and the reversal reach |ρ| = 1, p = 2/120 (not 0)
    perfect = study.spearman([0.1, 0.2, 0.3, 0.4, 0.5], [3.0, 4.0, 5.0, 6.0, 7.0])
    assert perfect.rho == pytest.approx(1.0) and perfect.p == pytest.approx(2 / 120)
    # the p-value is two-sided: reversing one side flips ρ and keeps p
    flipped = study.spearman(x, [-v for v in y])
    assert flipped.rho == pytest.approx(-test.rho) and flipped.p == pytest.approx(test.p)
    assert study.spearman([0.1, 0.2, None, 0.4], [1.0, 2.0, 5.0, 3.0]).n == 3  # None skipped
    assert study.spearman([0.1, 0.2, float("nan"), 0.4], [1.0, 2.0, 5.0, 3.0]).rho == pytest.approx(1.0)
    assert study.spearman([0.1, 0.2], [1.0, 2.0]) is None
    assert study.spearman([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]) is None


def _rows(encoder, factor, accuracy, pointing, falcon=0.5, nuisance=None, iou=0.1, deletion=0.5):
    rows = [{"encoder": encoder, "factor": factor, "probe accuracy": accuracy, "explainer": explainer,
             "pointing game": pointing[j], "mask IoU": iou, "deletion AUC": deletion}
            for j, explainer in enumerate(study.SALIENCY_EXPLAINERS)]
    rows.append({"encoder": encoder, "factor": factor, "probe accuracy": accuracy, "explainer": "FALCON",
                 "concept P@1": falcon, "features explained": 3})
    rows.append({"encoder": encoder, "factor": factor, "probe accuracy": accuracy, "explainer": "TCAV",
                 "nuisance share": nuisance})
    rows.append({"encoder": encoder, "factor": factor, "probe accuracy": accuracy, "explainer": study.PROTOPNET,
                 "pointing game": pointing[0] / 2, "mask IoU": iou, "deletion AUC": deletion,
                 "model accuracy": accuracy - 0.05})
    return rows


BASELINES = {"random map": {"pointing game": 0.1, "mask IoU": 0.05}, "centre prior": {"pointing game": 0.3,
                                                                                    "mask IoU": 0.1}}


def test_tradeoff_figure_puts_each_explainers_signed_rank_correlation_and_its_p_value_in_its_cell():
    rows = []
    for k, accuracy in enumerate([0.3, 0.5, 0.7, 0.9]):
        rows += _rows(f"e{k}", "width", accuracy, [k / 4] + [1 - k / 4] * 4, falcon=[0.5, 0.4, 0.9, 0.8][k])
    rows[1]["deletion AUC"] = 0.6  # the contrastive maps of e0 delete worst: deletion improves with accuracy
    fig, axes = study.tradeoff_figure(study.StudyResult(rows, BASELINES, TINY))
    correlations = np.ma.filled(axes[1, 2].images[0].get_array(), np.nan)
    assert axes.shape == (2, 3)
    assert correlations[0, 0] == pytest.approx(1.0) and correlations[1, 0] == pytest.approx(-1.0)
    assert np.isnan(correlations[0, 1])  # constant IoU: no correlation
    expected = spearmanr([0.3, 0.5, 0.7, 0.9], [0.6, 0.5, 0.5, 0.5]).statistic
    assert correlations[1, 2] == pytest.approx(-expected) and correlations[1, 2] > 0  # lower is better: sign flipped
    assert correlations[5, 0] == pytest.approx(spearmanr([0.3, 0.5, 0.7, 0.9], [0.5, 0.4, 0.9, 0.8]).statistic)
    assert np.isnan(correlations[6, 0])  # TCAV not measured
    texts = [t.get_text() for t in axes[1, 2].texts]
    # a perfect ranking of 4 encoders: p = 2/24 (exact), which is NOT below 0.05, so not bold
    assert "+1.00\np = 0.08" in texts and "4 encoders" in axes[1, 2].get_title()
    cell = next(t for t in axes[1, 2].texts if t.get_text().startswith("+1.00"))
    assert cell.get_fontweight() == "normal"
    # each encoder's ProtoPNet sits at its own accuracy (0.05 below its probe's), linked to its encoder's probe
    points = np.concatenate([c.get_offsets() for c in axes[0, 0].collections])
    for k, accuracy in enumerate([0.3, 0.5, 0.7, 0.9]):
        assert any(np.allclose(point, [accuracy - 0.05, k / 8]) for point in points)
    links = {tuple(np.round(line.get_xydata().flatten(), 6)) for line in axes[0, 0].lines}
    for k, accuracy in enumerate([0.3, 0.5, 0.7, 0.9]):
        assert (round(accuracy, 6), k / 8, round(accuracy - 0.05, 6), k / 8) in links
    plt.close(fig)


def test_improvement_correlations_count_the_base_recipe_once_with_its_seed_mean():
    rows = (_rows("base", "base", 0.80, [0.5] * 5) + _rows("base-s1", "seed", 0.84, [0.7] * 5)
            + _rows("base-s2", "seed", 0.86, [0.9] * 5))
    for k, (accuracy, pointing) in enumerate([(0.5, 0.2), (0.6, 0.3), (0.7, 0.4), (0.9, 0.8), (0.95, 0.9)]):
        rows += _rows(f"e{k}", "width", accuracy, [pointing] * 5)
    result = study.StudyResult(rows, BASELINES, TINY)
    assert study.seed_encoders(result) == ["base", "base-s1", "base-s2"]
    mean = study.improvement_correlations(result).tests[("RELAX", "pointing game")]
    # six recipes: the base at its seed mean (0.833, 0.7) ranks 4th on both axes -> a perfect ranking
    assert mean.n == 6 and mean.rho == pytest.approx(1.0) and mean.p == pytest.approx(2 / 720)
    separate = study.improvement_correlations(result, seeds="keep").tests[("RELAX", "pointing game")]
    assert separate.n == 8 and separate.rho < 1  # the repeats would count as three encoders
    excluded = study.improvement_correlations(result, seeds="exclude").tests[("RELAX", "pointing game")]
    assert excluded.n == 6 and excluded.rho == pytest.approx(1.0)
    assert study.improvement_correlations(result).significant() == [
        (e, "pointing game") for e in study.SALIENCY_EXPLAINERS]
    with pytest.raises(ValueError, match="seeds must be"):
        study.recipes(result, seeds="median")


def test_a_factor_effect_counts_only_where_it_exceeds_the_seed_spread():
    rows = (_rows("base", "base", 0.80, [0.5] * 5, falcon=0.9) + _rows("base-s1", "seed", 0.84, [0.6] * 5, falcon=0.8)
            + _rows("base-s2", "seed", 0.82, [0.45] * 5, falcon=0.9)
            + _rows("narrow", "width", 0.70, [0.58, 0.9, 0.3, 0.5, 0.5], falcon=0.6))
    result = study.StudyResult(rows, BASELINES, TINY)
    spread = study.seed_spread(result)
    assert spread["probe accuracy"] == pytest.approx(0.04) and spread["PG RELAX"] == pytest.approx(0.15)
    assert spread["FALCON P@1"] == pytest.approx(0.1) and np.isnan(spread["TCAV nuisance share"])
    deltas, exceeds = study.factor_effects(result, {"narrow": "base", "missing": "base"})
    assert list(deltas.index) == ["base → narrow"]
    assert deltas.loc["base → narrow", "Δ probe accuracy"] == pytest.approx(-0.10)
    assert exceeds.loc["base → narrow"].to_dict() == {
        "Δ probe accuracy": True, "Δ PG Grad-CAM (probe class)": False, "Δ PG Grad-CAM (contrastive)": True,
        "Δ PG Grad-CAM (top feature)": True, "Δ PG RELAX": False, "Δ PG AGF (probe class)": False,
        "Δ FALCON P@1": True, "Δ TCAV nuisance share": False, "Δ ProtoPNet accuracy": True, "Δ PG ProtoPNet": False}
    one_seed = study.StudyResult([r for r in rows if r["factor"] != "seed"], BASELINES, TINY)
    assert study.seed_spread(one_seed).isna().all()  # one seed: no spread, no effect counts


def test_the_committed_study_results_are_those_of_the_committed_encoders_at_full_settings():
    expected = set(study.measurement_files("cpu", study.FULL))
    committed = {path.name for path in study.committed_results_dir().glob("*.json")}
    assert committed == expected, ("data/study is stale (an encoder, the settings or the version changed): "
                                   "rerun `python -m course_utils.study --commit` and delete the old files")


def test_the_readme_table_of_the_study_is_generated_from_the_committed_measurements():
    """The README quotes the study's numbers: they must be those of data/study (regenerate the table with
    `python -m course_utils.study --markdown` after `--commit`)."""
    files = [study.committed_results_dir() / name for name in study.measurement_files("cpu", study.FULL)]
    if not all(f.is_file() for f in files):
        pytest.fail("data/study is stale: see the test of the committed study results")
    result = study.run_study("cpu", study.FULL, torch.device("cpu"), progress=False)
    table = study.markdown_table(result)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme, "README's study table differs from data/study:\n" + table
