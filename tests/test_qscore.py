"""Q-Score against an independent per-sample implementation of SCIENCE.md section 4, and its penalty."""

import numpy as np
import pytest
import torch

from course_utils.explain.qscore import qscore, qscore_penalty


def _reference(H: np.ndarray, eps: float, percentiles=(50, 95)):
    """SCIENCE.md section 4, one sample at a time, in numpy float64."""
    n, r = H.shape
    sets = []
    for row in H:
        x = row / np.linalg.norm(row)
        mu, sigma = x.mean(), x.std()  # numpy's std is ddof = 0
        sets.append({j for j in range(r) if x[j] > mu + eps * sigma})
    A = np.array([100.0 * sum(j in s for s in sets) / n for j in range(r)])
    positive = A[A > 0]
    lo, hi = np.percentile(positive, percentiles)  # linear interpolation
    D = {j for j in range(r) if A[j] > 0 and lo <= A[j] <= hi}
    q = []
    for row, s in zip(H, sets):
        x = row / np.linalg.norm(row)
        chosen = sorted(s & D)
        q.append(np.mean([x[j] - x.mean() for j in chosen]) if chosen else 0.0)
    return np.array(q), sets, A, D


def _heavy_tailed(n: int, r: int, seed: int) -> torch.Tensor:
    """Representations with a few strong coordinates per sample, like ReLU features."""
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(n, r, generator=g, dtype=torch.float64) * 0.2
    hot = torch.randint(0, r, (n, 3), generator=g)
    H.scatter_(1, hot, 1.0 + torch.rand(n, 3, generator=g, dtype=torch.float64) * 3)
    return H


@pytest.mark.parametrize("n, r, eps", [(200, 16, 2.0), (300, 40, 3.0), (150, 64, 4.0)])
def test_qscore_equals_a_per_sample_implementation_of_the_formulas(n, r, eps):
    H = _heavy_tailed(n, r, seed=r)
    result = qscore(H, eps=eps)
    q, sets, A, D = _reference(H.numpy(), eps)
    assert result.highly_active.tolist() == [[j in s for j in range(r)] for s in sets]
    np.testing.assert_allclose(result.frequency.numpy(), A, atol=1e-12)
    assert set(result.discriminative.nonzero().flatten().tolist()) == D
    np.testing.assert_allclose(result.q.numpy(), q, atol=1e-12)
    assert 0 < len(D) < r and (result.q > 0).any()  # a non-trivial case, so the comparison can fail


def test_the_percentile_band_is_inclusive_and_ignores_never_active_features():
    # Frequencies by construction: features 0-3 never active, 4-13 active in 1..10 of 100 samples
    # (one strong coordinate per sample; the 45 flat rows have no active feature).
    n, r = 100, 14
    H = torch.ones((n, r), dtype=torch.float64)
    owners = torch.cat([torch.full((k + 1,), 4 + k) for k in range(10)])  # 55 samples
    H[: len(owners)] = 0.01
    H[torch.arange(len(owners)), owners] = 10.0
    result = qscore(H, eps=1.0)
    A = result.frequency
    assert (A[:4] == 0).all() and torch.allclose(A[4:], torch.arange(1, 11, dtype=torch.float64))
    lo, hi = np.percentile(np.arange(1, 11), [50, 95])  # 5.5 and 9.55 (linear)
    assert result.bounds == pytest.approx((lo, hi))
    expected = [(0 < a and lo <= a <= hi) for a in A.tolist()]
    assert result.discriminative.tolist() == expected
    inclusive = qscore(H, eps=1.0, percentiles=(0, 100))  # the band covers every ever-active feature, ends included
    assert inclusive.discriminative.tolist() == [False] * 4 + [True] * 10


