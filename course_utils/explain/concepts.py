"""Concept methods: does a representation use a human concept? (SCIENCE.md section 8)

* **TCAV** (Kim et al. 2018).  A concept activation vector (CAV) v_C at a layer is the normal of a linear
  classifier that separates the layer's activations on concept examples from those on random examples.
  For inputs of a class and a scalar target y (a class score, a feature), the directional derivative
  S_C(x) = ∇_a y(a(x)) · v_C says whether moving the activation towards the concept raises y; the
  **TCAV score** is the share of inputs with S_C(x) > 0.  A score means something only when it differs from
  chance: CAVs are trained against several random sets (≥ 20 in the course's protocol), random-vs-random CAVs
  give the null distribution, a one-sided Welch t-test asks whether the concept's scores lie *above* it, and
  Benjamini–Hochberg corrects for the many concepts tested at once.
* **Prototypes** (the ProtoPNet / ProtoVAE idea, without training a prototype layer): k-means centroids of
  the representations h and the training images nearest to each, shown as image grids.

Activations at convolutional layers are flattened ([B, C·h·w]), as in the TCAV paper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.explain.gradcam import layer_gradient
from course_utils.inputs import check_features, check_images

Target = Callable[[torch.Tensor], torch.Tensor]  # model output -> one score per input [B]


def _capture(model: nn.Module, layer: nn.Module, images: torch.Tensor, target: Target | None,
             batch_size: int, name: str = "images") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flattened activations of ``layer`` [N, D] and, given a target, the gradients of the target at them.
    ``images`` pass the input guard; ``name`` says which argument they are in its errors."""
    images = check_images(images, name)

    def scorer(n: int) -> Target:
        def score(output: torch.Tensor) -> torch.Tensor:
            scores = target(output)
            if scores.shape != (n,):
                raise ValueError(f"the target must give one score per image, got shape {tuple(scores.shape)}")
            return scores
        return score

    activations, gradients = [], []
    for batch in images.split(batch_size):
        score = scorer(len(batch)) if target is not None else None
        activation, gradient = layer_gradient(model, layer, batch, score, name=name)
        activations.append(activation.flatten(1).cpu())
        if gradient is not None:
            gradients.append(gradient.flatten(1).cpu())
    return torch.cat(activations), (torch.cat(gradients) if target is not None else None)


