"""FALCON (thesis chapter 4): name in words what a feature of a representation encodes.

For feature i of L2-normalised representations H (SCIENCE.md section 5):

1. its highly activating images ``T_i = {j : h_ji > α}`` (α: mean + 5 std of all normalised activations);
2. optionally each image cropped to the box where the feature's Grad-CAM is >= 0.6 of its maximum;
3. a vision-language model retrieves the top-5 captions of every (cropped) image from a caption set S;
4. every word w of those captions gets the Word Score (eq. 4.1)
       WS(w) = (1/|T_i|) Σ_q max_p C_{q,p} · 1[w ∈ caption p]     (p over image q's top-5 captions);
5. contrastive interpretation (eq. 4.2): the *lowly* activating images that look like T_i otherwise,
       {j : h_ji < ε, h_{j,V_i} · h^μ >= β}    (ε: the feature's mean, h^μ: mean of T_i without feature i),
   get their own word scores, and their top words are discarded from the feature's concepts — what the
   feature shares with images where it is silent cannot be what it encodes.

Words are lower-case alphabetic tokens minus English stop words (scikit-learn's list) and a discard set
of non-concepts.  No part-of-speech filter is used: it would need a lexicon that is not installed
offline, and the caption vocabulary here is small and clean.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from course_utils.vlm import words

NON_CONCEPTS = frozenset({"photo", "picture", "image", "background", "backdrop", "shape", "object", "thing",
                          "next", "beside", "size", "texture", "colour", "color", "sized"})


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def caption_words(caption: str, discard: Sequence[str] = ()) -> set[str]:
    """The concept words of a caption: alphabetic, lower-case, no stop words, none of ``discard``."""
    dropped = _stop_words() | set(discard)
    return {w for w in words(caption) if w not in dropped}


def word_scores_from_top(similarities: torch.Tensor, indices: torch.Tensor, captions: Sequence[str],
                         discard: Sequence[str] = ()) -> dict[str, float]:
    """Eq. 4.1 from each image's retrieved captions: similarities and caption indices [n_images, k].

    Returns:
        word -> WS(w), sorted by score, highest first.
    """
    if similarities.shape != indices.shape or similarities.ndim != 2:
        raise ValueError(f"need similarities and indices of the same shape [n_images, k], got "
                         f"{tuple(similarities.shape)} and {tuple(indices.shape)}")
    n_images = similarities.shape[0]
    if n_images == 0:
        raise ValueError("word scores need at least one image")
    cache: dict[int, set[str]] = {}
    totals: dict[str, float] = defaultdict(float)
    for row_values, row_index in zip(similarities.tolist(), indices.tolist()):
        best: dict[str, float] = {}
        for value, index in zip(row_values, row_index):
            if index not in cache:
                cache[index] = caption_words(captions[index], discard)
            for word in cache[index]:
                best[word] = max(best.get(word, float("-inf")), value)
        for word, value in best.items():
            totals[word] += value
    return dict(sorted(((w, s / n_images) for w, s in totals.items()), key=lambda item: (-item[1], item[0])))


def word_scores(confidence: torch.Tensor, captions: Sequence[str], top_k: int = 5,
                discard: Sequence[str] = ()) -> dict[str, float]:
    """Eq. 4.1: WS(w) = (1/|T|) Σ_q max over image q's top-k captions p containing w of C_{q,p}.

    Args:
        confidence: C, image-caption similarities [n_images, n_captions].
        captions: the n_captions strings.
        top_k: captions kept per image (thesis: 5).
        discard: words that are not concepts (added to the stop words).
    Returns:
        word -> score, highest first.
    """
    if confidence.ndim != 2 or confidence.shape[1] != len(captions):
        raise ValueError(f"confidence must be [n_images, n_captions = {len(captions)}], got {tuple(confidence.shape)}")
    if not 1 <= top_k <= len(captions):
        raise ValueError(f"top_k must lie in [1, {len(captions)}], got {top_k}")
    values, indices = confidence.topk(top_k, dim=1)
    return word_scores_from_top(values, indices, captions, discard)


def normalise(H: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, float32 on the CPU (every FALCON step works on these)."""
    if H.ndim != 2:
        raise ValueError(f"H must be [N, r], got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or inf values")
    return F.normalize(H.detach().float().cpu(), dim=1)


def activation_threshold(H: torch.Tensor, k: float = 5.0) -> float:
    """The reference code's α: mean + k std of all L2-normalised activations."""
    values = normalise(H)
    return (values.mean() + k * values.std()).item()


def highly_activating(H: torch.Tensor, feature: int, alpha: float) -> torch.Tensor:
    """T_i = {j : h_ji > α} on L2-normalised H, as image indices sorted by activation (highest first)."""
    values = normalise(H)
    if not 0 <= feature < values.shape[1]:
        raise ValueError(f"feature {feature} is out of range for r = {values.shape[1]}")
    column = values[:, feature]
    chosen = (column > alpha).nonzero().flatten()
    return chosen[column[chosen].argsort(descending=True)]


