"""Pair explanations on hand-made models with a known answer, and the pair metrics on hand-built curves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.explain.pairs import (
    TRANSFORMS, averaged_transforms, conditional_occlusion, context_agnostic_occlusion, feature_visualisation,
    interaction_cam, invariance_map, invert, pairwise_occlusion, patch_masks, pixel_invariance, projection,
    random_erasing_masks,
)
from course_utils.imageops import gaussian_blur
from course_utils.metrics import max_sensitivity, pair_average_drop_increase, pair_deletion_auc, pair_insertion_auc

SIZE = 16


class QuadrantModel(nn.Module):
    """A "SimCLR model" that only sees the top-left quadrant: h = z = 4x4-pooled features of that quadrant.
    ``layer`` is its feature map, so Interaction-CAM has a layer to read."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        features = torch.relu(self.layer(x)) + 0.1
        quadrant = features * quadrant_mask(x.shape[-1]).to(x)
        h = F.adaptive_avg_pool2d(quadrant, 4).flatten(1)
        return h, h


def quadrant_mask(size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[: size // 2, : size // 2] = 1
    return mask


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(2, 3, SIZE, SIZE, generator=g)
    return x1, x2


def share_in_quadrant(saliency: torch.Tensor) -> float:
    positive = saliency.clamp(min=0)
    return (positive * quadrant_mask(saliency.shape[-1])).sum().item() / positive.sum().item()


def test_patch_masks_cover_every_pixel_with_the_scaled_default_patch():
    masks = patch_masks(32)
    assert masks.shape[1:] == (32, 32) and masks.sum((1, 2)).unique().tolist() == [81]  # 9 x 9 patches at 32 px
    assert masks.any(0).all()
    with pytest.raises(ValueError, match="patch"):
        patch_masks(8, patch=9)


@pytest.mark.parametrize("method", [conditional_occlusion, context_agnostic_occlusion])
def test_occlusion_maps_point_at_the_only_quadrant_the_model_sees(method, pair):
    model = QuadrantModel().eval()
    map1, map2 = method(projection(model), *pair, patch=4, stride=2)
    assert map1.shape == map2.shape == (SIZE, SIZE)
    for saliency in (map1, map2):
        assert quadrant_mask()[divmod(int(saliency.argmax()), SIZE)] == 1
        assert saliency[:8, :8].mean() > saliency[12:, 12:].mean() + 1e-3
        assert saliency[12:, 12:].std() < 1e-6  # patches the model cannot see all score alike
    if method is conditional_occlusion:  # a pixel whose patches all miss the quadrant changes nothing
        assert map1[12:].abs().max() < 1e-6 and map1[:, 12:].abs().max() < 1e-6  # 3x3 conv: 1 px beyond


def test_conditional_occlusion_equals_a_patch_by_patch_loop(pair):
    model = QuadrantModel().eval()
    embed = projection(model)
    x1, x2 = pair
    map1, _ = conditional_occlusion(embed, x1, x2, patch=4, stride=4)
    base = F.cosine_similarity(embed(x1[None]), embed(x2[None])).item()
    expected = torch.zeros(SIZE, SIZE)
    for top in range(0, SIZE, 4):
        for left in range(0, SIZE, 4):
            occluded = x1.clone()
            occluded[:, top:top + 4, left:left + 4] = 0
            drop = base - F.cosine_similarity(embed(occluded[None]), embed(x2[None])).item()
            expected[top:top + 4, left:left + 4] = drop
    assert torch.allclose(map1, expected, atol=1e-5)


@pytest.mark.parametrize("method", [conditional_occlusion, context_agnostic_occlusion, pairwise_occlusion])
def test_batch_size_none_fits_memory_and_gives_the_maps_of_an_explicit_batch_size(method, pair, monkeypatch):
    from course_utils import runtime

    model = QuadrantModel().eval()
    batches = []

    def embed(images):
        batches.append(images.shape[0])
        return model(images)[1]

    def run(batch_size):
        batches.clear()
        if method is pairwise_occlusion:
            return method(embed, *pair, samples=120, generator=torch.Generator().manual_seed(0), batch_size=batch_size)
        return method(embed, *pair, patch=4, stride=1, batch_size=batch_size)  # 169 patches

    explicit = run(256)
    monkeypatch.setattr(runtime, "_available_bytes", lambda device: 10**12)  # plenty: the old default, 256
    plenty = run(None)
    assert max(batches) == (120 if method is pairwise_occlusion else 169)  # everything in one pass, as before
    per_image = int(1e9 // runtime.fitting_batch_size(embed, (3, SIZE, SIZE), budget_bytes=1e9, cap=10**9))
    monkeypatch.setattr(runtime, "_available_bytes", lambda device: 2 * 30 * per_image)  # room for ~30 images
    small = run(None)
    assert 20 <= max(batches) <= 30  # smaller batches
    for a, b, c in zip(explicit, plenty, small):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_bad_batch_size_raises_a_clear_error(pair, batch_size):
    embed = projection(QuadrantModel().eval())
    for call in (lambda: conditional_occlusion(embed, *pair, batch_size=batch_size),
                 lambda: pairwise_occlusion(embed, *pair, batch_size=batch_size),
                 lambda: pixel_invariance(embed, pair[0], lambda v: v, n_augments=4, epochs=1, batch_size=batch_size)):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            call()


def test_pairwise_occlusion_credits_erasures_in_the_seen_quadrant_and_is_seeded(pair):
    model = QuadrantModel().eval()
    maps = pairwise_occlusion(projection(model), *pair, samples=200, temperature=0.01,
                              generator=torch.Generator().manual_seed(0))
    again = pairwise_occlusion(projection(model), *pair, samples=200, temperature=0.01,
                               generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(maps, again))
    for saliency in maps:
        assert saliency.max() == pytest.approx(1.0) and saliency.min() >= 0
        assert share_in_quadrant(saliency) > 0.4  # the quadrant is a quarter of the image
    with pytest.raises(ValueError, match="credit"):
        pairwise_occlusion(projection(model), *pair, credit="first")


def test_random_erasing_masks_have_the_requested_area_and_ratio():
    masks = random_erasing_masks(500, 32, scale=(0.1, 0.3), ratio=(1.0, 1.5), generator=torch.Generator().manual_seed(0))
    area = masks.float().mean((1, 2))
    assert area.min() > 0.07 and area.max() < 0.34
    rows, cols = masks.any(2).sum(1).float(), masks.any(1).sum(1).float()
    assert ((rows / cols) > 0.75).all() and ((rows / cols) < 1.8).all()


def test_interaction_cam_elementwise_is_zero_outside_the_seen_quadrant(pair):
    model = QuadrantModel().eval()
    x1, x2 = (x[None] for x in pair)
    map1, map2 = interaction_cam(model, model.layer, x1, x2, alpha="elementwise")
    assert map1.shape == map2.shape == (1, SIZE, SIZE)
    outside = quadrant_mask() == 0
    for saliency in (map1[0], map2[0]):  # gradients vanish outside the quadrant
        assert saliency[outside].abs().max() < 1e-6 and saliency.max() > 0
    with pytest.raises(ValueError, match="alpha"):
        interaction_cam(model, model.layer, x1, x2, alpha="max")


def test_interaction_cam_weights_channels_by_what_both_images_share():
    """With one channel silent in x2, that channel contributes nothing to x1's map."""

    class TwoChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x):
            f = self.layer(x[:, :2])
            z = f.mean((2, 3)) + 0.5
            return z, z

    x1 = torch.zeros(1, 3, 4, 4)
    x1[:, 0, 0, 0], x1[:, 1, 3, 3] = 1.0, 1.0
    x2 = torch.zeros(1, 3, 4, 4)
    x2[:, 0] = 0.5  # channel 1 is silent in x2
    model = TwoChannels()
    map1, _ = interaction_cam(model, model.layer, x1, x2)  # the paper's form, the default
    # independent: w = GAP(F1) * GAP(F2) = [1/16 * 0.5, 0]; only channel 0 counts
    f1 = x1[0, :2].requires_grad_()
    z1, z2 = f1.mean((1, 2)) + 0.5, x2[0, :2].mean((1, 2)) + 0.5
    (g1,) = torch.autograd.grad(F.cosine_similarity(z1, z2, dim=0), f1)
    weight = torch.tensor([1 / 16 * 0.5, 0.0])
    expected = (weight[:, None, None] * g1.mean((1, 2), keepdim=True) * x1[0, :2]).sum(0).clamp(min=0)
    assert torch.allclose(map1[0], expected, atol=1e-7)
    assert map1[0, 3, 3] == 0  # the pixel that only channel 1 sees


def test_averaged_transforms_gradients_stay_in_the_seen_quadrant(pair):
    model = QuadrantModel().eval()
    for name in TRANSFORMS:
        first, second = averaged_transforms(projection(model), pair[0], name, generator=torch.Generator().manual_seed(0))
        assert first.shape == second.shape == (SIZE, SIZE)
        seen = torch.zeros(SIZE, SIZE)
        seen[:9, :9] = 1  # the quadrant and the 1-pixel reach of the 3x3 convolution
        for saliency in (first, second):
            assert (saliency * (1 - seen)).abs().max() < 1e-6 and saliency.max() > 0
    with pytest.raises(ValueError, match="unknown transform"):
        averaged_transforms(projection(model), pair[0], "rotate")


def test_pixel_invariance_weights_concentrate_where_the_model_looks(pair):
    def quadrant_pixels(images):  # similarity = cosine of the top-left quadrant's pixels
        return images[:, :, : SIZE // 2, : SIZE // 2].flatten(1)

    g = torch.Generator().manual_seed(0)

    def augment(images):
        scale = torch.rand(len(images), 3, 1, 1, generator=g) * 0.8 + 0.6
        erase = torch.rand(len(images), 1, SIZE, SIZE, generator=g) < 0.2
        return torch.where(erase, torch.zeros_like(images), (images * scale).clamp(0, 1))

    saliency = pixel_invariance(quadrant_pixels, pair[0], augment, n_augments=1000, epochs=300)
    assert saliency.shape == (SIZE, SIZE) and saliency.max() == pytest.approx(1.0)
    top = saliency.flatten().topk(SIZE * SIZE // 8).indices
    assert quadrant_mask().flatten()[top].mean() > 0.8  # measured 0.94; chance 0.25


def test_invariance_map_takes_the_signed_channel_maximum_as_the_reference_code():
    # pixel (0, 0): channels (−3, 1, 0) — signed max 1, |w| max 3; pixel (0, 1): (2, 2, −1); pixel (1, 0): all
    # negative (−1, −2, −0.5); pixel (1, 1): zeros.  Worked by hand, independently of the module:
    weights = torch.tensor([[[-3.0, 2.0], [-1.0, 0.0]],
                            [[1.0, 2.0], [-2.0, 0.0]],
                            [[0.0, -1.0], [-0.5, 0.0]]])
    signed_max = torch.tensor([[1.0, 2.0], [-0.5, 0.0]])  # max over channels, sign kept
    expected = (signed_max + 0.5) / 2.5  # (m − min) / (max − min)
    assert torch.allclose(invariance_map(weights), expected)
    assert torch.allclose(invariance_map(weights, "abs"), torch.tensor([[3.0, 2.0], [2.0, 0.0]]) / 3)
    # where the two differ: |w| ranks pixel (0, 0) first, the signed maximum ranks pixel (0, 1) first
    assert invariance_map(weights).argmax() == 1 and invariance_map(weights, "abs").argmax() == 0
    with pytest.raises(ValueError, match="channels"):
        invariance_map(weights, "max")


def test_pixel_invariance_ranks_pixels_that_lower_the_similarity_last_by_default():
    # A black image and a model whose embedding grows with the brightness of a 4x4 corner: every view brightens
    # that corner by a random amount and is *less* similar to the image, so the surrogate's weights there are
    # negative; the other pixels stay 0 in every view, so their weights stay 0.  The signed maximum ranks the
    # corner last, |w| ranks it first.
    x = torch.zeros(3, SIZE, SIZE)
    corner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    corner[:4, :4] = True

    def embed(images):
        return torch.stack([torch.ones(len(images)), 4 * images[:, :, corner].mean((1, 2))], 1)

    g = torch.Generator().manual_seed(0)

    def brighten(images):
        return images + corner * torch.rand(len(images), 1, 1, 1, generator=g)

    signed = pixel_invariance(embed, x, brighten, n_augments=500, epochs=200)
    absolute = pixel_invariance(embed, x, brighten, n_augments=500, epochs=200, channels="abs")
    assert signed[corner].max() < 0.05 and signed[~corner].min() > 0.95  # measured 0 and 1
    assert absolute[corner].min() > 0.95 and absolute[~corner].max() < 0.05


def test_blur_transform_scales_the_reference_sigma_to_the_image():
    # explain-cl blends in a Gaussian blur of sigma 5 px at 224 px; at 16 px that is 5 * 16 / 224 px
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(TRANSFORMS["blur"](x), gaussian_blur(x, 5 * SIZE / 224))
    assert not torch.allclose(TRANSFORMS["blur"](x), gaussian_blur(x, 1.0), atol=1e-3)


def test_pair_insertion_starts_from_a_blur_scaled_to_the_image():
    # the curve's first point scores the baseline images themselves: record what the similarity sees
    seen = []

    def record(a, b):
        seen.append((a.clone(), b.clone()))
        return torch.zeros(len(a))

    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(2, 1, 3, 32, 32, generator=g)
    maps = torch.rand(1, 32, 32, generator=g)
    pair_insertion_auc(record, x1, x2, maps, maps, steps=2)
    first_a, first_b = seen[0][0][0], seen[0][1][0]  # step 0 of pair 0: nothing inserted yet
    sigma = 5 * 32 / 224
    assert torch.allclose(first_a, gaussian_blur(x1, sigma)[0]) and torch.allclose(first_b, gaussian_blur(x2, sigma)[0])
    seen.clear()
    pair_insertion_auc(record, x1, x2, maps, maps, steps=2, blur_sigma=5.0)  # fixed in pixels on request
    assert torch.allclose(seen[0][0][0], gaussian_blur(x1, 5.0)[0])


def test_feature_visualisation_raises_the_similarity_and_stays_an_image(pair):
    model = QuadrantModel().eval()
    image, history = feature_visualisation(projection(model), pair[1], steps=60, lr=0.1)
    assert image.shape == pair[1].shape and image.min() >= 0 and image.max() <= 1
    assert history[-1] > history[0] + 0.01 and history[-1] > 0.99


def test_inversion_matches_the_layer_better_than_its_starting_noise(pair):
    model = QuadrantModel().eval()
    x = pair[0]
    inverted = invert(model, model.layer, x, steps=150, lr=0.1, tv=0.0)
    start = torch.sigmoid(0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        target = model.layer(x[None])
        assert (model.layer(inverted[None]) - target).norm() < 0.5 * (model.layer(start[None]) - target).norm()


def _dot_similarity(a, b):
    return (a[:, 0] * b[:, 0]).flatten(1).sum(1)


def test_pair_deletion_and_insertion_auc_on_hand_built_curves():
    x1 = torch.zeros(1, 3, 1, 2)
    x1[0, 0] = torch.tensor([[1.0, 0.5]])  # images lie in [0, 1]: the scores below are those of [[2, 1]], halved
    x2 = torch.ones(1, 3, 1, 2)
    good, bad = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    # conditional: x1 loses pixel (0,0) then (0,1); s = 3 -> 1 -> 0 (good order), 3 -> 2 -> 0 (bad)
    assert pair_deletion_auc(_dot_similarity, x1, x2, good, good, "conditional", steps=2).item() == pytest.approx(
        0.5 * (3 / 2 + 1 + 0 / 2) / 2)
    assert pair_deletion_auc(_dot_similarity, x1, x2, bad, bad, "conditional", steps=2).item() == pytest.approx(
        0.5 * (3 / 2 + 2 + 0 / 2) / 2)
    # simultaneous: x2 loses its pixels too, by its own map: s = 3 -> 1 (x2's pixel (0,0) gone with x1's) -> 0
    assert pair_deletion_auc(_dot_similarity, x1, x2, good, good, "simultaneous", steps=2).item() == pytest.approx(
        0.5 * (3 / 2 + 1 + 0) / 2)
    assert pair_deletion_auc(_dot_similarity, x1, x2, good, bad, "simultaneous", steps=2).item() == pytest.approx(
        0.5 * (3 / 2 + 0 + 0) / 2)  # x2 deletes pixel (0,1) first: both products vanish after one step
    # insertion into a zero baseline mirrors deletion
    assert pair_insertion_auc(_dot_similarity, x1, x2, good, good, "conditional", steps=2,
                              baseline=0.0).item() == pytest.approx(0.5 * (0 / 2 + 2 + 3 / 2) / 2)
    with pytest.raises(ValueError, match="mode"):
        pair_deletion_auc(_dot_similarity, x1, x2, good, good, "both")


def test_pair_average_drop_and_increase_on_hand_built_pairs():
    x = torch.ones(2, 3, 1, 2)
    x2 = torch.ones(2, 3, 1, 2)
    maps = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # the second map is constant: chance, E = 1/2 everywhere
    with pytest.warns(UserWarning, match="constant"):
        drop, increase = pair_average_drop_increase(_dot_similarity, x, x2, maps, torch.ones(2, 1, 2), "conditional")
    # Y = 2 for both; O = 1 (half kept) and 1 (every pixel at weight 1/2): drops 0.5 and 0.5
    assert drop == pytest.approx(50.0) and increase == 0.0
    with pytest.raises(ValueError, match="positive similarity"):
        pair_average_drop_increase(lambda a, b: -_dot_similarity(a, b), x, x2, maps, maps, "simultaneous")


def test_max_sensitivity_is_zero_for_a_constant_explainer_and_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(2, 3, 3, 8, 8, generator=g)

    def constant(a, b):
        return torch.zeros(a.shape[0], 8, 8), torch.zeros(a.shape[0], 8, 8)  # zero maps: no division by zero

    def channel_means(a, b):
        return a.mean(1), b.mean(1)

    assert max_sensitivity(constant, x1, x2).abs().max() == 0
    ours = max_sensitivity(channel_means, x1, x2, radius=0.1, samples=5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)

    def unit(m):
        flat = m.flatten(1)
        return ((flat - flat.min(1, keepdim=True).values) /
                (flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values)).view_as(m)

    worst1, worst2 = torch.zeros(3), torch.zeros(3)
    for _ in range(5):
        delta = (torch.rand(x1.shape, generator=g) * 2 - 1) * 0.1
        for worst, image in ((worst1, x1), (worst2, x2)):
            change = (unit((image + delta).clamp(0, 1).mean(1)) - unit(image.mean(1))).pow(2).mean((1, 2)).sqrt()
            torch.maximum(worst, change, out=worst)
    assert torch.allclose(ours, (worst1 + worst2) / 2, atol=1e-6)
    assert (ours > 0).all() and (ours <= 1).all()
