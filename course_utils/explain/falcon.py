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

Where the thesis, the reference code (falcon-explain) and this course differ, the choice is an argument:

* caption confidences C (``temperature``): the reference code does not use raw cosines but, per image, the
  softmax of the scaled cosines over the candidate captions, ``P = softmax(C / τ)`` with CLIP's logit scale
  1/τ = 100 (``REFERENCE_TEMPERATURE``), and keeps words with WS >= 0.08 of those probabilities;
  ``temperature=None`` keeps raw cosines (and then no cut-off, ``min_score`` 0);
* the discard rule of the contrastive step (``low_discard``): ``"top"`` drops the ``low_top_words`` best
  words of the lowly activating set (the course's own rule, its default), ``"all"`` every concept of that
  set, i.e. every word with WS >= ``min_score`` there (the thesis), ``"score"`` every word with
  WS >= ``low_min_score`` = 0.1 there (the reference code);
* ε of eq. 4.2 (``eps``): ``"feature"`` the feature's mean (the thesis and the course, default) or
  ``"global"`` the mean of all normalised activations (the reference code), or a number.

Beyond single features: feature groups (thesis Algorithm 1), failure explanations of a linear head, concept
transfer through a linear map, and — because ShapesWorld knows every attribute — an automatic evaluation
against ground truth (``evaluate_features``) beside a word-counting baseline.

Words are lower-case alphabetic tokens minus English stop words (scikit-learn's list) and a discard set
of non-concepts.  No part-of-speech filter is used: it would need a lexicon that is not installed
offline, and the caption vocabulary here is small and clean.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.inputs import check_features, check_images, check_maps
from course_utils.vlm import top_captions, words

REFERENCE_TEMPERATURE = 0.01  # the reference code's softmax(100 · cosine): CLIP's logit scale
THESIS_MIN_SCORE = 0.08  # the thesis' Word-Score cut-off, on softmax confidences
REFERENCE_LOW_MIN_SCORE = 0.1  # the reference code discards the lowly activating set's words with WS >= 0.1
DISCARD_RULES = ("top", "all", "score")  # course (top-n words), thesis (every concept), reference (WS >= 0.1)
EPS_RULES = ("feature", "global")  # ε of eq. 4.2: the feature's mean (thesis, course), the global mean (reference)

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
                discard: Sequence[str] = (), temperature: float | None = None) -> dict[str, float]:
    """Eq. 4.1: WS(w) = (1/|T|) Σ_q max over image q's top-k captions p containing w of C_{q,p}.

    Args:
        confidence: image-caption cosines [n_images, n_captions].
        captions: the n_captions strings.
        top_k: captions kept per image (thesis: 5).
        discard: words that are not concepts (added to the stop words).
        temperature: None: C is the cosine itself; τ > 0: C = softmax(cosine / τ) over the n_captions
            candidates of each image, as the reference code (τ = ``REFERENCE_TEMPERATURE``).
    Returns:
        word -> score, highest first.
    """
    if confidence.ndim != 2 or confidence.shape[1] != len(captions):
        raise ValueError(f"confidence must be [n_images, n_captions = {len(captions)}], got {tuple(confidence.shape)}")
    if not 1 <= top_k <= len(captions):
        raise ValueError(f"top_k must lie in [1, {len(captions)}], got {top_k}")
    if temperature is not None:
        _check_temperature(temperature)
        confidence = (confidence.double() / temperature).softmax(dim=1)
    values, indices = confidence.topk(top_k, dim=1)
    return word_scores_from_top(values, indices, captions, discard)


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number (the reference code: {REFERENCE_TEMPERATURE}) or None "
                         f"for raw cosines, got {temperature!r}")


