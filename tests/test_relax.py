"""RELAX: masks, the importance/uncertainty formulas against a per-mask loop, and ground truth."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.data.shapes import ShapesWorld
from course_utils.explain.relax import relax, relax_batch, relax_from_similarities, relax_masks
from course_utils.metrics import dilate, pointing_game
from course_utils.models import SimCLRModel, load_pretrained, resnet


@pytest.fixture
def fp32(monkeypatch):
    """Exact comparisons: no bf16 autocast."""
    monkeypatch.setenv("COURSE_PRECISION", "fp32")


@pytest.fixture(scope="module")
def small_encoder() -> nn.Module:
    torch.manual_seed(0)
    return resnet(10, 8).eval()


def _per_mask_loop(encoder: nn.Module, image: torch.Tensor, masks: torch.Tensor, normalize: bool):
    """SCIENCE.md section 3, one mask at a time, two passes (R first, then U)."""
    with torch.no_grad():
        h = encoder(image[None])[0]
        s = torch.stack([F.cosine_similarity(h, encoder((image * m)[None])[0], dim=0) for m in masks]).double()
    m = masks.double()
    weight = m.sum(0) if normalize else torch.tensor(float(len(masks)), dtype=torch.float64)
    importance = sum(s_n * m_n for s_n, m_n in zip(s, m)) / weight
    uncertainty = sum((s_n - importance) ** 2 * m_n for s_n, m_n in zip(s, m)) / weight
    return importance, uncertainty, s


@pytest.mark.parametrize("normalize", [False, True])
def test_importance_and_uncertainty_equal_a_per_mask_loop_of_the_formulas(small_encoder, fp32, normalize):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    masks = relax_masks(37, 16, grid=4, generator=torch.Generator().manual_seed(2))
    result = relax(small_encoder, image, masks=masks, batch_size=8, normalize=normalize)
    importance, uncertainty, s = _per_mask_loop(small_encoder, image, masks, normalize)
    torch.testing.assert_close(result.similarities.double(), s, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.importance.double(), importance, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.uncertainty.double(), uncertainty, atol=1e-6, rtol=1e-3)
    assert result.uncertainty.std() > 0  # a non-trivial map, so the comparison can fail


@pytest.mark.parametrize("normalize", [False, True])
def test_maps_from_stored_similarities_equal_the_run_that_measured_them(small_encoder, normalize):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    masks = relax_masks(25, 16, generator=torch.Generator().manual_seed(2))
    run = relax_batch(small_encoder, images, masks=masks, normalize=normalize)
    again = relax_from_similarities(run.similarities, masks, normalize=normalize)
    for field in ("importance", "uncertainty", "u_relax"):
        torch.testing.assert_close(getattr(again, field), getattr(run, field), atol=1e-6, rtol=1e-5)
    one = relax_from_similarities(run.similarities[1], masks, normalize=normalize)
    torch.testing.assert_close(one.importance, run.importance[1], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="same N"):
        relax_from_similarities(run.similarities[:, :5], masks)


def test_a_pixel_no_mask_kept_gets_zero_not_nan_when_normalised(small_encoder):
    masks = torch.ones(4, 16, 16)
    masks[:, 0, 0] = 0  # never kept
    result = relax(small_encoder, torch.rand(3, 16, 16), masks=masks, normalize=True)
    assert torch.isfinite(result.importance).all() and torch.isfinite(result.uncertainty).all()
    assert result.importance[0, 0] == 0 and result.uncertainty[0, 0] == 0


def test_u_relax_keeps_importance_where_uncertainty_is_at_most_its_median(small_encoder):
    result = relax(small_encoder, torch.rand(3, 16, 16), num_masks=20, generator=torch.Generator().manual_seed(0))
    certain = result.uncertainty <= result.uncertainty.median()
    assert torch.equal(result.u_relax[certain], result.importance[certain])
    assert (result.u_relax[~certain] == 0).all() and (~certain).any()


def test_batched_relax_equals_relax_image_by_image_with_the_same_masks(small_encoder, fp32):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    masks = relax_masks(10, 16, generator=torch.Generator().manual_seed(4))
    batched = relax_batch(small_encoder, images, masks=masks, batch_size=7)  # groups of 3 images x 2 masks
    for i, image in enumerate(images):
        single = relax(small_encoder, image, masks=masks, batch_size=4)
        torch.testing.assert_close(batched.importance[i], single.importance, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.uncertainty[i], single.uncertainty, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.similarities[i], single.similarities, atol=1e-5, rtol=0)


class _BatchRecorder(nn.Module):
    """Wraps an encoder and records the batch size of every forward pass."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.batches = encoder, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.encoder(x)


