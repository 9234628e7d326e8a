"""Image operations shared by the explainers and the metrics: Gaussian blur and the fills that stand in for
removed pixels.

They sit beside the input guard (``inputs.py``), below everything else: explainers (RELAX's "blur" fill,
the pair transforms) and metrics (deletion / insertion baselines) both import them from here, so no
explainer imports ``metrics``.  Like ``inputs``, this module imports nothing from ``course_utils``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REFERENCE_BLUR_SIGMA = 5.0  # px at 224 px: explain-cl's insertion baseline (11 x 11 kernel, sigma 5)
REFERENCE_SIZE = 224


def scaled_blur_sigma(size: int, sigma_at_224: float = REFERENCE_BLUR_SIGMA) -> float:
    """A blur's sigma scaled to the image side: ``sigma_at_224 · size / 224`` px.

    The references blur 224-px images with sigma 5 px (explain-cl's insertion baseline and its "blur"
    transform).  The same sigma on a 32-px image blurs seven times as much of the image (relative to its
    side) as the references do.  Scaled, it is 5 · 32 / 224 ≈ 0.71 px at 32 px."""
    if size < 1 or sigma_at_224 <= 0:
        raise ValueError(f"need an image side >= 1 and a sigma > 0, got {size} and {sigma_at_224}")
    return sigma_at_224 * size / REFERENCE_SIZE


def gaussian_blur(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur with replicated borders: [B, C, H, W] -> same shape.

    Args:
        sigma: in pixels; None: the references' 5 px at 224 px scaled to the image's shorter side
            (``scaled_blur_sigma``), 0.71 px at 32 px.  The kernel reaches ceil(3 sigma) px to each side (the
            references truncate theirs at 11 x 11, i.e. at 1 sigma; a full Gaussian is the course's choice).
    """
    if sigma is None:
        sigma = scaled_blur_sigma(min(images.shape[-2:]))
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1).float() ** 2 / (2 * sigma**2))
    taps = (taps / taps.sum()).to(images)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


RELAX_BLUR_SIGMA = 5.0  # px, whatever the image size: the "blur" fill whose RELAX settings notebook 03 chose on val


def baseline_images(images: torch.Tensor, baseline: str | float, blur_sigma: float | None = RELAX_BLUR_SIGMA
                    ) -> torch.Tensor:
    """What removed pixels are replaced with: ``"blur"`` (Gaussian blur of ``blur_sigma`` px), ``"mean"``
    (each image's mean colour) or a number (e.g. 0, black); images [B, 3, H, W] -> same shape.

    ``blur_sigma``: None scales the references' 5 px at 224 px to the image (``scaled_blur_sigma``, 0.71 px
    at 32 px), which the perturbation metrics (``metrics.deletion_auc`` …) use by default.  The default 5 px,
    fixed in pixels, is RELAX's "blur" fill (``relax_batch(fill="blur")`` calls this function): a course
    choice made on val in notebook 03, not a reference setting; at 32 px it is close to a local mean colour.
    """
    if baseline == "blur":
        return gaussian_blur(images, blur_sigma)
    if baseline == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    if isinstance(baseline, (int, float)):
        return torch.full_like(images, float(baseline))
    raise ValueError(f"baseline must be 'blur', 'mean' or a number, got {baseline!r}")
