"""ShapesWorld: determinism, ground truth and the statistics the course relies on."""

import math

import pytest
import torch

from course_utils.data.shapes import BACKGROUND_COLORS, DIFFICULTIES, ShapesWorld, select_samples


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(n=4000, seed=0)


def test_same_seed_gives_identical_samples_and_a_prefix_of_a_larger_world():
    small = ShapesWorld(n=100, seed=7)
    large = ShapesWorld(n=1300, seed=7)
    again = ShapesWorld(n=100, seed=7)
    assert torch.equal(small.images, again.images)
    assert torch.equal(small.images, large.images[:100])
    assert torch.equal(small.masks, large.masks[:100])
    assert small.captions == large.captions[:100]
    for key, values in small.attributes.items():
        assert torch.equal(values, large.attributes[key][:100]), key


def test_different_seeds_and_splits_give_different_samples():
    train = ShapesWorld(n=64, seed=0, split="train")
    assert not torch.equal(train.images, ShapesWorld(n=64, seed=1, split="train").images)
    test = ShapesWorld(n=64, seed=0, split="test")
    # no test image equals any train image
    same = (train.images[:, None] == test.images[None]).flatten(2).all(-1)
    assert not same.any()


def test_tensor_shapes_dtypes_and_item_access(world):
    n, s = len(world), world.size
    assert world.images.shape == (n, 3, s, s) and world.images.dtype == torch.uint8
    assert world.labels.shape == (n,) and world.labels.dtype == torch.int64
    assert world.masks.shape == (n, s, s) and world.masks.dtype == torch.bool
    assert len(world.captions) == n and len(world.classes) >= 8
    for key, values in world.attributes.items():
        assert values.shape == (n,) and values.dtype == torch.int64
        assert 0 <= values.min() and values.max() < len(world.attribute_names[key]), key
    image, label = world[5]
    assert image.shape == (3, s, s) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and label == int(world.labels[5])


def test_every_mask_is_nonempty_and_object_pixels_differ_from_background(world):
    assert world.masks.flatten(1).any(1).all()
    x = world.images.float() / 255
    obj = world.masks[:, None].float()
    background = (~world.masks & ~world.distractor_masks)[:, None].float()
    obj_mean = (x * obj).sum((2, 3)) / obj.sum((2, 3))
    bg_mean = (x * background).sum((2, 3)) / background.sum((2, 3))
    assert (obj_mean - bg_mean).norm(dim=1).min() > 0.3


def test_objects_lie_fully_inside_and_never_overlap_the_distractor():
    world = ShapesWorld(n=2000, seed=0, distractor_p=0.2)
    m = world.masks
    border = m[:, 0].any(1) | m[:, -1].any(1) | m[:, :, 0].any(1) | m[:, :, -1].any(1)
    assert not border.any()
    assert not (world.masks & world.distractor_masks).any()
    has_bar = world.attributes["distractor"] == 1
    assert world.distractor_masks[has_bar].flatten(1).any(1).all()
    assert not world.distractor_masks[~has_bar].any()
    assert 0.15 < has_bar.float().mean() < 0.25


def test_default_world_has_no_distractors_unless_asked(world):
    assert world.attributes["distractor"].sum() == 0 and not world.distractor_masks.any()
    with pytest.raises(ValueError, match="distractor_p"):
        ShapesWorld(n=4, distractor_p=1.5)


def test_circle_masks_match_the_analytic_disc(world):
    """Independent check of the renderer: a circle of radius 0.85 R has area pi (0.85 R)^2
    and its mask centroid is the drawn centre."""
    circles = world.labels == world.classes.index("circle")
    radius = world.geometry["radius"][circles]
    area = world.masks[circles].float().sum((1, 2))
    assert torch.allclose(area, math.pi * (0.85 * radius) ** 2, rtol=0.12)
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    m = world.masks[circles].float()
    cx = (m * xs).sum((1, 2)) / m.sum((1, 2))
    cy = (m * ys).sum((1, 2)) / m.sum((1, 2))
    assert (cx - world.geometry["center_x"][circles]).abs().max() < 0.5
    assert (cy - world.geometry["center_y"][circles]).abs().max() < 0.5


