"""Metrics that degenerate maps, bad images, empty batches and train-mode models cannot game (issue 19).

A constant map (all zeros, all ones) ranks no pixel above another: every metric warns and scores it as
chance.  Images go through the input guard; an empty batch raises a ValueError; a model used as the score
function runs in eval mode and keeps its BatchNorm statistics and its mode.

New names (``ConstantMapWarning``, ``chance_iou``) are imported inside the tests, so that on the code before
issue 19 each test fails on its own behaviour rather than the whole file failing to import.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.metrics import (
    average_drop_increase, deletion_auc, insertion_auc, mask_iou, max_sensitivity, pair_average_drop_increase,
    pair_deletion_auc, pair_insertion_auc, pointing_game, pointing_hits, saliency_scores,
)

SIZE = 8


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True  # 4 px
    masks[1, 4:8, 4:8] = True  # 16 px
    return masks


def _constant_warning():
    """``pytest.warns`` for the guard's ConstantMapWarning (a UserWarning naming constant maps)."""
    return pytest.warns(UserWarning, match="constant")


def _region_score(x: torch.Tensor) -> torch.Tensor:
    """The mean of the red channel over the 4x4 bottom-right region: [N, 3, 8, 8] -> [N]."""
    return x[:, 0, 4:, 4:].mean((1, 2))


# constant maps score chance --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_pointing_game_warns_on_a_constant_map_and_scores_the_mask_area_share(value):
    masks = _masks()
    with _constant_warning():
        score = pointing_game(torch.full((2, SIZE, SIZE), value), masks)
    assert score == pytest.approx((4 / 64 + 16 / 64) / 2)
    with _constant_warning():
        hits = pointing_hits(torch.full((2, SIZE, SIZE), value), masks, tolerance=1)
    assert hits[0] == pytest.approx(12 / 64)  # the 2x2 square grown by a 1-px disc: 4x4 less its corners


def test_chance_iou_is_the_hypergeometric_expectation_of_a_random_selection():
    from scipy.stats import hypergeom

    from course_utils.metrics import chance_iou

    n, areas, ks = 64, torch.tensor([4, 16, 16, 60]), torch.tensor([4, 16, 8, 60])
    ours = chance_iou(areas, ks, n)
    for value, m, k in zip(ours, areas.tolist(), ks.tolist()):
        support = range(max(0, k + m - n), min(k, m) + 1)
        expected = sum(hypergeom.pmf(i, n, m, k) * i / (k + m - i) for i in support)
        assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("top_fraction", [None, 0.25])