def caption_confidences(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor, top_k: int = 5,
                        temperature: float | None = None, chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ``top_k`` captions and their confidences C, the weights of eq. 4.1.

        temperature None:  C_{q,p} = cos(b_q, a_p)                                   (raw cosines)
        temperature τ:     C_{q,p} = exp(cos(b_q, a_p) / τ) / Σ_{p' ∈ S} exp(cos(b_q, a_p') / τ)

    The softmax runs over every candidate caption of S, as the reference code's ``softmax(100 · B Aᵀ)`` does
    (it normalises over each file of LAION captions it scans; here S is one such set); the normaliser is a
    log-sum-exp accumulated ``chunk`` captions at a time, so memory stays bounded for 10^6 captions.

    Args:
        image_embeddings: [n, d]; caption_embeddings: [M, d] (both L2-normalised).
    Returns:
        (confidences float [n, top_k], caption indices LongTensor [n, top_k]), best first.
    """
    values, indices = top_captions(image_embeddings, caption_embeddings, top_k, chunk=chunk)
    if temperature is None:
        return values, indices
    _check_temperature(temperature)
    images = image_embeddings.float()
    log_partition = torch.full((images.shape[0],), float("-inf"), dtype=torch.float64)
    for start in range(0, caption_embeddings.shape[0], chunk):
        block = (images @ caption_embeddings[start:start + chunk].float().T).double() / temperature
        log_partition = torch.logaddexp(log_partition, block.logsumexp(dim=1))
    return (values.double() / temperature - log_partition[:, None]).exp().float(), indices


def normalise(H: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, float32 on the CPU (every FALCON step works on these)."""
    check_features(H, "H")
    return F.normalize(H.detach().float().cpu(), dim=1)


def activation_threshold(H: torch.Tensor, k: float = 5.0) -> float:
    """The reference code's α: mean + k std of all L2-normalised activations."""
    values = normalise(H)
    return (values.mean() + k * values.std()).item()


Features = int | Sequence[int]


def _feature_list(feature: Features, r: int) -> list[int]:
    group = [feature] if isinstance(feature, int) else [int(f) for f in feature]
    if not group or any(not 0 <= f < r for f in group):
        raise ValueError(f"feature {feature} is out of range for r = {r} (give an index or a non-empty group)")
    return group


def highly_activating(H: torch.Tensor, feature: Features, alpha: float) -> torch.Tensor:
    """T_i = {j : h_ji > α} on L2-normalised H, as image indices sorted by activation (highest first).

    For a feature group, the images where every feature of the group exceeds α (sorted by the weakest)."""
    values = normalise(H)
    group = _feature_list(feature, values.shape[1])
    column = values[:, group].min(1).values
    chosen = (column > alpha).nonzero().flatten()
    return chosen[column[chosen].argsort(descending=True)]


def lowly_activating(H: torch.Tensor, feature: Features, high_idx: torch.Tensor, beta: float = 0.7,
                     eps: float | str | None = None, max_images: int | None = None) -> torch.Tensor:
    """Eq. 4.2: images where feature i is low but which otherwise resemble its highly activating ones.

        {j : h_ji < ε, h_{j,V_i} · h^μ >= β},   h^μ = mean over T_i of h without feature i,

    on L2-normalised H.  ε: ``"feature"`` (or None, the default) the feature's mean over the population, as
    the thesis; ``"global"`` the mean of all normalised activations, as the reference code; or a number.
    Sorted by similarity to h^μ (highest first) and cut to ``max_images``.  For a feature group (thesis 4.3)
    every feature of the group must be below its ε (with ``"feature"``, its own mean), and V_i leaves out
    the whole group.
    """
    values = normalise(H)
    group = _feature_list(feature, values.shape[1])
    if len(high_idx) == 0:
        raise ValueError("the highly activating set is empty: nothing to contrast with")
    columns = values[:, group]
    if eps is None or eps == "feature":
        eps_values = columns.mean(0)
    elif eps == "global":
        eps_values = values.mean().expand(len(group))
    elif isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps_values = torch.full((len(group),), float(eps))
    else:
        raise ValueError(f"eps must be 'feature' (the feature's mean), 'global' (the mean of all activations) or a "
                         f"number, got {eps!r}")
    others = torch.ones(values.shape[1], dtype=torch.bool)
    others[group] = False
    centre = values[high_idx][:, others].mean(0)  # h^μ
    similarity = values[:, others] @ centre
    chosen = ((columns < eps_values).all(1) & (similarity >= beta)).nonzero().flatten()
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
    """Each image cropped to its ``crop_box`` and resized back to its size: images [B, 3, H, W] in [0, 1] and
    one saliency map per image [B, H, W] (the images' size) -> crops [B, 3, H, W] float32."""
    images = check_images(images, "images")
    saliency = check_maps(saliency, "saliency")
    if saliency.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"need one saliency map per image at the images' size, [B, H, W] = "
                         f"{[images.shape[0], *images.shape[2:]]}, got {list(saliency.shape)}; upsample the maps "
                         "to the image size (e.g. gradcam(..., upsample=True)) and pass one per image")
    crops = []
    for image, saliency_map in zip(images, saliency):
        top, left, bottom, right = crop_box(saliency_map, threshold)
        crop = image[:, top:bottom, left:right].float()[None]
        crops.append(F.interpolate(crop, size=image.shape[-2:], mode="bilinear", align_corners=False)[0])
    return torch.stack(crops)


