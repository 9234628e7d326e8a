"""Grad-CAM for any layer and any per-sample scalar target, including the SSL adaptations.

Grad-CAM (Selvaraju et al. 2017) weighs the activation maps ``A^k`` of a layer by the spatial mean
of the target's gradient and keeps the positive part:

    alpha_k = (1 / Z) sum_ij d y / d A^k_ij,        L = ReLU(sum_k alpha_k A^k).

Without class labels the scalar ``y`` has to come from somewhere else (SCIENCE.md section 2):

* ``contrastive(x_other)``: ``y = -NT-Xent`` of the image's view pair: regions that make the views agree;
* ``feature(j)``, ``cosine_to(h_ref)``, ``squared_norm()``: the representation h before the projector;
* ``class_score(c)``: a linear probe trained on frozen h (``nn.Sequential(encoder, probe)``).

A target is a callable ``target(output) -> [B]`` of the model's output: logits [B, C] for a probe,
h [B, r] for an encoder, or ``(h, z)`` for a ``SimCLRModel``.  Each score must depend on its own
image only, so that one backward pass of the summed scores gives every image's own gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.inputs import check_images
from course_utils.runtime import eval_mode

Target = Callable[[Any], torch.Tensor]


def representation(output: Any) -> torch.Tensor:
    """h from an encoder's output [B, r] or a SimCLRModel's (h, z): explainers accept either model."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _projection(output: Any) -> torch.Tensor:
    """z from a SimCLRModel's (h, z); a plain tensor output is used as it is."""
    return output[1] if isinstance(output, (tuple, list)) else output


def _column(values: torch.Tensor, index: int | torch.Tensor, what: str) -> torch.Tensor:
    """values[:, index] for one index, or values[i, index[i]] for a LongTensor [B] of indices: [B]."""
    if isinstance(index, torch.Tensor):
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < values.shape[1]:
            raise ValueError(f"{what} indices must lie in [0, {values.shape[1]}), got {index.tolist()}")
        return values.gather(1, index.to(values.device).long().view(-1, 1)).squeeze(1)
    if not 0 <= index < values.shape[1]:
        raise ValueError(f"{what} {index} is out of range for {values.shape[1]} {what}s")
    return values[:, index]


class class_score:  # noqa: N801 - lower-case like captum's target arguments: gradcam(..., class_score(3))
    """``y = output[:, c]``: a class logit (of a classifier or a linear probe on frozen h).

    Args:
        c: one class index for the whole batch, or a LongTensor [B] (e.g. the predicted classes).
    """

    def __init__(self, c: int | torch.Tensor) -> None:
        self.c = c

    def __call__(self, output: Any) -> torch.Tensor:
        logits = representation(output)
        if logits.ndim != 2:
            raise ValueError(f"class_score needs logits [B, C], got shape {tuple(logits.shape)}")
        return _column(logits, self.c, "class")


class feature:  # noqa: N801
    """``y = h_j``: one feature of the representation (before the projection head)."""

    def __init__(self, j: int | torch.Tensor) -> None:
        self.j = j

    def __call__(self, output: Any) -> torch.Tensor:
        return _column(representation(output), self.j, "feature")


class cosine_to:  # noqa: N801
    """``y = cos(h, h_ref)``: similarity to a fixed reference embedding (another image or view).

    Pitfall: ``h_ref = h.detach()`` of the same image gives an exactly zero gradient — the
    similarity is at its maximum, 1 — so the "map" is numerical noise. Use another view, or
    ``squared_norm()`` (the gradient of ``h . stopgrad(h)``, up to a factor 2).

    Args:
        h_ref: [r] (one reference for every image) or [B, r]; used without gradient.
    """

    def __init__(self, h_ref: torch.Tensor) -> None:
        self.h_ref = h_ref.detach()

    def __call__(self, output: Any) -> torch.Tensor:
        h = representation(output)
        return F.cosine_similarity(h, self.h_ref.to(h.device, h.dtype).expand_as(h), dim=1)


class squared_norm:  # noqa: N801
    """``y = ||h||^2``: how strongly the image drives the representation as a whole."""

    def __call__(self, output: Any) -> torch.Tensor:
        return representation(output).pow(2).sum(1)


