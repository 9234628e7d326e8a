"""SimCLR views, batched on tensors: every sample draws its own parameters.

One ``SimCLRAugment(x)`` call turns a batch [B, 3, H, W] in [0, 1] into one view
per image on the same device: random resized crop (with flip folded into the
same affine resampling), colour jitter (brightness, contrast, saturation, then
a hue rotation in YIQ space), random grayscale, optional Gaussian blur and
optional random erasing (a rectangle set to black, as torchvision's
``RandomErasing`` with value 0), with an optional small rotation folded into the
crop's affine map.
Nothing loops over samples; the random parameters are drawn from a
``torch.Generator`` on the CPU (they are tiny) and moved to the device, so the
same generator gives the same views on every device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ (NTSC); a hue shift is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class SimCLRAugment(nn.Module):
    """Random SimCLR view of each image of a batch.

    Defaults are the course recipe for 32 px ShapesWorld (SCIENCE.md §1): crop
    scale 0.35–1 with aspect 3/4–4/3 and reflection padding, flip 0.5, with
    p = 0.8 brightness/contrast/saturation ±0.8 then hue rotation ±180°,
    grayscale 0.2, no blur.  For other data pass the recipe explicitly (the
    presets in ``course_utils.train`` do): SimCLR's own uses strengths 0.4/0.1,
    crop scale 0.08–1 and blur p = 0.5 from 96 px up.

    Args:
        size: output side in pixels.
        crop_scale: range of the crop area as a fraction of the image area.
        crop_ratio: range of the crop aspect ratio (width / height), log-uniform.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying the colour jitter (all four parts together).
        brightness, contrast, saturation: factors drawn uniformly from [1 - s, 1 + s].
        hue: fraction of a full turn; the hue angle is uniform in [-2 pi hue, 2 pi hue]
            (0.5 = any hue).
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of a Gaussian blur with sigma uniform in ``blur_sigma``
            (as a fraction of the image side: 0.1–2.0 px at 224 px in SimCLR).
        rotate_degrees: the crop is rotated by an angle uniform in [-d, d] degrees (0 = none).
        erase_p: probability of erasing one rectangle (set to 0, black) after the colour steps.
        erase_scale: range of the erased area as a fraction of the view's area.
        erase_ratio: range of its aspect ratio (width / height), log-uniform.
    Input / output: float [B, 3, H, W] in [0, 1] -> float [B, 3, size, size] in [0, 1],
    same dtype and device as the input (computed in float32 inside).
    """

    def __init__(
        self,
        size: int,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.8,
        contrast: float = 0.8,
        saturation: float = 0.8,
        hue: float = 0.5,
        grayscale_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1 / 224, 2.0 / 224),
        rotate_degrees: float = 0.0,
        erase_p: float = 0.0,
        erase_scale: tuple[float, float] = (0.02, 0.2),
        erase_ratio: tuple[float, float] = (0.3, 3.3),
    ) -> None:
        super().__init__()
        if not 0 < crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high, got {crop_scale}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {crop_ratio}")
        if not 0 < erase_scale[0] <= erase_scale[1] <= 1:
            raise ValueError(f"erase_scale must satisfy 0 < low <= high <= 1, got {erase_scale}")
        if not 0 < erase_ratio[0] <= erase_ratio[1]:
            raise ValueError(f"erase_ratio must satisfy 0 < low <= high, got {erase_ratio}")
        if not 0.0 <= rotate_degrees <= 180.0:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {rotate_degrees}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p),
                        ("erase_p", erase_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"{name} strength must be in [0, 1], got {s}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue is a fraction of a turn in [0, 0.5], got {hue}")
        self.size = size
        self.crop_scale, self.crop_ratio, self.flip_p = crop_scale, crop_ratio, flip_p
        self.jitter_p, self.brightness, self.contrast, self.saturation, self.hue = (
            jitter_p, brightness, contrast, saturation, hue)
        self.grayscale_p, self.blur_p, self.blur_sigma = grayscale_p, blur_p, blur_sigma
        self.rotate_degrees = rotate_degrees
        self.erase_p, self.erase_scale, self.erase_ratio = erase_p, erase_scale, erase_ratio

    def extra_repr(self) -> str:
        return (f"size={self.size}, crop_scale={self.crop_scale}, flip_p={self.flip_p}, jitter_p={self.jitter_p}, "
                f"bcsh=({self.brightness}, {self.contrast}, {self.saturation}, {self.hue}), "
                f"grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, rotate_degrees={self.rotate_degrees}, "
                f"erase_p={self.erase_p}")

    def sample_parameters(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The random parameters of ``batch`` views (CPU tensors of shape [batch])."""
        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, generator=generator)

        def coin(p: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator) < p

        scale = uniform(*self.crop_scale)
        ratio = torch.exp(uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
        width, height = torch.sqrt(scale * ratio), torch.sqrt(scale / ratio)  # fractions of the side
        # Crop centre such that the crop stays inside when it fits; reflection fills the rest.
        cx = 0.5 + (uniform(-1, 1) * (1 - width).clamp(min=0) / 2)
        cy = 0.5 + (uniform(-1, 1) * (1 - height).clamp(min=0) / 2)
        erase_area = uniform(*self.erase_scale)
        erase_aspect = torch.exp(uniform(math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])))
        erase_w = torch.sqrt(erase_area * erase_aspect).clamp(max=1.0)  # fractions of the view's side
        erase_h = torch.sqrt(erase_area / erase_aspect).clamp(max=1.0)
        return dict(
            scale=scale, width=width, height=height, cx=cx, cy=cy, flip=coin(self.flip_p),
            jitter=coin(self.jitter_p),
            brightness=uniform(1 - self.brightness, 1 + self.brightness),
            contrast=uniform(1 - self.contrast, 1 + self.contrast),
            saturation=uniform(1 - self.saturation, 1 + self.saturation),
            hue=uniform(-2 * math.pi * self.hue, 2 * math.pi * self.hue),
            grayscale=coin(self.grayscale_p),
            blur=coin(self.blur_p), sigma=uniform(*self.blur_sigma),
            angle=uniform(-math.radians(self.rotate_degrees), math.radians(self.rotate_degrees)),
            erase=coin(self.erase_p), erase_w=erase_w, erase_h=erase_h,
            erase_x=erase_w / 2 + uniform(0, 1) * (1 - erase_w), erase_y=erase_h / 2 + uniform(0, 1) * (1 - erase_h),
        )

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SimCLRAugment expects images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"SimCLRAugment expects float images in [0, 1], got {x.dtype}; "
                             "convert uint8 images with x.float() / 255")
        dtype = x.dtype
        p = {k: v.to(x.device) for k, v in self.sample_parameters(x.shape[0], generator).items()}
        out = self._crop_and_flip(x.float(), p)
        out = self._jitter(out, p)
        gray = _luma(out).expand_as(out)
        out = torch.where(p["grayscale"][:, None, None, None], gray, out)
        if self.blur_p > 0:
            out = self._blur(out, p)
        if self.erase_p > 0:
            out = self._erase(out, p)
        return out.clamp_(0.0, 1.0).to(dtype)

    def _crop_and_flip(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Resized crop (rotated by ``angle``) as one affine resampling (bilinear, reflection padding):
        [B, 3, size, size]."""
        sign = torch.where(p["flip"], -1.0, 1.0)
        cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        # input = rotation @ diag(width * sign, height) @ output + centre
        theta[:, 0, 0], theta[:, 0, 1] = cos * p["width"] * sign, -sin * p["height"]
        theta[:, 1, 0], theta[:, 1, 1] = sin * p["width"] * sign, cos * p["height"]
        theta[:, 0, 2] = 2 * p["cx"] - 1
        theta[:, 1, 2] = 2 * p["cy"] - 1
        grid = F.affine_grid(theta, [x.shape[0], 3, self.size, self.size], align_corners=False)
        # Antialias strong downscaling (e.g. 96 px -> 32 px) before resampling.
        factor = x.shape[-1] / self.size
        if factor >= 2:
            x = F.avg_pool2d(x, int(factor))
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Brightness, contrast, saturation, hue on the samples whose ``jitter`` coin came up."""
        def col(v: torch.Tensor) -> torch.Tensor:
            return v[:, None, None, None]

        y = (x * col(p["brightness"])).clamp(0, 1)
        mean = _luma(y).mean(dim=(2, 3), keepdim=True)
        y = ((y - mean) * col(p["contrast"]) + mean).clamp(0, 1)
        gray = _luma(y)
        y = ((y - gray) * col(p["saturation"]) + gray).clamp(0, 1)
        y = _rotate_hue(y, p["hue"]).clamp(0, 1)
        return torch.where(col(p["jitter"]), y, x)

    def _blur(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Separable Gaussian blur with a per-sample sigma, as one grouped convolution per axis."""
        batch, side = x.shape[0], x.shape[-1]
        sigma = (p["sigma"] * side).clamp(min=1e-3)  # pixels
        radius = max(1, int(math.ceil(3 * float(sigma.max()))))
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, K]
        kernel = kernel.repeat_interleave(3, dim=0)  # one kernel per channel: [3B, K]
        flat = x.reshape(1, batch * 3, side, side)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=3 * batch)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=3 * batch)
        blurred = flat.view_as(x)
        return torch.where(p["blur"][:, None, None, None], blurred, x)


    def _erase(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Set one rectangle per sample whose ``erase`` coin came up to 0 (black): [B, 3, S, S]."""
        def col(v: torch.Tensor) -> torch.Tensor:
            return v[:, None, None]

        centres = (torch.arange(x.shape[-1], device=x.device, dtype=torch.float32) + 0.5) / x.shape[-1]
        inside_x = (centres[None, None, :] - col(p["erase_x"])).abs() < col(p["erase_w"]) / 2  # [B, 1, S]
        inside_y = (centres[None, :, None] - col(p["erase_y"])).abs() < col(p["erase_h"]) / 2  # [B, S, 1]
        erased = (inside_x & inside_y & col(p["erase"]))[:, None]  # [B, 1, S, S]
        return x.masked_fill(erased, 0.0)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma: [B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = _LUMA
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``angle`` [B] radians in YIQ space (one 3x3 matrix per sample)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(angle.shape[0], 3, 3, device=x.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = _YIQ_TO_RGB.to(x.device) @ rotation @ _RGB_TO_YIQ.to(x.device)  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", matrix, x)