def lowly_activating(H: torch.Tensor, feature: int, high_idx: torch.Tensor, beta: float = 0.7,
                     eps: float | None = None, max_images: int | None = None) -> torch.Tensor:
    """Eq. 4.2: images where feature i is low but which otherwise resemble its highly activating ones.

        {j : h_ji < ε, h_{j,V_i} · h^μ >= β},   h^μ = mean over T_i of h without feature i,

    on L2-normalised H; ε defaults to the feature's mean over the population.  Sorted by similarity to
    h^μ (highest first) and cut to ``max_images``.
    """
    values = normalise(H)
    if len(high_idx) == 0:
        raise ValueError("the highly activating set is empty: nothing to contrast with")
    column = values[:, feature]
    eps = column.mean().item() if eps is None else eps
    others = torch.ones(values.shape[1], dtype=torch.bool)
    others[feature] = False
    centre = values[high_idx][:, others].mean(0)  # h^μ
    similarity = values[:, others] @ centre
    chosen = ((column < eps) & (similarity >= beta)).nonzero().flatten()
    chosen = chosen[similarity[chosen].argsort(descending=True)]
    return chosen if max_images is None else chosen[:max_images]


def crop_box(saliency: torch.Tensor, threshold: float = 0.6) -> tuple[int, int, int, int]:
    """The bounding box (top, left, bottom, right; bottom/right exclusive) of the largest connected region
    where ``saliency`` [H, W] is >= ``threshold`` of its maximum."""
    import numpy as np
    from scipy import ndimage

    if saliency.ndim != 2:
        raise ValueError(f"saliency must be one map [H, W], got shape {tuple(saliency.shape)}")
    peak = saliency.max()
    if not torch.isfinite(peak) or peak <= 0:
        return 0, 0, saliency.shape[0], saliency.shape[1]  # nothing salient: keep the whole image
    above = (saliency >= threshold * peak).cpu().numpy()
    labels, count = ndimage.label(above)
    sizes = ndimage.sum(above, labels, index=np.arange(1, count + 1))
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def crop_images(images: torch.Tensor, saliency: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Each image cropped to its ``crop_box`` and resized back to its size: [B, 3, H, W] -> same shape."""
    crops = []
    for image, saliency_map in zip(images, saliency):
        top, left, bottom, right = crop_box(saliency_map, threshold)
        crop = image[:, top:bottom, left:right].float()[None]
        crops.append(F.interpolate(crop, size=image.shape[-2:], mode="bilinear", align_corners=False)[0])
    return torch.stack(crops)


@dataclass
class FeatureExplanation:
    """FALCON's explanation of one feature (or feature group)."""

    feature: int | tuple[int, ...]
    concepts: list[str]  # ranked, after the contrastive discard
    scores: dict[str, float]  # WS of every word of the highly activating images' captions
    high: torch.Tensor  # indices of T_i
    low: torch.Tensor  # indices of the lowly activating counterfactuals
    low_scores: dict[str, float] = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)  # words dropped by the contrastive step


def explain_feature(
    H: torch.Tensor, feature: int, image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor,
    captions: Sequence[str], alpha: float | None = None, top_k: int = 5, min_images: int = 10,
    discard: Sequence[str] = NON_CONCEPTS, contrastive: bool = True, beta: float = 0.7, max_low: int = 50,
    low_top_words: int = 3, min_score: float = 0.0, n_concepts: int = 5,
) -> FeatureExplanation | None:
    """Explain feature ``feature`` of H [N, r] by the captions of its highly activating images.

    Args:
        image_embeddings: VLM embeddings [N, d] of the probe images (crops, when Grad-CAM cropping is used).
        caption_embeddings, captions: the caption set S ([M, d] and M strings).
        alpha: the activation threshold (default ``activation_threshold(H)``).
        min_images: features with at most this many highly activating images are not explained (None returned).
        contrastive: drop the top ``low_top_words`` words of the lowly activating set (at most ``max_low``
            images, similarity β) from the concepts.
        min_score: keep words with WS >= this (thesis: 0.08 for its CLIP; tune per VLM).
    Returns:
        ``FeatureExplanation``, or None when |T_i| <= min_images.
    """
    from course_utils.vlm import top_captions

    alpha = activation_threshold(H) if alpha is None else alpha
    high = highly_activating(H, feature, alpha)
    if len(high) <= min_images:
        return None
    values, indices = top_captions(image_embeddings[high], caption_embeddings, top_k)
    scores = word_scores_from_top(values, indices, captions, discard)
    low = torch.zeros(0, dtype=torch.long)
    low_scores: dict[str, float] = {}
    dropped: list[str] = []
    if contrastive:
        low = lowly_activating(H, feature, high, beta=beta, max_images=max_low)
        if len(low):
            low_values, low_indices = top_captions(image_embeddings[low], caption_embeddings, top_k)
            low_scores = word_scores_from_top(low_values, low_indices, captions, discard)
            dropped = list(low_scores)[:low_top_words]
    concepts = [w for w, s in scores.items() if s >= min_score and w not in dropped][:n_concepts]
    return FeatureExplanation(feature, concepts, scores, high, low, low_scores, dropped)


