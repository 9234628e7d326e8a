"""Explaining a *pair* of images: why does a self-supervised model find them similar? (Sammani et al.)

A similarity model has no class to explain; its natural output is the similarity of two images,
``s(x1, x2) = cos(f(x1), f(x2))`` with ``f`` the projection head's output z (SCIENCE.md section 7).
Every method here explains that number, for each image of the pair:

* perturbation: ``conditional_occlusion`` (occlude one image, keep the other), ``context_agnostic_occlusion``
  (the patch alone, without its surroundings) and ``pairwise_occlusion`` (random erasing on both images);
* gradients: ``interaction_cam`` (Grad-CAM weighted by the features both images share) and
  ``averaged_transforms`` (input gradients averaged while an augmentation is blended in, λ = 0.9 … 0.1);
* a surrogate: ``pixel_invariance`` (a linear model of the similarity under augmentations);
* optimisation: ``feature_visualisation`` (an image the model finds similar to x2) and ``model_difference``
  (what two models keep of an image, by feature inversion).

Occlusions are evaluated as batches of occluded images.  Patch size and stride default to the paper's
64 px / 8 px at 224 px, scaled to the image size.  Occluded pixels get ``fill`` (0: black, as the reference
code does for [0, 1] inputs).  The reference code resizes an occlusion grid to the image, which shifts
it by half a patch; here each pixel gets the mean drop of the patches that cover it, so maps align with
the image.  Where the course simplifies the papers, the function's docstring says so.  The methods embed a
single image and batches of occluded copies, which train-mode batch norm would normalise differently (and
its running statistics would change): ``projection(model)`` and the methods that take a model run it in
eval mode and restore its mode.  Every image argument passes the input guard (``inputs.check_images``).

Memory: the occlusion methods build all occluded copies at once (``n_patches`` x 3 x H x W floats: 441 x 0.6 MB =
265 MB at 224 px with the default 64/8 px windows) and embed them ``batch_size`` at a time, so the peak is
those copies plus one no-grad forward pass of ``batch_size`` images (for a ResNet-50 at 224 px in fp32 about
15 MB per image measured on a CPU, 22 MB estimated).  ``batch_size=None`` (default) takes the largest batch that fits in the free memory, at
most 256 (``runtime.fitting_batch_size``; one extra forward pass of two images measures the model): 256 for
the course's 32 px models wherever 0.5 GB are free, as the fixed default was.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.runtime import eval_mode, fitting_batch_size

from course_utils.explain.gradcam import layer_gradient
from course_utils.inputs import check_image, check_images
from course_utils.imageops import gaussian_blur

Embed = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, H, W] in [0, 1] -> embeddings [N, d]
DEFAULT_BATCH_SIZE = 256  # images per forward pass, and the cap of batch_size=None


def projection(model: nn.Module) -> Embed:
    """The embedding the papers compare: the projection head's output z of a ``SimCLRModel``.

    Each call runs the model in eval mode (BatchNorm with its running statistics, which it leaves unchanged)
    and restores the mode the model had."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            return model(images)[1]
    return embed


