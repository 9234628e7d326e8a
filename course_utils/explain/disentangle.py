"""Disentanglement scores of a representation against known generating factors (SCIENCE.md §12).

ShapesWorld knows every image's factors (shape, colour, size, position, texture, background), so how a
representation ``codes [N, D]`` organises them can be scored, not judged by eye:

- **MIG** (Chen et al. 2018): each code dimension is binned (``bins`` equal-width bins) and its mutual
  information with each factor computed; per factor, the gap between the two most informative
  dimensions divided by the factor's entropy; MIG is the mean over factors.  1 = one dimension per
  factor, 0 = a factor spread evenly (or not captured at all).
- **DCI** (Eastwood & Williams 2018) from an importance matrix ``R [D, K]``: here the mean absolute
  weight of an L1-regularised logistic regression predicting factor k from the standardised codes
  (the "lasso" variant; fitted here by FISTA, no scikit-learn needed).  Disentanglement ``D = Σ_i ρ_i (1 − H_K(P_i·))`` with ``P_ij = R_ij / Σ_k R_ik``
  and ``ρ_i = Σ_j R_ij / Σ R`` (does each dimension serve one factor?); completeness
  ``C = mean_j (1 − H_D(P̃_·j))`` with ``P̃_ij = R_ij / Σ_i R_ij`` (is each factor held by one dimension?);
  informativeness is the regression's held-out accuracy per factor.  Entropies use log base K and D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from course_utils.inputs import check_features


def _check_factors(codes: torch.Tensor, factors: torch.Tensor, name: str = "factors") -> torch.Tensor:
    if not isinstance(factors, torch.Tensor) or factors.ndim != 2 or len(factors) != len(codes):
        raise ValueError(f"{name} must be [N, K] integers, one row per code (N = {len(codes)}), got "
                         f"{tuple(factors.shape) if isinstance(factors, torch.Tensor) else type(factors).__name__}")
    if factors.is_floating_point():
        raise ValueError(f"{name} must be integer factor values (class indices), got {factors.dtype}; "
                         "bin a continuous factor first, e.g. torch.bucketize")
    return factors.long()


def discretize(codes: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Equal-width bins of every code dimension: codes [N, D] -> long [N, D] in 0..bins-1 (a constant
    dimension falls in bin 0)."""
    codes = check_features(codes, "codes").double()
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    low, high = codes.min(0).values, codes.max(0).values
    width = (high - low).clamp_min(1e-12)
    return ((codes - low) / width * bins).floor().clamp(0, bins - 1).long()