def test_mask_area_grows_with_the_size_attribute_for_every_shape(world):
    area = world.masks.float().sum((1, 2))
    size = world.attributes["size"]
    for k, name in enumerate(world.classes):
        means = [area[(world.labels == k) & (size == s)].mean() for s in range(3)]
        assert means[0] < means[1] < means[2], name


def test_classes_are_balanced(world):
    counts = torch.bincount(world.labels, minlength=len(world.classes)).float()
    expected = len(world) / len(world.classes)
    assert ((counts - expected).abs() / expected).max() < 0.15


def test_every_caption_names_the_true_shape_and_colour(world):
    names = world.attribute_names
    for i, caption in enumerate(world.captions):
        words = caption.split()
        assert names["shape"][world.labels[i]] in words, caption
        assert names["color"][world.attributes["color"][i]] in words, caption
        assert names["background_color"][world.attributes["background_color"][i]] in words, caption


def test_spurious_background_agrees_with_class_at_rate_p_in_train_and_chance_in_test():
    p = 0.9
    train = ShapesWorld(n=3000, seed=1, split="train", spurious=p)
    test = ShapesWorld(n=3000, seed=1, split="test", spurious=p)
    n_bg = len(BACKGROUND_COLORS)
    agree_train = (train.attributes["background_color"] == train.labels % n_bg).float().mean()
    agree_test = (test.attributes["background_color"] == test.labels % n_bg).float().mean()
    assert abs(agree_train - p) < 0.03
    assert abs(agree_test - 1 / n_bg) < 0.03
    plain = ShapesWorld(n=3000, seed=1, split="train")
    assert abs((plain.attributes["background_color"] == plain.labels % n_bg).float().mean() - 1 / n_bg) < 0.03


def test_centre_of_the_image_is_inside_the_object_for_at_most_30_percent(world):
    s = world.size
    centre_inside = world.masks[:, s // 2, s // 2]
    assert centre_inside.float().mean() <= 0.30
    # and positions cover the whole image: every 3x3 cell is used
    assert torch.bincount(world.attributes["position"], minlength=9).min() > len(world) / 9 * 0.5


def test_difficulty_changes_object_size_and_nuisances():
    easy = ShapesWorld(n=600, seed=0, difficulty="easy")
    hard = ShapesWorld(n=600, seed=0, difficulty="hard")
    assert easy.masks.float().mean() > hard.masks.float().mean()
    assert set(easy.attributes["texture"].unique().tolist()) == {0}
    assert len(hard.attributes["texture"].unique()) == 4 and len(hard.attributes["background"].unique()) == 4
    assert hard.attributes["distractor"].float().mean() > easy.attributes["distractor"].float().mean()
    assert set(DIFFICULTIES) == {"easy", "default", "hard"}


@pytest.mark.parametrize("size", [48, 64])
def test_larger_images_scale_objects_with_the_image(size):
    world = ShapesWorld(n=300, size=size, seed=0)
    assert world.images.shape[-1] == size and world.masks.flatten(1).any(1).all()
    relative_area = world.masks.float().mean()
    reference = ShapesWorld(n=300, size=32, seed=0).masks.float().mean()
    assert abs(relative_area - reference) / reference < 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n >= 1"),
        (dict(size=16), "at least 32"),
        (dict(split="validation"), "Unknown split"),
        (dict(spurious=1.5), "probability"),
        (dict(difficulty="extreme"), "Unknown difficulty"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorld(**kwargs)


def test_select_samples_returns_exactly_the_matching_images(world):
    chosen = select_samples(world, shape="star", color="red")
    expected = (world.labels == world.classes.index("star")) & (
        world.attributes["color"] == world.attribute_names["color"].index("red")
    )
    assert torch.equal(chosen, expected.nonzero(as_tuple=True)[0]) and chosen.numel() > 0
    assert select_samples(world, shape="any").numel() == len(world)
    assert select_samples(world, limit=3, shape="ring").numel() == 3


def test_select_samples_rejects_unknown_attribute_or_value(world):
    with pytest.raises(ValueError, match="unknown attribute"):
        select_samples(world, flavour="sweet")
    with pytest.raises(ValueError, match="values are"):
        select_samples(world, shape="hexagon")