def test_samples_with_an_empty_set_get_zero_and_are_counted():
    H = _heavy_tailed(200, 32, seed=0)
    H[:7] = 1.0  # flat rows: sigma = 0, nothing stands above the mean
    result = qscore(H, eps=2.0)
    assert result.empty[:7].all() and (result.q[:7] == 0).all()
    q, sets, A, D = _reference(H.numpy(), 2.0)
    expected_empty = [not (s & D) for s in sets]
    assert result.empty.tolist() == expected_empty
    assert result.n_empty == sum(expected_empty) >= 7
    assert result.empty_share == pytest.approx(result.n_empty / 200)
    assert torch.isfinite(result.q).all()


def test_a_huge_eps_leaves_every_set_empty_without_nans():
    result = qscore(_heavy_tailed(50, 16, seed=1), eps=100.0)
    assert result.n_empty == 50 and (result.q == 0).all() and not result.discriminative.any()


@pytest.mark.parametrize("H, message", [
    (torch.rand(10), r"matrix \[N, D\]"),
    (torch.rand(10, 1), "r >= 2"),
    (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), "NaN"),
    (torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), "inf"),
    (torch.ones(4, 3, dtype=torch.int64), "floating point"),
])
def test_bad_input_raises_a_clear_error(H, message):
    with pytest.raises(ValueError, match=message):
        qscore(H)


def test_bad_eps_or_percentiles_raise():
    with pytest.raises(ValueError, match="eps"):
        qscore(torch.rand(10, 4), eps=0)
    with pytest.raises(ValueError, match="percentiles"):
        qscore(torch.rand(10, 4), percentiles=(95, 50))


def _penalty_reference(h: torch.Tensor, D: torch.Tensor, eps: float, l1: float, l2: float) -> float:
    H = (h / h.norm(dim=1, keepdim=True)).double()
    qs = []
    for x in H:
        mu, sigma = x.mean(), x.std(correction=0)
        chosen = [j for j in range(len(x)) if x[j] > mu + eps * sigma and D[j]]
        qs.append(float(np.mean([float(x[j] - mu) for j in chosen])) if chosen else 0.0)
    alpha = np.mean(qs)
    columns = H.abs().sum(0).numpy()
    beta = columns.mean()
    return -l1 * np.mean([q for q in qs if q < alpha] + [0.0] * sum(q >= alpha for q in qs)) \
        + l2 * sum(c for c in columns if c > beta)


def test_penalty_value_equals_the_formula():
    h = _heavy_tailed(64, 24, seed=3).float()
    D = qscore(h, eps=2.0).discriminative
    value = qscore_penalty(h, D, eps=2.0, lambda1=0.5, lambda2=0.01)
    assert value.item() == pytest.approx(_penalty_reference(h, D, 2.0, 0.5, 0.01), rel=1e-5)


def test_minimising_the_penalty_raises_low_q_and_shrinks_large_columns():
    h = _heavy_tailed(64, 24, seed=4).float()
    D = qscore(h, eps=2.0).discriminative
    before = qscore(h, eps=2.0)
    low = before.q < before.q[~before.empty].mean()
    low &= ~before.empty
    # Q term alone: a gradient step raises the Q of the low-Q samples.
    x = h.clone().requires_grad_()
    qscore_penalty(x, D, eps=2.0, lambda1=1.0, lambda2=0.0).backward()
    stepped = (x - 0.05 * x.grad).detach()
    after = qscore(stepped, eps=2.0)
    assert low.any() and (after.q[low] - before.q[low]).mean() > 0
    # Column term alone: the columns above the mean L1 norm shrink.
    x = h.clone().requires_grad_()
    qscore_penalty(x, D, eps=2.0, lambda1=0.0, lambda2=1.0).backward()
    stepped = (x - 0.05 * x.grad).detach()
    columns = torch.nn.functional.normalize(h, dim=1).abs().sum(0)
    large = columns > columns.mean()
    new_columns = torch.nn.functional.normalize(stepped, dim=1).abs().sum(0)
    assert large.any() and (new_columns[large] < columns[large]).all()


def test_penalty_rejects_a_mask_of_the_wrong_size():
    with pytest.raises(ValueError, match="bool mask"):
        qscore_penalty(torch.rand(8, 6), torch.ones(5, dtype=torch.bool))
