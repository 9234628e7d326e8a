"""Grad-CAM: equality with captum, the SSL targets, and clear errors."""

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from course_utils.explain.gradcam import (
    class_score, contrastive, cosine_to, feature, gradcam, squared_norm,
)
from course_utils.models import SimCLRModel, resnet
from course_utils.simclr import nt_xent


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(resnet(10, 8), nn.Linear(64, 5))
    model[0].layer4[0].bn2.weight.data.uniform_(0.5, 1.5)  # break the symmetry of a fresh init
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer_name", ["layer1", "layer2", "layer3", "layer4"])
def test_class_score_gradcam_equals_captum_layer_gradcam(classifier, images, layer_name):
    layer = getattr(classifier[0], layer_name)
    for c in (0, 3):
        ours = gradcam(classifier, layer, images, class_score(c), upsample=False)
        theirs = LayerGradCam(classifier, layer).attribute(images, target=c, relu_attributions=True)[:, 0]
        assert ours.shape == theirs.shape == (4, *theirs.shape[-2:])
        assert torch.allclose(ours, theirs.detach(), atol=1e-5, rtol=1e-4)
        assert ours.abs().max() > 0


def test_relu_false_keeps_the_sign_and_relu_is_its_positive_part(classifier, images):
    layer = classifier[0].layer3
    signed = gradcam(classifier, layer, images, class_score(1), relu=False)
    positive = gradcam(classifier, layer, images, class_score(1))
    assert (signed < 0).any() and (signed > 0).any()
    small_signed = gradcam(classifier, layer, images, class_score(1), relu=False, upsample=False)
    small_positive = gradcam(classifier, layer, images, class_score(1), upsample=False)
    assert torch.allclose(small_signed.clamp(min=0), small_positive)
    assert positive.shape == (4, 32, 32) and positive.min() >= 0


def test_per_image_class_targets_equal_one_class_at_a_time(classifier, images):
    layer = classifier[0].layer4
    classes = torch.tensor([0, 2, 4, 1])
    together = gradcam(classifier, layer, images, class_score(classes))
    for i, c in enumerate(classes.tolist()):
        assert torch.allclose(together[i], gradcam(classifier, layer, images[i:i + 1], class_score(c))[0], atol=1e-5)


def test_hooks_are_removed_even_when_the_target_fails(classifier, images):
    layer = classifier[0].layer2

    def broken_target(output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gradcam(classifier, layer, images, broken_target)
    assert not layer._forward_hooks
    gradcam(classifier, layer, images, class_score(0))
    assert not layer._forward_hooks and not classifier.training


def test_a_layer_that_does_not_influence_the_target_raises_a_clear_error():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.a(x).mean((2, 3)), self.b(x).mean((2, 3))

    model = TwoHeads()
    with pytest.raises(ValueError, match="does not depend on"):
        gradcam(model, model.b, torch.rand(2, 3, 8, 8), feature(0))
    with pytest.raises(ValueError, match="not a module of the model"):
        gradcam(model, nn.Conv2d(3, 4, 3), torch.rand(2, 3, 8, 8), feature(0))
    with pytest.raises(ValueError, match="out of range"):
        gradcam(model, model.a, torch.rand(2, 3, 8, 8), feature(9))


@pytest.fixture(scope="module")
def simclr_model() -> SimCLRModel:
    torch.manual_seed(0)
    return SimCLRModel(resnet(10, 8), proj_dim=16).eval()


def test_cosine_to_its_own_detached_embedding_has_a_zero_gradient(simclr_model, images):
    """The pitfall of SCIENCE.md section 2: cos(h, stopgrad(h)) is at its maximum."""
    layer = simclr_model.encoder.layer4
    with torch.no_grad():
        h = simclr_model.encoder(images)
    self_cos = gradcam(simclr_model, layer, images, cosine_to(h), relu=False)
    other = gradcam(simclr_model, layer, images, cosine_to(h.roll(1, 0)), relu=False)
    assert self_cos.abs().max() < 1e-3 * other.abs().max()
    assert gradcam(simclr_model, layer, images, squared_norm(), relu=False).abs().min(0).values.max() > 0


def test_contrastive_target_is_minus_nt_xent_of_the_view_pair(simclr_model, images):
    views = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y12, y21 = contrastive(views, 0.3), contrastive(images, 0.3)
    y12.prepare(simclr_model)
    y21.prepare(simclr_model)
    with torch.no_grad():
        z1, z2 = simclr_model(images)[1], simclr_model(views)[1]
        scores = -(y12(simclr_model(images)).mean() + y21(simclr_model(views)).mean()) / 2
    assert torch.allclose(scores, nt_xent(z1, z2, 0.3), atol=1e-5)
    maps = gradcam(simclr_model, simclr_model.encoder.layer3, images, contrastive(views, 0.3))
    assert maps.shape == (4, 32, 32) and torch.isfinite(maps).all() and maps.abs().max() > 0


def test_contrastive_target_refuses_a_single_image(simclr_model, images):
    with pytest.raises(ValueError, match="at least 2 images"):
        gradcam(simclr_model, simclr_model.encoder.layer3, images[:1], contrastive(images[1:2]))
    with pytest.raises(ValueError, match="indices must lie in"):
        gradcam(simclr_model, simclr_model.encoder.layer3, images, feature(torch.tensor([0, 1, 2, 999])))


def test_feature_target_reads_h_of_a_simclr_model(simclr_model, images):
    layer = simclr_model.encoder.layer4
    through_model = gradcam(simclr_model, layer, images, feature(5))
    through_encoder = gradcam(simclr_model.encoder, layer, images, feature(5))
    assert torch.allclose(through_model, through_encoder, atol=1e-6)


def test_a_model_in_train_mode_is_explained_in_eval_mode_and_keeps_its_batchnorm_statistics(simclr_model, images):
    """The contrastive target embeds the partner views before the hooked pass; both run in eval mode, so a
    model left in train mode gets the eval-mode map, keeps its running statistics and its mode."""
    views = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layer = simclr_model.encoder.layer3
    simclr_model.eval()
    expected = gradcam(simclr_model, layer, images, contrastive(views, 0.3))
    simclr_model.train()
    buffers = {name: b.clone() for name, b in simclr_model.named_buffers()}
    try:
        maps = gradcam(simclr_model, layer, images, contrastive(views, 0.3))
        assert simclr_model.training
        assert all(torch.equal(buffers[name], b) for name, b in simclr_model.named_buffers())
        assert torch.allclose(maps, expected, atol=1e-6)
    finally:
        simclr_model.eval()
