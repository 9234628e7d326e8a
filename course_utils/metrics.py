"""Scores of saliency maps against ground truth and against the model itself.

* against ShapesWorld's masks: ``pointing_game``, ``mask_iou``;
* against the model's score: ``deletion_auc`` / ``insertion_auc`` (Petsiuk et al. 2018, RISE) and
  ``average_drop_increase`` (Chattopadhay et al. 2018, Grad-CAM++);
* the same for a pair of images explained together (Sammani et al.): ``pair_deletion_auc`` /
  ``pair_insertion_auc`` (simultaneous or conditional), ``pair_average_drop_increase``, and the stability
  score ``max_sensitivity``;
* a sanity check (Adebayo et al. 2018): ``model_randomisation`` re-initialises the model from the
  top layer down and measures how much the maps change (a map that does not change does not
  explain the model);
* baselines every method must beat: ``random_map``, ``centre_prior``;
* scores that predict a binary outcome (e.g. Q-Score predicting a correct classification): ``auroc``,
  ``auprc`` and ``bootstrap_interval`` for their confidence intervals.

Saliency maps are float [B, H, W] (higher = more important); masks are bool [B, H, W].  Images, maps and
batches go through the input guard (``inputs``): bad images (uint8, 0–255, NaN) and empty batches raise a
``ValueError``.  A constant map (all zeros, all ones: it ranks no pixel above another) warns with
``ConstantMapWarning`` and is scored as chance: the pointing game's chance hit rate (the mask's area share),
the expected IoU of a random ranking, the deletion / insertion curve averaged over ``CHANCE_ORDERS`` random
orders, and Average Drop / Increase with the weight E = 1/2 everywhere.  A score function that is a model (an
``nn.Module``, a method of one, a ``functools.partial`` or a closure over one) runs in eval mode for the call
and gets its mode back, so a metric never changes BatchNorm statistics nor depends on the model's mode.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from course_utils import imageops
from course_utils.inputs import check_images, check_maps, constant_maps, warn_constant_maps
from course_utils.runtime import eval_mode

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, H, W] -> scores [N] or per class [N, C]


CHANCE_ORDERS = 8  # random deletion / insertion orders averaged for a constant map (its chance curve)
CONSTANT_MAP_WEIGHT = 0.5  # Average Drop / Increase: the weight E of every pixel of a constant map


def _check_maps(saliency: torch.Tensor, masks: torch.Tensor | None = None, name: str = "saliency maps"
                ) -> torch.Tensor:
    """``inputs.check_maps`` (shape [B, H, W], finite, non-empty; float) and, given masks, their shape and content."""
    saliency = check_maps(saliency, name)
    if masks is not None:
        if not isinstance(masks, torch.Tensor):
            raise ValueError(f"masks must be a bool tensor [B, H, W], got {type(masks).__name__}")
        if masks.shape != saliency.shape:
            raise ValueError(f"masks {tuple(masks.shape)} and saliency {tuple(saliency.shape)} differ in shape; "
                             "upsample the maps to the image size first")
        if not masks.flatten(1).any(1).all():
            raise ValueError("every mask needs at least one pixel (an empty mask has no object to point at)")
    return saliency


def _check_image_maps(images: torch.Tensor, saliency: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images through ``inputs.check_images``, maps through ``_check_maps``, one [H, W] map per image."""
    images = check_images(images, "images")
    saliency = _check_maps(saliency)
    if images.shape[0] != saliency.shape[0] or images.shape[-2:] != saliency.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and saliency {tuple(saliency.shape)} do not match: "
                         f"{metric} needs one [H, W] map per image [3, H, W]")
    return images, saliency


def _modules_of(fn: Callable) -> list[nn.Module]:
    """The models a score function runs: ``fn`` itself (an ``nn.Module``), the module of a bound method, the
    function and arguments of a ``functools.partial``, and the modules a closure (lambda, nested def)
    captures, recursively.  A model reached only through a global name or an object's attribute is not found."""
    found, todo, seen = [], [fn], set()
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, nn.Module):
            found.append(item)
        elif isinstance(item, functools.partial):
            todo += [item.func, *item.args, *item.keywords.values()]
        elif callable(item):
            owner = getattr(item, "__self__", None)
            if isinstance(owner, nn.Module):
                todo.append(owner)
            for cell in getattr(getattr(item, "__func__", item), "__closure__", None) or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
    return found


