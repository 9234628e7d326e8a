"""Cross-checks against independent implementations in libraries the course already requires.

Each test feeds the same inputs to a course function and to captum or scikit-learn, set up so that both
compute the same quantity (the comment in each test says why), and asserts agreement within a stated
tolerance. A disagreement means one of the two implements another formula than the one it names.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam, Occlusion
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression

from course_utils.data.augment import SimCLRAugment
from course_utils.data.shapes import ShapesWorld
from course_utils.explain.concepts import concept_activation_vector, layer_activations, prototypes
from course_utils.explain.gradcam import contrastive, cosine_to, gradcam
from course_utils.explain.pairs import conditional_occlusion, projection
from course_utils.models import load_pretrained
from course_utils.simclr import extract_features, linear_probe


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    """Exact comparisons: no bf16 autocast anywhere."""
    monkeypatch.setenv("COURSE_PRECISION", "fp32")


@pytest.fixture(scope="module")
def model():
    """The committed SimCLR ResNet-10 (trained, so the maps and features are not those of noise)."""
    torch.manual_seed(0)
    return load_pretrained("simclr-shapes-r10").eval()


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(n=600, size=32, seed=3, split="test")


@pytest.fixture(scope="module")
def features(model, world):
    """Frozen h of 600 test images: 400 to fit on, 200 to predict."""
    H, y = extract_features(model.encoder, world, progress=False)
    return H.double(), y


def _images(world, n):
    return world.images[:n].float() / 255


# ---------------------------------------------------------------------------------------------------------
# Grad-CAM of the self-supervised targets against captum's LayerGradCam
# ---------------------------------------------------------------------------------------------------------

def _captum_gradcam(model, layer, x, score, relu, upsample):
    """captum's LayerGradCam of the per-sample scalar ``score(model(x))`` [B]: alpha_k = spatial mean of the
    gradient, map = sum_k alpha_k A^k (summed over channels, ReLU and bilinear upsampling only when asked)."""
    attribution = LayerGradCam(lambda images: score(model(images)), layer).attribute(
        x, relu_attributions=relu, attr_dim_summation=True)  # [B, 1, h, w]
    if upsample:
        attribution = LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return attribution[:, 0].detach()


def _check_against_captum(model, layer, x, target):
    # captum has no "prepare" step: the contrastive target embeds its partner views once, in eval mode, and the
    # captum forward function then reads the same fixed z_other — so both differentiate the same scalar.
    for relu, upsample in [(False, False), (True, True)]:
        ours = gradcam(model, layer, x, target, upsample=upsample, relu=relu)
        theirs = _captum_gradcam(model, layer, x, target, relu, upsample)
        assert ours.shape == theirs.shape
        scale = theirs.abs().max()
        assert scale > 0  # a non-trivial map, so the comparison can fail
        # float32 sums over 64-256 channels in a different order: agreement to 1e-5 of the map's range
        torch.testing.assert_close(ours, theirs, atol=1e-5 * scale.item(), rtol=1e-4)


@pytest.mark.parametrize("layer_name", ["layer2", "layer4"])
def test_gradcam_of_the_contrastive_target_equals_captum_layer_gradcam(model, world, layer_name):
    x = _images(world, 8)
    views = SimCLRAugment(32)(x, torch.Generator().manual_seed(0))
    target = contrastive(views, temperature=0.2)
    target.prepare(model)
    _check_against_captum(model, getattr(model.encoder, layer_name), x, target)


@pytest.mark.parametrize("layer_name", ["layer2", "layer4"])
def test_gradcam_of_the_cosine_target_equals_captum_layer_gradcam(model, world, layer_name):
    x = _images(world, 8)
    views = SimCLRAugment(32)(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        h_ref = model.encoder(views)  # each image's similarity to its own augmented view
    _check_against_captum(model.encoder, getattr(model.encoder, layer_name), x, cosine_to(h_ref))


# ---------------------------------------------------------------------------------------------------------
# Conditional occlusion against captum's Occlusion
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, stride", [(8, 4), (5, 3)])
def test_conditional_occlusion_equals_captum_occlusion_of_the_pair_similarity(model, world, patch, stride):
    """captum's Occlusion attributes to each pixel the mean, over the windows covering it, of
    f(x) − f(x with the window set to the baseline). With f(x) = cos(z(x), z(x_other)) for a fixed partner,
    baseline = the fill, a window of all 3 channels × patch × patch moved by the stride, that is the course's
    M1[p] = s(x1, x2) − s(x1 with patch p filled, x2) averaged over the covering patches. The window grids are
    the same when the stride divides size − patch (24 = 6 · 4, 27 = 9 · 3 at 32 px; so does the default 9 px
    patch with stride 1, left out for time). Otherwise captum's last window is cut at the border, the course's
    is moved back inside it."""
    embed = projection(model)
    x1, x2 = _images(world, 2)
    fill = 0.25
    ours = conditional_occlusion(embed, x1, x2, patch=patch, stride=stride, fill=fill)
    size = x1.shape[-1]
    for image, other, our_map in ((x1, x2, ours[0]), (x2, x1, ours[1])):
        with torch.no_grad():
            partner = embed(other[None]).float()

        def similarity(images):
            with torch.no_grad():
                return F.cosine_similarity(embed(images).float(), partner.expand(len(images), -1), dim=1)

        attribution = Occlusion(similarity).attribute(
            image[None], sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride), baselines=fill,
            perturbations_per_eval=256)[0]  # [3, H, W], the same on every channel
        assert attribution.shape == (3, size, size)
        torch.testing.assert_close(attribution[0], attribution[2])
        assert attribution.abs().max() > 1e-3  # occlusion changes the similarity: the check can fail
        torch.testing.assert_close(our_map, attribution[0], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Linear probe, CAV and prototypes against scikit-learn
# ---------------------------------------------------------------------------------------------------------

def test_linear_probe_equals_scikit_learn_logistic_regression_with_the_same_objective(features):
    """linear_probe minimises mean cross-entropy + ||W||² / (2 C N) on features standardised with the mean and
    the (unbiased) std of H_train: scikit-learn's multinomial LogisticRegression(C) objective,
    C · Σ CE + ½ ||W||² (unpenalised intercept), divided by C N — the same minimiser. Fed the same
    standardised features, both must give the same classifier: the same test predictions (at most 1 of 200
    may flip where two logits tie within the solvers' tolerance) and logits within 1e-3 of their scale
    (measured: no flip, 4.5e-3 apart on a scale of 14.6). C = 0.05 makes the penalty matter (test accuracy
    0.755 against 0.785 at C = 1), so a penalty of the wrong scale is caught; C = 1 converges 2-3 times slower."""
    H, y = features
    H_train, y_train, H_test, y_test = H[:400], y[:400], H[400:], y[400:]
    C = 0.05
    ours = linear_probe(H_train.float(), y_train, H_test.float(), y_test, C=C)
    mean, std = H_train.mean(0), H_train.std(0).clamp(min=1e-6)
    reference = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(((H_train - mean) / std).numpy(), y_train.numpy())
    theirs = reference.predict(((H_test - mean) / std).numpy())
    assert (ours.predictions.numpy() != theirs).sum() <= 1
    assert ours.accuracy == pytest.approx(float((theirs == y_test.numpy()).mean()), abs=1 / 200)
    with torch.no_grad():
        our_logits = ours.classifier(H_test.float()).double().numpy()
    their_logits = reference.decision_function(((H_test - mean) / std).numpy())
    # softmax is invariant to a per-sample constant, but the L2 penalty fixes it (the optimal W's rows sum to
    # zero in both), so the logits themselves must agree
    np.testing.assert_allclose(our_logits, their_logits, atol=1e-3 * np.abs(their_logits).max())


def test_concept_activation_vector_is_the_direction_of_scikit_learn_logistic_regression(model, world):
    """The CAV is the unit normal of a logistic regression (C · Σ log-loss + ½ ||w||², unpenalised bias)
    separating concept activations from random ones: scikit-learn's LogisticRegression(C) on the same
    activations must give the same direction, cosine > 0.999 (measured 1.0000000 at C = 1 and 0.01 on 8192
    layer-3 activations; the former dual solver in α reached 0.944 and 0.988 at its default 200 iterations)."""
    images = _images(world, 600)
    red = world.attributes["color"] == world.attribute_names["color"].index("red")
    concept = layer_activations(model.encoder, model.encoder.layer3, images[red][:40])
    random = layer_activations(model.encoder, model.encoder.layer3, images[~red][:60])
    assert len(concept) >= 20
    x = torch.cat([concept, random]).double().numpy()
    y = np.r_[np.ones(len(concept)), np.zeros(len(random))]
    for C in (1.0, 0.01):
        ours = concept_activation_vector(concept, random, C=C).double().numpy()
        reference = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(x, y).coef_[0]
        cosine = ours @ reference / np.linalg.norm(reference)
        assert cosine > 0.999, f"C = {C}: cosine {cosine:.4f}"


def test_prototypes_are_a_k_means_solution_as_good_as_scikit_learns(features):
    """prototypes() runs k-means (k-means++ start, Lloyd steps) on L2-normalised h. Checked two ways against
    scikit-learn's KMeans on the same normalised features: (1) started from the course's centroids, Lloyd's
    algorithm does not move them (they are a fixed point of the k-means objective: same centroids to 1e-4,
    same assignment); (2) with the same number of k-means++ starts (5 seeds here, n_init=5 there) the best
    inertia is within 1 % of scikit-learn's. One start alone may end in another local minimum: measured at k = 8,
    the course's single starts gave 47.66-48.99 and scikit-learn's 47.66-49.47."""
    H, _ = features
    x = F.normalize(H.float(), dim=1).double().numpy()
    k = 8
    inertias = []
    for seed in range(5):
        ours = prototypes(H.float(), k=k, iterations=300, seed=seed)
        centroids = ours.centroids.double().numpy()
        inertias.append(((x - centroids[ours.assignment.numpy()]) ** 2).sum())
        if seed == 0:
            restarted = KMeans(k, init=centroids, n_init=1, max_iter=300, tol=0).fit(x)
            np.testing.assert_allclose(restarted.cluster_centers_, centroids, atol=1e-4)
            assert (restarted.labels_ == ours.assignment.numpy()).all()
    best = KMeans(k, n_init=5, random_state=0).fit(x).inertia_
    assert min(inertias) <= 1.01 * best, f"inertia {min(inertias):.3f} vs scikit-learn's {best:.3f}"
