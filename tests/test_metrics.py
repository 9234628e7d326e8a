"""Saliency metrics on hand-built maps and masks whose scores are known."""

import pytest
import torch

from course_utils.imageops import baseline_images, gaussian_blur, scaled_blur_sigma
from course_utils.metrics import (
    average_drop_increase, centre_prior, deletion_auc, insertion_auc, mask_iou, model_randomisation, pointing_game,
    random_map, saliency_scores,
)


def _square_masks() -> torch.Tensor:
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True  # top-left 2x2
    masks[1, 4:8, 4:8] = True  # bottom-right 4x4
    return masks


def test_pointing_game_counts_maxima_inside_the_mask():
    masks = _square_masks()
    maps = torch.zeros(2, 8, 8)
    maps[0, 2, 2] = 1.0  # inside
    maps[1, 0, 0] = 1.0  # outside
    assert pointing_game(maps, masks) == pytest.approx(0.5)
    maps[1, 5, 6] = 2.0
    assert pointing_game(maps, masks) == pytest.approx(1.0)


def test_pointing_game_tolerance_counts_near_misses_within_the_radius():
    masks = _square_masks()
    maps = torch.zeros(2, 8, 8)
    maps[0, 4, 2] = 1.0  # 2 px below the 2x2 square (rows 1-2)
    maps[1, 1, 1] = 1.0  # 3 px diagonal from the 4x4 square (its corner is at row 4, column 4)
    assert pointing_game(maps, masks) == 0.0
    assert pointing_game(maps, masks, tolerance=1) == 0.0
    assert pointing_game(maps, masks, tolerance=2) == pytest.approx(0.5)
    assert pointing_game(maps, masks, tolerance=5) == pytest.approx(1.0)


def test_pointing_game_of_a_constant_map_is_the_mask_area():
    masks = _square_masks()
    assert pointing_game(torch.ones(2, 8, 8), masks) == pytest.approx((4 / 64 + 16 / 64) / 2)


def test_mask_iou_is_one_for_the_mask_and_zero_for_its_complement():
    masks = _square_masks()
    assert torch.allclose(mask_iou(masks.float(), masks), torch.ones(2))
    assert torch.allclose(mask_iou((~masks).float(), masks), torch.zeros(2))
    # top 25 % of a map equal to the mask: the 4x4 mask (16 px) inside a 16 px selection is exact
    iou = mask_iou(masks.float() + 0.01 * torch.arange(64.0).view(8, 8), masks, top_fraction=0.25)
    assert iou[1] == pytest.approx(1.0)
    assert iou[0] == pytest.approx(4 / 16)


def test_deletion_and_insertion_auc_match_hand_computed_curves():
    """4x4 image of ones; the score is the mean over a 4-pixel region (a = 1/4).
    Deleting the region first gives AUC a/2 = 0.125, deleting it last 1 - a/2 = 0.875."""
    images = torch.ones(1, 3, 4, 4)
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, 0, :] = True

    def score(x):
        return x[:, 0][:, region[0]].mean(1)

    good = region.float()
    bad = (~region).float()
    assert deletion_auc(score, images, good, steps=16).item() == pytest.approx(0.125)
    assert deletion_auc(score, images, bad, steps=16).item() == pytest.approx(0.875)
    assert insertion_auc(score, images, good, steps=16, baseline=0.0).item() == pytest.approx(0.875)
    assert insertion_auc(score, images, bad, steps=16, baseline=0.0).item() == pytest.approx(0.125)