@contextlib.contextmanager
def _models_in_eval_mode(fn: Callable) -> Iterator[None]:
    """Every model ``fn`` runs (``_modules_of``) in eval mode (``runtime.eval_mode``), its mode restored after."""
    with contextlib.ExitStack() as stack:
        for module in _modules_of(fn):
            stack.enter_context(eval_mode(module))
        yield


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Masks grown by ``radius`` pixels (Euclidean disc): bool [B, H, W] -> bool [B, H, W]."""
    if radius < 0:
        raise ValueError(f"the dilation radius must be >= 0 pixels, got {radius}")
    if radius == 0:
        return masks.bool()
    offsets = torch.arange(-radius, radius + 1, device=masks.device).float()
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()[None, None]
    grown = F.conv2d(masks[:, None].float(), disc, padding=radius)[:, 0]
    return grown > 0.5


def pointing_hits(saliency: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Per-image pointing-game hits [B] in [0, 1]: 1 when the most salient pixel lies inside the object mask.

    Args:
        saliency: [B, H, W]; masks: bool [B, H, W].
        tolerance: a hit may also lie within this many pixels of the mask (Zhang et al. 2018 use
            15 px at ImageNet resolution, about 2 px at 32 px).
    Ties are broken at random in expectation: an image whose maximum is shared by several pixels
    counts as the share of them inside the mask, so a constant map scores the mask's area (chance).
    Feed the hits to ``stats.mean_interval`` / ``stats.difference_interval`` for intervals over images.
    A constant map (``ConstantMapWarning``) therefore scores exactly chance: the share of the (dilated) mask.
    """
    saliency = _check_maps(saliency, masks)
    warn_constant_maps(saliency, "the pointing game")
    flat, inside = saliency.flatten(1), dilate(masks, tolerance).flatten(1)
    is_max = flat == flat.max(1, keepdim=True).values
    return (is_max & inside).sum(1).float() / is_max.sum(1).float()


