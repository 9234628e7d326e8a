"""RELAX (Wickstrøm et al. 2023): which pixels the representation needs, and how sure that is.

No labels and no gradients: mask the image many times, re-embed each masked copy and compare it
with the embedding of the full image (SCIENCE.md section 3):

    h = f(X),   h̄_n = f(X ⊙ M_n + B ⊙ (1 - M_n)),   s_n = cos(h, h̄_n)
    R = (1/N) Σ_n s_n M_n                  importance
    U = (1/N) Σ_n (s_n - R)² M_n           uncertainty
    U-RELAX = R where U <= median(U), else 0

``normalize=True`` (the reference code) divides both sums by ``Σ_n M_n`` instead of N: a weighted
mean and a weighted variance.  Use it for maps: the literal ÷N importance is dominated by how often the
random masks happened to keep each pixel and needs far more than 3000 masks to converge (notebook 03
measures it); the default stays the SCIENCE.md formula.  The fill ``B`` is 0 in the paper (``X ⊙ M``); the course also offers
the image's mean colour and a blurred copy, because at 32 px what replaces a pixel decides a lot.

The masks are evaluated ``batch_size`` masked images per forward pass under autocast, and only
three running sums of [H, W] are kept (Σ M, Σ s M, Σ s² M), so memory does not grow with N and
the bookkeeping costs almost nothing next to the forward passes.  The peak memory is that of one forward
pass of ``batch_size`` images plus their masked copies; ``batch_size=None`` (default) takes the largest
batch that fits in the free memory (``runtime.fitting_batch_size``), at most 100: 100 at 32 px wherever 200 MB
are free; it estimates 22 MB per image for a ResNet-50 at 224 px (fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.explain.gradcam import representation
from course_utils.inputs import check_image, check_images
from course_utils.imageops import baseline_images
from course_utils.runtime import autocast, eval_mode, fitting_batch_size

_PROGRESS_MIN_FORWARDS = 20  # show a progress bar by default from this many forward passes
DEFAULT_BATCH_SIZE = 100  # masked images per forward pass, and the cap of batch_size=None


@dataclass
class RelaxResult:
    """RELAX maps of one image ([H, W], similarities [N]) or of a batch ([B, H, W], [B, N])."""

    importance: torch.Tensor
    uncertainty: torch.Tensor
    u_relax: torch.Tensor
    similarities: torch.Tensor


def _image_size(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


def relax_masks(n: int, size: int | tuple[int, int], grid: int = 7, p_keep: float = 0.5,
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Smooth random masks: float [n, H, W] in [0, 1].

    A ``grid × grid`` array of Bernoulli(``p_keep``) keep-cells is bilinearly upsampled to
    ``(H + cell) × (W + cell)`` with ``cell = ceil(H / grid)`` and cropped back to ``H × W`` at a
    random shift, so cell borders fall anywhere in the image.  The random draws come from
    ``generator`` on the CPU, so a seed gives the same masks on every device.
    """
    height, width = _image_size(size)
    draws = _mask_draws(n, (height, width), grid, p_keep, generator)
    return _render_masks(draws, (height, width), torch.device(device) if device is not None else torch.device("cpu"))


