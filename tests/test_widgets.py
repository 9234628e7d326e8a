"""The explorer callbacks, run headless."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from course_utils.data.shapes import ShapesWorld
from course_utils.widgets import (
    AUGMENT_SLIDERS, augmentation_explorer, augmentation_view, explorer_view, select_samples, shapes_explorer,
)


@pytest.fixture(scope="module")
def worlds():
    return {
        "default": ShapesWorld(n=600, seed=0),
        "spurious": ShapesWorld(n=600, seed=0, spurious=0.9),
    }


def test_select_samples_returns_exactly_the_matching_images(worlds):
    world = worlds["default"]
    chosen = select_samples(world, shape="star", color="red")
    expected = (world.labels == world.classes.index("star")) & (
        world.attributes["color"] == world.attribute_names["color"].index("red")
    )
    assert torch.equal(chosen, expected.nonzero(as_tuple=True)[0]) and chosen.numel() > 0
    assert select_samples(world, shape="any").numel() == len(world)
    assert select_samples(world, limit=3, shape="ring").numel() == 3


def test_select_samples_rejects_unknown_attribute_or_value(worlds):
    with pytest.raises(ValueError, match="unknown attribute"):
        select_samples(worlds["default"], flavour="sweet")
    with pytest.raises(ValueError, match="values are"):
        select_samples(worlds["default"], shape="hexagon")


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
