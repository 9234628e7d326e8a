"""One input guard for every entry point: images, saliency maps and feature matrices.

Every explainer, metric and the encoder itself calls these checks, so a bad input gives the same clear
``ValueError`` (what was wrong, what to do) wherever it enters, never a silent wrong number:

- images are float in [0, 1] (a slack of ±0.05 for resampling overshoot), finite, 4-D ``[B, 3, H, W]``
  and at least one image; uint8 or 0–255 floats raise with the fix ``x.float() / 255``; values well below
  0 raise with a hint that the images look normalised (the course's encoders normalise inside);
- float64 (or float16) images are converted to float32, or to the model's dtype and device when ``like``
  is given; the same rule in every module;
- an empty batch raises everywhere (the course's choice: an empty result would hide an empty selection);
- saliency maps are ``[B, H, W]``, finite and non-empty; a map with one value everywhere carries no
  ranking: ``constant_maps`` finds them, ``warn_constant_maps`` warns with ``ConstantMapWarning`` and the
  metrics score such maps as chance.

No module below the face of the package imports anything but ``torch`` from here.
"""
from __future__ import annotations

import math
import warnings

import torch

IMAGE_SLACK = 0.05  # resampling and blur overshoot a little outside [0, 1]; more than this is an error


class ConstantMapWarning(UserWarning):
    """A saliency map has the same value at every pixel: it ranks nothing and is scored as chance."""


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_images(images: torch.Tensor, name: str = "images", like: torch.Tensor | torch.nn.Module | None = None
                 ) -> torch.Tensor:
    """The images, validated and as float: ``[B, 3, H, W]`` in [0, 1] -> the same values, float32 (or the
    dtype and device of ``like``, a tensor or a model's first parameter).

    Raises:
        ValueError: not a 4-D tensor with 3 channels, an empty batch, an integer dtype (uint8), values in
            0–255, values well below 0 (normalised images), NaN or inf.  The message names ``name``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be RGB images [B, 3, H, W] in [0, 1], got {_shape(images)}"
                         f"{_shape_hint(images, batch=True)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 images); select at least one image")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} has no pixels, shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got {images.dtype}; convert with x.float() / 255")
    # one reduction and one device sync: NaN propagates through min/max and inf shows as an extreme, so
    # (min, max) is finite exactly when every value is (the encoder runs this on every forward pass)
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise ValueError(f"{name} contains NaN or inf values ({bad} of {len(images)} images); "
                         "fix or drop those images first")
    if high > 2.0:
        raise ValueError(f"{name} has values up to {high:.4g}: they look like 0–255 pixel values; "
                         "the course expects floats in [0, 1]: use x.float() / 255")
    if high > 1 + IMAGE_SLACK or low < -IMAGE_SLACK:
        hint = (" (negative values: are they already normalised? the course's encoders normalise inside, "
                "pass the raw [0, 1] images)" if low < -IMAGE_SLACK else "; clamp them with x.clamp(0, 1)")
        raise ValueError(f"{name} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]{hint}")
    target = _reference(like)
    if target is not None:
        return images.to(device=target.device, dtype=target.dtype if target.is_floating_point() else None)
    if images.dtype in (torch.float64, torch.float16):
        return images.float()
    return images


def check_image(image: torch.Tensor, name: str = "image", like: torch.Tensor | torch.nn.Module | None = None
                ) -> torch.Tensor:
    """One image ``[3, H, W]`` checked as ``check_images`` does; returns it as ``[3, H, W]``."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must be one RGB image [3, H, W] in [0, 1], got {_shape(image)}"
                         f"{_shape_hint(image, batch=False)}")
    return check_images(image[None], name, like)[0]


def _shape_hint(x: object, batch: bool) -> str:
    """What to do about a wrong shape: add the batch dimension, take one image, or move channels first."""
    if not isinstance(x, torch.Tensor):
        return "; pass a torch tensor (torch.as_tensor(x))"
    if x.ndim == (4 if batch else 3) and x.shape[-1] == 3:
        return "; the channels are last: move them first with x.permute(0, 3, 1, 2)" if batch else \
            "; the channels are last: move them first with x.permute(2, 0, 1)"
    if batch and x.ndim == 3 and x.shape[0] == 3:
        return "; add a batch dimension to one image with x[None]"
    if not batch and x.ndim == 4:
        return "; pass one image, e.g. x[0]"
    return ""


def _reference(like: torch.Tensor | torch.nn.Module | None) -> torch.Tensor | None:
    if isinstance(like, torch.nn.Module):
        return next(iter(like.parameters()), None)
    return like


def check_maps(maps: torch.Tensor, name: str = "saliency maps") -> torch.Tensor:
    """Saliency maps ``[B, H, W]``: finite, at least one; returned as float (bool/int maps are converted)."""
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError(f"{name} must be [B, H, W] (one map per image), got {_shape(maps)}")
    if maps.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 maps); explain at least one image")
    maps = maps if maps.is_floating_point() else maps.float()
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contain NaN or inf; check the explanation method's output")
    return maps


def check_features(features: torch.Tensor, name: str = "features") -> torch.Tensor:
    """A feature matrix ``[N, D]``: floating point, finite, at least one row."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"{name} must be a matrix [N, D] (one row per image), got {_shape(features)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} needs at least 1 row(s), got 0; extract features from a non-empty data set first")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {features.dtype}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or inf values; check the encoder's output (e.g. bf16 overflow)")
    return features


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """Which maps have one value at every pixel: [B, H, W] -> bool [B] (relative tolerance 1e-6)."""
    flat = maps.flatten(1).float()
    spread = flat.max(1).values - flat.min(1).values
    scale = flat.abs().max(1).values.clamp_min(1e-12)
    return spread <= 1e-6 * scale


def warn_constant_maps(maps: torch.Tensor, metric: str) -> torch.Tensor:
    """``constant_maps(maps)``, with a ``ConstantMapWarning`` naming ``metric`` when any map is constant."""
    constant = constant_maps(maps)
    count = int(constant.sum())
    if count:
        warnings.warn(f"{count} of {len(maps)} saliency maps are constant (one value at every pixel): they rank "
                      f"no pixel above another, so {metric} scores them as chance", ConstantMapWarning,
                      stacklevel=3)
    return constant