def _impulse_response_variance(size: int, sigma: float | None = None) -> float:
    """Spatial variance (px²) along the rows of the default blur of a centred single-pixel impulse: a Gaussian
    of standard deviation sigma has variance sigma², whatever its implementation."""
    impulse = torch.zeros(1, 1, size, size, dtype=torch.float64)
    impulse[0, 0, size // 2, size // 2] = 1.0
    response = gaussian_blur(impulse, sigma)[0, 0].sum(1)  # the row profile, mass 1
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    return float((response * offsets**2).sum() / response.sum())


def test_blur_sigma_scales_with_the_image_side_from_5_px_at_224_px():
    # references: sigma 5 px at 224 px; at 32 px that is 5 * 32 / 224 = 0.714 px
    assert scaled_blur_sigma(224) == pytest.approx(5.0) and scaled_blur_sigma(32) == pytest.approx(5 / 7)
    # the default blur's impulse response has the scaled variance at both sizes (a full Gaussian: within 3 %)
    assert _impulse_response_variance(224) == pytest.approx(25.0, rel=0.03)
    assert _impulse_response_variance(32) == pytest.approx((5 / 7) ** 2, rel=0.03)
    assert _impulse_response_variance(32, 2.0) == pytest.approx(4.0, rel=0.03)  # an explicit sigma is kept
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(torch.zeros(1, 1, 8, 8), 0.0)


def test_insertion_starts_from_a_blur_scaled_to_the_image_unless_told_otherwise():
    # a one-step curve scores [baseline, image]: record what the score function sees
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 32, 32, generator=g)
    saliency = torch.rand(1, 32, 32, generator=g)

    def curve_images(metric, **options):
        seen = []
        metric(lambda x: seen.append(x.clone()) or torch.zeros(len(x)), images, saliency, steps=1, **options)
        return torch.cat(seen)  # [2, 3, 32, 32]: step 0 and step 1

    scaled, fixed = gaussian_blur(images, 5 * 32 / 224), gaussian_blur(images, 5.0)
    assert (scaled - fixed).abs().max() > 0.1  # the two baselines differ
    assert torch.allclose(curve_images(insertion_auc)[0], scaled[0])
    assert torch.allclose(curve_images(insertion_auc, blur_sigma=5.0)[0], fixed[0])
    assert torch.allclose(curve_images(deletion_auc, baseline="blur")[1], scaled[0])  # deletion ends there
    # RELAX's "blur" fill keeps its 5 px (notebook 03 chose it on val)
    assert torch.allclose(baseline_images(images, "blur"), fixed)


def test_per_class_scores_follow_each_images_target_across_batch_boundaries():
    """score_fn gives [N, 2]: column 0 the mean of the image, column 1 its square.  Batches of 5
    rows cut the 17-point curves of the two images anywhere; each curve must keep its own column."""
    images = torch.ones(2, 3, 4, 4)
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))

    def two_columns(x):
        mean = x.mean((1, 2, 3))
        return torch.stack([mean, mean**2], 1)

    auc = deletion_auc(two_columns, images, maps, steps=16, batch_size=5, target=torch.tensor([0, 1]))
    squares = sum(((16 - k) / 16) ** 2 for k in range(1, 16)) / 16 + 0.5 / 16  # trapezoid of (1 - t)^2
    assert auc.tolist() == pytest.approx([0.5, squares])
    with pytest.raises(ValueError, match="pass target"):
        deletion_auc(two_columns, images, maps, steps=16)


def test_average_drop_and_increase_of_known_maskings():
    images = torch.ones(2, 3, 8, 8)
    masks = _square_masks()

    def score_global(x):
        return x.mean((1, 2, 3))

    drop, increase = average_drop_increase(score_global, images, masks.float())
    assert drop == pytest.approx(100 * (1 - (4 / 64 + 16 / 64) / 2))
    assert increase == 0.0

    def score_bright(x):
        return 2.0 - x.mean((1, 2, 3))  # darker images score higher

    assert average_drop_increase(score_bright, images, masks.float()) == (0.0, 100.0)


def test_model_randomisation_separates_a_faithful_map_from_an_edge_detector():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 1, 3, padding=1))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def gradient_map(m, images):
        images = images.clone().requires_grad_()
        m(images).sum().backward()
        return images.grad.abs().sum(1)

    def edges(m, images):  # ignores the model
        return (images[..., 1:, :] - images[..., :-1, :]).abs().sum(1)

    trained_weight = model[0].weight.detach().clone()
    faithful = model_randomisation(gradient_map, model, ["2", "0"], x)
    blind = model_randomisation(edges, model, ["2", "0"], x)
    assert list(faithful) == ["original", "2", "0"]
    assert faithful["0"].mean() < 0.5 and torch.allclose(faithful["original"], torch.ones(3))
    assert torch.allclose(blind["2"], torch.ones(3)) and torch.allclose(blind["0"], torch.ones(3))
    assert torch.equal(model[0].weight, trained_weight)  # the model itself is untouched
    with pytest.raises(ValueError, match="unknown layer"):
        model_randomisation(gradient_map, model, ["layer9"], x)