def pointing_game(saliency: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> float:
    """Fraction of images whose most salient pixel lies inside the object mask: the mean of ``pointing_hits``."""
    return pointing_hits(saliency, masks, tolerance).mean().item()


def _ranks(saliency: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of every pixel, 0 = most salient, ties broken at random (fixed seed): long [B, H*W].

    Grad-CAM maps are exactly zero over large regions; breaking those ties in raster order would
    favour objects near the top-left corner."""
    flat = saliency.flatten(1)
    n_pixels = flat.shape[1]
    shuffle = torch.randperm(n_pixels, generator=torch.Generator().manual_seed(seed)).to(flat.device)
    order = shuffle[flat[:, shuffle].argsort(dim=1, descending=True, stable=True)]
    positions = torch.arange(n_pixels, device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def mask_iou(saliency: torch.Tensor, masks: torch.Tensor, top_fraction: float | None = None) -> torch.Tensor:
    """IoU between the most salient pixels and the mask, per image: float [B].

    The map is binarised by keeping its top-k pixels, k = the mask's area (default) or
    ``top_fraction`` of the image; ties are broken at random (fixed seed).  A constant map
    (``ConstantMapWarning``) scores chance: the expected IoU of k pixels drawn at random (``chance_iou``).
    """
    saliency = _check_maps(saliency, masks)
    constant = warn_constant_maps(saliency, "mask IoU")
    flat, inside = saliency.flatten(1), masks.flatten(1).bool()
    n_pixels = flat.shape[1]
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    ks = (inside.sum(1) if top_fraction is None
          else torch.full((flat.shape[0],), max(1, round(top_fraction * n_pixels))))
    selected = _ranks(saliency) < ks[:, None].to(flat.device)
    iou = (selected & inside).sum(1).float() / (selected | inside).sum(1).float()
    if constant.any():
        rows = constant.to(iou.device)
        iou[rows] = chance_iou(inside.sum(1)[rows].cpu(), ks.to(rows.device)[rows].cpu(), n_pixels).to(iou)
    return iou


def chance_iou(mask_area: torch.Tensor, k: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """The IoU a random ranking scores in expectation: k of ``n_pixels`` pixels drawn at random against a
    mask of ``mask_area`` pixels, E[I / (k + m - I)] with I hypergeometric (exact, not I's mean plugged in);
    int [B], int [B], int -> float [B].  For k = m it is close to a / (2 - a), a = m / n the mask's area share."""
    m, k, n = mask_area.double()[:, None], k.double()[:, None], float(n_pixels)
    i = torch.arange(int(torch.minimum(m, k).max()) + 1, dtype=torch.float64)[None]

    def log_choose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)

    possible = (i <= torch.minimum(m, k)) & (i >= (k + m - n).clamp(min=0))
    log_pmf = log_choose(m, i) + log_choose(n - m, k - i) - log_choose(torch.tensor(n), k)
    pmf = torch.where(possible, log_pmf, torch.tensor(float("-inf"), dtype=torch.float64)).exp()
    return torch.where(possible, pmf * i / (k + m - i).clamp(min=1), 0.0).sum(1).float()


def random_map(batch: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline: i.i.d. uniform noise, float [batch, size, size]."""
    return torch.rand(batch, size, size, generator=generator)


def centre_prior(batch: int, size: int, sigma: float = 0.25) -> torch.Tensor:
    """Baseline: a Gaussian bump at the image centre (std ``sigma`` of the side), float [batch, size, size]."""
    coords = (torch.arange(size) + 0.5) / size - 0.5
    bump = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    return bump.expand(batch, size, size).clone()


def _scores(score_fn: ScoreFn, images: torch.Tensor, target: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """score_fn over ``images`` in batches: [N], taking column ``target[i]`` of per-class scores [N, C]; its
    models in eval mode (``_models_in_eval_mode``)."""
    with torch.no_grad(), _models_in_eval_mode(score_fn):
        scores = torch.cat([score_fn(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
    if scores.ndim == 2 and scores.shape[0] == len(images):
        if target is None:
            raise ValueError(f"score_fn gives per-class scores {tuple(scores.shape)}; pass target= (one class per row)")
        return scores.gather(1, target.cpu().long().view(-1, 1)).squeeze(1)
    if scores.ndim != 1 or scores.shape[0] != len(images):
        raise ValueError(f"score_fn must return scores [N] or [N, C] for N = {len(images)} images, "
                         f"got shape {tuple(scores.shape)}")
    return scores


def _perturbation_curve(score_fn: ScoreFn, images: torch.Tensor, saliency: torch.Tensor, steps: int,
                        start: torch.Tensor, end: torch.Tensor, batch_size: int,
                        target: torch.Tensor | None, metric: str) -> torch.Tensor:
    """Scores while the most salient pixels switch from ``start`` to ``end``: float [B, steps + 1].

    ``saliency`` is checked (``_check_image_maps``) by the caller.  A constant map's curve is the mean over
    ``CHANCE_ORDERS`` random orders (the first is its fixed-seed tie-break order), an estimate of the
    random-order expectation."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    constant = warn_constant_maps(saliency, metric).cpu()
    mixed = _switched(saliency, steps, start, end)
    rows = None if target is None else target.repeat_interleave(steps + 1)
    curve = _scores(score_fn, mixed.flatten(0, 1), rows, batch_size).view(saliency.shape[0], steps + 1)
    if constant.any():
        index = constant.nonzero().squeeze(1).repeat_interleave(CHANCE_ORDERS - 1)
        orders = _random_orders(len(index), saliency.shape[-2:]).to(saliency.device)
        on_device = index.to(start.device)
        more = _switched(orders, steps, start[on_device], end[on_device])
        rows = None if target is None else target[index.to(target.device)].repeat_interleave(steps + 1)
        extra = _scores(score_fn, more.flatten(0, 1), rows, batch_size).view(-1, CHANCE_ORDERS - 1, steps + 1)
        curve[constant] = (curve[constant] + extra.sum(1)) / CHANCE_ORDERS
    return curve


def _random_orders(count: int, shape: Sequence[int]) -> torch.Tensor:
    """``count`` i.i.d. uniform maps (fixed seed) whose rankings are random pixel orders: float [count, H, W]."""
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(1))


def _switched(saliency: torch.Tensor, steps: int, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The images while their most salient pixels switch from ``start`` to ``end`` in ``steps`` equal steps:
    saliency [B, H, W], start/end [B, 3, H, W] -> [B, steps + 1, 3, H, W]."""
    n_pixels = saliency[0].numel()
    rank = _ranks(saliency).view_as(saliency).to(start.device)
    counts = torch.linspace(0, n_pixels, steps + 1).round().long().to(start.device)  # pixels switched per step
    switched = rank[:, None] < counts[None, :, None, None]  # [B, steps + 1, H, W]
    return torch.where(switched[:, :, None], end[:, None], start[:, None])


def _auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under curves sampled evenly on [0, 1]: [B, T] -> [B]."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def deletion_auc(score_fn: ScoreFn, images: torch.Tensor, saliency: torch.Tensor, steps: int = 16,
                 baseline: str | float = 0.0, batch_size: int = 512,
                 target: torch.Tensor | None = None, blur_sigma: float | None = None) -> torch.Tensor:
    """Area under the score while the most salient pixels are deleted first (lower = better map).

    Args:
        score_fn: images [N, 3, H, W] -> scores [N], or per-class scores [N, C] (e.g. softmax
            probabilities) with ``target`` [B] naming the explained class of each image.
        images: [B, 3, H, W]; saliency: [B, H, W].
        steps: the curve has steps + 1 points, from 0 to all pixels deleted; every point of every
            image is scored in batches of ``batch_size``.
        baseline: what a deleted pixel becomes: a number (0 = black, RISE), "mean" or "blur".
        blur_sigma: the blur's sigma in px; None (default): the references' 5 px at 224 px scaled to the
            image (``imageops.scaled_blur_sigma``: 0.71 px at 32 px).
    Returns:
        float [B], in the units of ``score_fn``.  A constant map (``ConstantMapWarning``) scores chance: the
        AUC of the curve averaged over ``CHANCE_ORDERS`` random deletion orders.
    Raises:
        ValueError: images that are not float in [0, 1] (uint8, 0–255, NaN), an empty batch, maps that do not
            match the images.
    """
    images, saliency = _check_image_maps(images, saliency, "deletion AUC")
    return _auc(_perturbation_curve(score_fn, images, saliency, steps, images,
                                    imageops.baseline_images(images, baseline, blur_sigma), batch_size, target,
                                    "deletion AUC"))


def insertion_auc(score_fn: ScoreFn, images: torch.Tensor, saliency: torch.Tensor, steps: int = 16,
                  baseline: str | float = "blur", batch_size: int = 512,
                  target: torch.Tensor | None = None, blur_sigma: float | None = None) -> torch.Tensor:
    """Area under the score while the most salient pixels are inserted first into a blurred copy
    (higher = better map); arguments as ``deletion_auc``.  The blur's sigma scales with the image (5 px at
    224 px as in the references, 0.71 px at 32 px) unless ``blur_sigma`` fixes it in pixels."""
    images, saliency = _check_image_maps(images, saliency, "insertion AUC")
    return _auc(_perturbation_curve(score_fn, images, saliency, steps,
                                    imageops.baseline_images(images, baseline, blur_sigma), images, batch_size,
                                    target, "insertion AUC"))


def average_drop_increase(score_fn: ScoreFn, images: torch.Tensor, saliency: torch.Tensor,
                          target: torch.Tensor | None = None, batch_size: int = 512) -> tuple[float, float]:
    """Average Drop and Increase in Confidence (Grad-CAM++), in percent.

    Each image is masked by its map scaled to [0, 1] (``x * E``); with Y = score(x) and
    O = score(x * E): drop = mean(max(0, Y - O) / Y) x 100 (lower = better), increase =
    share of images with O > Y x 100 (higher = better).  Scores must be positive (probabilities);
    per-class scores [N, C] need ``target`` [B] as in ``deletion_auc``.  A constant map
    (``ConstantMapWarning``; an all-zero map once kept nothing, an all-ones map everything) is scored as
    chance: E = 1/2 at every pixel, a random map's mean weight.
    """
    images, saliency = _check_image_maps(images, saliency, "Average Drop / Increase")
    warn_constant_maps(saliency, "Average Drop / Increase")
    explanation = _unit_range(saliency).to(images)
    full = _scores(score_fn, images, target, batch_size)
    masked = _scores(score_fn, images * explanation[:, None], target, batch_size)
    if (full <= 0).any():
        raise ValueError("Average Drop needs positive scores (e.g. softmax probabilities), got a score <= 0")
    drop = ((full - masked).clamp(min=0) / full).mean().item() * 100
    increase = (masked > full).float().mean().item() * 100
    return drop, increase


PairScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a [N, 3, H, W], b [N, 3, H, W]) -> [N]
PAIR_MODES = ("simultaneous", "conditional")


def _check_pair_maps(x1: torch.Tensor, x2: torch.Tensor, map1: torch.Tensor, map2: torch.Tensor, mode: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mode, images (``inputs.check_images``) and maps (``inputs.check_maps``) of a pair metric, checked."""
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {PAIR_MODES}, got {mode!r}")
    x1, x2 = check_images(x1, "x1"), check_images(x2, "x2")
    map1, map2 = _check_maps(map1, name="map1"), _check_maps(map2, name="map2")
    if x1.ndim != 4 or x1.shape != x2.shape or map1.shape != map2.shape or map1.shape != (x1.shape[0], *x1.shape[-2:]):
        raise ValueError(f"need pairs x1, x2 [B, 3, H, W] and maps [B, H, W] for each, got {tuple(x1.shape)}, "
                         f"{tuple(x2.shape)}, {tuple(map1.shape)}, {tuple(map2.shape)}")
    return x1, x2, map1, map2


def _constant_pair_maps(map1: torch.Tensor, map2: torch.Tensor, mode: str, metric: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which maps of the pairs are constant (warning once per metric call): bool [B] for map1 and for map2
    (map2 only in simultaneous mode: the conditional mode does not use it)."""
    used = torch.cat([map1, map2]) if mode == "simultaneous" else map1
    constant = warn_constant_maps(used, metric).cpu()
    return constant[:len(map1)], (constant[len(map1):] if mode == "simultaneous" else torch.zeros_like(constant))


def _pair_scores(similarity_fn: PairScoreFn, a: torch.Tensor, b: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad(), _models_in_eval_mode(similarity_fn):
        scores = torch.cat([similarity_fn(a[i:i + batch_size], b[i:i + batch_size]).float().cpu()
                            for i in range(0, len(a), batch_size)])
    if scores.shape != (len(a),):
        raise ValueError(f"similarity_fn must return one score per pair, shape [{len(a)}], got {tuple(scores.shape)}")
    return scores


def _pair_curve(similarity_fn: PairScoreFn, x1: torch.Tensor, x2: torch.Tensor, map1: torch.Tensor,
                map2: torch.Tensor, mode: str, steps: int, deletion: bool, baseline: str | float,
                batch_size: int, blur_sigma: float | None = None) -> torch.Tensor:
    """Pair similarities while the most salient pixels are deleted (inserted): float [B, steps + 1].  A pair
    with a constant map is scored with that map's pixels in random order, averaged over ``CHANCE_ORDERS``
    orders (the other, non-constant map keeps its own order)."""
    x1, x2, map1, map2 = _check_pair_maps(x1, x2, map1, map2, mode)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    constant1, constant2 = _constant_pair_maps(map1, map2, mode, f"pair {'deletion' if deletion else 'insertion'} AUC")

    def curve_images(images: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        other = imageops.baseline_images(images, baseline, blur_sigma)
        start, end = (images, other) if deletion else (other, images)
        return _switched(saliency, steps, start, end).flatten(0, 1)

    def curves(x1: torch.Tensor, x2: torch.Tensor, map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
        first = curve_images(x1, map1)
        second = curve_images(x2, map2) if mode == "simultaneous" else x2.repeat_interleave(steps + 1, dim=0)
        return _pair_scores(similarity_fn, first, second, batch_size).view(x1.shape[0], steps + 1)

    curve = curves(x1, x2, map1, map2)
    chance = constant1 | constant2
    if chance.any():
        index = chance.nonzero().squeeze(1).repeat_interleave(CHANCE_ORDERS - 1)
        orders = _random_orders(2 * len(index), map1.shape[-2:]).to(map1.device).view(2, len(index), *map1.shape[-2:])
        on_maps = index.to(map1.device)
        random1 = torch.where(constant1.to(map1.device)[on_maps][:, None, None], orders[0], map1[on_maps])
        random2 = torch.where(constant2.to(map2.device)[on_maps][:, None, None], orders[1], map2[on_maps])
        on_images = index.to(x1.device)
        extra = curves(x1[on_images], x2[on_images], random1, random2).view(-1, CHANCE_ORDERS - 1, steps + 1)
        curve[chance] = (curve[chance] + extra.sum(1)) / CHANCE_ORDERS
    return curve


def pair_deletion_auc(similarity_fn: PairScoreFn, x1: torch.Tensor, x2: torch.Tensor, map1: torch.Tensor,
                      map2: torch.Tensor, mode: str = "simultaneous", steps: int = 16, baseline: str | float = 0.0,
                      batch_size: int = 512, blur_sigma: float | None = None) -> torch.Tensor:
    """Deletion AUC for pairs (Sammani et al.): the area under the pair similarity while the most salient
    pixels are deleted first (lower = better maps).

    Args:
        similarity_fn: (images a, images b) -> similarities [N], e.g. cosine of projection outputs.
        x1, x2: pairs [B, 3, H, W]; map1, map2: their maps [B, H, W].
        mode: "simultaneous" deletes from both images, each by its own map; "conditional" deletes from x1
            only while x2 stays whole (swap the arguments for the other direction).
        baseline: 0 (black) as in the reference code.  Beware: in simultaneous mode both images end up
            black, hence identical, and the curve climbs back to s = 1; the conditional mode has no such end
            point.
        blur_sigma: for ``baseline="blur"``: sigma in px; None (default): the reference code's 5 px at 224 px
            scaled to the image (``imageops.scaled_blur_sigma``: 0.71 px at 32 px).
    Returns:
        float [B].
    """
    return _auc(_pair_curve(similarity_fn, x1, x2, map1, map2, mode, steps, True, baseline, batch_size, blur_sigma))


def pair_insertion_auc(similarity_fn: PairScoreFn, x1: torch.Tensor, x2: torch.Tensor, map1: torch.Tensor,
                       map2: torch.Tensor, mode: str = "simultaneous", steps: int = 16, baseline: str | float = "blur",
                       batch_size: int = 512, blur_sigma: float | None = None) -> torch.Tensor:
    """Insertion AUC for pairs: the most salient pixels are inserted first into blurred copies (higher =
    better maps); arguments as ``pair_deletion_auc``.  The reference code blurs 224-px images with sigma
    5 px; by default the sigma is scaled to the image (0.71 px at 32 px); ``blur_sigma=5.0`` blurs a 32-px
    image seven times as strongly (notebook 06 compares the two)."""
    return _auc(_pair_curve(similarity_fn, x1, x2, map1, map2, mode, steps, False, baseline, batch_size, blur_sigma))


def pair_average_drop_increase(similarity_fn: PairScoreFn, x1: torch.Tensor, x2: torch.Tensor, map1: torch.Tensor,
                               map2: torch.Tensor, mode: str = "simultaneous",
                               batch_size: int = 512) -> tuple[float, float]:
    """Average Drop and Average Increase for pairs, in percent.

    Each map is scaled to [0, 1] and multiplies its image (x ⊙ E).  With Y = s(x1, x2) and O = s(x1 ⊙ E1,
    x2 ⊙ E2) ("simultaneous") or s(x1 ⊙ E1, x2) ("conditional"): drop = mean over pairs of max(0, Y − O) / Y
    × 100 (lower = better), increase = share of pairs with O > Y × 100 (higher = better).  Pairs with Y <= 0
    (dissimilar pairs, for which a relative drop means nothing) are left out.  A constant map
    (``ConstantMapWarning``) is scored as chance, E = 1/2 at every pixel: an all-zero map no longer blacks out
    both images (two black images are identical, so it used to score 0 % drop and 100 % increase).
    """
    x1, x2, map1, map2 = _check_pair_maps(x1, x2, map1, map2, mode)
    _constant_pair_maps(map1, map2, mode, "pair Average Drop / Increase")
    full = _pair_scores(similarity_fn, x1, x2, batch_size)
    masked_second = x2 * _unit_range(map2)[:, None].to(x2) if mode == "simultaneous" else x2
    masked = _pair_scores(similarity_fn, x1 * _unit_range(map1)[:, None].to(x1), masked_second, batch_size)
    kept = full > 0
    if not kept.any():
        raise ValueError("no pair has a positive similarity: Average Drop is undefined; explain similar pairs")
    drop = ((full - masked).clamp(min=0) / full)[kept].mean().item() * 100
    increase = (masked > full)[kept].float().mean().item() * 100
    return drop, increase


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each map [H, W] of [B, H, W] scaled to [0, 1].  A constant map (all zeros, all ones: ``inputs.constant_maps``)
    has no range to scale: it becomes ``CONSTANT_MAP_WEIGHT`` = 1/2 everywhere, the mean weight of a random map,
    so all-zero and all-ones maps are scored alike and as chance (callers warn with ``ConstantMapWarning``)."""
    maps = maps.detach().float().cpu()
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    scaled = (maps - low) / (high - low).clamp(min=1e-12)
    constant = constant_maps(maps)[:, None, None]
    return torch.where(constant, torch.full_like(scaled, CONSTANT_MAP_WEIGHT), scaled)


def max_sensitivity(explain_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    x1: torch.Tensor, x2: torch.Tensor, radius: float = 0.2, samples: int = 10,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Max-Sensitivity (Yeh et al. 2019) for pair explanations: the largest change of the maps when the
    *same* uniform noise δ ∈ [−radius, radius] is added to both images,

        SENS = ( max_n RMS(Φ̂1(x + δ_n) − Φ̂1(x))  +  max_n RMS(Φ̂2(…) − Φ̂2(x)) ) / 2,

    where Φ̂ is each map scaled to [0, 1] (as maps are shown), so methods in different units compare and a
    map that is zero everywhere cannot divide by zero; RMS is over the pixels, so SENS lies in [0, 1].
    Noisy images are clamped to [0, 1].  Lower = more stable; a map that ignores its input scores 0, so read
    it together with a faithfulness score.

    Args:
        explain_fn: (x1 [B, 3, H, W], x2) -> (maps of x1 [B, H, W], maps of x2 [B, H, W]).
    Returns:
        float [B].
    """
    x1, x2 = check_images(x1, "x1"), check_images(x2, "x2")
    if x1.shape != x2.shape:
        raise ValueError(f"need pairs x1, x2 [B, 3, H, W] of the same shape, got {tuple(x1.shape)}, {tuple(x2.shape)}")
    if radius <= 0 or samples < 1:
        raise ValueError(f"need radius > 0 and samples >= 1, got {radius} and {samples}")
    reference = [_unit_range(m) for m in explain_fn(x1, x2)]
    worst = [torch.zeros(x1.shape[0]), torch.zeros(x1.shape[0])]
    for _ in range(samples):
        delta = ((torch.rand(x1.shape, generator=generator) * 2 - 1) * radius).to(x1)
        noisy = explain_fn((x1 + delta).clamp(0, 1), (x2 + delta).clamp(0, 1))
        for index, (new, old) in enumerate(zip(noisy, reference)):
            change = (_unit_range(new) - old).pow(2).flatten(1).mean(1).sqrt()
            worst[index] = torch.maximum(worst[index], change)
    return (worst[0] + worst[1]) / 2


def saliency_scores(saliency: torch.Tensor, masks: torch.Tensor, images: torch.Tensor | None = None,
                    score_fn: ScoreFn | None = None, steps: int = 16, tolerance: int = 0,
                    target: torch.Tensor | None = None) -> dict[str, float]:
    """The course's table row for one method: pointing game (with ``tolerance`` pixels), mean mask
    IoU and, given a score function, mean deletion AUC (zero baseline) for maps [B, H, W] against
    masks [B, H, W]."""
    row = {"pointing game": pointing_game(saliency, masks, tolerance),
           "mask IoU": mask_iou(saliency, masks).mean().item()}
    if score_fn is not None:
        if images is None:
            raise ValueError("deletion AUC needs the images the maps explain")
        row["deletion AUC"] = deletion_auc(score_fn, images, saliency, steps=steps, target=target).mean().item()
    return row


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair (average ranks for ties; 0 where a row is constant)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return np.where(denominator > 0, (ra * rb).sum(1) / np.where(denominator > 0, denominator, 1), 0.0)


def model_randomisation(
    explain: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module, layers: Sequence[str],
    x: torch.Tensor, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    Re-initialises the named modules one after another, in the given order (top layer first),
    keeping the earlier ones random, and compares the maps with those of the trained model.

    Args:
        explain: ``explain(model, x) -> maps [B, H, W]``; called on a copy of ``model``.
        layers: names from ``model.named_modules()``, top (output side) first.
        x: images [B, 3, H, W].
    Returns:
        {"original": Spearman 1 [B], then one entry per layer: Spearman rank correlation [B] of the
        maps after randomising down to that layer with the original maps}.  A faithful method
        falls towards 0; a map that stays near 1 ignores the weights.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"unknown layer names {missing}; choose from named_modules(), e.g. {list(modules)[1:6]}")
    reference = explain(model, x).flatten(1).detach().cpu().numpy()
    result = {"original": torch.ones(reference.shape[0])}
    randomised = copy.deepcopy(model)
    random_modules = dict(randomised.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            for module in random_modules[name].modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            maps = explain(randomised, x).flatten(1).detach().cpu().numpy()
            result[name] = torch.from_numpy(_spearman_rows(reference, maps)).float()
    return result


def _binary_outcome(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same length, got {labels.shape} and {scores.shape}")
    if labels.all() or not labels.any():
        raise ValueError("AUROC/AUPRC need both outcomes among the labels (some True, some False)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf values")
    return labels, scores


def auroc(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` predicting ``labels`` (bool [N]); 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_binary_outcome(labels, scores)))


def auprc(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> float:
    """Area under the precision-recall curve (average precision); chance = the share of positives."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_binary_outcome(labels, scores)))


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], float], labels: torch.Tensor | np.ndarray,
                       scores: torch.Tensor | np.ndarray, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """``statistic(labels, scores)`` and its percentile bootstrap interval: (value, low, high).

    Samples are resampled with replacement ``n_boot`` times (``stats.bootstrap``); resamples with a single
    outcome are redrawn.  Example: ``bootstrap_interval(auroc, correct, q)``.
    """
    from course_utils.stats import bootstrap

    labels, scores = _binary_outcome(labels, scores)
    interval = bootstrap(statistic, labels, scores, n_boot=n_boot, level=level, seed=seed)
    return interval.value, interval.low, interval.high