def failure_features(h: torch.Tensor, head_weight: torch.Tensor, predicted: int, top: int = 3) -> torch.Tensor:
    """The features that pushed a linear head towards its prediction: the largest (h ⊙ U_y)_k.

    Args:
        h: one representation [r] (as the head sees it); head_weight: U [o, r]; predicted: y.
    Returns:
        LongTensor [top] of feature indices, largest contribution first.
    """
    if h.ndim != 1 or head_weight.ndim != 2 or head_weight.shape[1] != h.shape[0]:
        raise ValueError(f"need h [r] and a head weight [o, r], got {tuple(h.shape)} and {tuple(head_weight.shape)}")
    contribution = h.float().cpu() * head_weight[predicted].detach().float().cpu()
    return contribution.topk(min(top, len(contribution))).indices


def transfer_map(H_target: torch.Tensor, H_source: torch.Tensor, epochs: int = 10, lr: float = 1.0,
                 batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """The linear map Z [r_target, r_source] with normalised H_target Z ≈ normalised H_source, fitted by
    SGD on the mean squared error (SCIENCE.md: lr 1, 10 epochs) over images seen by both models."""
    if H_target.shape[0] != H_source.shape[0]:
        raise ValueError(f"the two representations must describe the same images, got {H_target.shape[0]} "
                         f"and {H_source.shape[0]} rows")
    target, source = normalise(H_target), normalise(H_source)
    Z = torch.zeros(target.shape[1], source.shape[1], requires_grad=True)
    optimizer = torch.optim.SGD([Z], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(target), generator=generator).split(batch_size):
            loss = (target[batch] @ Z - source[batch]).pow(2).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Z.detach()


def inherited_features(Z: torch.Tensor, k: float = 4.0) -> dict[int, list[int]]:
    """Target feature -> the source features whose weight in Z exceeds mean + k std of all weights; the
    target feature inherits their concepts."""
    threshold = Z.mean() + k * Z.std()
    return {t: (Z[t] > threshold).nonzero().flatten().tolist() for t in range(Z.shape[0]) if (Z[t] > threshold).any()}


def feature_groups(H: torch.Tensor, features: Sequence[int], image_embeddings: torch.Tensor, alpha: float,
                   min_images: int = 10, gamma: float = 0.8) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """Pairs of features that are highly active together on more than ``min_images`` images whose VLM
    embeddings are alike (mean pairwise cosine > γ): explained together as a group.

    Returns:
        [((i, j), joint image indices)] sorted by the number of joint images.
    """
    sets = {f: set(highly_activating(H, f, alpha).tolist()) for f in features}
    groups = []
    ordered = list(features)
    for a, first in enumerate(ordered):
        for second in ordered[a + 1:]:
            joint = sorted(sets[first] & sets[second])
            if len(joint) <= min_images:
                continue
            embeddings = F.normalize(image_embeddings[joint].float(), dim=1)
            similarity = embeddings @ embeddings.T
            mean_off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (len(joint) * (len(joint) - 1))
            if mean_off_diagonal > gamma:
                groups.append(((first, second), torch.tensor(joint)))
    return sorted(groups, key=lambda item: -len(item[1]))


def true_concepts(attributes: dict[str, torch.Tensor], attribute_names: dict[str, list[str]], images: torch.Tensor,
                  min_share: float = 0.5, enrichment: float = 2.0,
                  keys: Sequence[str] = ("shape", "color", "texture", "size", "background_color")) -> set[str]:
    """The ground-truth concepts of a set of probe images (ShapesWorld attributes): attribute values present
    in at least ``min_share`` of them and at least ``enrichment`` times as often as in the whole probe set."""
    truth = set()
    for key in keys:
        values = attributes[key]
        for index, name in enumerate(attribute_names[key]):
            overall = (values == index).float().mean().item()
            share = (values[images] == index).float().mean().item()
            if share >= min_share and share >= enrichment * overall and overall > 0:
                truth.add(name)
    return truth


def concept_precision(predicted: Sequence[Sequence[str]], truths: Sequence[set[str]], k: int = 5) -> dict[str, float]:
    """P@1, precision over the top min(k, #true) and recall@k of ranked concepts against true concept sets,
    averaged over the features that have at least one true concept, each next to its ceiling."""
    rows = [(list(p), t) for p, t in zip(predicted, truths) if t]
    if not rows:
        raise ValueError("no feature has a true concept: nothing to score")
    p_at_1 = sum(bool(p) and p[0] in t for p, t in rows) / len(rows)
    p_at_true = sum(len(set(p[:min(k, len(t))]) & t) / min(k, len(t)) for p, t in rows) / len(rows)
    recall = sum(len(set(p[:k]) & t) / len(t) for p, t in rows) / len(rows)
    return {"features scored": len(rows), "P@1": p_at_1, "P@min(k,#true)": p_at_true, f"R@{k}": recall,
            "P@1 ceiling": 1.0, f"P@{k} ceiling": sum(min(k, len(t)) / k for _, t in rows) / len(rows)}
