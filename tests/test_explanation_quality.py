"""The committed encoder's explanations against ShapesWorld's ground truth (the course's quality bars)."""

import pytest
import torch
from torch import nn

from course_utils.data.shapes import ShapesWorld
from course_utils.explain.gradcam import class_score, gradcam
from course_utils.metrics import centre_prior, pointing_game, random_map
from course_utils.models import load_pretrained
from course_utils.simclr import extract_features, linear_probe

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
    map 0.14.  The course's bar (+0.15 over the better baseline) is not reached yet; this test holds
    the level reached so that a regression shows."""
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
