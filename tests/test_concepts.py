"""TCAV and prototypes on planted concepts."""

import pytest
import torch
from torch import nn

from course_utils.explain.gradcam import layer_gradient
from course_utils.explain.concepts import (
    concept_activation_vector, layer_activations, prototypes, tcav, tcav_concepts, tcav_score, tcav_targets,
)


class RednessModel(nn.Module):
    """y = how much of the image is bright red, read through an identity "layer" whose activations are the
    pixels: the gradient is positive on the red channel where red > 0.4 and zero elsewhere, so it differs
    between images."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x):
        return torch.relu(self.layer(x)[:, 0] - 0.4).mean((1, 2)) + 0 * self.dummy


def random_images(n, seed):
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_a_concept_the_target_uses_is_significant_and_a_random_concept_is_not():
    model = RednessModel()
    red = random_images(30, 0)
    red[:, 0] = 0.8 + 0.2 * red[:, 0]  # red images: the concept
    randoms = [random_images(30, seed) for seed in range(1, 9)]
    inputs = random_images(20, 100)
    result = tcav(model, model.layer, inputs, lambda y: y, red, randoms)
    assert result.score > 0.9 and result.significant  # more red raises y (measured: 1.0, p = 0.002)
    blue = random_images(30, 0)
    blue[:, 2] = 0.8 + 0.2 * blue[:, 2]  # a real concept the target does not read
    unrelated = tcav(model, model.layer, inputs, lambda y: y, blue, randoms)
    assert not unrelated.significant  # measured p = 0.12 (red: p = 0.002)
    with pytest.raises(ValueError, match="at least 3 random sets"):
        tcav(model, model.layer, inputs, lambda y: y, red, randoms[:2])


def test_tcav_of_several_concepts_at_once_equals_one_call_per_concept():
    model = RednessModel()
    red, blue = random_images(30, 0), random_images(30, 50)
    red[:, 0] = 0.8 + 0.2 * red[:, 0]
    blue[:, 2] = 0.8 + 0.2 * blue[:, 2]
    randoms = [random_images(30, seed) for seed in range(1, 6)]
    inputs = random_images(20, 100)
    together = tcav_concepts(model, model.layer, inputs, lambda y: y, {"red": red, "blue": blue}, randoms)
    for name, examples in (("red", red), ("blue", blue)):
        alone = tcav(model, model.layer, inputs, lambda y: y, examples, randoms)
        assert together[name].scores == alone.scores and together[name].p_value == alone.p_value
    assert together["red"].random_scores == together["blue"].random_scores  # one shared null distribution


def test_tcav_of_several_targets_shares_the_cavs_and_equals_one_call_per_target():
    """Two targets that read red with opposite signs: the shared CAVs give each target exactly the scores and
    p-values of its own tcav_concepts call, and the two targets' verdicts on red differ."""
    model = RednessModel()
    red = random_images(30, 0)
    red[:, 0] = 0.8 + 0.2 * red[:, 0]
    randoms = [random_images(30, seed) for seed in range(1, 6)]
    targets = {"more red": (random_images(20, 100), lambda y: y), "less red": (random_images(15, 200), lambda y: -y)}
    together = tcav_targets(model, model.layer, targets, {"red": red}, randoms)
    for key, (inputs, target) in targets.items():
        alone = tcav_concepts(model, model.layer, inputs, target, {"red": red}, randoms)["red"]
        assert together[key]["red"].scores == alone.scores and together[key]["red"].p_value == alone.p_value
        assert together[key]["red"].random_scores == alone.random_scores
    assert together["more red"]["red"].significant and not together["less red"]["red"].significant
    with pytest.raises(ValueError, match="at least one target"):
        tcav_targets(model, model.layer, {}, {"red": red}, randoms)