def layer_activations(model: nn.Module, layer: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The activations of ``layer`` for ``images`` [N, 3, H, W] in [0, 1], flattened: float [N, D] on the CPU."""
    return _capture(model, layer, images, None, batch_size)[0]


def concept_activation_vector(concept: torch.Tensor, random: torch.Tensor, C: float = 1.0,
                              max_iter: int = 200) -> torch.Tensor:
    """The CAV: the unit normal of a logistic regression separating concept activations [n_c, D] from random
    ones [n_r, D], pointing towards the concept; float [D].

    The regression minimises scikit-learn's objective C · Σ log-loss + ½ ||w||² (with an unpenalised bias).
    By the representer theorem w lies in the span of the n examples, so it is solved in an orthonormal basis
    of that span: with the n × n Gram matrix X Xᵀ = U S² Uᵀ, the examples' coordinates are Z = U S and
    w = Xᵀ U S⁻¹ β, where β minimises the same objective on Z (L-BFGS in float64): fast for tens of thousands
    of dimensions and a few hundred examples, and as well conditioned as the problem in w itself. (Solving
    for α in w = Xᵀα, as before, squares the Gram matrix's condition number: at the default 200 iterations
    L-BFGS stopped 14 % above the optimum, 19° off scikit-learn's direction; tests/test_crosschecks.py.)
    """
    if concept.ndim != 2 or random.ndim != 2 or concept.shape[1] != random.shape[1]:
        raise ValueError(f"need activations [n, D] with the same D, got {tuple(concept.shape)} and {tuple(random.shape)}")
    if len(concept) < 2 or len(random) < 2:
        raise ValueError("a CAV needs at least 2 concept and 2 random examples")
    x = torch.cat([concept, random]).double()
    y = torch.cat([torch.ones(len(concept)), torch.zeros(len(random))]).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(x @ x.T)  # Gram matrix [n, n] = U S² Uᵀ
    kept = eigenvalues > eigenvalues.max().clamp(min=1e-300) * 1e-12  # the span's dimensions (drop round-off)
    scale = eigenvalues[kept].sqrt()  # S
    basis = eigenvectors[:, kept]  # U
    z = basis * scale  # [n, rank]: the examples' coordinates in an orthonormal basis V = Xᵀ U S⁻¹ of their span
    beta = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = C * F.binary_cross_entropy_with_logits(z @ beta + bias, y, reduction="sum") + 0.5 * beta @ beta
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    direction = (x.T @ (basis / scale) @ beta.detach()).float()  # w = V β
    return direction / direction.norm().clamp(min=1e-12)


def tcav_score(gradients: torch.Tensor, cav: torch.Tensor) -> float:
    """Share of inputs whose directional derivative ∇y · v_C is positive: gradients [N, D], cav [D]."""
    if gradients.ndim != 2 or cav.shape != (gradients.shape[1],):
        raise ValueError(f"need gradients [N, D] and a CAV [D], got {tuple(gradients.shape)} and {tuple(cav.shape)}")
    return (gradients @ cav > 0).float().mean().item()


@dataclass
class TCAVResult:
    """TCAV of one concept for one set of inputs and one target."""

    score: float  # mean TCAV score over the concept's CAVs (one per random set)
    scores: list[float]  # TCAV score of each concept CAV
    random_scores: list[float]  # TCAV scores of random-vs-random CAVs (the null distribution)
    p_value: float  # one-sided Welch t-test: are the concept's scores above the random CAVs' scores?
    significant: bool  # "the model uses the concept": p_value survives Benjamini–Hochberg at q = alpha


def tcav(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: Target,
         concept: torch.Tensor | Sequence[torch.Tensor], random_sets: Sequence[torch.Tensor], alpha: float = 0.05,
         batch_size: int = 256) -> TCAVResult:
    """TCAV with its significance test.

    Args:
        model, layer: the network and the layer whose activations the CAVs live in.
        inputs: images [N, 3, H, W] whose target is explained (e.g. test images of one class).
        target: model output -> score [N] (e.g. ``lambda out: head(out)[:, c]``).
        concept: concept example images: one sample [n_c, 3, H, W], reused against every random set, or one
            sample per random set (a sequence of [n_c, 3, H, W], as long as ``random_sets``; CAV i is sample i
            against random set i). Only the second gives a calibrated test: with one reused sample the
            concept's CAVs share that sample's quirks and the test calls random concepts "used" too often
            (notebook 07, §3).
        random_sets: random image sets [n_r, 3, H, W], at least 3 (the evaluation protocol, SCIENCE.md §10,
            uses at least 20).
        alpha: significance level of the one-sided test (concept CAVs above random-vs-random CAVs).
    """
    return tcav_concepts(model, layer, inputs, target, {"concept": concept}, random_sets, alpha, batch_size)["concept"]


def tcav_p_value(scores: Sequence[float], random_scores: Sequence[float]) -> float:
    """One-sided p-value that the concept CAVs' TCAV scores lie above the random CAVs' (Welch t-test);
    identical constant groups give 1, a constant group above another constant one gives 0."""
    from scipy.stats import ttest_ind

    if np.std(scores) == 0 and np.std(random_scores) == 0:
        return 0.0 if scores[0] > random_scores[0] else 1.0
    with warnings.catch_warnings():  # one group may be constant (every score 1): scipy warns, the test holds
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(scores, random_scores, equal_var=False, alternative="greater").pvalue)


def tcav_concepts(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: Target,
                  concepts: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], random_sets: Sequence[torch.Tensor],
                  alpha: float = 0.05, batch_size: int = 256) -> dict[str, TCAVResult]:
    """``tcav`` for several concepts at once: the gradients, the random activations and the null
    distribution (random-vs-random CAVs) are computed once and shared; ``{name: TCAVResult}``.

    Each concept is one sample [n_c, 3, H, W] reused against every random set, or one sample per random
    set (see ``tcav``: only that design is calibrated). A concept is ``significant`` ("used") when its
    scores lie significantly *above* the random CAVs' after a Benjamini–Hochberg correction at
    q = ``alpha`` across the concepts tested in this call.
    """
    return tcav_targets(model, layer, {"target": (inputs, target)}, concepts, random_sets, alpha, batch_size)["target"]


def tcav_targets(model: nn.Module, layer: nn.Module, targets: Mapping[object, tuple[torch.Tensor, Target]],
                 concepts: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], random_sets: Sequence[torch.Tensor],
                 alpha: float = 0.05, batch_size: int = 256) -> dict[object, dict[str, TCAVResult]]:
    """``tcav_concepts`` for several targets (e.g. every class's logit on that class's inputs) with the CAVs
    trained once: ``{key: {concept: TCAVResult}}`` for ``targets = {key: (inputs [N, 3, H, W], target)}``.

    The CAVs depend only on the concept and random images, so sharing them gives, for every target, exactly
    what a separate ``tcav_concepts`` call gives, at the cost of one set of CAV fits. The Benjamini–Hochberg
    correction runs per target, across its concepts (as in ``tcav_concepts``).
    """
    from course_utils.stats import benjamini_hochberg

    if len(random_sets) < 3:
        raise ValueError(f"the significance test needs at least 3 random sets, got {len(random_sets)}")
    if not concepts:
        raise ValueError("give at least one concept: {name: concept images}")
    if not targets:
        raise ValueError("give at least one target: {key: (inputs, target)}")
    samples, labels = {}, {}
    for name, concept in concepts.items():
        if isinstance(concept, torch.Tensor):
            samples[name] = [concept] * len(random_sets)
            labels[name] = [f"concept {name!r}"] * len(random_sets)
        elif len(concept) != len(random_sets):
            raise ValueError(f"concept {name!r} has {len(concept)} samples for {len(random_sets)} random sets: give "
                             "one sample per random set (or a single tensor, reused against every set)")
        else:
            samples[name] = list(concept)
            labels[name] = [f"concept {name!r} sample {i}" for i in range(len(samples[name]))]
    # every image set through the input guard before any work: a NaN or uint8 set raises, naming itself,
    # instead of giving a score (NaN activations once gave 0.92 and "significant")
    for key, (inputs, _) in targets.items():
        check_images(inputs, "inputs" if len(targets) == 1 else f"inputs of target {key!r}")
    for i, random_set in enumerate(random_sets):
        check_images(random_set, f"random set {i}")
    for name, per_set in samples.items():
        for i, (sample, label) in enumerate(zip(per_set, labels[name])):
            if i == 0 or sample is not per_set[i - 1]:  # a reused sample once
                check_images(sample, label)
    random_acts = [_capture(model, layer, r, None, batch_size, f"random set {i}")[0]
                   for i, r in enumerate(random_sets)]
    random_cavs = [concept_activation_vector(random_acts[i], random_acts[(i + 1) % len(random_acts)])
                   for i in range(len(random_acts))]
    concept_cavs = {}
    for name, per_set in samples.items():
        if per_set[0] is per_set[-1]:  # one reused sample: its activations once
            concept_acts = [_capture(model, layer, per_set[0], None, batch_size, labels[name][0])[0]] * len(per_set)
        else:
            concept_acts = [_capture(model, layer, sample, None, batch_size, label)[0]
                            for sample, label in zip(per_set, labels[name])]
        concept_cavs[name] = [concept_activation_vector(c, r) for c, r in zip(concept_acts, random_acts)]
    results = {}
    for key, (inputs, target) in targets.items():
        _, gradients = _capture(model, layer, inputs, target, batch_size,
                                "inputs" if len(targets) == 1 else f"inputs of target {key!r}")
        random_scores = [tcav_score(gradients, cav) for cav in random_cavs]
        measured = {}
        for name, cavs in concept_cavs.items():
            scores = [tcav_score(gradients, cav) for cav in cavs]
            measured[name] = (scores, tcav_p_value(scores, random_scores))
        used = benjamini_hochberg([p for _, p in measured.values()], q=alpha)
        results[key] = {name: TCAVResult(float(np.mean(scores)), scores, random_scores, p, bool(significant))
                        for (name, (scores, p)), significant in zip(measured.items(), used)}
    return results


@dataclass
class Prototypes:
    """k-means prototypes of a representation."""

    centroids: torch.Tensor  # [k, r]
    assignment: torch.Tensor  # cluster of every sample [N]
    nearest: torch.Tensor  # [k, m]: indices of the m samples nearest to each centroid, nearest first


def prototypes(H: torch.Tensor, k: int = 8, per_prototype: int = 8, iterations: int = 50, seed: int = 0) -> Prototypes:
    """k-means (k-means++ start, ``iterations`` Lloyd steps) on L2-normalised representations H [N, r]."""
    check_features(H, "H")
    if not 1 <= k <= H.shape[0]:
        raise ValueError(f"need H [N, r] with N >= k >= 1, got shape {tuple(H.shape)} and k = {k}")
    x = F.normalize(H.detach().float().cpu(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    while len(centroids) < k:  # k-means++: next centre with probability ∝ squared distance
        distance = torch.cdist(x, centroids).min(1).values.square()
        centroids = torch.cat([centroids, x[torch.multinomial(distance + 1e-12, 1, generator=generator)]])
    for _ in range(iterations):
        assignment = torch.cdist(x, centroids).argmin(1)
        updated = torch.stack([x[assignment == c].mean(0) if (assignment == c).any() else centroids[c]
                               for c in range(k)])
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    assignment = torch.cdist(x, centroids).argmin(1)
    nearest = torch.cdist(centroids, x).topk(min(per_prototype, len(x)), dim=1, largest=False).indices
    return Prototypes(centroids, assignment, nearest)