def test_mask_iou_of_all_zero_and_all_ones_maps_is_the_mean_iou_of_random_maps(top_fraction):
    masks = _masks()
    with _constant_warning():
        zeros = mask_iou(torch.zeros(2, SIZE, SIZE), masks, top_fraction)
    with _constant_warning():
        ones = mask_iou(torch.ones(2, SIZE, SIZE), masks, top_fraction)
    assert torch.equal(zeros, ones)
    # a random ranking, averaged over many random maps: the chance value a constant map now gets
    noise = torch.rand(4000, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    random_iou = torch.stack([mask_iou(noise, masks[i].expand(4000, SIZE, SIZE), top_fraction).mean() for i in (0, 1)])
    assert torch.allclose(zeros, random_iou, atol=0.01)


@pytest.mark.parametrize("metric", [deletion_auc, insertion_auc])
def test_deletion_and_insertion_auc_of_constant_maps_warn_and_score_the_random_order_average(metric):
    """The score is the red mean over a 16-px region of a 64-px white image: deleting (inserting) the pixels
    in random order gives, in expectation, a straight line and an AUC of 1/2; the region first gives
    16/64 / 2 = 0.125 for deletion (the best) and 1 - 0.125 for insertion."""
    images = torch.ones(2, 3, SIZE, SIZE)
    region = torch.zeros(2, SIZE, SIZE)
    region[:, 4:, 4:] = 1.0
    options = dict(steps=64, baseline=0.0)
    with _constant_warning():
        zeros = metric(_region_score, images, torch.zeros(2, SIZE, SIZE), **options)
    with _constant_warning():
        ones = metric(_region_score, images, torch.ones(2, SIZE, SIZE), **options)
    assert torch.equal(zeros, ones)
    assert torch.allclose(zeros, torch.full((2,), 0.5), atol=0.08)  # 8 random orders: sd ≈ 0.03
    real = metric(_region_score, images, region, **options)
    better = real < zeros if metric is deletion_auc else real > zeros
    assert better.all() and real[0].item() == pytest.approx(0.125 if metric is deletion_auc else 0.875)


def test_average_drop_increase_scores_a_constant_map_as_weight_one_half_everywhere():
    """An all-zero map used to black the image out (weight 0): a score that a black image maximises then gave
    it 0 % drop and 100 % increase, beating the map of the object.  Now all-zero = all-ones = E of 1/2."""
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[:, 0, 4:, 4:] = torch.tensor([0.6, 0.7])[:, None, None]  # a red object on black: red means 0.15, 0.175
    region = (images[:, 0] > 0).float()

    def u_shaped(x):  # lowest at a red mean of 0.1: black scores 1.01, the images 1.0025 and 1.0056, halves less
        return 1 + (x[:, 0].mean((1, 2)) - 0.1) ** 2

    real = average_drop_increase(u_shaped, images, region)
    assert real == (0.0, 0.0)  # x ⊙ E = x
    with _constant_warning():
        zeros = average_drop_increase(u_shaped, images, torch.zeros(2, SIZE, SIZE))
    with _constant_warning():
        ones = average_drop_increase(u_shaped, images, torch.ones(2, SIZE, SIZE))
    assert zeros == ones
    half, full = u_shaped(images / 2), u_shaped(images)
    assert zeros[0] == pytest.approx(((full - half).clamp(min=0) / full).mean().item() * 100, abs=1e-4)
    assert zeros[1] == pytest.approx((half > full).float().mean().item() * 100)
    assert zeros[0] >= real[0] and zeros[1] <= real[1]  # the old all-zero score, (0 %, 100 %), beat the real map


def _thresholded_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of (mean of relu(x - 0.4) per channel, 0.01): two black images are identical (cosine 1)."""
    def embed(x):
        return torch.cat([F.relu(x - 0.4).mean((2, 3)), torch.full((len(x), 1), 0.01)], 1)

    return F.cosine_similarity(embed(a), embed(b))


def _object_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 8x8 images with a 2x2 object of similar colours on black, and the object's mask as the map."""
    x1, x2 = torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE)
    x1[0, :, :2, :2] = torch.tensor([1.0, 0.9, 0.0])[:, None, None]
    x2[0, :, :2, :2] = torch.tensor([0.9, 1.0, 0.0])[:, None, None]
    mask = torch.zeros(1, SIZE, SIZE)
    mask[0, :2, :2] = 1.0
    return x1, x2, mask


@pytest.mark.parametrize("mode", ["simultaneous", "conditional"])
def test_pair_average_drop_increase_an_all_zero_map_no_longer_beats_the_object_map(mode):
    x1, x2, mask = _object_pairs()
    real = pair_average_drop_increase(_thresholded_cosine, x1, x2, mask, mask, mode)
    assert real == (0.0, 0.0)  # x ⊙ E = x: nothing changes
    with _constant_warning():
        zeros = pair_average_drop_increase(_thresholded_cosine, x1, x2, torch.zeros_like(mask),
                                           torch.zeros_like(mask), mode)
    with _constant_warning():
        ones = pair_average_drop_increase(_thresholded_cosine, x1, x2, torch.ones_like(mask),
                                          torch.ones_like(mask), mode)
    assert zeros == ones
    second = x2 / 2 if mode == "simultaneous" else x2
    full, half = _thresholded_cosine(x1, x2), _thresholded_cosine(x1 / 2, second)
    assert zeros[0] == pytest.approx(((full - half).clamp(min=0) / full).item() * 100, abs=1e-4)
    assert zeros[0] >= real[0] and zeros[1] <= real[1]  # not better than the object's map on either score


@pytest.mark.parametrize("metric", [pair_deletion_auc, pair_insertion_auc])
def test_pair_deletion_and_insertion_auc_of_constant_maps_warn_and_score_the_random_order_average(metric):
    x = torch.ones(1, 3, SIZE, SIZE)

    def region_dot(a, b):  # the product of the two images' region means: 1 for whole images
        return _region_score(a) * _region_score(b)

    region = torch.zeros(1, SIZE, SIZE)
    region[0, 4:, 4:] = 1.0
    with _constant_warning():
        zeros = metric(region_dot, x, x, torch.zeros(1, SIZE, SIZE), region, "conditional", steps=64, baseline=0.0)
    with _constant_warning():
        ones = metric(region_dot, x, x, torch.ones(1, SIZE, SIZE), region, "conditional", steps=64, baseline=0.0)
    assert torch.equal(zeros, ones) and zeros.item() == pytest.approx(0.5, abs=0.08)
    # conditional mode does not use map2: a constant map2 there is no reason to warn
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric(region_dot, x, x, region, torch.zeros(1, SIZE, SIZE), "conditional", steps=4, baseline=0.0)