def gradcam_crops(encoder: nn.Module, layer: nn.Module, images: torch.Tensor, features: int | Sequence[int],
                  threshold: float = 0.6, batch_size: int = 256) -> torch.Tensor:
    """The images cropped to where ``encoder``'s feature(s) look (step 2 of FALCON).

    Each image is cropped to the largest box where the Grad-CAM map of feature h_i is >= ``threshold`` of its
    maximum, and resized back.  For a feature group the maps, each scaled to a maximum of 1, are intersected
    (element-wise minimum), so the box covers what all features of the group look at.

    Args:
        encoder: maps images to h [B, r]; layer: its feature-map layer for Grad-CAM (e.g. ``encoder.layer3``).
        images: float [B, 3, H, W] in [0, 1] (on the encoder's device).
        features: one feature index or a group of them.
    Returns:
        float [B, 3, H, W] crops on the CPU.
    """
    from course_utils.explain.gradcam import feature, gradcam

    group = [features] if isinstance(features, int) else list(features)
    if not group:
        raise ValueError("give at least one feature to crop for")
    images = check_images(images, "images")
    crops = []
    for batch in images.split(batch_size):
        maps = None
        for index in group:
            cam = gradcam(encoder, layer, batch, feature(index)).cpu()
            cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
            maps = cam if maps is None else torch.minimum(maps, cam)
        crops.append(crop_images(batch.cpu(), maps, threshold))
    return torch.cat(crops)


@dataclass
class FeatureExplanation:
    """FALCON's explanation of one feature (or feature group)."""

    feature: int | tuple[int, ...]  # a feature or a feature group
    concepts: list[str]  # ranked, after the contrastive discard
    scores: dict[str, float]  # WS of every word of the highly activating images' captions
    high: torch.Tensor  # indices of T_i
    low: torch.Tensor  # indices of the lowly activating counterfactuals
    low_scores: dict[str, float] = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)  # words dropped by the contrastive step
    high_captions: torch.Tensor | None = None  # indices into S of each T_i image's top-k captions [|T_i|, k]


def contrastive_discard(low_scores: dict[str, float], rule: str = "top", top_words: int = 3, min_score: float = 0.0,
                        low_min_score: float = REFERENCE_LOW_MIN_SCORE) -> list[str]:
    """The words the contrastive step removes from a feature's concepts, given the Word Scores of its lowly
    activating set L_i (word -> WS, highest first).

    rule:
        ``"top"``   the ``top_words`` highest-scoring words of L_i (the course's own rule);
        ``"all"``   every concept of L_i, i.e. every word with WS >= ``min_score`` (the thesis: "we include
                    the concepts of lowly activating images in the discard set");
        ``"score"`` every word with WS >= ``low_min_score`` (the reference code: 0.1).
    Returns:
        the discarded words, in L_i's ranking.
    """
    if rule == "top":
        return list(low_scores)[:top_words]
    if rule == "all":
        return [w for w, score in low_scores.items() if score >= min_score]
    if rule == "score":
        return [w for w, score in low_scores.items() if score >= low_min_score]
    raise ValueError(f"rule must be one of {DISCARD_RULES} (course: top-n words, thesis: every concept, reference: "
                     f"WS >= {REFERENCE_LOW_MIN_SCORE}), got {rule!r}")


