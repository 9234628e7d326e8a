"""MIG and DCI against independent computations and synthetic codes whose answer is known."""

import math

import pytest
import torch
from sklearn.metrics import mutual_info_score

from course_utils.explain.disentangle import (
    dci, dci_scores, discretize, entropy, l1_logistic_regression, mig, mutual_information,
)


@pytest.fixture(scope="module")
def factors() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.stack([torch.randint(0, 4, (2000,), generator=generator),
                        torch.randint(0, 3, (2000,), generator=generator)], dim=1)  # [N, K = 2]


def test_mutual_information_and_entropy_match_scikit_learn_and_the_formula():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 5, (500,), generator=generator), torch.randint(0, 3, (500,), generator=generator)
    b = torch.where(torch.rand(500, generator=generator) < 0.5, a % 3, b)  # dependent
    assert mutual_information(a, b) == pytest.approx(mutual_info_score(a.numpy(), b.numpy()), rel=1e-9)
    assert entropy(torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])) == pytest.approx(
        -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert mutual_information(a, a) == pytest.approx(entropy(a))


def test_discretize_uses_equal_width_bins_per_dimension():
    codes = torch.tensor([[0.0, 10.0], [0.49, 10.0], [0.51, 10.0], [1.0, 10.0]])
    assert discretize(codes, bins=2).tolist() == [[0, 0], [0, 0], [1, 0], [1, 0]]


def test_mig_is_one_for_one_dimension_per_factor_and_zero_for_a_duplicated_one(factors):
    noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(2))
    separate = torch.cat([factors.float(), noise], dim=1)  # z0 = factor 0, z1 = factor 1, z2 noise
    result = mig(separate, factors)
    assert result.score == pytest.approx(1.0, abs=0.02)
    duplicated = torch.cat([factors[:, :1].float(), factors[:, :1].float(), factors[:, 1:].float()], dim=1)
    result = mig(duplicated, factors)
    assert result.per_factor[0] == pytest.approx(0.0, abs=1e-9)  # two dimensions hold factor 0 equally
    assert result.per_factor[1] == pytest.approx(1.0, abs=0.02)
    assert result.mutual_information.shape == (3, 2)


def test_dci_scores_on_hand_computed_importance_matrices():
    assert dci_scores(torch.eye(3)) == pytest.approx((1.0, 1.0))
    assert dci_scores(torch.ones(3, 3)) == pytest.approx((0.0, 0.0), abs=1e-12)
    # R = [[1, 1], [0, 3]]: code 0 splits evenly (D_0 = 0, weight 2/5), code 1 serves factor 1 alone
    # (D_1 = 1, weight 3/5) -> D = 0.6.  Factor 0 is held by code 0 alone (C = 1); factor 1 by codes 0 and 1
    # in shares 1/4 and 3/4 -> C = 1 - H([1/4, 3/4]) / log 2.
    h = -(1 / 4 * math.log(1 / 4) + 3 / 4 * math.log(3 / 4)) / math.log(2)
    d, c = dci_scores(torch.tensor([[1.0, 1.0], [0.0, 3.0]]))
    assert d == pytest.approx(0.6) and c == pytest.approx((1 + (1 - h)) / 2)


def test_l1_logistic_regression_meets_the_lasso_optimality_conditions():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(400, 6, generator=generator).double()
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(400, generator=generator) > 0).long() + (x[:, 2] > 1).long()
    strength = 0.02
    weight, bias = l1_logistic_regression(x, y, strength, iterations=1000)
    residual = (torch.softmax(x @ weight + bias, 1) - torch.nn.functional.one_hot(y, 3).double()) / len(x)
    gradient = x.T @ residual  # of the mean cross-entropy
    active = weight != 0
    assert active.any() and (~active).any()  # the penalty zeroes some weights and keeps others
    assert torch.allclose(gradient[active], -strength * weight[active].sign(), atol=1e-4)  # stationarity
    assert (gradient[~active].abs() <= strength + 1e-4).all()  # subgradient condition at zero
    assert residual.sum(0).abs().max() < 1e-5  # the unpenalised bias is optimal


def test_dci_of_codes_that_copy_the_factors_is_high_and_of_mixed_codes_low(factors):
    generator = torch.Generator().manual_seed(3)
    one_hot = torch.cat([torch.nn.functional.one_hot(factors[:, 0], 4), torch.nn.functional.one_hot(factors[:, 1], 3)],
                        dim=1).float()
    clean = one_hot + 0.05 * torch.randn(one_hot.shape, generator=generator)
    good = dci(clean[:1500], factors[:1500], clean[1500:], factors[1500:])
    assert good.disentanglement > 0.9 and good.informativeness.min() > 0.95
    mixing = torch.randn(7, 7, generator=generator)
    mixed = dci((clean @ mixing)[:1500], factors[:1500], (clean @ mixing)[1500:], factors[1500:])
    assert mixed.disentanglement < good.disentanglement - 0.3
    assert mixed.importance.shape == (7, 2)


def test_dci_fits_every_factor_together_exactly_as_one_regression_each(factors):
    generator = torch.Generator().manual_seed(5)
    codes = torch.cat([factors.float(), torch.randn(len(factors), 3, generator=generator)], dim=1)
    result = dci(codes[:1500], factors[:1500], codes[1500:], factors[1500:], iterations=200)
    standardised = (codes[:1500].double() - codes[:1500].double().mean(0)) / codes[:1500].double().std(0)
    for k in range(factors.shape[1]):
        weight, _ = l1_logistic_regression(standardised, factors[:1500, k], 0.01, iterations=200)
        assert torch.allclose(result.importance[:, k], weight.abs().mean(1), atol=1e-10)


def test_mig_information_matrix_equals_mutual_information_per_dimension(factors):
    codes = torch.randn(len(factors), 4, generator=torch.Generator().manual_seed(6)) + factors[:, :1]
    result = mig(codes, factors, bins=7)
    binned = discretize(codes, 7)
    expected = torch.tensor([[mutual_information(binned[:, i], factors[:, k]) for k in range(factors.shape[1])]
                             for i in range(codes.shape[1])], dtype=torch.float64)
    assert torch.allclose(result.mutual_information, expected, atol=1e-12)


def test_bad_input_raises_clear_errors(factors):
    codes = torch.randn(2000, 3)
    with pytest.raises(ValueError, match="integer factor values"):
        mig(codes, factors.float())
    with pytest.raises(ValueError, match="one row per code"):
        mig(codes[:10], factors)
    with pytest.raises(ValueError, match="single value"):
        mig(codes, torch.zeros(2000, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="D >= 2"):
        mig(codes[:, :1], factors)
    with pytest.raises(ValueError, match="NaN"):
        mig(codes.masked_fill(codes > 2, float("nan")), factors)
    with pytest.raises(ValueError, match="non-negative"):
        dci_scores(-torch.eye(2))