class contrastive:  # noqa: N801
    """``y_i = -NT-Xent`` of anchor i: its view x_i against its partner view ``x_other[i]``.

    The partner views and the negatives (every other image's two views) are embedded without
    gradient, so the gradient of ``y_i`` flows through image i alone and the map shows which regions
    of x_i make it agree with its partner rather than with the other images.  The negatives are the
    rest of the batch, so a map depends on which images share it: explain an image inside a batch
    of at least 2 (e.g. 32) images.  Needs a ``SimCLRModel`` (it uses z).

    Args:
        x_other: [B, 3, H, W] the second view of each image.
        temperature: NT-Xent temperature.
    """

    def __init__(self, x_other: torch.Tensor, temperature: float = 0.5) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.x_other, self.temperature = x_other, temperature
        self.z_other: torch.Tensor | None = None

    def prepare(self, model: nn.Module) -> None:
        """Embed the partner views (called by ``gradcam`` before the hooked forward pass)."""
        x_other = check_images(self.x_other, "x_other (the contrastive target's partner views)", like=model)
        with torch.no_grad():
            self.z_other = F.normalize(_projection(model(x_other)).float(), dim=1)

    def __call__(self, output: Any) -> torch.Tensor:
        if self.z_other is None:
            raise RuntimeError("contrastive target used before prepare(model); call it through gradcam")
        z = F.normalize(_projection(output).float(), dim=1)
        if z.shape[0] < 2:
            raise ValueError("the contrastive target needs a batch of at least 2 images: with one image there "
                             "are no negatives and the score is constant (a zero map); explain it inside a batch")
        if z.shape != self.z_other.shape:
            raise ValueError(f"x_other gives embeddings {tuple(self.z_other.shape)} but x gives {tuple(z.shape)}; "
                             "pass one partner view per image")
        batch = z.shape[0]
        others = torch.cat([self.z_other, z.detach()])  # [2B, D] candidates, without gradient
        logits = z @ others.T / self.temperature  # [B, 2B]
        self_index = torch.arange(batch, device=z.device) + batch
        logits = logits.masked_fill(F.one_hot(self_index, 2 * batch).bool(), float("-inf"))
        return logits.log_softmax(1)[torch.arange(batch), torch.arange(batch)]


def layer_gradient(model: nn.Module, layer: nn.Module, x: torch.Tensor,
                   score: Callable[[Any], torch.Tensor] | None = None, name: str = "x"
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output of ``layer`` while ``model(x)`` runs and, given ``score``, the gradient of
    ``score(model(x)).sum()`` with respect to it — the hook behind Grad-CAM, Interaction-CAM and TCAV.

    The model runs in eval mode (its mode is restored); the activation is captured in float32 (also under
    autocast) and handed on as a copy, so in-place operations downstream cannot change it.

    Args:
        model: any module; layer: a module called inside ``model``'s forward pass.
        x: the model's input batch, images [B, 3, H, W] in [0, 1] (checked by ``inputs.check_images`` and
            converted to the model's dtype and device); score: model output -> scores [B] (one per input).
        name: what to call ``x`` in error messages (e.g. "random set 3").
    Returns:
        (activation, gradient or None), float32, the layer's output shape (e.g. [B, K, h, w]), detached.
    Raises:
        ValueError: ``layer`` is not part of the model, is not called, or the score does not depend on it;
            ``x`` is not valid images (uint8, 0–255, NaN/inf, wrong shape, empty).
    """
    if not any(m is layer for m in model.modules()):
        raise ValueError(f"{type(layer).__name__} is not a module of the model; pass e.g. model.encoder.layer4")
    x = check_images(x, name, like=model)
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{type(layer).__name__} returns a {type(output).__name__}, not a tensor")
        activation = output.detach().float().requires_grad_(score is not None)
        captured.append(activation)
        return activation.to(output.dtype).clone()

    handle = layer.register_forward_hook(keep)
    try:
        with eval_mode(model), torch.set_grad_enabled(score is not None):
            output = model(x)
            if not captured:
                raise ValueError(f"{type(layer).__name__} was not called in the model's forward pass")
            gradient = None
            if score is not None:
                (gradient,) = torch.autograd.grad(score(output).sum(), captured[-1], allow_unused=True)
                if gradient is None:
                    raise ValueError(f"the score does not depend on {type(layer).__name__}: pick a layer on the "
                                     "path to the score, e.g. model.encoder.layer4 (the projector comes after h)")
    finally:
        handle.remove()
    return captured[-1].detach(), gradient


def gradcam(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, target: Target, upsample: bool = True, relu: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps of ``target`` at ``layer`` for a batch of images.

    Args:
        model: maps x to the output the target reads; run in eval mode (its mode is restored).
        layer: a module inside ``model`` whose output is a feature map [B, K, h, w].
        x: images float [B, 3, H, W] in [0, 1] (``inputs.check_images``: uint8, 0–255 values, NaN/inf or an
            empty batch raise ``ValueError``).
        target: ``target(output) -> [B]`` scalar per image, e.g. ``class_score(c)``.
        upsample: bilinearly resize the maps to [H, W] (else the layer's [h, w]).
        relu: keep the positive part (Grad-CAM); ``False`` keeps the sign.
    Returns:
        float32 [B, H, W] (or [B, h, w]) on the model's device.
    """
    x = check_images(x, "x", like=model)
    if hasattr(target, "prepare"):  # in eval mode too: a train-mode forward pass would update BatchNorm's statistics
        with eval_mode(model):
            target.prepare(model)

    def score(output: Any) -> torch.Tensor:
        scores = target(output)
        if scores.shape != (x.shape[0],):
            raise ValueError(f"the target must give one score per image, shape [{x.shape[0]}], "
                             f"got {tuple(scores.shape)}")
        return scores

    activation, gradient = layer_gradient(model, layer, x, score)
    if activation.ndim != 4:
        raise ValueError(f"Grad-CAM needs a layer with a feature map [B, K, h, w]; {type(layer).__name__} "
                         f"gives {tuple(activation.shape)}")
    weights = gradient.mean((2, 3), keepdim=True)  # alpha_k [B, K, 1, 1]
    cam = (weights * activation).sum(1)  # [B, h, w]
    if relu:
        cam = cam.clamp(min=0)
    if upsample:
        cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam
