"""Q-Score (thesis chapter 3): which coordinates of a representation matter, and how confidently a
sample uses them — without labels.

For every sample the representation is L2-normalised, and a coordinate is *highly activating* when it
stands ε standard deviations above the sample's own mean (SCIENCE.md section 4):

    L_i = {j : h_ij > μ_i + ε σ_i}                     (μ_i, σ_i over the r coordinates, ddof = 0)
    A_j = (100 / N) Σ_i 1[j ∈ L_i]                      activation frequency, percent
    D   = {j : A_j > 0, P50(A⁺) <= A_j <= P95(A⁺)}      discriminative features (A⁺: the A_j > 0)
    Q_i = mean over j ∈ L_i ∩ D of (h_ij − μ_i),        Q_i = 0 when L_i ∩ D is empty

Features that fire for almost every sample (above P95) carry little information about any one of them;
features that fire rarely (below P50) are noise-like; the band in between is discriminative.  A sample
with a high Q has a few strong discriminative coordinates — the thesis finds such samples are more
often classified correctly.

``qscore_penalty`` is the fine-tuning regulariser of eq. 3.3: it raises Q of the batch's low-Q samples
and shrinks the columns with the largest L1 norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from course_utils.inputs import check_features


@dataclass
class QScoreResult:
    """Q-Score of N samples with r features.

    Attributes:
        q: float [N]; 0 for samples whose L_i ∩ D is empty.
        highly_active: bool [N, r], the sets L_i.
        frequency: float [r], A_j in percent.
        discriminative: bool [r], the set D.
        empty: bool [N], samples with an empty L_i ∩ D (their Q is 0 by definition, not measured).
        bounds: (P_low, P_high) of A⁺, the frequency band of D.
    """

    q: torch.Tensor
    highly_active: torch.Tensor
    frequency: torch.Tensor
    discriminative: torch.Tensor
    empty: torch.Tensor
    bounds: tuple[float, float]

    @property
    def n_empty(self) -> int:
        """How many samples have an empty L_i ∩ D."""
        return int(self.empty.sum())

    @property
    def empty_share(self) -> float:
        """Share of samples with an empty L_i ∩ D (report it next to any Q-Score result)."""
        return self.n_empty / max(1, self.empty.numel())


def _check_representations(h: torch.Tensor, name: str) -> None:
    """The input guard's feature check (a float, finite [N, r] with N >= 1; an empty batch raises) plus
    what Q-Score itself needs: r >= 2 coordinates for a mean and a std."""
    check_features(h, name)
    if h.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 features per sample (r >= 2) for a mean and a std, "
                         f"got r = {h.shape[1]}")


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (standard deviations above the sample mean), got {eps}")


def _normalised_stats(h: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised rows, their mean μ [N, 1] and the threshold μ + ε σ [N, 1] (σ with ddof = 0)."""
    normalised = F.normalize(h, dim=1)
    mean = normalised.mean(1, keepdim=True)
    std = normalised.std(1, correction=0, keepdim=True)
    return normalised, mean, mean + eps * std


def qscore(H: torch.Tensor, eps: float = 4.0, percentiles: tuple[float, float] = (50, 95)) -> QScoreResult:
    """Q-Score, highly activating sets, activation frequencies and discriminative features.

    Args:
        H: representations float [N, r] (raw h; normalised inside).
        eps: ε, standard deviations above the sample mean for "highly activating" (thesis: 4 at r = 2048;
            smaller r needs a smaller ε, see notebook 04).
        percentiles: the (low, high) percentiles of A⁺ bounding D, inclusive, linear interpolation.
    Returns:
        ``QScoreResult``; all tensors on the CPU.
    """
    _check_representations(H, "H")
    _check_eps(eps)
    low, high = percentiles
    if not 0 <= low <= high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 100, got {percentiles}")
    H = H.detach().cpu()
    H = H if H.dtype == torch.float64 else H.float()
    normalised, mean, threshold = _normalised_stats(H, eps)
    active = normalised > threshold  # [N, r]: the sets L_i
    frequency = active.sum(0).to(H.dtype) * (100.0 / H.shape[0])  # A_j
    ever = frequency > 0
    if ever.any():
        band = torch.quantile(frequency[ever].double(), torch.tensor([low, high], dtype=torch.float64) / 100)
        lower, upper = float(band[0]), float(band[1])
        discriminative = ever & (frequency >= lower) & (frequency <= upper)
    else:
        lower = upper = float("nan")
        discriminative = ever
    chosen = active & discriminative  # L_i ∩ D
    count = chosen.sum(1)
    total = torch.where(chosen, normalised - mean, torch.zeros((), dtype=H.dtype)).sum(1)
    empty = count == 0
    q = torch.where(empty, torch.zeros((), dtype=H.dtype), total / count.clamp(min=1))
    return QScoreResult(q, active, frequency, discriminative, empty, (lower, upper))


def qscore_penalty(h: torch.Tensor, discriminative: torch.Tensor, eps: float = 4.0, lambda1: float = 1e-4,
                   lambda2: float = 1e-4) -> torch.Tensor:
    """The Q-Score regulariser of eq. 3.3, a penalty to add to the SimCLR loss and minimise.

        P = −λ1 (1/B) Σ_i 1[Q_i < α] Q_i  +  λ2 Σ_k 1[‖H_{*,k}‖₁ > β] ‖H_{*,k}‖₁

    with H the L2-normalised batch, α the batch mean of Q_i and β the mean column L1 norm.  The sets
    L_i, the thresholds α and β and D (computed beforehand on the population) are fixed within a step;
    the values carry the gradient, so minimising P raises the Q of the low-Q samples and shrinks the
    largest columns.

    Args:
        h: raw batch of representations [B, r], with gradient.
        discriminative: bool [r], the D of ``qscore`` on the population.
    Returns:
        scalar tensor.
    """
    _check_representations(h, "h")
    _check_eps(eps)
    if discriminative.shape != (h.shape[1],) or discriminative.dtype != torch.bool:
        raise ValueError(f"discriminative must be a bool mask [r] = [{h.shape[1]}] (qscore(...).discriminative), "
                         f"got {discriminative.dtype} {tuple(discriminative.shape)}")
    normalised, mean, threshold = _normalised_stats(h.float(), eps)
    chosen = (normalised.detach() > threshold.detach()) & discriminative.to(h.device)  # L_i ∩ D, fixed
    count = chosen.sum(1)
    q = ((normalised - mean) * chosen).sum(1) / count.clamp(min=1)  # 0 where the set is empty
    low_q = (q < q.detach().mean()).float()
    columns = normalised.abs().sum(0)  # ‖H_{*,k}‖₁ [r]
    large = (columns > columns.detach().mean()).float()
    return -lambda1 * (low_q * q).mean() + lambda2 * (large * columns).sum()
