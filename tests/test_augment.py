"""SimCLRAugment: batched per-sample views."""

import math

import pytest
import torch

from course_utils.data.augment import SimCLRAugment, _luma, _rotate_hue
from course_utils.data.shapes import ShapesWorld

IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return ShapesWorld(n=64, seed=0).images.float() / 255


def test_zero_strengths_give_the_identity(images):
    out = SimCLRAugment(32, **IDENTITY)(images)
    assert torch.allclose(out, images, atol=1e-5)
    jitter_zero = SimCLRAugment(32, **{**IDENTITY, "jitter_p": 1.0, "brightness": 0, "contrast": 0,
                                       "saturation": 0, "hue": 0})
    assert torch.allclose(jitter_zero(images), images, atol=1e-5)


def test_outputs_stay_in_unit_range_and_keep_dtype(images):
    out = SimCLRAugment(32, blur_p=0.5)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    bf16 = SimCLRAugment(32)(images.bfloat16(), torch.Generator().manual_seed(0))
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16.float()).all()


def test_parameters_differ_across_the_batch():
    params = SimCLRAugment(32).sample_parameters(256, torch.Generator().manual_seed(0))
    for key in ("scale", "cx", "cy", "brightness", "hue"):
        assert params[key].unique().numel() > 200, key
    assert 0.3 < params["flip"].float().mean() < 0.7


def test_identical_images_in_a_batch_get_different_views(images):
    batch = images[:1].repeat(16, 1, 1, 1)
    views = SimCLRAugment(32)(batch, torch.Generator().manual_seed(0))
    distinct = {tuple(v.flatten()[::97].tolist()) for v in views}
    assert len(distinct) == 16


def test_uint8_input_is_refused_with_a_hint(images):
    with pytest.raises(ValueError, match="float"):
        SimCLRAugment(32)((images * 255).to(torch.uint8))


def test_same_generator_gives_the_same_views_and_another_seed_does_not(images):
    augment = SimCLRAugment(32)
    a = augment(images, torch.Generator().manual_seed(5))
    b = augment(images, torch.Generator().manual_seed(5))
    c = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_scales_and_ratios_stay_in_their_bounds():
    augment = SimCLRAugment(32, crop_scale=(0.2, 0.6), crop_ratio=(0.5, 2.0))
    p = augment.sample_parameters(10_000, torch.Generator().manual_seed(1))
    assert p["scale"].min() >= 0.2 and p["scale"].max() <= 0.6
    ratio = p["width"] / p["height"]
    assert ratio.min() >= 0.5 - 1e-6 and ratio.max() <= 2.0 + 1e-6
    assert torch.allclose(p["width"] * p["height"], p["scale"], atol=1e-6)
    inside = (p["width"] <= 1) & (p["height"] <= 1)
    left, right = p["cx"] - p["width"] / 2, p["cx"] + p["width"] / 2
    assert (left[inside] >= -1e-6).all() and (right[inside] <= 1 + 1e-6).all()


def test_flip_alone_mirrors_the_image(images):
    out = SimCLRAugment(32, **{**IDENTITY, "flip_p": 1.0})(images)
    assert torch.allclose(out, images.flip(-1), atol=1e-5)


def test_grayscale_makes_channels_equal_to_luma(images):
    out = SimCLRAugment(32, **{**IDENTITY, "grayscale_p": 1.0})(images)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert torch.allclose(out[:, :1], _luma(images), atol=1e-6)


def test_hue_rotation_keeps_luma_and_a_full_turn_is_the_identity(images):
    angle = torch.full((images.shape[0],), 1.3)
    rotated = _rotate_hue(images, angle)
    assert torch.allclose(_luma(rotated), _luma(images), atol=1e-5)
    assert not torch.allclose(rotated, images, atol=1e-2)
    assert torch.allclose(_rotate_hue(images, torch.full_like(angle, 2 * math.pi)), images, atol=1e-5)


def test_blur_preserves_the_mean_and_smooths(images):
    augment = SimCLRAugment(32, **{**IDENTITY, "blur_p": 1.0, "blur_sigma": (1.5 / 32, 1.5 / 32)})
    out = augment(images)
    assert torch.allclose(out.mean((2, 3)), images.mean((2, 3)), atol=0.02)
    roughness = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert roughness(out) < 0.6 * roughness(images)


def test_erasing_blacks_out_one_rectangle_of_the_drawn_area():
    ones = torch.ones(256, 3, 28, 28)
    augment = SimCLRAugment(28, **IDENTITY, erase_p=1.0, erase_scale=(0.05, 0.15))
    generator = torch.Generator().manual_seed(0)
    out = augment(ones, generator)
    erased = out[:, 0] == 0
    assert (out[:, 0] == out[:, 1]).all() and (out[:, 1] == out[:, 2]).all()  # all channels erased together
    fraction = erased.float().mean(dim=(1, 2))
    assert fraction.min() > 0.02 and fraction.max() < 0.2  # 0.05-0.15 of the area, up to pixel rounding
    rows, cols = erased.any(dim=2), erased.any(dim=1)  # a rectangle is the product of its rows and columns
    assert torch.equal(erased, rows[:, :, None] & cols[:, None, :])
    untouched = SimCLRAugment(28, **IDENTITY, erase_p=0.0)(ones, generator)
    assert torch.equal(untouched, ones)
    half = SimCLRAugment(28, **IDENTITY, erase_p=0.5)(ones, torch.Generator().manual_seed(1))
    assert 0.35 < (half == 0).flatten(1).any(dim=1).float().mean() < 0.65


def test_rotation_turns_the_crop_by_the_drawn_angle(images, monkeypatch):
    augment = SimCLRAugment(32, **IDENTITY, rotate_degrees=90.0)
    angles = augment.sample_parameters(512, torch.Generator().manual_seed(0))["angle"]
    assert angles.abs().max() <= math.pi / 2 and angles.abs().max() > 0.9 * math.pi / 2
    assert SimCLRAugment(32).sample_parameters(8)["angle"].abs().max() == 0  # off by default
    drawn = augment.sample_parameters
    monkeypatch.setattr(augment, "sample_parameters",
                        lambda batch, generator=None: {**drawn(batch, generator),
                                                       "angle": torch.full((batch,), math.pi / 2)})
    out = augment(images[:4])
    quarter_turns = [(out - torch.rot90(images[:4], k, dims=(2, 3))).abs().max().item() for k in range(4)]
    assert min(quarter_turns[1], quarter_turns[3]) < 1e-4 and quarter_turns[0] > 0.1


def test_bad_arguments_and_inputs_raise_clear_errors(images):
    with pytest.raises(ValueError, match="erase_scale"):
        SimCLRAugment(32, erase_scale=(0.2, 0.1))
    with pytest.raises(ValueError, match="rotate_degrees"):
        SimCLRAugment(32, rotate_degrees=-5)
    with pytest.raises(ValueError, match="probability"):
        SimCLRAugment(32, erase_p=2.0)
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRAugment(32, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        SimCLRAugment(32, flip_p=1.5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        SimCLRAugment(32)(images[0])