def test_a_concept_that_lowers_the_target_is_not_used_and_many_concepts_are_fdr_corrected():
    """'Used' means significantly *above* random: a concept whose CAV lowers y (dark-red images: moving
    towards them removes red) has a tiny two-sided p but is not used; Benjamini–Hochberg runs across the
    concepts of one call, so adding null concepts cannot make an unused concept significant."""
    from course_utils.explain.concepts import tcav_p_value

    model = RednessModel()
    not_red = random_images(30, 0)
    not_red[:, 0] = 0.1 * not_red[:, 0]  # no red at all: the CAV points away from red
    randoms = [random_images(30, seed) for seed in range(1, 21)]
    inputs = random_images(20, 100)
    result = tcav(model, model.layer, inputs, lambda y: y, not_red, randoms)
    assert result.score < 0.1 and not result.significant
    assert tcav_p_value(result.random_scores, result.scores) < 0.01  # the opposite direction is very significant
    assert tcav_p_value([0.9, 0.9], [0.5, 0.5]) == 0.0 and tcav_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0
    # p = 0.03 alone is significant; among four concepts with p = 0.03, 0.5, 0.6, 0.7 it is not (0.03 > 0.05/4)
    from course_utils.stats import benjamini_hochberg
    assert benjamini_hochberg([0.03]).tolist() == [True]
    assert benjamini_hochberg([0.03, 0.5, 0.6, 0.7]).tolist() == [False] * 4


def test_cav_points_towards_the_concept_and_the_score_counts_positive_derivatives():
    concept = torch.tensor([[2.0, 0.0], [3.0, 0.5], [2.5, -0.5]])
    random = torch.tensor([[-2.0, 0.0], [-3.0, 0.5], [-2.5, -0.5]])
    cav = concept_activation_vector(concept, random)
    assert cav.norm() == pytest.approx(1.0) and cav[0] > 0.9
    gradients = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.5, 3.0], [2.0, -1.0]])
    expected = ((gradients @ cav) > 0).float().mean().item()
    assert tcav_score(gradients, cav) == expected == 0.75
    with pytest.raises(ValueError, match="same D"):
        concept_activation_vector(concept, random[:, :1])


def test_layer_activations_are_flattened_per_image():
    model = RednessModel()
    images = random_images(5, 0)
    assert torch.equal(layer_activations(model, model.layer, images, batch_size=2), images.flatten(1))
    with pytest.raises(ValueError, match="not a module"):
        layer_activations(model, nn.Identity(), images)


def test_prototypes_recover_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    labels = torch.arange(3).repeat_interleave(40)
    H = centres[labels] + 0.1 * torch.randn(120, 8, generator=g)
    result = prototypes(H, k=3, per_prototype=5)
    for c in range(3):  # every cluster is one planted group
        assert len(set(labels[result.assignment == c].tolist())) == 1
        assert len(set(labels[result.nearest[c]].tolist())) == 1
    assert result.centroids.shape == (3, 8) and result.nearest.shape == (3, 5)
    with pytest.raises(ValueError, match="N >= k"):
        prototypes(H[:2], k=3)


def test_a_concept_with_one_sample_per_random_set_pairs_sample_i_with_random_set_i():
    """The calibrated design (notebook 07): CAV i separates concept sample i from random set i, so each
    sample enters exactly one CAV; a list of the wrong length is refused."""
    model = RednessModel()
    samples = [random_images(30, 200 + i) for i in range(4)]  # random concepts: scores strictly between 0 and 1
    randoms = [random_images(30, seed) for seed in range(1, 5)]
    inputs = random_images(20, 100)
    result = tcav(model, model.layer, inputs, lambda y: y, samples, randoms)
    _, gradients = layer_gradient(model, model.layer, inputs, lambda y: y)
    gradients = gradients.flatten(1)
    expected = [tcav_score(gradients, concept_activation_vector(layer_activations(model, model.layer, s),
                                                                layer_activations(model, model.layer, r)))
                for s, r in zip(samples, randoms)]
    assert result.scores == pytest.approx(expected) and len(set(expected)) > 1
    reused = tcav(model, model.layer, inputs, lambda y: y, samples[0], randoms)
    assert reused.scores[0] == pytest.approx(expected[0]) and reused.scores[1:] != pytest.approx(expected[1:])
    with pytest.raises(ValueError, match="one sample per random set"):
        tcav_concepts(model, model.layer, inputs, lambda y: y, {"red": samples[:3]}, randoms)
