"""The explorer callbacks, run headless."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from course_utils.data.shapes import ShapesWorld
from course_utils.widgets import (
    AUGMENT_SLIDERS, augmentation_explorer, augmentation_view, explorer_view, shapes_explorer,
)


@pytest.fixture(scope="module")
def worlds():
    return {
        "default": ShapesWorld(n=600, seed=0),
        "spurious": ShapesWorld(n=600, seed=0, spurious=0.9),
    }


def test_explorer_view_shows_matching_captions_and_counts(worlds):
    fig, text = explorer_view(worlds, "spurious", show_masks=True, count=4, shape="heart", background="any")
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    assert len(titles) == 4 and all("heart" in t for t in titles)
    assert "spurious" in text and "match shape=heart" in text
    matplotlib.pyplot.close(fig)


def test_explorer_view_says_when_nothing_matches(worlds):
    fig, text = explorer_view(worlds, "default", shape="star", texture="dotted")
    assert fig is None and "No image" in text


def test_shapes_explorer_builds_headless_and_reacts_to_controls(worlds):
    box = shapes_explorer(worlds)
    variant, grid, show_masks, summary, output = box.children
    shape = next(d for d in grid.children if d.description == "shape")
    shape.value = "cross"
    variant.value = "spurious"
    assert "of spurious match shape=cross" in summary.value


def test_augmentation_view_shows_originals_and_two_views(worlds):
    images = worlds["default"].images[:4].float() / 255
    fig, views = augmentation_view(images, seed=1)
    assert views.shape == (2, 4, 3, 32, 32) and not torch.equal(views[0], views[1])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles.count("original") == 4 and titles.count("view 2") == 4
    matplotlib.pyplot.close(fig)
    fig, again = augmentation_view(images, seed=1)
    assert torch.equal(again, views)
    matplotlib.pyplot.close(fig)
    fig, grey = augmentation_view(images, seed=2, grayscale_p=1.0)
    assert torch.allclose(grey[:, :, 0], grey[:, :, 1])
    matplotlib.pyplot.close(fig)


def test_augmentation_explorer_has_a_slider_per_strength(worlds):
    box = augmentation_explorer(worlds["default"].images[:3].float() / 255)
    names = [c.description for c in box.children[0].children]
    assert names == [*AUGMENT_SLIDERS, "seed"]


def test_masking_view_shows_the_mask_and_the_similarity_of_the_masked_image():
    from course_utils.models import resnet
    from course_utils.widgets import masking_explorer, masking_view

    torch.manual_seed(0)
    encoder = resnet(10, 8).eval()
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    fig, keep_all = masking_view(encoder, image, grid=4, p_keep=1.0)
    assert keep_all == pytest.approx(1.0, abs=1e-3)  # nothing masked: the same embedding
    matplotlib.pyplot.close(fig)
    fig, similarity = masking_view(encoder, image, grid=4, p_keep=0.3, fill="mean colour", seed=3)
    assert similarity < 0.999 and "s = cos" in fig.axes[2].get_title()
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="fill must be one of"):
        masking_view(encoder, image, fill="noise")
    assert masking_explorer(encoder, image[None].repeat(2, 1, 1, 1)).children


def test_qscore_view_reports_the_set_sizes_and_the_auroc():
    from sklearn.metrics import roc_auc_score

    from course_utils.explain.qscore import qscore
    from course_utils.widgets import qscore_explorer, qscore_view

    g = torch.Generator().manual_seed(0)
    H = torch.rand(300, 32, generator=g) * 0.2
    H[torch.arange(300), torch.randint(0, 32, (300,), generator=g)] = 3.0
    reference = qscore(H, eps=2.0)
    # "correct" depends on Q (noisily), so the AUROC is far from 0.5 and a flipped or shuffled one is caught
    correct = reference.q + 0.5 * reference.q.std() * torch.randn(300, generator=g) > reference.q.median()
    fig, summary = qscore_view(H, correct, eps=2.0)
    assert summary["AUROC (all)"] > 0.75
    assert summary["|D|"] == int(reference.discriminative.sum())
    assert summary["empty share"] == pytest.approx(reference.empty_share)
    # the AUROC of Q for "correct" is the rank statistic of an independent implementation (scikit-learn)
    assert summary["AUROC (all)"] == pytest.approx(roc_auc_score(correct.numpy(), reference.q.numpy()), abs=1e-6)
    matplotlib.pyplot.close(fig)
    assert qscore_explorer(H, correct).children


def test_top_activating_returns_the_strongest_samples_of_a_feature():
    from course_utils.widgets import feature_browser, top_activating

    H = torch.ones(5, 3)
    H[3, 1], H[0, 1] = 9.0, 5.0
    assert top_activating(H, 1, count=2).tolist() == [3, 0]
    with pytest.raises(ValueError, match="out of range"):
        top_activating(H, 3)
    assert feature_browser(H, torch.rand(5, 3, 8, 8), count=2).children


def test_falcon_view_and_browser_show_an_explanation():
    from course_utils.explain.falcon import FeatureExplanation
    from course_utils.plots import word_score_plot
    from course_utils.widgets import falcon_browser, falcon_view

    explanation = FeatureExplanation(3, ["red", "star"], {"shape": 0.9, "red": 0.8, "star": 0.5}, torch.arange(5),
                                     torch.arange(5, 8), {"shape": 0.7}, ["shape"])
    fig = falcon_view(explanation, torch.rand(10, 3, 8, 8), count=4)
    assert "red, star" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)
    fig, ax = word_score_plot(explanation.scores, explanation.discarded)
    bars = {label.get_text(): patch for label, patch in zip(ax.get_yticklabels(), ax.patches)}
    assert bars["shape"].get_hatch() == "//" and bars["red"].get_hatch() is None
    matplotlib.pyplot.close(fig)
    assert falcon_browser([explanation], torch.rand(10, 3, 8, 8)).children
    with pytest.raises(ValueError, match="no explanations"):
        falcon_browser([], torch.rand(10, 3, 8, 8))


def test_pair_view_and_explorer_show_both_maps():
    from course_utils.widgets import pair_explorer, pair_view

    def explain(x1, x2):
        return x1.mean(1), x2.mean(1)

    x = torch.rand(3, 3, 8, 8)
    fig = pair_view(x[0], x[1], explain, "mean colour", similarity=0.5)
    assert "0.500" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)
    explorer = pair_explorer({"views": (x, x.flip(0))}, {"mean colour": explain},
                             similarity=lambda a, b: torch.ones(len(a)))
    assert explorer.children
    with pytest.raises(ValueError, match="at least one"):
        pair_explorer({}, {"mean colour": explain})


def test_image_grid_wraps_long_row_labels_to_the_row_height_and_keeps_short_ones():
    from course_utils.plots import image_grid

    images = torch.rand(12, 3, 8, 8)
    labels = ["red", "a label much longer than one small row"]
    _, axes = image_grid(images, ncols=6, panel_size=1.0, row_labels=labels)
    assert axes[0, 0].get_ylabel() == "red"
    wrapped = axes[1, 0].get_ylabel().split("\n")
    assert len(wrapped) > 1 and " ".join(wrapped) == labels[1] and max(map(len, wrapped)) <= 13
    _, axes = image_grid(images, ncols=6, panel_size=4.0, row_labels=labels)
    assert axes[1, 0].get_ylabel() == labels[1]
    with pytest.raises(ValueError, match="row labels"):
        image_grid(images, ncols=6, row_labels=["one"])