def test_baselines_have_the_right_shapes_and_the_centre_prior_peaks_at_the_centre():
    centre = centre_prior(2, 9)
    assert centre.shape == (2, 9, 9) and centre[0].argmax() == 4 * 9 + 4
    noise = random_map(3, 8, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 8, 8) and torch.equal(noise, random_map(3, 8, torch.Generator().manual_seed(0)))


def test_metrics_reject_nan_maps_mismatched_shapes_and_empty_masks():
    masks = _square_masks()
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((2, 8, 8), float("nan")), masks)
    with pytest.raises(ValueError, match="differ in shape"):
        mask_iou(torch.rand(2, 4, 4), masks)
    with pytest.raises(ValueError, match="at least one pixel"):
        pointing_game(torch.rand(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        deletion_auc(lambda x: x.mean((1, 2, 3)), torch.rand(2, 3, 4, 4), torch.rand(2, 8, 8))


def test_saliency_scores_collects_the_table_row_of_one_method():
    masks = _square_masks()
    images = torch.ones(2, 3, 8, 8)

    def object_score(x):  # column c: mean over object c; image c is scored on its own object
        return torch.stack([(x[:, 0] * m).sum((1, 2)) / m.sum() for m in masks], 1)

    objects = torch.tensor([0, 1])
    row = saliency_scores(masks.float(), masks, images, score_fn=object_score, steps=64, target=objects)
    assert row["pointing game"] == 1.0 and row["mask IoU"] == pytest.approx(1.0)
    # the curve falls to 0 after area/64 of the steps: AUC = area / 128 (4 and 16 pixels)
    assert row["deletion AUC"] == pytest.approx((4 / 128 + 16 / 128) / 2, abs=1e-6)
    reversed_row = saliency_scores((~masks).float(), masks, images, score_fn=object_score, steps=64, target=objects)
    assert reversed_row["deletion AUC"] > 0.8 and reversed_row["pointing game"] == 0.0
    assert set(saliency_scores(masks.float(), masks)) == {"pointing game", "mask IoU"}
    with pytest.raises(ValueError, match="needs the images"):
        saliency_scores(masks.float(), masks, score_fn=object_score, target=objects)


def test_mask_iou_breaks_ties_at_random_not_in_raster_order():
    """One salient pixel inside a 4x4 object, zeros elsewhere: the other 15 selected pixels are a
    random draw among the 63 zeros, so the IoU is near its expectation, not a corner artefact."""
    masks = torch.zeros(200, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True  # top-left object: raster order would fill the selection from it
    maps = torch.zeros(200, 8, 8)
    maps[:, 1, 1] = 1.0
    iou = mask_iou(maps, masks)
    # raster order would pick rows 0-1 (7 of them inside the object) -> IoU 8/24
    assert iou.mean().item() < 0.3


def test_auroc_and_auprc_match_hand_computed_values():
    from course_utils.metrics import auprc, auroc

    labels = torch.tensor([True, False, True, False])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    # positive-negative pairs ranked correctly: (0.9>0.8), (0.9>0.1), (0.7>0.1), not (0.7>0.8): 3 of 4
    assert auroc(labels, scores) == pytest.approx(0.75)
    # precision at each positive, in score order: 1/1 at 0.9, 2/3 at 0.7 -> mean 5/6
    assert auprc(labels, scores) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="both outcomes"):
        auroc(torch.ones(4, dtype=torch.bool), scores)


def test_bootstrap_interval_covers_the_value_and_separates_a_real_signal_from_chance():
    from course_utils.metrics import auroc, bootstrap_interval

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(400, generator=g) < 0.7
    informative = labels.float() + torch.randn(400, generator=g)
    noise = torch.randn(400, generator=g)
    value, low, high = bootstrap_interval(auroc, labels, informative, n_boot=300)
    assert low < value < high and low > 0.6
    _, low, high = bootstrap_interval(auroc, labels, noise, n_boot=300)
    assert low < 0.5 < high
    assert bootstrap_interval(auroc, labels, noise, n_boot=50, seed=1) == bootstrap_interval(auroc, labels, noise,
                                                                                          n_boot=50, seed=1)