def _mask_draws(n: int, size: tuple[int, int], grid: int, p_keep: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of ``n`` masks, drawn on the CPU: keep-cells [n, 1, grid, grid], shifts [n], [n]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1 cell, got {grid}")
    if not 0 < p_keep <= 1:
        raise ValueError(f"p_keep must lie in (0, 1], got {p_keep}")
    cell_h, cell_w = math.ceil(size[0] / grid), math.ceil(size[1] / grid)
    cells = (torch.rand(n, 1, grid, grid, generator=generator) < p_keep).float()
    shift_y = torch.randint(0, cell_h, (n,), generator=generator)
    shift_x = torch.randint(0, cell_w, (n,), generator=generator)
    return cells, shift_y, shift_x


def _render_masks(draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: tuple[int, int],
                  device: torch.device) -> torch.Tensor:
    """Masks [n, H, W] on ``device`` from their draws: upsample the cells, crop at the shifts."""
    cells, shift_y, shift_x = (d.to(device) for d in draws)
    height, width = size
    grid = cells.shape[-1]
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    upsampled = F.interpolate(cells, size=(height + cell_h, width + cell_w), mode="bilinear",
                              align_corners=False)[:, 0]  # [n, H + cell, W + cell]
    rows = shift_y[:, None] + torch.arange(height, device=device)  # [n, H]
    cols = shift_x[:, None] + torch.arange(width, device=device)  # [n, W]
    index = torch.arange(len(cells), device=device)[:, None, None]
    # bilinear weights can sum to 1 + 1 ulp in float32 (e.g. 16 or 37 px with grid 7): clamp, so that the
    # masks pass the [0, 1] check when they are handed back as ``masks=``
    return upsampled[index, rows[:, :, None], cols[:, None, :]].clamp(0, 1)


def _mask_batches(num_masks: int, chunk: int, size: tuple[int, int], masks: torch.Tensor | None, grid: int,
                  p_keep: float, generator: torch.Generator | None, device: torch.device) -> Iterator[torch.Tensor]:
    """The masks, ``chunk`` at a time, on ``device``: given ones sliced, or new ones rendered chunk by chunk
    from draws made once (so they equal ``relax_masks(num_masks, …)`` with the same generator, and a GPU
    gets one small copy instead of one per chunk)."""
    if masks is None:
        draws = tuple(d.to(device) for d in _mask_draws(num_masks, size, grid, p_keep, generator))
    for start in range(0, num_masks, chunk):
        count = min(chunk, num_masks - start)
        if masks is not None:
            yield masks[start:start + count].to(device, torch.float32)
        else:
            yield _render_masks(tuple(d[start:start + count] for d in draws), size, device)


def masked_copies(images: torch.Tensor, masks: torch.Tensor, fill: str | float = 0.0) -> torch.Tensor:
    """Every image under every mask, ``X ⊙ M + B ⊙ (1 - M)``: images [B, 3, H, W], masks [m, H, W]
    -> [B, m, 3, H, W], with the fill ``B`` as in ``relax_batch``."""
    images = check_images(images)
    return _blend(images, baseline_images(images, fill), masks)


def _blend(images: torch.Tensor, fills: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    keep = masks[None, :, None]  # [1, m, 1, H, W]
    return images[:, None] * keep + fills[:, None] * (1 - keep)


def _check_masks(masks: torch.Tensor, size: tuple[int, int]) -> None:
    if masks.ndim != 3 or tuple(masks.shape[1:]) != size:
        raise ValueError(f"masks must be [N, H, W] with H, W = {size} (the image size), got {tuple(masks.shape)}")
    if masks.shape[0] < 2:
        raise ValueError(f"RELAX needs at least 2 masks (the uncertainty is a variance), got {masks.shape[0]}")
    if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
        raise ValueError("mask values must lie in [0, 1]")


def relax_batch(
    encoder: nn.Module, images: torch.Tensor, num_masks: int = 3000, batch_size: int | None = None,
    masks: torch.Tensor | None = None, normalize: bool = False, generator: torch.Generator | None = None,
    grid: int = 7, p_keep: float = 0.5, fill: str | float = 0.0, progress: bool | None = None,
) -> RelaxResult:
    """RELAX for several images at once, with the same masks for every image.

    Args:
        encoder: maps images [B, 3, H, W] in [0, 1] to h [B, r] (a ``SimCLRModel``'s (h, z) works too);
            run in eval mode on its own device (its mode is restored).
        images: float [B, 3, H, W] in [0, 1] (``inputs.check_images``: uint8, 0–255 values, NaN/inf or an
            empty batch raise ``ValueError``; float64 is converted to the encoder's dtype).
        num_masks: N, masks per image (ignored when ``masks`` is given).
        batch_size: masked images per forward pass; bounds the memory: the peak is about one no-grad forward
            pass of ``batch_size`` images plus a few copies of them (the blend), e.g. 1.4 GB measured at 100 for a
            ResNet-50 at 224 px in fp32 on a CPU (``fitting_batch_size`` estimates 2.2 GB), 84 MB estimated for
            the course's ResNet-10 w32 at 32 px.  None (default): the largest batch that fits in the device's
            free memory, at most 100 (``runtime.fitting_batch_size``; one extra forward pass of two images
            measures the model).
        masks: optional explicit masks float [N, H, W] in [0, 1].
        normalize: divide by Σ_n M_n (reference code) instead of N (proposal formula).
        generator: CPU generator for the masks (reproducible results).
        grid, p_keep: mask parameters (``relax_masks``).
        fill: what masked-out pixels become: 0.0 (paper: X ⊙ M), another number, ``"mean"`` (the
            image's mean colour) or ``"blur"`` (a blurred copy).
        progress: tqdm bar; None shows one when the run needs 20 forward passes or more.
    Returns:
        ``RelaxResult`` with importance, uncertainty, u_relax float32 [B, H, W] on the CPU and
        similarities [B, N].
    """
    images = check_images(images, "images", like=encoder)
    size = tuple(images.shape[-2:])
    if masks is not None:
        _check_masks(masks, size)
        num_masks = masks.shape[0]
    elif num_masks < 2:
        raise ValueError(f"num_masks must be >= 2 (the uncertainty is a variance), got {num_masks}")
    batch_size = fitting_batch_size(encoder, images.shape[1:], batch_size, cap=DEFAULT_BATCH_SIZE, under_autocast=True)
    device = next(encoder.parameters()).device
    n_images = images.shape[0]
    group = min(n_images, batch_size)  # images per forward pass
    chunk = max(1, batch_size // group)  # masks per forward pass
    n_forwards = math.ceil(num_masks / chunk) * math.ceil(n_images / group)
    show = n_forwards >= _PROGRESS_MIN_FORWARDS if progress is None else progress

    fills = baseline_images(images, fill)
    pixels = size[0] * size[1]
    accumulate = torch.float32 if device.type == "mps" else torch.float64
    sum_m = torch.zeros(pixels, device=device, dtype=accumulate)  # Σ M_n
    sum_sm = torch.zeros(n_images, pixels, device=device, dtype=accumulate)  # Σ s_n M_n
    sum_ssm = torch.zeros(n_images, pixels, device=device, dtype=accumulate)  # Σ s_n² M_n
    similarities = []
    bar = tqdm(total=n_forwards, desc="RELAX", disable=not show, leave=False)
    with eval_mode(encoder), torch.no_grad(), bar:
        with autocast(device):
            h = F.normalize(representation(encoder(images)).float(), dim=1)  # [B, r]
        for mask in _mask_batches(num_masks, chunk, size, masks, grid, p_keep, generator, device):
            flat = mask.flatten(1).to(accumulate)  # [m, HW]
            sum_m += flat.sum(0)
            chunk_similarities = []
            for first in range(0, n_images, group):
                x = images[first:first + group]
                masked = _blend(x, fills[first:first + group], mask).flatten(0, 1)  # [g * m, 3, H, W]
                with autocast(device):
                    h_masked = representation(encoder(masked)).float()
                h_masked = F.normalize(h_masked, dim=1).view(x.shape[0], mask.shape[0], -1)
                chunk_similarities.append((h_masked * h[first:first + group, None]).sum(2))  # [g, m]
                bar.update()
            s = torch.cat(chunk_similarities)  # [B, m]
            similarities.append(s)  # kept on the device: a copy per batch would stall a GPU
            s = s.to(accumulate)
            sum_sm += s @ flat
            sum_ssm += s.square() @ flat
    return _maps(sum_m, sum_sm, sum_ssm, num_masks, normalize, size, torch.cat(similarities, 1).cpu())


def _maps(sum_m: torch.Tensor, sum_sm: torch.Tensor, sum_ssm: torch.Tensor, num_masks: int, normalize: bool,
          size: tuple[int, int], similarities: torch.Tensor) -> RelaxResult:
    """Importance, uncertainty and U-RELAX from the running sums Σ M [HW], Σ s M and Σ s² M [B, HW]."""
    # normalize: a pixel that no mask kept has no weight; its maps are 0 (not 0 / 0).
    weight = sum_m.clamp(min=1e-12) if normalize else torch.full_like(sum_m, num_masks)
    importance = sum_sm / weight
    # Σ (s - R)² M = Σ s² M - 2 R Σ s M + R² Σ M, from the running sums.
    uncertainty = ((sum_ssm - 2 * importance * sum_sm + importance.square() * sum_m) / weight).clamp(min=0)
    importance = importance.float().view(-1, *size).cpu()
    uncertainty = uncertainty.float().view(-1, *size).cpu()
    median = uncertainty.flatten(1).median(1).values[:, None, None]
    u_relax = torch.where(uncertainty <= median, importance, torch.zeros_like(importance))
    return RelaxResult(importance, uncertainty, u_relax, similarities)


def relax_from_similarities(similarities: torch.Tensor, masks: torch.Tensor, normalize: bool = False) -> RelaxResult:
    """The RELAX maps from similarities that were already measured, without any forward pass.

    Useful to re-analyse a run: maps from the first n masks (convergence), or both normalisations
    from one set of forward passes.

    Args:
        similarities: s_n, float [N] (one image) or [B, N] (a batch, same masks for every image).
        masks: the masks that gave them, float [N, H, W] in [0, 1].
    Returns:
        ``RelaxResult`` shaped like ``relax`` ([H, W]) or ``relax_batch`` ([B, H, W]).
    """
    single = similarities.ndim == 1
    s = similarities[None] if single else similarities
    if s.ndim != 2 or masks.ndim != 3 or s.shape[1] != masks.shape[0]:
        raise ValueError(f"need similarities [N] or [B, N] and masks [N, H, W] with the same N, got "
                         f"{tuple(similarities.shape)} and {tuple(masks.shape)}")
    _check_masks(masks, tuple(masks.shape[1:]))
    flat, s = masks.flatten(1).double(), s.double()
    result = _maps(flat.sum(0), s @ flat, s.square() @ flat, masks.shape[0], normalize, tuple(masks.shape[1:]),
                   similarities)
    if single:
        return RelaxResult(result.importance[0], result.uncertainty[0], result.u_relax[0], similarities)
    return result


def relax(
    encoder: nn.Module, image: torch.Tensor, num_masks: int = 3000, batch_size: int | None = None,
    masks: torch.Tensor | None = None, normalize: bool = False, generator: torch.Generator | None = None,
    grid: int = 7, p_keep: float = 0.5, fill: str | float = 0.0, progress: bool | None = None,
) -> RelaxResult:
    """RELAX of one image float [3, H, W] in [0, 1]: importance, uncertainty, u_relax [H, W] and the
    similarities [N].  Arguments as in ``relax_batch``."""
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        raise ValueError(f"relax explains one image [3, H, W], got shape {tuple(image.shape)}; "
                         "use relax_batch for [B, 3, H, W]")
    image = check_image(image, "image", like=encoder)
    result = relax_batch(encoder, image[None], num_masks, batch_size, masks, normalize, generator, grid, p_keep,
                         fill, progress)
    return RelaxResult(result.importance[0], result.uncertainty[0], result.u_relax[0], result.similarities[0])