# bad images and empty batches --------------------------------------------------------------------------


@pytest.mark.parametrize("images, message", [
    ((torch.rand(2, 3, SIZE, SIZE) * 255).to(torch.uint8), r"x\.float\(\) / 255"),
    (torch.rand(2, 3, SIZE, SIZE) * 255, "0–255"),
    (torch.rand(2, 3, SIZE, SIZE).index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"))),
     "NaN"),
], ids=["uint8", "0-255 floats", "NaN pixels"])
def test_deletion_auc_rejects_images_that_are_not_floats_in_unit_range(images, message):
    with pytest.raises(ValueError, match=message):
        deletion_auc(_region_score, images, torch.rand(2, SIZE, SIZE))


def _empty_calls():
    images, maps, masks = torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0, SIZE, SIZE), torch.zeros(0, SIZE, SIZE).bool()
    score = _region_score

    def pair(a, b):
        return _region_score(a) * _region_score(b)

    return {
        "pointing_game": lambda: pointing_game(maps, masks),
        "mask_iou": lambda: mask_iou(maps, masks),
        "deletion_auc": lambda: deletion_auc(score, images, maps),
        "insertion_auc": lambda: insertion_auc(score, images, maps),
        "average_drop_increase": lambda: average_drop_increase(score, images, maps),
        "saliency_scores": lambda: saliency_scores(maps, masks, images, score),
        "pair_deletion_auc": lambda: pair_deletion_auc(pair, images, images, maps, maps),
        "pair_insertion_auc": lambda: pair_insertion_auc(pair, images, images, maps, maps),
        "pair_average_drop_increase": lambda: pair_average_drop_increase(pair, images, images, maps, maps),
        "max_sensitivity": lambda: max_sensitivity(lambda a, b: (a.mean(1), b.mean(1)), images, images),
    }


@pytest.mark.parametrize("name", list(_empty_calls()))
def test_every_metric_raises_a_clear_value_error_on_an_empty_batch(name):
    with pytest.raises(ValueError, match="empty batch"):
        _empty_calls()[name]()


# models run in eval mode and keep their state -------------------------------------------------------------


def _bn_scorer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0))


@pytest.mark.parametrize("wrap", ["module", "closure", "bound method", "partial"])
def test_deletion_auc_leaves_a_train_mode_model_unchanged_and_scores_as_in_eval_mode(wrap):
    model = _bn_scorer()
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    saliency = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    model.eval()
    expected = deletion_auc(model, images, saliency, steps=8)
    model.train()
    running_mean = model[1].running_mean.clone()
    batches_seen = model[1].num_batches_tracked.clone()
    score_fn = {"module": model, "closure": lambda x: model(x), "bound method": model.forward,
                "partial": functools.partial(lambda m, x: m(x), model)}[wrap]
    got = deletion_auc(score_fn, images, saliency, steps=8)
    assert model.training and all(module.training for module in model.modules())  # the mode is restored
    assert torch.equal(model[1].running_mean, running_mean) and torch.equal(model[1].num_batches_tracked, batches_seen)
    assert torch.allclose(got, expected, atol=1e-6)


class _PairEncoder(nn.Module):
    """Cosine similarity of a BatchNorm encoder's embeddings: a pair similarity_fn that is a module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, a, b):
        return F.cosine_similarity(self.encoder(a), self.encoder(b)) + 2  # positive, for Average Drop


@pytest.mark.parametrize("metric", ["pair_deletion_auc", "pair_insertion_auc", "pair_average_drop_increase"])
def test_pair_metrics_leave_a_train_mode_model_unchanged_and_score_as_in_eval_mode(metric):
    function = {"pair_deletion_auc": functools.partial(pair_deletion_auc, steps=4),
                "pair_insertion_auc": functools.partial(pair_insertion_auc, steps=4),
                "pair_average_drop_increase": pair_average_drop_increase}[metric]
    model = _PairEncoder()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.rand(2, 3, 3, SIZE, SIZE, generator=g)
    map1, map2 = torch.rand(2, 3, SIZE, SIZE, generator=g)
    model.eval()
    expected = function(model, x1, x2, map1, map2)
    model.train()
    running_mean = model.encoder[1].running_mean.clone()
    got = function(model, x1, x2, map1, map2)
    assert model.training and model.encoder[1].training
    assert torch.equal(model.encoder[1].running_mean, running_mean)
    if isinstance(expected, tuple):
        assert got == pytest.approx(expected, abs=1e-4)
    else:
        assert torch.allclose(got, expected, atol=1e-6)