def explain_feature(
    H: torch.Tensor, feature: Features, image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor,
    captions: Sequence[str], alpha: float | None = None, top_k: int = 5, min_images: int = 10,
    discard: Sequence[str] = NON_CONCEPTS, contrastive: bool = True, beta: float = 0.7, max_low: int = 50,
    low_top_words: int = 3, min_score: float | None = None, n_concepts: int = 5,
    high_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None, temperature: float | None = None,
    low_discard: str = "top", low_min_score: float = REFERENCE_LOW_MIN_SCORE, eps: float | str = "feature",
) -> FeatureExplanation | None:
    """Explain feature ``feature`` of H [N, r] (or a feature group, a sequence of indices) by the captions of
    its highly activating images.

    Args:
        image_embeddings: VLM embeddings [N, d] of the probe images (crops, when Grad-CAM cropping is used).
        caption_embeddings, captions: the caption set S ([M, d] and M strings).
        alpha: the activation threshold (default ``activation_threshold(H)``).
        min_images: features with at most this many highly activating images are not explained (None returned).
        contrastive: remove the lowly activating set's words (at most ``max_low`` images, similarity β,
            threshold ``eps``) from the concepts, by ``low_discard`` (``contrastive_discard``): ``"top"`` its
            ``low_top_words`` best words (the course's default), ``"all"`` every one of its concepts (thesis),
            ``"score"`` its words with WS >= ``low_min_score`` (reference code, 0.1).
        temperature: caption confidences (``caption_confidences``): None raw cosines (the course's default),
            τ the softmax of cosine / τ over the caption set (reference code: τ = 0.01).
        min_score: keep words with WS >= this.  None (default): the thesis' 0.08 with softmax confidences,
            0 with raw cosines — the toy CLIP's retrieval cosines are about 0.75, so any cut-off that low is
            void and every word is kept.
        eps: ε of eq. 4.2, ``"feature"`` (the feature's mean: thesis and course), ``"global"`` (the mean of
            all normalised activations: reference code) or a number.
        high_embeddings: optional function from the indices of T_i to the VLM embeddings [|T_i|, d] FALCON
            should caption instead of their rows of ``image_embeddings``, e.g. of their Grad-CAM crops
            (``gradcam_crops``).  The lowly activating images are always seen whole: the feature is silent
            there, so its map would not say where to look.
    Returns:
        ``FeatureExplanation``, or None when |T_i| <= min_images.
    """
    if low_discard not in DISCARD_RULES:
        raise ValueError(f"low_discard must be one of {DISCARD_RULES}, got {low_discard!r}")
    if min_score is None:
        min_score = 0.0 if temperature is None else THESIS_MIN_SCORE
    alpha = activation_threshold(H) if alpha is None else alpha
    high = highly_activating(H, feature, alpha)
    if len(high) <= min_images:
        return None
    seen = image_embeddings[high] if high_embeddings is None else high_embeddings(high)
    values, indices = caption_confidences(seen, caption_embeddings, top_k, temperature)
    scores = word_scores_from_top(values, indices, captions, discard)
    low = torch.zeros(0, dtype=torch.long)
    low_scores: dict[str, float] = {}
    dropped: list[str] = []
    if contrastive:
        low = lowly_activating(H, feature, high, beta=beta, eps=eps, max_images=max_low)
        if len(low):
            low_values, low_indices = caption_confidences(image_embeddings[low], caption_embeddings, top_k, temperature)
            low_scores = word_scores_from_top(low_values, low_indices, captions, discard)
            dropped = contrastive_discard(low_scores, low_discard, low_top_words, min_score, low_min_score)
    removed = set(dropped)
    concepts = [w for w, s in scores.items() if s >= min_score and w not in removed][:n_concepts]
    name = feature if isinstance(feature, int) else tuple(int(f) for f in feature)
    return FeatureExplanation(name, concepts, scores, high, low, low_scores, dropped, indices)


