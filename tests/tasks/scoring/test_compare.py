import numpy as np
import pytest

from tasks.config import SpecError
from tasks.scoring import compare
from tasks.scoring.compare import (
    BootstrapConfig,
    Variant,
    better_variant,
    check_significance_level,
    check_variants,
    holm_rejections,
    paired_difference,
    sign_test_p_value,
    wilson_interval,
)


def test_check_variants_names_the_problem():
    with pytest.raises(SpecError, match="at least two"):
        check_variants([Variant(name="a")])
    with pytest.raises(SpecError, match="names must be unique"):
        check_variants([Variant(name="a"), Variant(name="a")])


# ---------------------------------------------------------------- statistics, against values worked by hand


def test_wilson_interval_of_7_in_10():
    # p = 0.7, z² = 3.8415: centre (0.7 + 0.19207) / 1.38415 = 0.64449, half-width 1.41600 · √0.030604 = 0.24772
    low, high = wilson_interval(7, 10)
    assert (low, high) == pytest.approx((0.39677, 0.89220), abs=5e-5)
    assert wilson_interval(6 + 2 / 2, 10) == (low, high)  # 6 wins, 2 ties counted half: the same
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_sign_test_of_9_wins_and_1_loss():
    # two-sided: 2 · (C(10,0) + C(10,1)) / 2¹⁰ = 22 / 1024
    assert sign_test_p_value(9, 1) == 22 / 1024 == pytest.approx(0.0215, abs=5e-5)
    assert sign_test_p_value(1, 9) == 22 / 1024
    assert sign_test_p_value(5, 5) == 1.0 and sign_test_p_value(0, 0) == 1.0
    assert sign_test_p_value(10, 0) == 2 / 1024


def test_the_sign_test_in_log_space_agrees_with_the_exact_sum(monkeypatch):
    exact = [sign_test_p_value(k, 3000 - k) for k in (1400, 1450, 1500)]
    monkeypatch.setattr(compare, "EXACT_SIGN_TEST_LIMIT", 0)
    assert [sign_test_p_value(k, 3000 - k) for k in (1400, 1450, 1500)] == pytest.approx(exact, rel=1e-9)
    assert 0 < exact[0] < 0.001 and exact[2] == 1.0


def test_the_paired_bootstrap_interval_holds_the_true_difference_and_is_reproducible_by_its_seed():
    rng = np.random.default_rng(42)
    a = rng.normal(5.0, 2.0, 400)
    b = a + 0.5 + rng.normal(0.0, 1.0, 400)  # the true mean difference is 0.5
    seeded = BootstrapConfig(resamples=2000, seed=7)
    result = paired_difference(list(a), list(b), seeded)
    assert result.diff_ci95_low < 0.5 < result.diff_ci95_high
    assert result.diff_ci95_low < result.mean_diff < result.diff_ci95_high
    # about ±1.96 · sd/√n of the differences (sd 1): a bootstrap of the mean agrees with the normal theory here
    assert result.diff_ci95_high - result.diff_ci95_low == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert paired_difference(list(a), list(b), seeded) == result
    assert paired_difference(list(a), list(b), BootstrapConfig(resamples=2000, seed=8)) != result
    assert (result.pairs, result.b_higher + result.a_higher) == (400, 400) and result.p_value < 1e-6


def test_a_paired_difference_counts_by_hand():
    result = paired_difference([1, 2, 3, 4], [2, 2, 5, 3], BootstrapConfig(resamples=200, seed=0))
    assert (result.mean_a, result.mean_b, result.mean_diff) == (2.5, 3.0, 0.5)
    assert (result.b_higher, result.a_higher, result.p_value) == (2, 1, 1.0)  # one tie left out: 2·(1+3)/8 > 1
    assert -1.0 <= result.diff_ci95_low <= result.diff_ci95_high <= 2.0  # within the differences' own range
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0], [], BootstrapConfig())


def test_better_variant_follows_the_direction_and_holm_steps_down():
    assert better_variant("higher", "a", "b", 0.2) == "b" and better_variant("lower", "a", "b", 0.2) == "a"
    assert better_variant("lower", "a", "b", -0.2) == "b" and better_variant("none", "a", "b", 5.0) is None
    # sorted: 0.01 ≤ 0.05/4 rejected; 0.03 > 0.05/3 stops there
    assert holm_rejections([0.01, 0.04, 0.03, 0.5], 0.05) == [True, False, False, False]
    assert holm_rejections([0.001, 0.01, 0.02], 0.05) == [True, True, True]


def test_the_significance_level_is_checked():
    check_significance_level(0.01)
    with pytest.raises(SpecError, match="significance_level: must be between 0 and 1"):
        check_significance_level(5)