def test_batch_size_none_fits_memory_and_gives_the_maps_of_an_explicit_batch_size(small_encoder, fp32, monkeypatch):
    from course_utils import runtime

    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    run = lambda encoder, batch_size: relax(encoder, image, 250, batch_size, progress=False,  # noqa: E731
                                            generator=torch.Generator().manual_seed(6))
    explicit = run(small_encoder, 100)
    monkeypatch.setattr(runtime, "_available_bytes", lambda device: 10**12)  # plenty: the old default, 100
    recorder = _BatchRecorder(small_encoder)
    fitted = run(recorder, None)
    assert max(recorder.batches) == 100
    for field in ("importance", "uncertainty", "u_relax", "similarities"):
        assert torch.equal(getattr(fitted, field), getattr(explicit, field))
    per_image = runtime.fitting_batch_size(small_encoder, (3, 16, 16), budget_bytes=1e9, cap=10**9)
    per_image = int(1e9 // per_image)  # upper bound of the estimate
    monkeypatch.setattr(runtime, "_available_bytes", lambda device: 2 * 30 * per_image)  # room for ~30 images
    recorder = _BatchRecorder(small_encoder)
    small = run(recorder, None)
    assert 20 <= max(recorder.batches[1:]) <= 30 and len(recorder.batches) > 8  # smaller batches, more passes
    for field in ("importance", "uncertainty", "u_relax", "similarities"):
        torch.testing.assert_close(getattr(small, field), getattr(explicit, field), atol=1e-5, rtol=1e-4)


def test_a_simclr_model_is_explained_through_its_representation(fp32):
    torch.manual_seed(0)
    model = SimCLRModel(resnet(10, 8)).eval()
    image, masks = torch.rand(3, 16, 16), relax_masks(6, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(relax(model, image, masks=masks).importance, relax(model.encoder, image, masks=masks).importance)


def test_masks_lie_in_the_unit_interval_keep_p_on_average_and_are_smooth():
    for p_keep in (0.5, 0.3):
        masks = relax_masks(2000, 32, grid=7, p_keep=p_keep, generator=torch.Generator().manual_seed(0))
        assert masks.shape == (2000, 32, 32)
        assert masks.min() >= 0 and masks.max() <= 1
        assert abs(masks.mean().item() - p_keep) < 0.02
        # Bilinear cells of ceil(32 / 7) + ~0.3 px: neighbours differ by at most about one cell step.
        assert (masks[:, 1:] - masks[:, :-1]).abs().max() <= 0.25
        assert (masks[:, :, 1:] - masks[:, :, :-1]).abs().max() <= 0.25
        assert masks.std() > 0.2  # not blurred into a constant


@pytest.mark.parametrize("size", [16, 37])
def test_the_course_masks_at_any_size_are_accepted_back_as_masks(small_encoder, size):
    """At 16 or 37 px with grid 7 the bilinear weights summed to 1 + 1 ulp in float32, and relax refused the
    course's own masks; they are clamped to [0, 1]."""
    masks = relax_masks(400, size, generator=torch.Generator().manual_seed(0))
    assert 0 <= masks.min() and masks.max() <= 1
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    result = relax(small_encoder, image, num_masks=len(masks), masks=masks)
    assert result.importance.shape == (size, size) and torch.isfinite(result.importance).all()


def _expected_mask_variance(size, grid, p_keep, shifts):
    """Per-pixel variance of masks whose Bernoulli(p) cells are bilinearly upsampled to size + cell and cropped
    at a shift drawn uniformly from ``shifts`` (both axes): a pixel with bilinear weights w_c has variance
    p (1 - p) Σ_c w_c², its mean is p whatever the shift, so the variance is what a shift changes."""
    cell = -(-size // grid)
    basis = torch.eye(grid * grid).view(grid * grid, 1, grid, grid)  # one cell on at a time: its weights w_c
    weights = F.interpolate(basis, size=(size + cell, size + cell), mode="bilinear", align_corners=False)[:, 0]
    squares = weights.square().sum(0)
    crops = torch.stack([squares[dy:dy + size, dx:dx + size] for dy in shifts for dx in shifts])
    return p_keep * (1 - p_keep) * crops.mean(0)


def test_mask_cells_land_at_random_shifts():
    """The per-pixel variance of the masks is that of cells cropped at a uniform random shift in [0, cell):
    unshifted masks (or one fixed shift) have variance p (1 - p) = 0.25 at the cell centres and 0.06 between
    them, a grid pattern the shifts average out (measured: 0.09-0.21). The per-pixel mean is p either way,
    so it cannot tell."""
    size, grid, p_keep = 32, 4, 0.5
    masks = relax_masks(4000, size, grid=grid, p_keep=p_keep, generator=torch.Generator().manual_seed(0))
    variance = masks.var(0)
    expected = _expected_mask_variance(size, grid, p_keep, range(-(-size // grid)))
    unshifted = _expected_mask_variance(size, grid, p_keep, [0])
    assert (unshifted - expected).abs().max() > 0.08  # the two hypotheses differ by far more than the noise
    # sampling error of a variance from 4000 masks: sd <= 0.004 per pixel, max over 1024 pixels < 0.02
    assert (variance - expected).abs().max() < 0.02
    assert (variance - expected).abs().mean() < 0.005


def test_the_same_generator_gives_the_same_result_and_another_seed_does_not(small_encoder):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    runs = [relax(small_encoder, image, num_masks=30, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0].importance, runs[1].importance)
    assert torch.equal(runs[0].uncertainty, runs[1].uncertainty)
    assert not torch.equal(runs[0].importance, runs[2].importance)


@pytest.mark.parametrize("fill", ["mean", "blur", 0.5])
def test_other_fills_replace_masked_pixels_with_the_fill(fill, fp32):
    seen = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1) * self.weight

    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 8, 8)
    relax(Recorder(), image, masks=masks, fill=fill)
    masked = seen[-1][0]  # the first fully masked copy (the last forward pass: one batch of masked copies)
    expected = {"mean": image.mean((1, 2), keepdim=True).expand_as(image), 0.5: torch.full_like(image, 0.5)}
    if fill == "blur":
        assert masked.std() < image.std() / 2  # smoothed, not the image and not a constant
        assert masked.std() > 0
    else:
        torch.testing.assert_close(masked, expected[fill])


@pytest.mark.parametrize("kwargs, message", [
    ({"image": torch.rand(1, 3, 16, 16)}, "one image"),
    ({"image": torch.rand(16, 16)}, "one RGB image"),
    ({"image": torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)}, "float"),
    ({"image": torch.full((3, 16, 16), float("nan"))}, "NaN"),
    ({"num_masks": 1}, "num_masks"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"masks": torch.rand(5, 8, 8)}, "image size"),
    ({"masks": torch.rand(1, 16, 16)}, "at least 2"),
    ({"masks": torch.rand(5, 16, 16) * 2}, r"\[0, 1\]"),
    ({"fill": "noise"}, "baseline"),
    ({"p_keep": 0.0}, "p_keep"),
    ({"grid": 0}, "grid"),
])
def test_bad_input_raises_a_clear_error(small_encoder, kwargs, message):
    arguments = {"image": torch.rand(3, 16, 16), "num_masks": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        relax(small_encoder, **arguments)


@pytest.fixture(scope="module")
def trained():
    encoder = load_pretrained("simclr-shapes-r10").encoder.eval()
    return encoder, ShapesWorld(n=60, seed=0, split="test")


def test_importance_converges_two_independent_sets_of_3000_masks_agree(trained):
    """With the reference code's normalisation (weighted mean).  The unnormalised proposal formula
    is dominated by how often each pixel happened to be kept (notebook 03 shows it)."""
    encoder, world = trained
    images = world.images[:2].float() / 255
    first, second = (relax_batch(encoder, images, 3000, batch_size=400, normalize=True, fill="mean",
                                 generator=torch.Generator().manual_seed(s), progress=False) for s in (0, 1))
    for a, b in zip(first.importance, second.importance):
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert correlation > 0.9


def test_trained_importance_points_inside_the_object_more_often_than_a_random_map(trained):
    encoder, world = trained
    images = world.images.float() / 255
    result = relax_batch(encoder, images, 500, batch_size=500, normalize=True, fill="mean", generator=torch.Generator().manual_seed(0),
                         progress=False)
    tolerance = 2
    random_expected = dilate(world.masks, tolerance).float().mean().item()  # a random map's expected score
    assert pointing_game(result.importance, world.masks, tolerance) > random_expected + 0.15