def frequency_concepts(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor, captions: Sequence[str],
                       top_k: int = 5, discard: Sequence[str] = NON_CONCEPTS, n_concepts: int = 5) -> list[str]:
    """The baseline FALCON must beat: the words that occur most often in the images' top-k captions
    (ties broken alphabetically).

    Args:
        image_embeddings: VLM embeddings [n, d] of the images to describe (e.g. T_i).
    """
    _, indices = top_captions(image_embeddings, caption_embeddings, top_k)
    return _most_frequent_words(indices, captions, discard, n_concepts)


def _most_frequent_words(indices: torch.Tensor, captions: Sequence[str], discard: Sequence[str],
                         n_concepts: int) -> list[str]:
    """The ``n_concepts`` words most frequent in the captions ``indices`` [n, k] (ties alphabetically)."""
    counts: dict[str, int] = defaultdict(int)
    for row in indices.tolist():
        for index in row:
            for word in caption_words(captions[index], discard):
                counts[word] += 1
    return [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))][:n_concepts]


@dataclass
class Evaluation:
    """FALCON against ShapesWorld's ground truth over the explained features."""

    explanations: list[FeatureExplanation]
    truths: list[set[str]]  # true concepts of each explanation's T_i
    baseline: list[list[str]]  # the frequency baseline's words for the same T_i
    falcon: dict[str, float]  # concept_precision of FALCON's concepts
    frequency: dict[str, float]  # concept_precision of the baseline


def evaluate_features(H: torch.Tensor, image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor,
                      captions: Sequence[str], attributes: dict[str, torch.Tensor],
                      attribute_names: dict[str, list[str]], names: dict[str, set[str]],
                      features: Sequence[Features] | None = None, k: int = 5, **explain_options) -> Evaluation:
    """Explain every feature with more than ``min_images`` highly activating images (or the given features
    or groups) and score the concepts against the probe set's attributes (``true_concepts``), beside the
    frequency baseline on the same images.

    Args:
        H [N, r], image_embeddings [N, d]: the probe set; attributes/attribute_names: its ground truth.
        names: word -> attribute values (``captions.concept_names``).
        explain_options: passed to ``explain_feature`` (alpha, contrastive, beta, max_low, discard, temperature,
            low_discard, eps, …); the baseline counts the words of the captions FALCON retrieved for T_i (same
            top_k, discard and n_concepts; the confidences do not change which captions are retrieved).
    """
    candidates = range(H.shape[1]) if features is None else features
    explanations, truths, baseline = [], [], []
    discard = explain_options.get("discard", NON_CONCEPTS)
    for feature in candidates:
        explanation = explain_feature(H, feature, image_embeddings, caption_embeddings, captions, **explain_options)
        if explanation is None:
            continue
        explanations.append(explanation)
        truths.append(true_concepts(attributes, attribute_names, explanation.high))
        baseline.append(_most_frequent_words(explanation.high_captions, captions, discard,
                                             explain_options.get("n_concepts", 5)))
    if not explanations:
        raise ValueError("no feature has more than min_images highly activating images; lower alpha")
    return Evaluation(explanations, truths, baseline,
                      concept_precision([e.concepts for e in explanations], truths, k, names),
                      concept_precision(baseline, truths, k, names))


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


@dataclass
class FeatureGroup:
    """A set of features that are highly active together (thesis Algorithm 1)."""

    features: tuple[int, ...]
    images: torch.Tensor  # indices of the images whose highly activating features are exactly this set
    similarity: float  # average VLM cosine similarity between those images
    interpretable: bool  # similarity > γ