def _check_pair(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two images of a pair through the input guard: [3, S, S] each, square, of the same size."""
    x1, x2 = check_image(x1, "x1"), check_image(x2, "x2")
    if x1.shape != x2.shape or x1.shape[1] != x1.shape[2]:
        raise ValueError(f"need two square images [3, S, S] of the same size, got {tuple(x1.shape)} and "
                         f"{tuple(x2.shape)}")
    return x1, x2


def _check_batches(x1: torch.Tensor, x2: torch.Tensor, like: nn.Module | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of pairs through the input guard: [B, 3, H, W] each, of the same shape."""
    x1, x2 = check_images(x1, "x1", like=like), check_images(x2, "x2", like=like)
    if x1.shape != x2.shape:
        raise ValueError(f"need two batches [B, 3, H, W] of the same shape, got {tuple(x1.shape)} and "
                         f"{tuple(x2.shape)}")
    return x1, x2


def _scaled(size: int, at_224: int) -> int:
    return max(1, round(size * at_224 / 224))


def _batch_size(embed: Embed, image: torch.Tensor, batch_size: int | None, count: int) -> int:
    """``batch_size`` checked, or for None the largest batch of ``count`` images like ``image`` [3, H, W] that
    fits in memory, at most ``DEFAULT_BATCH_SIZE`` (``runtime.fitting_batch_size``)."""
    return fitting_batch_size(embed, image.shape, batch_size, cap=min(DEFAULT_BATCH_SIZE, max(1, count)),
                              device=image.device)


def _embed_batches(embed: Embed, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Embeddings in float32, without autocast: occlusion maps are differences of similarities of a few
    hundredths, below bf16's resolution of cosines near 1."""
    with torch.no_grad():
        return torch.cat([embed(chunk).float() for chunk in images.split(batch_size)])


def similarity(embed: Embed, x1: torch.Tensor, x2: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """cos(f(x1), f(x2)) for batches of pairs [N, 3, H, W] -> [N] (no gradient), ``batch_size`` images per
    forward pass (None: as many as fit in memory, at most 256)."""
    x1, x2 = _check_batches(x1, x2)
    batch_size = _batch_size(embed, x1[0], batch_size, len(x1))
    return F.cosine_similarity(_embed_batches(embed, x1, batch_size), _embed_batches(embed, x2, batch_size), dim=1)


def patch_masks(size: int, patch: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Square occlusion windows sliding over a ``size`` x ``size`` image: bool [n_patches, size, size].

    Defaults: the paper's 64 px patch and 8 px stride at 224 px, scaled to ``size`` (9 and 1 px at 32 px);
    the last row and column of windows touch the image border.
    """
    patch = _scaled(size, 64) if patch is None else patch
    stride = _scaled(size, 8) if stride is None else stride
    if not 1 <= patch <= size or stride < 1:
        raise ValueError(f"need 1 <= patch <= {size} and stride >= 1, got patch {patch}, stride {stride}")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    masks = torch.zeros(len(starts) ** 2, size, size, dtype=torch.bool)
    for index, (top, left) in enumerate((t, l) for t in starts for l in starts):
        masks[index, top:top + patch, left:left + patch] = True
    return masks


def _patch_map(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each pixel's mean score over the patches covering it: scores [n], masks [n, H, W] -> [H, W]."""
    weights = masks.float().to(scores)
    return (scores[:, None, None] * weights).sum(0) / weights.sum(0).clamp(min=1)


def conditional_occlusion(embed: Embed, x1: torch.Tensor, x2: torch.Tensor, patch: int | None = None,
                          stride: int | None = None, fill: float = 0.0,
                          batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlude one image of the pair, keep the other: how much does the similarity drop?

        M1[p] = s(x1, x2) − s(x1 with patch p filled, x2),  and symmetrically M2 for x2.

    Args:
        embed: images -> embeddings (``projection(model)``); x1, x2: [3, H, W] in [0, 1].
        batch_size: occluded images per forward pass; None: as many as fit in memory, at most 256.  Peak
            memory: the occluded copies of one image (n_patches x 3 x H x W floats) plus one forward pass of
            ``batch_size`` images (module docstring).
    Returns:
        (map of x1, map of x2), float [H, W] each: the mean drop of the patches covering each pixel.
    """
    x1, x2 = _check_pair(x1, x2)
    masks = patch_masks(x1.shape[-1], patch, stride).to(x1.device)
    batch_size = _batch_size(embed, x1, batch_size, len(masks))
    base = similarity(embed, x1[None], x2[None], 1)
    maps = []
    for image, other in ((x1, x2), (x2, x1)):
        occluded = torch.where(masks[:, None], torch.full_like(image, fill), image)
        partner = _embed_batches(embed, other[None], 1).expand(len(masks), -1)
        drop = base - F.cosine_similarity(_embed_batches(embed, occluded, batch_size), partner, dim=1)
        maps.append(_patch_map(drop, masks))
    return maps[0], maps[1]


def context_agnostic_occlusion(embed: Embed, x1: torch.Tensor, x2: torch.Tensor, patch: int | None = None,
                               stride: int | None = None, fill: float = 0.0,
                               batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a patch says on its own, without the context around it:

        M1[p] = cos( f(only patch p of x1) − f(x1 without patch p),  f(x2) ),   symmetrically for x2.

    "Only patch p" keeps the patch and fills the rest; subtracting the embedding of the context without the
    patch removes what the surroundings contribute.  No base similarity is subtracted (reference code).

    ``batch_size`` and memory as in ``conditional_occlusion``, with two sets of copies (patch only, context only).

    Returns:
        (map of x1, map of x2), float [H, W] each (cosines in [-1, 1], averaged over covering patches).
    """
    x1, x2 = _check_pair(x1, x2)
    masks = patch_masks(x1.shape[-1], patch, stride).to(x1.device)
    batch_size = _batch_size(embed, x1, batch_size, len(masks))
    maps = []
    for image, other in ((x1, x2), (x2, x1)):
        filled = torch.full_like(image, fill)
        only_patch = torch.where(masks[:, None], image, filled)
        without_patch = torch.where(masks[:, None], filled, image)
        difference = _embed_batches(embed, only_patch, batch_size) - _embed_batches(embed, without_patch, batch_size)
        partner = _embed_batches(embed, other[None], 1).expand(len(masks), -1)
        maps.append(_patch_map(F.cosine_similarity(difference, partner, dim=1), masks))
    return maps[0], maps[1]


def random_erasing_masks(count: int, size: int, scale: tuple[float, float] = (0.1, 0.3),
                         ratio: tuple[float, float] = (1.0, 1.5),
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rectangles as torchvision's RandomErasing draws them: area ``scale`` of the image, aspect ratio
    ``ratio`` (log-uniform), random position: bool [count, size, size]."""
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    area = torch.empty(count).uniform_(*scale, generator=generator) * size * size
    log_ratio = torch.empty(count).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    heights = (area * aspect).sqrt().round().clamp(1, size).long()
    widths = (area / aspect).sqrt().round().clamp(1, size).long()
    tops = (torch.rand(count, generator=generator) * (size - heights + 1)).long()
    lefts = (torch.rand(count, generator=generator) * (size - widths + 1)).long()
    for index in range(count):
        top, left = int(tops[index]), int(lefts[index])
        masks[index, top:top + int(heights[index]), left:left + int(widths[index])] = True
    return masks


def pairwise_occlusion(embed: Embed, x1: torch.Tensor, x2: torch.Tensor, samples: int = 100,
                       scale: tuple[float, float] = (0.1, 0.3), ratio: tuple[float, float] = (1.0, 1.5),
                       fill: float = 0.0, credit: str = "norm", temperature: float = 0.05,
                       generator: torch.Generator | None = None,
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase a random rectangle in *both* images at once, ``samples`` times; the similarity drops
    d_n = s(x1, x2) − s(x̃1_n, x̃2_n) are turned into weights a = softmax(d / temperature) and credited to
    the erased pixels.

    Args:
        credit: "norm" (reference code): sample n is credited to the image whose erased embedding has the
            smaller norm (the one the erasure hurt more); "both": to both images.
        temperature: the reference code uses 1; drops of a few hundredths (typical here) then give nearly
            equal weights and the map only shows where rectangles fell, so the course default is 0.05.
        generator: the randomness of the rectangles (a seed gives the same maps).
        batch_size: erased images per forward pass; None: as many as fit in memory, at most 256.  Peak memory:
            the erased copies of both images (2 x samples x 3 x H x W floats) plus one forward pass of
            ``batch_size`` images.
    Returns:
        (map of x1, map of x2), float [H, W] each, divided by its maximum (in [0, 1]).
    """
    x1, x2 = _check_pair(x1, x2)
    if credit not in ("norm", "both"):
        raise ValueError(f"credit must be 'norm' or 'both', got {credit!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch_size = _batch_size(embed, x1, batch_size, samples)
    size = x1.shape[-1]
    masks1 = random_erasing_masks(samples, size, scale, ratio, generator).to(x1.device)
    masks2 = random_erasing_masks(samples, size, scale, ratio, generator).to(x1.device)
    erased1 = torch.where(masks1[:, None], torch.full_like(x1, fill), x1)
    erased2 = torch.where(masks2[:, None], torch.full_like(x2, fill), x2)
    z1, z2 = _embed_batches(embed, erased1, batch_size), _embed_batches(embed, erased2, batch_size)
    drops = similarity(embed, x1[None], x2[None], 1) - F.cosine_similarity(z1, z2, dim=1)
    weights = torch.softmax(drops / temperature, dim=0)
    to_first = z1.norm(dim=1) < z2.norm(dim=1) if credit == "norm" else torch.ones(samples, dtype=torch.bool)
    to_second = ~to_first if credit == "norm" else to_first
    maps = []
    for masks, chosen in ((masks1, to_first), (masks2, to_second)):
        total = (weights[chosen, None, None] * masks[chosen].float()).sum(0) if chosen.any() else \
            torch.zeros(size, size, device=x1.device)
        maps.append(total / (total.max() + 1e-9))
    return maps[0], maps[1]


def interaction_cam(model: nn.Module, layer: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                    alpha: str = "gap") -> tuple[torch.Tensor, torch.Tensor]:
    """Interaction-CAM: Grad-CAM of the pair similarity, each channel weighted by how much *both* images
    use it, w_k = GAP(F1)_k · GAP(F2)_k:

        "gap" (the paper's formula, default): L1 = ReLU( Σ_k w_k · α_k · F1_k ),  α_k = mean_ij ∂s/∂F1_k(i, j)
        "elementwise" (reference code):       L1 = Σ_k w_k · F1_k ⊙ ReLU(∂s/∂F1_k)

    and symmetrically for x2, with s = cos(z1, z2) of the projection outputs.

    Args:
        model: a ``SimCLRModel`` (returns (h, z)); layer: a feature-map layer inside it (``model.encoder.layer4``).
        x1, x2: batches of pairs [B, 3, H, W].
    Returns:
        (maps of x1, maps of x2), float [B, H, W] each (upsampled bilinearly, not normalised).
    """
    if alpha not in ("elementwise", "gap"):
        raise ValueError(f"alpha must be 'elementwise' or 'gap', got {alpha!r}")
    x1, x2 = _check_batches(x1, x2, like=model)
    features, gradient = layer_gradient(model, layer, torch.cat([x1, x2]),
                                        lambda output: F.cosine_similarity(*output[1].float().chunk(2), dim=1))
    f1, f2 = features.chunk(2)
    g1, g2 = gradient.chunk(2)
    shared = (f1.mean((2, 3)) * f2.mean((2, 3)))[:, :, None, None]  # w_k [B, K, 1, 1]
    maps = []
    for f, g in ((f1, g1), (f2, g2)):
        if alpha == "elementwise":
            cam = (shared * f * g.clamp(min=0)).sum(1)
        else:
            cam = (shared * g.mean((2, 3), keepdim=True) * f).sum(1).clamp(min=0)
        maps.append(F.interpolate(cam[:, None], size=x1.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return maps[0], maps[1]


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    gray = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]
    return gray.expand_as(images)


def _colour_jitter(images: torch.Tensor) -> torch.Tensor:
    """A fixed strong colour change (brightness ×1.3, contrast ×0.6, saturation ×0.3, channels rotated)."""
    out = (images * 1.3).clamp(0, 1)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = ((out - mean) * 0.6 + mean).clamp(0, 1)
    gray = _grayscale(out)
    out = ((out - gray) * 0.3 + gray).clamp(0, 1)
    return out[:, [1, 2, 0]]


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "colour jitter": _colour_jitter,
    "grayscale": _grayscale,
    "blur": lambda images: gaussian_blur(images),  # sigma 5 px at 224 px (reference), scaled: 0.71 px at 32 px
    "solarize": lambda images: torch.where(images >= 0.5, 1 - images, images),
}


def averaged_transforms(embed: Embed, x: torch.Tensor, transform: str | Callable[[torch.Tensor], torch.Tensor],
                        lambdas: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
                        noise: float = 0.15, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which pixels keep an image similar to itself while an augmentation is blended in?

    For x̃_λ = λ·x + (1 − λ)·T(x) and every λ, the input gradients of s(x, x̃_λ) with respect to both
    images are averaged over λ; the maps are gradient × input, max over channels:

        S1 = max_c |x ⊙ mean_λ ∂s/∂x|,    S2 = max_c |x̃_λmin ⊙ mean_λ ∂s/∂x̃_λ|.

    Args:
        embed: images -> embeddings; x: one image [3, H, W]; transform: a name in ``TRANSFORMS`` or a function
            of images [N, 3, H, W].
        lambdas: the blend weights of x (SCIENCE.md: 1, 0.9, …, 0.1; λ = 1 is left out because there the
            two images are equal, s is at its maximum and both gradients vanish).
        noise: Gaussian noise of std ``noise`` × (max − min of x) added to the intermediate blends (reference
            code, SmoothGrad-like); 0 turns it off.
    Returns:
        (map of x, map of the most transformed view x̃_λmin), float [H, W] each.  The reference code also uses
        guided back-propagation; the course's ResNets use functional ReLUs, so plain gradients are used.
    """
    x = check_image(x, "x")
    if isinstance(transform, str):
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; choose from {sorted(TRANSFORMS)} or pass a function")
        transform = TRANSFORMS[transform]
    if not lambdas or not all(0 <= value < 1 for value in lambdas):
        raise ValueError(f"lambdas must lie in [0, 1), got {lambdas}")
    weights = torch.tensor(lambdas, dtype=x.dtype, device=x.device)[:, None, None, None]
    views = weights * x + (1 - weights) * transform(x[None])
    last = int(torch.tensor(lambdas).argmin())  # the most transformed view
    if noise > 0:
        spread = (x.max() - x.min()).item() * noise
        jitter = torch.randn(views.shape, generator=generator).to(views) * spread
        jitter[last] = 0  # the most transformed view stays exact, as in the reference code
        views = (views + jitter).clamp(0, 1)
    anchor = x[None].expand_as(views).clone().requires_grad_()
    views = views.detach().requires_grad_()
    with torch.enable_grad():
        score = F.cosine_similarity(embed(anchor).float(), embed(views).float(), dim=1)
        gradient_anchor, gradient_views = torch.autograd.grad(score.sum(), [anchor, views])
    first = (x * gradient_anchor.mean(0)).abs().amax(0)
    second = (views[last].detach() * gradient_views.mean(0)).abs().amax(0)
    return first.detach(), second.detach()


INVARIANCE_CHANNELS = ("signed", "abs")


def invariance_map(weights: torch.Tensor, channels: str = "signed") -> torch.Tensor:
    """A pixel-invariance surrogate's weights [3, H, W] -> one value per pixel [H, W] in [0, 1].

    "signed" (the reference code): ``m = max_c w_c``, scaled ``(m − min m) / (max m − min m)``;
    "abs": ``m = max_c |w_c|``, scaled ``m / max m``.  See ``pixel_invariance``."""
    if channels not in INVARIANCE_CHANNELS:
        raise ValueError(f"channels must be one of {INVARIANCE_CHANNELS}, got {channels!r}")
    if weights.ndim != 3:
        raise ValueError(f"weights must be [C, H, W], got shape {tuple(weights.shape)}")
    if channels == "abs":
        magnitude = weights.abs().amax(0)
        return magnitude / magnitude.max().clamp(min=1e-12)
    signed = weights.amax(0)
    return (signed - signed.min()) / (signed.max() - signed.min()).clamp(min=1e-12)


def pixel_invariance(embed: Embed, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor],
                     n_augments: int = 1000, epochs: int = 300, lr: float = 0.1, l1: float = 0.2,
                     batch_size: int | None = None, channels: str = "signed") -> torch.Tensor:
    """A linear surrogate of the similarity under augmentations: which pixels' values predict that an
    augmented view stays similar to the image?

    ``n_augments`` views x_t = augment(x) get the soft label y_t = cos(f(x), f(x_t)) (clamped to [0, 1]); a
    linear model g(v) = w·vec(v) + b is fitted on p_t = (g(x) + g(x_t)) / 2 with the summed binary
    cross-entropy on y_t plus l1 · (|w|₁ + |b|), by full-batch SGD (the reference code's loss and settings).

    Args:
        augment: images [N, 3, H, W] -> augmented views of the same shape, without shifts (colour changes,
            erasing), so that pixel positions keep their meaning.
        epochs: SGD steps (reference code: 1000 on 64 px images; 300 converge on 32 px).
        batch_size: views per forward pass; None: as many as fit in memory, at most 256.  Peak memory: the
            views (n_augments x 3 x H x W floats, twice for the fit) plus one forward pass of ``batch_size``.
        channels: how the three weights of a pixel become one value.  "signed" (default, the reference
            code): max_c w_c, then min-max scaled, (m − min m) / (max m − min m) — a pixel whose value
            *raises* the predicted similarity ranks high, one whose weights are all negative ranks low.
            "abs": max_c |w_c| / max — large weights of either sign rank high (a pixel whose brightness
            lowers the similarity counts as much as one that raises it).  ``invariance_map`` does this step.
    Returns:
        float [H, W] in [0, 1] (the reference code then zeroes values below 0.5 and blurs for display; that is
        left to the plot).
    """
    if channels not in INVARIANCE_CHANNELS:
        raise ValueError(f"channels must be one of {INVARIANCE_CHANNELS}, got {channels!r}")
    x = check_image(x, "x")
    batch_size = _batch_size(embed, x, batch_size, n_augments)
    views = augment(x[None].expand(n_augments, -1, -1, -1))
    if views.shape != (n_augments, *x.shape):
        raise ValueError(f"augment must return [N, 3, H, W] views of the same size, got {tuple(views.shape)}")
    anchor_embedding = _embed_batches(embed, x[None], 1)
    targets = F.cosine_similarity(_embed_batches(embed, views, batch_size), anchor_embedding, dim=1).clamp(0, 1)
    inputs = views.flatten(1).float()
    anchor = x.flatten().float()
    weight = torch.zeros(inputs.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(1, device=x.device, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr)
    for _ in range(epochs):
        logits = ((inputs @ weight + bias) + (anchor @ weight + bias)) / 2
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") + \
            l1 * (weight.abs().sum() + bias.abs().sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return invariance_map(weight.detach().view_as(x), channels)


def _total_variation(images: torch.Tensor) -> torch.Tensor:
    return ((images[..., 1:, :] - images[..., :-1, :]) ** 2).sum() + ((images[..., :, 1:] - images[..., :, :-1]) ** 2).sum()


def feature_visualisation(embed: Embed, x2: torch.Tensor, steps: int = 200, lr: float = 0.05, tv: float = 1e-3,
                          l2: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """An image the model finds similar to ``x2``, grown from noise by gradient ascent on
    cos(f(x), f(x2)) − tv · TV²(x) − l2 · ||x||² (the paper's "score maximisation" objective).

    The image is parameterised as sigmoid(θ), so it stays in [0, 1]; Adam instead of the reference code's
    DeepDream octaves (32 px images need no multi-scale detail).

    Returns:
        (image [3, H, W] in [0, 1], similarity after each step).
    """
    x2 = check_image(x2, "x2")
    generator = torch.Generator().manual_seed(seed)
    theta = (0.1 * torch.randn(x2.shape, generator=generator)).to(x2.device).requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=lr)
    with torch.no_grad():
        target = embed(x2[None]).float()
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            image = torch.sigmoid(theta)
            score = F.cosine_similarity(embed(image[None]).float(), target, dim=1).squeeze()
            loss = -score + tv * _total_variation(image) + l2 * image.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(score.item())
    return torch.sigmoid(theta).detach(), history


def invert(model: nn.Module, layer: nn.Module, x: torch.Tensor, steps: int = 300, lr: float = 0.05,
           tv: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Feature inversion (Mahendran & Vedaldi): an image whose activation at ``layer`` matches that of ``x``,
    minimising ||φ(v) − φ(x)||² / ||φ(x)||² + tv · TV²(v) from noise; image [3, H, W] -> [3, H, W] in [0, 1]."""
    x = check_image(x, "x", like=model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with eval_mode(model), torch.no_grad():
            captured.clear()
            model(x[None])
            reference = captured[-1].detach().float()
        generator = torch.Generator().manual_seed(seed)
        theta = (0.1 * torch.randn(x.shape, generator=generator)).to(x.device).requires_grad_()
        optimizer = torch.optim.Adam([theta], lr=lr)
        with eval_mode(model), torch.enable_grad():
            for _ in range(steps):
                captured.clear()
                image = torch.sigmoid(theta)
                model(image[None])
                loss = (captured[-1].float() - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-12)
                loss = loss + tv * _total_variation(image)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        handle.remove()
    return torch.sigmoid(theta).detach()


def model_difference(model_a: nn.Module, layer_a: nn.Module, model_b: nn.Module, layer_b: nn.Module,
                     x: torch.Tensor, steps: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What two models keep of an image at comparable depths: the feature inversions of ``x`` through
    (model_a, layer_a) and (model_b, layer_b) from the same noise, e.g. a supervised and a self-supervised
    encoder at the same stage.  Returns two images [3, H, W]."""
    x = check_image(x, "x")
    return invert(model_a, layer_a, x, steps, seed=seed), invert(model_b, layer_b, x, steps, seed=seed)
