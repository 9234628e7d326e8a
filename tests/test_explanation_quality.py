"""The committed encoder's explanations against ShapesWorld's ground truth (the course's quality bars)."""

import pytest
import torch
from torch import nn

from course_utils.data.shapes import ShapesWorld
from course_utils.explain.gradcam import class_score, gradcam
from course_utils.metrics import centre_prior, pointing_game, random_map
from course_utils.models import load_pretrained
from course_utils.simclr import extract_features, linear_probe, random_linear_head

TOLERANCE = 2  # pixels: Zhang et al.'s 15 px at 224 px, scaled to 32 px


@pytest.fixture(scope="module")
def probe_setup():
    encoder = load_pretrained("simclr-shapes-r10").encoder.eval()
    train = ShapesWorld(n=2000, seed=0, split="train")
    test = ShapesWorld(n=400, seed=0, split="test")
    probe = linear_probe(*extract_features(encoder, train, progress=False),
                         *extract_features(encoder, test, progress=False))
    return encoder, nn.Sequential(encoder, probe.classifier).eval(), test


def test_probe_class_gradcam_at_its_best_layer_beats_the_random_map_and_the_centre_prior(probe_setup):
    """Measured on 1,000 test images (notebook 02): best layer 0.63 vs centre prior 0.50 and random
    map 0.14.  The course encoder does not reach the course's bar (+0.15 over the better baseline), and
    random heads beat it at layer1; this test holds the level reached so that a regression shows."""
    encoder, probe_model, test = probe_setup
    images = test.images.float() / 255
    with torch.no_grad():
        predicted = probe_model(images).argmax(1)
    scores = {name: pointing_game(gradcam(probe_model, getattr(encoder, name), images, class_score(predicted)),
                                  test.masks, TOLERANCE)
              for name in ("layer1", "layer2", "layer3", "layer4")}
    random_score = pointing_game(random_map(len(test), 32, torch.Generator().manual_seed(0)), test.masks, TOLERANCE)
    centre_score = pointing_game(centre_prior(len(test), 32), test.masks, TOLERANCE)
    best = max(scores.values())
    assert best >= random_score + 0.3 and best >= centre_score + 0.05, (scores, random_score, centre_score)


def test_narrow_encoder_probe_gradcam_at_layer4_clears_the_course_bar_where_random_heads_fail():
    """Notebook 02's setting (probe on 10,000 training images, the 1,000 test images): the probe-class map of
    simclr-shapes-r10-w16 at layer4 points at the object in 0.67 of the images, +0.16 over the centre prior;
    random linear heads on the same features reach 0.27 there."""
    encoder = load_pretrained("simclr-shapes-r10-w16").encoder.eval()
    train = ShapesWorld(n=10_000, seed=0, split="train")
    test = ShapesWorld(n=1_000, seed=0, split="test")
    H_train, y_train = extract_features(encoder, train, progress=False)
    probe = linear_probe(H_train, y_train, *extract_features(encoder, test, progress=False))
    assert probe.accuracy >= 0.95
    images = test.images.float() / 255
    baseline = max(centre_prior(len(test), 32), random_map(len(test), 32, torch.Generator().manual_seed(0)),
                   key=lambda maps: pointing_game(maps, test.masks, TOLERANCE))

    def layer4_pointing_game(head: nn.Module) -> float:
        model = nn.Sequential(encoder, head).eval()
        with torch.no_grad():
            classes = model(images).argmax(1)
        return pointing_game(gradcam(model, encoder.layer4, images, class_score(classes)), test.masks, TOLERANCE)

    probe_score = layer4_pointing_game(probe.classifier)
    baseline_score = pointing_game(baseline, test.masks, TOLERANCE)
    random_heads = [layer4_pointing_game(random_linear_head(H_train, 8, seed=seed)) for seed in range(3)]
    assert probe_score >= baseline_score + 0.15, (probe_score, baseline_score)
    assert probe_score >= max(random_heads) + 0.2, (probe_score, random_heads)