def set_similarity(image_embeddings: torch.Tensor, images: torch.Tensor) -> float:
    """How alike a set of images looks to the VLM: the mean of the cosine-similarity matrix of their
    embeddings, diagonal included (as Algorithm 1 of the thesis).

    Args:
        image_embeddings: [N, d]; images: indices into it.
    """
    if len(images) == 0:
        raise ValueError("the image set is empty")
    chosen = F.normalize(image_embeddings[images].float(), dim=1)
    return (chosen @ chosen.T).mean().item()


def feature_groups(H: torch.Tensor, image_embeddings: torch.Tensor, alpha: float, min_images: int = 10,
                   gamma: float = 0.8) -> list[FeatureGroup]:
    """Thesis Algorithm 1: group the images by the exact set of features above α they activate; every set
    shared by more than ``min_images`` images is a feature group, interpretable when the average VLM cosine
    similarity of its images (``set_similarity``) exceeds γ.

    Args:
        H: representations [N, r]; image_embeddings: VLM embeddings [N, d] of the same images.
    Returns:
        the groups with more than ``min_images`` images, largest first.  (``explain_feature(H, group)``
        explains a group on the larger set of images where *all* its features exceed α, whatever else
        is active; SCIENCE.md asks for the similarity of the crops, the thesis' Algorithm 1 and this
        function use the whole images.)
    """
    if image_embeddings.shape[0] != H.shape[0]:
        raise ValueError(f"need one VLM embedding per image: H has {H.shape[0]} rows, the embeddings "
                         f"{image_embeddings.shape[0]}")
    active = normalise(H) > alpha
    members: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for j, row in enumerate(active.tolist()):
        group = tuple(i for i, on in enumerate(row) if on)
        if group:
            members[group].append(j)
    groups = []
    for group, images in members.items():
        if len(images) > min_images:
            similarity = set_similarity(image_embeddings, torch.tensor(images))
            groups.append(FeatureGroup(group, torch.tensor(images), similarity, similarity > gamma))
    return sorted(groups, key=lambda g: (-len(g.images), g.features))


def explainable_share(H: torch.Tensor, image_embeddings: torch.Tensor, groups: Sequence[FeatureGroup], alpha: float,
                      min_images: int = 10, gamma: float = 0.8) -> dict[str, float | int]:
    """How much of the representation FALCON can explain, as shares of the r features: single features
    whose highly activating set has more than ``min_images`` images that look alike (``set_similarity``
    > γ, the test Algorithm 1 applies to groups), features in an interpretable group of two or more
    features, and either."""
    r = H.shape[1]
    single = {f for f in range(r) if len(high := highly_activating(H, f, alpha)) > min_images
              and set_similarity(image_embeddings, high) > gamma}
    in_groups = {f for g in groups if g.interpretable and len(g.features) > 1 for f in g.features}
    return {"single features": len(single) / r, "features in interpretable groups": len(in_groups) / r,
            "either": len(single | in_groups) / r,
            "interpretable groups": sum(g.interpretable for g in groups), "groups": len(groups)}


TRUTH_KEYS = ("shape", "color", "texture", "size", "background", "background_color", "distractor")


def true_concepts(attributes: dict[str, torch.Tensor], attribute_names: dict[str, list[str]], images: torch.Tensor,
                  min_share: float = 0.5, enrichment: float = 2.0, keys: Sequence[str] = TRUTH_KEYS) -> set[str]:
    """The ground-truth concepts of a set of probe images (ShapesWorld attributes): attribute values present
    in at least ``min_share`` of them and at least ``enrichment`` times as often as in the whole probe set.
    The distractor's value "bar" is a concept, its absence ("none") is not."""
    truth = set()
    for key in keys:
        values = attributes[key]
        for index, name in enumerate(attribute_names[key]):
            if name == "none":
                continue
            overall = (values == index).float().mean().item()
            share = (values[images] == index).float().mean().item()
            if share >= min_share and share >= enrichment * overall and overall > 0:
                truth.add(name)
    return truth


