"""The one input guard, driven through the public entry points that take images (issue 19, items 1 and 7).

Every explainer, metric and the encoder itself raises a ``ValueError`` that says what was wrong and what to
do for uint8 or 0–255 images, values far outside [0, 1], NaN or inf, a wrong shape and an empty batch;
float64 images give the same result as float32; and an explainer leaves a train-mode model's mode and
BatchNorm statistics as they were.  The tests call the public functions only (not ``course_utils.inputs``),
so that each of them says whether that entry point is guarded.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from course_utils.explain.agf import agf
from course_utils.explain.concepts import layer_activations, tcav, tcav_concepts
from course_utils.explain.falcon import concept_hits, concept_precision, crop_images, gradcam_crops
from course_utils.explain.gradcam import feature, gradcam, layer_gradient
from course_utils.explain.pairs import (
    averaged_transforms, conditional_occlusion, context_agnostic_occlusion, feature_visualisation,
    interaction_cam, invert, model_difference, pairwise_occlusion, pixel_invariance, projection, similarity,
)
from course_utils.explain.qscore import qscore, qscore_penalty
from course_utils.explain.relax import masked_copies, relax, relax_batch
from course_utils.models import SimCLRModel, resnet
from course_utils.vlm import ToyCLIP, Vocabulary

SIZE = 16


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    """Exact comparisons (float64 vs float32): no bf16 autocast."""
    monkeypatch.setenv("COURSE_PRECISION", "fp32")


def tiny_model() -> SimCLRModel:
    torch.manual_seed(0)
    model = SimCLRModel(resnet(10, 4), proj_dim=8)
    for module in model.modules():  # non-trivial running statistics, so that a change would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


MODEL = tiny_model()
ENCODER = MODEL.encoder
CLIP = ToyCLIP(Vocabulary(["a", "red", "star"]), dim=8, width=4, text_dim=8, text_layers=1).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def randoms() -> list[torch.Tensor]:
    return [images(4, seed) for seed in (10, 11, 12)]


def _tcav(x: torch.Tensor) -> object:
    return tcav(MODEL, ENCODER.layer3, x, lambda out: out[0][:, 0], images(4, 20), randoms())


# Every public function that takes images, as ``call(batch)``.  The single-image functions take batch[0]
# (and x2 = batch[1] or a clean image), so one bad batch exercises every entry point.
BATCH_ENTRY_POINTS: dict[str, Callable[[torch.Tensor], object]] = {
    "ResNet.forward": lambda x: ENCODER(x),
    "SimCLRModel.forward": lambda x: MODEL(x),
    "gradcam": lambda x: gradcam(MODEL, ENCODER.layer3, x, feature(0)),
    "layer_gradient": lambda x: layer_gradient(MODEL, ENCODER.layer3, x, lambda out: out[0][:, 0]),
    "relax_batch": lambda x: relax_batch(ENCODER, x, num_masks=4, batch_size=8, progress=False,
                                         generator=torch.Generator().manual_seed(0)),
    "masked_copies": lambda x: masked_copies(x, torch.ones(2, SIZE, SIZE)),
    "agf": lambda x: agf(ENCODER, x, lambda h: h[:, 0]),
    "similarity": lambda x: similarity(projection(MODEL), x, x),
    "interaction_cam": lambda x: interaction_cam(MODEL, ENCODER.layer4, x, x.flip(0)),
    "tcav (inputs)": _tcav,
    "layer_activations": lambda x: layer_activations(MODEL, ENCODER.layer3, x),
    "gradcam_crops": lambda x: gradcam_crops(ENCODER, ENCODER.layer3, x, 0),
    "crop_images": lambda x: crop_images(x, torch.rand(x.shape[0], *x.shape[-2:])),
    "ToyCLIP.encode_images": lambda x: CLIP.encode_images(x),
}
SINGLE_ENTRY_POINTS: dict[str, Callable[[torch.Tensor], object]] = {
    "relax": lambda x: relax(ENCODER, x[0], num_masks=4, progress=False, generator=torch.Generator().manual_seed(0)),
    "conditional_occlusion": lambda x: conditional_occlusion(projection(MODEL), x[0], x[1], patch=8, stride=8),
    "conditional_occlusion (x2)": lambda x: conditional_occlusion(projection(MODEL), images()[0], x[1], patch=8,
                                                                  stride=8),
    "context_agnostic_occlusion": lambda x: context_agnostic_occlusion(projection(MODEL), x[0], x[1], patch=8,
                                                                       stride=8),
    "pairwise_occlusion": lambda x: pairwise_occlusion(projection(MODEL), x[0], x[1], samples=2,
                                                       generator=torch.Generator().manual_seed(0)),
    "averaged_transforms": lambda x: averaged_transforms(projection(MODEL), x[0], "grayscale", lambdas=(0.5,),
                                                         generator=torch.Generator().manual_seed(0)),
    "pixel_invariance": lambda x: pixel_invariance(projection(MODEL), x[0], lambda v: 0.9 * v, n_augments=4,
                                                   epochs=1),
    "feature_visualisation": lambda x: feature_visualisation(projection(MODEL), x[0], steps=1),
    "invert": lambda x: invert(MODEL, ENCODER.layer2, x[0], steps=1),
    "model_difference": lambda x: model_difference(MODEL, ENCODER.layer2, MODEL, ENCODER.layer1, x[0], steps=1),
}
ENTRY_POINTS = {**BATCH_ENTRY_POINTS, **SINGLE_ENTRY_POINTS}


def _with_value(value: float) -> torch.Tensor:
    x = images()
    x[:, 2, 3, 4] = value  # one pixel of every image: the single-image entry points take x[0] or x[1]
    return x


# (bad batch, what the message must say)
BAD_IMAGES = {
    "uint8": (lambda: (images() * 255).to(torch.uint8), r"x\.float\(\) / 255"),
    "0-255 floats": (lambda: images() * 255, r"0–255.*x\.float\(\) / 255"),
    "far above 1": (lambda: images() * 1.5, r"\[0, 1\]"),
    "normalised (far below 0)": (lambda: (images() - 0.5) / 0.25, r"normalised"),
    "NaN": (lambda: _with_value(float("nan")), r"NaN"),
    "inf": (lambda: _with_value(float("inf")), r"NaN or inf"),
    "-inf": (lambda: _with_value(float("-inf")), r"NaN or inf"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_images_into_every_entry_point_raise_a_value_error_that_says_what_to_do(entry, case):
    make, message = BAD_IMAGES[case]
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](make())


def test_uint8_images_into_gradcam_raise_with_the_float_conversion_fix():
    fix = r"x must be float in \[0, 1\], got torch\.uint8; convert with x\.float\(\) / 255"
    with pytest.raises(ValueError, match=fix):
        gradcam(MODEL, ENCODER.layer3, (images() * 255).to(torch.uint8), feature(0))


def test_0_255_floats_into_relax_and_agf_raise_instead_of_giving_a_map():
    for call in (BATCH_ENTRY_POINTS["relax_batch"], BATCH_ENTRY_POINTS["agf"], BATCH_ENTRY_POINTS["gradcam"]):
        with pytest.raises(ValueError, match="look like 0–255 pixel values"):
            call(images() * 255)


def test_nan_pixels_into_gradcam_and_conditional_occlusion_raise_naming_the_argument():
    with pytest.raises(ValueError, match=r"^x contains NaN"):
        gradcam(MODEL, ENCODER.layer3, _with_value(float("nan")), feature(0))
    with pytest.raises(ValueError, match=r"^x2 contains NaN"):
        conditional_occlusion(projection(MODEL), images()[0], _with_value(float("nan"))[1], patch=8, stride=8)


@pytest.mark.parametrize("shape", [(2, SIZE, SIZE), (2, 1, SIZE, SIZE), (2, SIZE, SIZE, 3), (2, 2, 3, SIZE, SIZE)])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_images_of_the_wrong_shape_raise_a_value_error_naming_the_expected_shape(entry, shape):
    with pytest.raises(ValueError, match=r"\[(B, )?3, (H, W|S, S)\]"):
        ENTRY_POINTS[entry](torch.rand(shape))


@pytest.mark.parametrize("entry", list(BATCH_ENTRY_POINTS))
def test_an_empty_batch_raises_everywhere(entry):
    with pytest.raises(ValueError, match="empty batch"):
        BATCH_ENTRY_POINTS[entry](images()[:0])


def test_slightly_out_of_range_images_from_resampling_are_accepted():
    x = images() * 1.08 - 0.04  # [-0.04, 1.04]: bilinear or bicubic overshoot
    assert gradcam(MODEL, ENCODER.layer3, x, feature(0)).shape == (2, SIZE, SIZE)
    assert relax_batch(ENCODER, x, num_masks=4, progress=False).importance.shape == (2, SIZE, SIZE)


# entry points with a deterministic result, compared float64 vs float32
DETERMINISTIC = ["ResNet.forward", "gradcam", "layer_gradient", "relax_batch", "agf", "similarity", "interaction_cam",
                 "layer_activations", "crop_images", "ToyCLIP.encode_images", "relax", "conditional_occlusion",
                 "context_agnostic_occlusion", "averaged_transforms", "invert"]


def _tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors(item)]
    if hasattr(result, "__dataclass_fields__"):
        return [t for name in result.__dataclass_fields__ for t in _tensors(getattr(result, name))]
    return []


@pytest.mark.parametrize("entry", DETERMINISTIC)
def test_float64_images_give_the_float32_result_in_every_module(entry):
    call = ENTRY_POINTS[entry]
    x = images()
    torch.manual_seed(0)
    expected = _tensors(call(x))
    torch.manual_seed(0)
    got = _tensors(call(x.double()))
    assert expected and len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# explainers that run the model, as call(model); each must leave a train-mode model as it was
MODEL_RUNNERS: dict[str, Callable[[SimCLRModel], object]] = {
    "gradcam": lambda m: gradcam(m, m.encoder.layer3, images(), feature(0)),
    "relax_batch": lambda m: relax_batch(m.encoder, images(), num_masks=4, progress=False),
    "agf": lambda m: agf(m.encoder, images(), lambda h: h[:, 0]),
    "similarity": lambda m: similarity(projection(m), images(), images(2, 5)),
    "conditional_occlusion": lambda m: conditional_occlusion(projection(m), *images(), patch=8, stride=8),
    "context_agnostic_occlusion": lambda m: context_agnostic_occlusion(projection(m), *images(), patch=8, stride=8),
    "pairwise_occlusion": lambda m: pairwise_occlusion(projection(m), *images(), samples=2),
    "averaged_transforms": lambda m: averaged_transforms(projection(m), images()[0], "blur", lambdas=(0.5,)),
    "pixel_invariance": lambda m: pixel_invariance(projection(m), images()[0], lambda v: 0.9 * v, n_augments=4,
                                                   epochs=1),
    "feature_visualisation": lambda m: feature_visualisation(projection(m), images()[0], steps=1),
    "interaction_cam": lambda m: interaction_cam(m, m.encoder.layer4, images(), images(2, 5)),
    "invert": lambda m: invert(m, m.encoder.layer2, images()[0], steps=1),
    "tcav": lambda m: tcav(m, m.encoder.layer3, images(4), lambda out: out[0][:, 0], images(4, 20), randoms()),
    "gradcam_crops": lambda m: gradcam_crops(m.encoder, m.encoder.layer3, images(), 0),
}


@pytest.mark.parametrize("entry", list(MODEL_RUNNERS))
def test_explainers_leave_a_train_mode_model_and_its_batchnorm_statistics_unchanged(entry):
    model = tiny_model().train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    MODEL_RUNNERS[entry](model)
    assert all(module.training for module in model.modules()), "the train mode was not restored"
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"{name} changed: the explainer ran the model in train mode"


def test_projection_embeds_in_eval_mode_and_restores_the_mode():
    model = tiny_model().train()
    x = images()
    z = projection(model)(x)
    assert model.training
    assert torch.allclose(z, tiny_model().eval()(x)[1])


def test_tcav_with_a_nan_concept_set_raises_and_names_the_concept():
    nan_set = images(4, 20)
    nan_set[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"concept 'striped'.*NaN"):
        tcav_concepts(MODEL, ENCODER.layer3, images(4), lambda out: out[0][:, 0], {"striped": nan_set}, randoms())
    per_set = [images(4, 30 + i) for i in range(3)]
    per_set[2] = nan_set
    with pytest.raises(ValueError, match=r"concept 'striped' sample 2 contains NaN"):
        tcav_concepts(MODEL, ENCODER.layer3, images(4), lambda out: out[0][:, 0], {"striped": per_set}, randoms())


def test_tcav_with_uint8_or_nan_random_sets_or_inputs_raises_and_names_the_set():
    bad_randoms = randoms()
    bad_randoms[1] = (bad_randoms[1] * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"random set 1 must be float.*x\.float\(\) / 255"):
        tcav(MODEL, ENCODER.layer3, images(4), lambda out: out[0][:, 0], images(4, 20), bad_randoms)
    uint8_concept = (images(4, 20) * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"concept 'concept' must be float"):
        tcav(MODEL, ENCODER.layer3, images(4), lambda out: out[0][:, 0], uint8_concept, randoms())
    nan_inputs = images(4)
    nan_inputs[0] = float("nan")
    with pytest.raises(ValueError, match=r"^inputs contains NaN"):
        tcav(MODEL, ENCODER.layer3, nan_inputs, lambda out: out[0][:, 0], images(4, 20), randoms())


def test_tcav_with_an_empty_concept_set_raises_instead_of_a_nan_score():
    with pytest.raises(ValueError, match="empty batch"):
        tcav(MODEL, ENCODER.layer3, images(4), lambda out: out[0][:, 0], images(4, 20)[:0], randoms())


def test_crop_images_raises_when_the_saliency_maps_have_another_size_or_count():
    x = images()
    with pytest.raises(ValueError, match="saliency map"):
        crop_images(x, torch.rand(2, SIZE // 2, SIZE // 2))  # Grad-CAM maps not upsampled
    with pytest.raises(ValueError, match="saliency map"):
        crop_images(x, torch.rand(1, SIZE, SIZE))  # one map for two images
    with pytest.raises(ValueError, match="NaN"):
        crop_images(x, torch.full((2, SIZE, SIZE), float("nan")))


def test_concept_precision_raises_on_mismatched_lengths_and_on_a_str_truth():
    predicted = [["red", "star"], ["blue"]]
    with pytest.raises(ValueError, match="one truth per feature"):
        concept_precision(predicted, [{"red"}])
    with pytest.raises(ValueError, match="one truth per feature"):
        concept_hits(predicted, [{"red"}, {"blue"}, {"ring"}])
    with pytest.raises(ValueError, match=r"truths\[1\] is a str"):
        concept_precision(predicted, [{"red"}, "blue"])
    with pytest.raises(ValueError, match=r"predicted\[0\] is the str"):
        concept_hits(["red", ["blue"]], [{"red"}, {"blue"}])


def test_qscore_and_its_penalty_raise_on_an_empty_batch():
    with pytest.raises(ValueError, match="at least 1 row"):
        qscore(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="at least 1 row"):
        qscore_penalty(torch.zeros(0, 8, requires_grad=True), torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        qscore(torch.full((4, 8), float("nan")))
