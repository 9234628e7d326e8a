"""AGF: conservation (BasicBlock and Bottleneck ResNets), the propagation rules against explicit loops, the
factorisation, clear errors, a ResNet-50 at 224 px, and localisation on ShapesWorld with the committed SimCLR
encoder."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.explain.agf import (
    add_split, agf, agf_relevance, class_target, conv_flat, conv_guided, delta_shift, factorize, ssl_target, stem_zb,
)
from course_utils.models import SimCLRModel, resnet


def _randomise_batchnorm(encoder: nn.Module, seed: int) -> nn.Module:
    """Fresh BN layers are the identity and zero the residual branches; give them random statistics.
    Positive biases keep some unit alive in every receptive field, so no relevance is dropped."""
    generator = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=generator) + 0.5
            m.bias.data = torch.rand(n, generator=generator) * 0.5
            m.running_mean = (torch.rand(n, generator=generator) - 0.5) * 0.4
            m.running_var = torch.rand(n, generator=generator) * 1.5 + 0.5
    return encoder.eval()


@pytest.fixture(scope="module")
def encoder64() -> nn.Module:
    """Float64 ResNet-10 of width 8 (random weights): totals can be compared to 1e-9."""
    torch.manual_seed(0)
    return _randomise_batchnorm(resnet(10, 8), seed=0).double()


@pytest.fixture(scope="module")
def images64() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    torch.manual_seed(1)
    return _randomise_batchnorm(resnet(10, 8), seed=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def bottleneck64() -> nn.Module:
    """Float64 ResNet-50 of width 4 with the ImageNet stem (random weights), for 64 px images."""
    torch.manual_seed(2)
    return _randomise_batchnorm(resnet(50, 4, small_input=False), seed=2).double()


def _linear_target(h: torch.Tensor) -> torch.Tensor:
    return h @ torch.linspace(-1, 1, h.shape[1], dtype=h.dtype)


def _images(n: int, size: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# 1. conservation ---------------------------------------------------------------------------------------

# depth: (width, image size).  ResNet-50 (Bottleneck) needs width 16: at width 4 (8 with small_input) some
# pixels of a 1x1 convolution's input have every channel dead, that receptive field is all zero and the
# relevance the add gave its output is dropped (measured: 1 % of the total at width 4).
CONSERVATION_SETUPS = {10: (8, 32), 50: (16, 64)}


@pytest.mark.parametrize("small_input", [True, False])
@pytest.mark.parametrize("add_rule", ["absolute", "signed"])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("use_head", [False, True])
@pytest.mark.parametrize("depth", sorted(CONSERVATION_SETUPS))
def test_total_relevance_at_the_image_equals_the_total_at_the_representation(depth, guided, add_rule, small_input,
                                                                            use_head):
    # flat rules and the residual split conserve; the Δ-shift puts back exactly what the residual added
    width, size = CONSERVATION_SETUPS[depth]
    images = _images(3, size, seed=1)
    torch.manual_seed(0)
    encoder = _randomise_batchnorm(resnet(depth, width, small_input=small_input), seed=0).double()
    head = nn.Linear(encoder.out_dim, 5).double()
    # logits of order 1: a saturated Eq. 8 score (ResNet-50's h is ~100) gives Σ Φ ~ 1e-19, below the rounding
    # of the guided residual r, which is O(1) per unit whatever the scale of Φ
    head.weight.data *= 8 / encoder.out_dim
    target = class_target(head, 2) if use_head else _linear_target
    phi, phi_h = agf_relevance(encoder, images, target, guided=guided, add_rule=add_rule)
    assert phi.shape == images.shape and phi_h.shape == (3, encoder.out_dim)
    scale = phi_h.abs().sum(1)
    assert (scale > 0).all() and phi.abs().sum((1, 2, 3)).min() > 0
    assert torch.allclose(phi.sum((1, 2, 3)), phi_h.sum(1), rtol=0, atol=1e-9 * scale.min().item())


def test_guided_and_flat_maps_differ(encoder64, images64):
    guided = agf(encoder64, images64, _linear_target)
    flat = agf(encoder64, images64, _linear_target, guided=False)
    assert not torch.allclose(guided, flat, atol=1e-3)


# 2. the propagation rules against explicit loops --------------------------------------------------------

def _loop_rule(phi: torch.Tensor, conv: nn.Conv2d, contributions) -> torch.Tensor:
    """Distribute every output unit's Φ over its receptive field in proportion to ``contributions(patch
    slice, k)`` [C, kh, kw] (stride 2, padding 1, 3x3 kernels)."""
    _, channels, size, _ = phi.shape
    relevance = torch.zeros(1, conv.in_channels, 2 * size + 1, 2 * size + 1, dtype=phi.dtype)  # padded input
    for k in range(channels):
        for i in range(size):
            for j in range(size):
                rows, cols = slice(2 * i, 2 * i + 3), slice(2 * j, 2 * j + 3)
                share = contributions(rows, cols, k)
                relevance[0, :, rows, cols] += share / share.sum() * phi[0, k, i, j]
    return relevance[:, :, 1:-1, 1:-1]


@pytest.fixture()
def tiny_conv() -> nn.Conv2d:
    torch.manual_seed(3)
    return nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False).double()


def test_flat_rule_shares_each_output_in_proportion_to_abs_x_times_abs_w(tiny_conv):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 5, generator=generator, dtype=torch.float64)
    phi = torch.randn(1, 3, 3, 3, generator=generator, dtype=torch.float64)
    padded, weight = F.pad(x.abs(), (1, 1, 1, 1))[0], tiny_conv.weight.detach().abs()
    expected = _loop_rule(phi, tiny_conv, lambda rows, cols, k: padded[:, rows, cols] * weight[k])
    assert torch.allclose(conv_flat(phi, x, tiny_conv), expected, atol=1e-12)
    ones = _loop_rule(phi, tiny_conv, lambda rows, cols, k: F.pad(torch.ones(2, 5, 5, dtype=torch.float64),
                                                                  (1, 1, 1, 1))[:, rows, cols] * weight[k])
    assert torch.allclose(conv_flat(phi, torch.ones_like(x), tiny_conv), ones, atol=1e-12)  # A of Eq. 10


def test_stem_zb_rule_against_loops(tiny_conv):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 5, generator=generator, dtype=torch.float64)
    phi = torch.randn(1, 3, 3, 3, generator=generator, dtype=torch.float64)
    weight = tiny_conv.weight.detach()
    from_low, from_high = F.pad(x - x.min(), (1, 1, 1, 1))[0], F.pad(x - x.max(), (1, 1, 1, 1))[0]
    expected = _loop_rule(phi, tiny_conv, lambda rows, cols, k: from_low[:, rows, cols] * weight[k].clamp(min=0)
                          + from_high[:, rows, cols] * weight[k].clamp(max=0))
    assert torch.allclose(stem_zb(phi, x, tiny_conv), expected, atol=1e-12)


def test_add_split_absolute_and_signed():
    phi, a, b = torch.tensor([6.0, 6.0]), torch.tensor([1.0, -1.0]), torch.tensor([2.0, 3.0])
    phi_a, phi_b = add_split(phi, a, b)
    assert torch.allclose(phi_a, torch.tensor([2.0, 1.5])) and torch.allclose(phi_b, torch.tensor([4.0, 4.5]))
    phi_a, phi_b = add_split(phi, a, b, "signed")
    assert torch.allclose(phi_a, torch.tensor([2.0, -3.0])) and torch.allclose(phi_b, torch.tensor([4.0, 9.0]))


def test_delta_shift_keeps_the_total_and_the_zeros():
    g = torch.tensor([[[[1.0, 0.0], [-2.0, 3.0]]]])
    r = torch.tensor([[[[0.5, 7.0], [1.0, 1.5]]]])
    shifted = delta_shift(g, r)
    assert shifted.sum().item() == pytest.approx(g.sum().item())
    assert shifted[0, 0, 0, 1] == 7.0  # the mean of r is taken off the non-zero units of G only
    assert torch.allclose(shifted, g + r - 10.0 / 3 * (g != 0))


def test_guided_step_is_the_delta_shift_of_c_by_the_eq13_residual(tiny_conv):
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(2, 2, 5, 5, generator=generator, dtype=torch.float64)  # a post-ReLU input
    x[:, :, :2] = 0  # dead rows: C = 0 there, so no residual either
    grad = torch.randn(2, 2, 5, 5, generator=generator, dtype=torch.float64)
    phi = torch.randn(2, 3, 3, 3, generator=generator, dtype=torch.float64)
    c = conv_flat(phi, x, tiny_conv)
    a = conv_flat(phi, torch.ones_like(x), tiny_conv)
    f_x, f_grad = factorize(x, c.mean(1, keepdim=True)), factorize(grad, c.mean(1, keepdim=True))
    m = (x * grad).mean(1, keepdim=True).clamp(min=0)
    m = m / m.amax((1, 2, 3), keepdim=True)
    r = (a + f_grad.clamp(min=0) + (f_x.clamp(min=0) + m) / (1 + torch.exp(-c))) * (c != 0)
    expected = c + r - r.sum((1, 2, 3), keepdim=True) / (c != 0).sum((1, 2, 3), keepdim=True) * (c != 0)
    guided = conv_guided(phi, x, grad, tiny_conv)
    assert torch.allclose(guided, expected, atol=1e-12)
    # output row 0 sees only dead input rows: conv(|x|, |W|) = 0 there and its Φ is dropped
    assert (guided[:, :, :2] == 0).all() and torch.allclose(guided.sum((1, 2, 3)), phi[:, :, 1:].sum((1, 2, 3)))


# 3. guided factorisation ---------------------------------------------------------------------------------

def _two_regions() -> tuple[torch.Tensor, torch.Tensor]:
    """Left half: channels 0, 1 on (foreground, φ > 0); right half: channels 2, 3 weakly on (φ < 0)."""
    y = torch.zeros(1, 4, 6, 6)
    y[:, :2, :, :3] = 1.0
    y[:, 2:, :, 3:] = 0.3
    phi = torch.ones(1, 1, 6, 6)
    phi[..., 3:] = -1.0
    return y, phi


def test_factorisation_is_positive_on_the_foreground_and_clipped_to_zero_on_the_background():
    y, phi = _two_regions()
    f = factorize(y, phi)
    assert f.shape == (1, 1, 6, 6)
    assert (f[..., :3] > 0.1).all() and (f[..., 3:] < 0).all()
    positive = f.clamp(min=0)  # F⁺ as in Eq. 11
    assert (positive[..., 3:] == 0).all() and (positive[..., :3] > 0.1).all()


def test_factorisation_flips_sign_with_the_partition_and_survives_an_empty_part():
    y, phi = _two_regions()
    assert torch.allclose(factorize(y, -phi), -factorize(y, phi), atol=1e-6)
    only_foreground = factorize(y, phi.abs())  # no background pixel: its representative is 0, not NaN
    assert torch.isfinite(only_foreground).all() and (only_foreground >= 0).all()


# 4. shapes, determinism, targets, errors ---------------------------------------------------------------

@pytest.mark.parametrize("model, size", [("encoder64", 32), ("bottleneck64", 64)])
def test_maps_are_finite_signed_deterministic_and_per_image(model, size, request):
    encoder, images = request.getfixturevalue(model), _images(3, size, seed=1)
    maps = agf(encoder, images, _linear_target)
    assert maps.shape == (3, size, size) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert (maps > 0).any() and (maps < 0).any()
    assert torch.equal(maps, agf(encoder, images, _linear_target))
    one_by_one = torch.cat([agf(encoder, images[i:i + 1], _linear_target) for i in range(3)])
    assert torch.allclose(maps, one_by_one, atol=1e-6)


def test_resnet50_at_224_px_gives_a_finite_map_in_seconds():
    # the course's imported ResNet-50 (ImageNet stem, width 64) on one 224 px image, float32; measured on a shared
    # 2-core CPU: 1.6-1.9 s on 1 thread, 3-13 s on 2 threads (by the load), peak RSS ~1.0 GB, as high as one plain
    # forward + backward pass of the encoder (190 MB above a no-grad forward)
    torch.manual_seed(0)
    encoder = _randomise_batchnorm(resnet(50, 64, small_input=False), seed=0)
    image = _images(1, 224, seed=0, dtype=torch.float32)
    start = time.perf_counter()
    maps = agf(encoder, image, _linear_target)
    assert time.perf_counter() - start < 60
    assert maps.shape == (1, 224, 224) and torch.isfinite(maps).all() and (maps > 0).any()


def test_encoder_mode_is_restored_and_the_map_uses_eval_mode(encoder, images):
    target = ssl_target(torch.rand(50, 64, generator=torch.Generator().manual_seed(0)))
    expected = agf(encoder, images, target)
    encoder.train()
    try:
        maps = agf(encoder, images, target)
        assert encoder.training
    finally:
        encoder.eval()
    assert torch.allclose(maps, expected, atol=1e-6)
    assert torch.allclose(agf(SimCLRModel(encoder), images, target), expected, atol=1e-6)


def test_class_target_is_eq8_and_class_specific(encoder, images):
    head = nn.Linear(64, 3)
    head.weight.data = torch.eye(3, 64)
    head.bias.data.zero_()
    h = torch.zeros(1, 64)
    h[0, :3] = torch.tensor([2.0, 1.0, 0.0])  # logits y = (2, 1, 0), t = 0, σ = 2
    expected = torch.softmax(2.0 * torch.exp(-0.5 * (torch.tensor([0.0, -1.0, -2.0]) / 2) ** 2), 0)[0]
    assert class_target(head, 0)(h).item() == pytest.approx(expected.item(), rel=1e-6)
    torch.manual_seed(0)
    probe = nn.Linear(64, 5)
    first, second = agf(encoder, images, class_target(probe, 0)), agf(encoder, images, class_target(probe, 1))
    per_image = agf(encoder, images, class_target(probe, torch.tensor([0, 1, 0, 1])))
    assert torch.allclose(per_image[0], first[0], atol=1e-6) and torch.allclose(per_image[1], second[1], atol=1e-6)
    correlation = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]
    assert correlation < 0.99
    with pytest.raises(ValueError, match="class indices"):
        agf(encoder, images, class_target(probe, 7))
    with pytest.raises(ValueError, match="one per image"):
        agf(encoder, images, class_target(probe, torch.tensor([0, 1])))


def test_ssl_target_skips_the_image_itself_and_uses_the_centred_neighbours():
    generator = torch.Generator().manual_seed(0)
    bank = torch.rand(20, 8, generator=generator)
    h = bank[:3] + 1e-4  # the images are in the bank (up to bf16-like noise)
    target = ssl_target(bank, k=2)
    neighbours = target.neighbours(h)
    assert neighbours.shape == (3, 2) and not (neighbours == torch.arange(3)[:, None]).any()
    distances = torch.cdist(h, bank)
    distances[torch.arange(3), torch.arange(3)] = float("inf")
    assert torch.equal(neighbours, distances.topk(2, largest=False).indices)
    mean = bank.mean(0)
    u = F.normalize(bank[neighbours].mean(1) - mean, dim=1)
    assert torch.allclose(target(h), ((h - mean) * u).sum(1), atol=1e-6)


def test_unique_ssl_target_on_a_hand_built_bank():
    # Alg. 2: S_I = L_I − L_N.  Bank rows and h chosen so the nearest neighbours are known by hand:
    bank = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 3.0, 3.0]])
    h = torch.tensor([[1.1, 0.2, 0.0]])  # distances 1.12, 0.22, 2.11, 4.5: nearest row 1, then row 0
    unique = ssl_target(bank, k=1, evidence="unique")
    # S = h − bank[1] = (0.1, 0.2, 0); y = ||S|| = √0.05; Φ^(1) = S ⊙ S/||S|| = (0.01, 0.04, 0) / √0.05
    norm = 0.05 ** 0.5
    assert unique(h).item() == pytest.approx(norm, rel=1e-5)
    seed = unique.relevance_seed(h, unique.direction(h))
    assert torch.allclose(seed, torch.tensor([[0.01, 0.04, 0.0]]) / norm, atol=1e-6)
    # k = 2 averages rows 1 and 0: S = h − (0.5, 0, 0) = (0.6, 0.2, 0)
    two = ssl_target(bank, k=2, evidence="unique")
    assert two(h).item() == pytest.approx((0.36 + 0.04) ** 0.5, rel=1e-5)
    # the shared target of the same bank is unchanged: ⟨h − μ, unit(h̄_N − μ)⟩, seeded h ⊙ u
    shared = ssl_target(bank, k=1)
    mean = bank.mean(0)
    u = (bank[1] - mean) / (bank[1] - mean).norm()
    assert shared.evidence == "shared" and shared(h).item() == pytest.approx(((h[0] - mean) @ u).item(), rel=1e-5)
    assert torch.allclose(shared.relevance_seed(h, u[None]), h * u, atol=1e-7)
    with pytest.raises(ValueError, match="evidence"):
        ssl_target(bank, k=1, evidence="different")


def test_agf_seeds_the_unique_evidence_with_the_neighbours_latent_subtracted(encoder64, images64):
    # an independent Φ^(1): the encoder's h, its nearest bank entry found by a loop, S ⊙ S / ||S||
    with torch.no_grad():
        h = encoder64(images64)
    generator = torch.Generator().manual_seed(7)
    bank = (h[[1, 2, 0]] + 0.05 * torch.rand(3, h.shape[1], generator=generator, dtype=h.dtype)).float()
    bank = torch.cat([bank, bank + 1.0])  # far entries that are never nearest
    target = ssl_target(bank, k=1, evidence="unique")
    expected = []
    for row in h:
        distances = [(row - entry.double()).norm().item() for entry in bank]
        nearest = bank[distances.index(min(distances))].double()
        difference = row - nearest
        expected.append(difference * difference / difference.norm())
    expected = torch.stack(expected)
    phi, phi_h = agf_relevance(encoder64, images64, target)
    assert torch.allclose(phi_h, expected, rtol=1e-5, atol=1e-9)
    # conservation: the map's total is y = ||S|| less the share of features the image lacks (h = 0): they have no
    # activation to land on (the bank's noise makes S ≠ 0 there)
    dead = h == 0
    assert dead.any() and (expected[dead] > 0).any()
    assert torch.allclose(phi.sum((1, 2, 3)), (expected * ~dead).sum(1), rtol=1e-6)
    assert torch.allclose(expected.sum(1), torch.stack([(h[i] - bank[j].double()).norm() for i, j in
                                                        enumerate(target.neighbours(h)[:, 0])]), rtol=1e-5)


def test_bad_inputs_raise_clear_errors(encoder, images):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        agf(encoder, images[0], _linear_target)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        agf(encoder, images[:, :1], _linear_target)
    with pytest.raises(ValueError, match="float"):
        agf(encoder, (images * 255).to(torch.uint8), _linear_target)
    with pytest.raises(ValueError, match="NaN"):
        agf(encoder, images.clone().fill_(float("nan")), _linear_target)
    unsupported = resnet(10, 2)
    unsupported.layer2 = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="BasicBlock .* or Bottleneck .* this encoder has Identity blocks"):
        agf(unsupported, images, _linear_target)
    with pytest.raises(ValueError, match="course ResNet"):
        agf(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), images, _linear_target)
    with pytest.raises(ValueError, match="add_rule"):
        agf(encoder, images, _linear_target, add_rule="positive")
    with pytest.raises(ValueError, match="one score per image"):
        agf(encoder, images, lambda h: h)
    for constant in (torch.zeros, lambda n: torch.zeros(n, requires_grad=True)):
        with pytest.raises(ValueError, match="does not depend"):
            agf(encoder, images, lambda h: constant(h.shape[0]))
    with pytest.raises(ValueError, match="k must be"):
        ssl_target(torch.rand(5, 8), k=5)
    with pytest.raises(ValueError, match=r"\[M, r\]"):
        ssl_target(torch.rand(5))
    with pytest.raises(ValueError, match="fewer than k"):
        ssl_target(torch.ones(3, 8), k=2).neighbours(torch.ones(1, 8))


# 5. science: the committed SimCLR encoder on ShapesWorld ------------------------------------------------

def test_agf_with_the_ssl_target_points_at_the_object():
    from course_utils.data.shapes import ShapesWorld
    from course_utils.metrics import centre_prior, pointing_game, random_map
    from course_utils.models import load_pretrained

    encoder = load_pretrained("simclr-shapes-r10").encoder.eval()
    world = ShapesWorld(n=64, seed=0, split="test")
    images, masks = world.images.float() / 255, world.masks
    with torch.no_grad():
        bank = encoder(ShapesWorld(n=1000, seed=0, split="train").images.float() / 255)
    maps = agf(encoder, images, ssl_target(bank, k=5))
    assert maps.shape == (64, 32, 32) and torch.isfinite(maps).all()
    agf_pg = pointing_game(maps, masks)
    unique_pg = pointing_game(agf(encoder, images, ssl_target(bank, k=1, evidence="unique")), masks)
    random_pg = pointing_game(random_map(64, 32, torch.Generator().manual_seed(0)), masks)
    centre_pg = pointing_game(centre_prior(64, 32), masks)
    # measured on these 64 images: AGF 0.72, random map 0.08 (the object covers 7 % of an image),
    # centre prior 0.27; the authors' signed Add split gives 0.19 (200 images: 0.79 / 0.085 / 0.26 / 0.20)
    assert agf_pg >= 0.5 and agf_pg >= random_pg + 0.35 and agf_pg >= centre_pg + 0.2
    # the unique evidence (Alg. 2, the single nearest neighbour) points at the object too: measured 0.91 (shared, k = 5: 0.72)
    assert unique_pg >= 0.5 and unique_pg >= centre_pg + 0.2