def _check_concept_lists(predicted: Sequence[Sequence[str]], truths: Sequence[set[str]]) -> None:
    """One ranked word list and one set of true values per feature (a bare str would be scored letter by
    letter, or fail deep inside the set arithmetic)."""
    if isinstance(predicted, str) or isinstance(truths, (str, set, frozenset)):
        raise ValueError("predicted and truths must be lists with one entry per feature: predicted[i] the ranked "
                         "words of feature i, truths[i] its set of true values")
    if len(predicted) != len(truths):
        raise ValueError(f"need one truth per feature, got {len(predicted)} predictions and {len(truths)} truths")
    for i, (words_i, truth) in enumerate(zip(predicted, truths)):
        if isinstance(words_i, str):
            raise ValueError(f"predicted[{i}] is the str {words_i!r}; give a list of ranked words, e.g. [{words_i!r}]")
        if not isinstance(truth, (set, frozenset)):
            raise ValueError(f"truths[{i}] is a {type(truth).__name__} ({truth!r}), not a set of true values; "
                             f"give e.g. {{{truth!r}}} (true_concepts returns sets)")


def concept_hits(predicted: Sequence[Sequence[str]], truths: Sequence[set[str]], k: int = 5,
                 names: dict[str, set[str]] | None = None) -> dict[str, "np.ndarray"]:
    """``concept_precision`` per feature, for bootstrap intervals over features (``stats.mean_interval``,
    ``stats.difference_interval``): the per-feature P@1 hit, precision over the top min(k, #true) and
    recall@k of the features that have at least one true concept, float arrays [n_scored] in input order
    (their means are ``concept_precision``'s values).  Also returns "scored": bool [len(predicted)], which
    features were scored, so two methods on the same features stay paired."""
    import numpy as np

    _check_concept_lists(predicted, truths)

    def hits(words: Sequence[str], truth: set[str]) -> set[str]:
        return {value for w in words for value in (names.get(w, set()) if names else {w})} & truth

    scored = np.array([bool(t) for t in truths])
    rows = [(list(p), t) for p, t in zip(predicted, truths) if t]
    p_at_1 = [float(bool(hits(p[:1], t))) for p, t in rows]
    p_at_true = [min(len(hits(p[:min(k, len(t))], t)), min(k, len(t))) / min(k, len(t)) for p, t in rows]
    recall = [len(hits(p[:k], t)) / len(t) for p, t in rows]
    return {"P@1": np.array(p_at_1), "P@min(k,#true)": np.array(p_at_true), f"R@{k}": np.array(recall),
            "scored": scored}


def concept_precision(predicted: Sequence[Sequence[str]], truths: Sequence[set[str]], k: int = 5,
                      names: dict[str, set[str]] | None = None) -> dict[str, float]:
    """P@1, precision over the top min(k, #true) and recall@k of ranked concept words against true concept
    sets, averaged over the features that have at least one true concept, each next to its ceiling.

    Args:
        predicted: per feature, its concept words, best first.
        truths: per feature, its true attribute values (``true_concepts``).
        names: word -> the attribute values it names (``captions.concept_names``: synonyms such as
            "hoop" -> ring); without it a word must equal a value.  Two synonyms of one value count once.
    """
    _check_concept_lists(predicted, truths)
    scored = [t for t in truths if t]
    if not scored:
        raise ValueError("no feature has a true concept: nothing to score")
    per_feature = concept_hits(predicted, truths, k, names)
    return {"features scored": len(scored), "P@1": float(per_feature["P@1"].mean()),
            "P@min(k,#true)": float(per_feature["P@min(k,#true)"].mean()), f"R@{k}": float(per_feature[f"R@{k}"].mean()),
            "P@1 ceiling": 1.0, f"P@{k} ceiling": sum(min(k, len(t)) / k for t in scored) / len(scored)}