def entropy(values: torch.Tensor) -> float:
    """Entropy in nats of the empirical distribution of integer ``values`` [N]."""
    counts = torch.unique(values, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mutual information in nats of two integer vectors [N] from their joint histogram."""
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two integer vectors of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    _, a_index = torch.unique(a, return_inverse=True)
    _, b_index = torch.unique(b, return_inverse=True)
    joint = torch.zeros(int(a_index.max()) + 1, int(b_index.max()) + 1, dtype=torch.float64)
    joint.index_put_((a_index, b_index), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nonzero = joint > 0
    return float((joint[nonzero] * (joint[nonzero] / outer[nonzero]).log()).sum())


def _information_per_dimension(binned: torch.Tensor, bins: int, factor: torch.Tensor) -> torch.Tensor:
    """``mutual_information(binned[:, i], factor)`` for every column i at once: binned [N, D] in 0..bins-1,
    factor [N] -> [D] in nats, from one joint histogram [D, bins, C] counted by ``bincount``."""
    _, factor_index = torch.unique(factor, return_inverse=True)
    values = int(factor_index.max()) + 1
    dims = binned.shape[1]
    cell = (torch.arange(dims) * bins + binned) * values + factor_index[:, None]  # [N, D]
    joint = torch.bincount(cell.flatten(), minlength=dims * bins * values).double().view(dims, bins, values)
    joint /= len(binned)
    outer = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)
    terms = torch.where(joint > 0, joint * (joint.clamp_min(1e-300) / outer.clamp_min(1e-300)).log(),
                        torch.zeros_like(joint))
    return terms.sum((1, 2))


@dataclass
class MIGResult:
    score: float  # mean over factors
    per_factor: torch.Tensor  # [K] normalised gap
    mutual_information: torch.Tensor  # [D, K] in nats
    factor_entropy: torch.Tensor  # [K] in nats


def mig(codes: torch.Tensor, factors: torch.Tensor, bins: int = 20) -> MIGResult:
    """Mutual information gap of codes [N, D] (D >= 2) with integer factors [N, K] (each taking >= 2 values)."""
    codes = check_features(codes, "codes")
    factors = _check_factors(codes, factors)
    if codes.shape[1] < 2:
        raise ValueError("MIG compares the two most informative dimensions: codes need D >= 2 columns")
    binned = discretize(codes, bins)
    entropies = torch.tensor([entropy(factors[:, k]) for k in range(factors.shape[1])], dtype=torch.float64)
    if (entropies <= 0).any():
        constant = [k for k in range(len(entropies)) if entropies[k] <= 0]
        raise ValueError(f"factor column(s) {constant} take a single value: there is nothing to disentangle")
    information = torch.stack([_information_per_dimension(binned, bins, factors[:, k])
                               for k in range(factors.shape[1])], dim=1)
    top_two = information.topk(2, dim=0).values  # [2, K]
    per_factor = (top_two[0] - top_two[1]) / entropies
    return MIGResult(float(per_factor.mean()), per_factor, information, entropies)


def dci_scores(importance: torch.Tensor) -> tuple[float, float]:
    """(disentanglement, completeness) of a non-negative importance matrix R [D codes, K factors]."""
    R = torch.as_tensor(importance, dtype=torch.float64)
    if R.ndim != 2 or (R < 0).any() or not torch.isfinite(R).all() or R.sum() <= 0:
        raise ValueError("the importance matrix must be [D, K], finite, non-negative and not all zero")
    codes, factors = R.shape

    def normalised_entropy(p: torch.Tensor, base: int) -> torch.Tensor:  # rows of p sum to 1
        terms = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
        return -terms.sum(1) / math.log(base) if base > 1 else torch.zeros(len(p), dtype=p.dtype)

    row_sum, column_sum = R.sum(1), R.sum(0)
    used = row_sum > 0
    P = R[used] / row_sum[used, None]
    disentanglement = float(((1 - normalised_entropy(P, factors)) * row_sum[used] / R.sum()).sum())
    held = column_sum > 0
    Q = (R[:, held] / column_sum[held]).T
    completeness = float((1 - normalised_entropy(Q, codes)).mean())
    return disentanglement, completeness


@dataclass
class DCIResult:
    disentanglement: float
    completeness: float
    informativeness: torch.Tensor  # [K] held-out accuracy per factor
    importance: torch.Tensor  # [D, K]


def l1_logistic_regression(x: torch.Tensor, y: torch.Tensor, strength: float = 0.01, iterations: int = 500
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L1 penalty, by FISTA (accelerated proximal gradient):
    minimises mean cross-entropy + ``strength`` · Σ|W| over x [N, D] (standardise it first) and integer
    labels y [N] in 0..C-1.  Returns (W [D, C], b [C]); the bias is not penalised.  The step is 1/L with
    L = ‖x‖₂² / (2N) + small, a bound on the curvature of the softmax cross-entropy."""
    return _l1_logistic_regressions(x, [y], strength, iterations)[0]


def _l1_logistic_regressions(x: torch.Tensor, labels: list[torch.Tensor], strength: float, iterations: int
                             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``l1_logistic_regression(x, y)`` for every y in ``labels``, fitted together: the problems share x
    and the step, and their weights are blocks of one matrix [D, Σ C] with a softmax per block, so the
    FISTA iterates are exactly those of separate fits, at one matrix product per iteration for all."""
    x = x.double()
    sizes = [int(y.max()) + 1 for y in labels]
    target = torch.cat([torch.nn.functional.one_hot(y, c) for y, c in zip(labels, sizes)], 1).double()
    step = 1.0 / (torch.linalg.matrix_norm(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), ord=2) ** 2
                  / (2 * len(x)) + 1e-8)
    weight = torch.zeros(x.shape[1], sum(sizes), dtype=x.dtype)
    bias = torch.zeros(sum(sizes), dtype=x.dtype)
    momentum_w, momentum_b, t = weight.clone(), bias.clone(), 1.0
    for _ in range(iterations):
        logits = (x @ momentum_w + momentum_b).split(sizes, dim=1)
        probabilities = torch.cat([torch.softmax(block, dim=1) for block in logits], 1)
        residual = (probabilities - target) / len(x)  # d CE / d logits, per block
        w_next = momentum_w - step * (x.T @ residual)
        w_next = w_next.sign() * (w_next.abs() - step * strength).clamp_min(0)  # soft threshold (L1 prox)
        b_next = momentum_b - step * residual.sum(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum_w = w_next + (t - 1) / t_next * (w_next - weight)
        momentum_b = b_next + (t - 1) / t_next * (b_next - bias)
        weight, bias, t = w_next, b_next, t_next
    return list(zip(weight.split(sizes, dim=1), bias.split(sizes)))


def dci(train_codes: torch.Tensor, train_factors: torch.Tensor, test_codes: torch.Tensor,
        test_factors: torch.Tensor, strength: float = 0.01, iterations: int = 500) -> DCIResult:
    """DCI with an L1-regularised logistic regression per factor (``l1_logistic_regression``) on codes
    standardised with the training mean and deviation: importance ``R_ik`` = mean |weight| of code i over
    the classes of factor k; informativeness = held-out accuracy per factor."""
    train_codes, test_codes = check_features(train_codes, "train_codes"), check_features(test_codes, "test_codes")
    train_factors = _check_factors(train_codes, train_factors, "train_factors")
    test_factors = _check_factors(test_codes, test_factors, "test_factors")
    if train_codes.shape[1] != test_codes.shape[1] or train_factors.shape[1] != test_factors.shape[1]:
        raise ValueError("train and test codes (and factors) must have the same number of columns")
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    mean, std = train_codes.double().mean(0), train_codes.double().std(0).clamp_min(1e-8)
    x_train, x_test = (train_codes.double() - mean) / std, (test_codes.double() - mean) / std
    encoded = []  # (values, y_train) per factor: a regression predicts the index of a factor's value
    for k in range(train_factors.shape[1]):
        values, y_train = torch.unique(train_factors[:, k], return_inverse=True)
        if len(values) < 2:
            raise ValueError(f"train_factors column {k} takes a single value: there is nothing to predict")
        encoded.append((values, y_train))
    fits = _l1_logistic_regressions(x_train, [y for _, y in encoded], strength, iterations)
    importance, accuracy = [], []
    for k, ((values, _), (weight, bias)) in enumerate(zip(encoded, fits)):
        importance.append(weight.abs().mean(1))
        predicted = values[(x_test @ weight + bias).argmax(1)]
        accuracy.append(float((predicted == test_factors[:, k]).double().mean()))
    R = torch.stack(importance, dim=1)
    disentanglement, completeness = dci_scores(R)
    return DCIResult(disentanglement, completeness, torch.tensor(accuracy), R)
