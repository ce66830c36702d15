"""Quality statistics checked against published and hand-computed values, not against themselves."""

from __future__ import annotations

import math

import pytest

from edgequant.bench.quality_stats import (jaccard, mcnemar_exact, normalize_item, paired_degradation,
                                           wilson_interval)

# ---------------------------------------------------------------------------
# Wilson score interval

# Newcombe (1998), "Two-sided confidence intervals for the single proportion:
# comparison of seven methods", Stat Med 17:857-872, Table II, method 3
# (score interval without continuity correction), 95% level.
NEWCOMBE = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize("x, n, low, high", NEWCOMBE)
def test_wilson_matches_newcombe_1998(x, n, low, high):
    got_low, got_high = wilson_interval(x, n)
    assert got_low == pytest.approx(low, abs=6e-5)
    assert got_high == pytest.approx(high, abs=6e-5)


def _score_test_bound(x: int, n: int, z: float, upper: bool) -> float:
    """Invert the score test by bisection: the p where |x/n - p| = z * sqrt(p(1-p)/n)."""
    phat = x / n
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(phat - mid) <= z * math.sqrt(mid * (1 - mid) / n)
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("x, n, z", [(3, 10, 1.959964), (47, 50, 1.959964), (500, 1000, 2.575829),
                                      (1, 7, 1.644854)])
def test_wilson_is_the_inverted_score_test(x, n, z):
    low, high = wilson_interval(x, n, z=z)
    assert low == pytest.approx(_score_test_bound(x, n, z, upper=False), abs=1e-9)
    assert high == pytest.approx(_score_test_bound(x, n, z, upper=True), abs=1e-9)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # all successes: the lower bound solves 1 - p = z * sqrt(p(1-p)/n), i.e. p = n / (n + z^2)
    low, high = wilson_interval(29, 29)
    assert high == 1.0 and low == pytest.approx(29 / (29 + 1.959964 ** 2), abs=1e-12)
    low, high = wilson_interval(0, 29)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (29 + 1.959964 ** 2), abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(-1, 4)


# ---------------------------------------------------------------------------
# McNemar exact


@pytest.mark.parametrize("b, c, expected", [
    (7, 1, 2 * (1 + 8) / 2 ** 8),               # 0.0703125
    (1, 7, 2 * (1 + 8) / 2 ** 8),               # symmetric
    (10, 0, 2 * 1 / 2 ** 10),                   # 0.001953125
    (3, 5, 2 * (1 + 8 + 28 + 56) / 2 ** 8),     # 0.7265625
    (12, 1, 2 * (1 + 13) / 2 ** 13),            # 0.00341796875
    (4, 4, 1.0),                                # 2 * 163/256 > 1, capped
    (0, 0, 1.0),
    (1, 0, 1.0),                                # 2 * 1/2
])
def test_mcnemar_exact_against_hand_computed_binomial_sums(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def _binomial_two_sided(b: int, c: int) -> float:
    """Independent route: sum the probabilities of all outcomes no more likely than the observed one."""
    n = b + c
    if n == 0:
        return 1.0
    probs = [math.comb(n, k) * 0.5 ** n for k in range(n + 1)]
    observed = probs[b]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-12)))


@pytest.mark.parametrize("b", range(0, 25, 3))
@pytest.mark.parametrize("c", range(0, 25, 4))
def test_mcnemar_exact_agrees_with_probability_ordering(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_binomial_two_sided(b, c), rel=1e-9)


def test_mcnemar_large_counts_stay_finite():
    p = mcnemar_exact(700, 600)
    assert 0.0 < p < 0.01


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


# ---------------------------------------------------------------------------
# paired degradation


def _outcomes(both_ok: int, b: int, c: int, both_fail: int):
    ref = [True] * both_ok + [True] * b + [False] * c + [False] * both_fail
    rung = [True] * both_ok + [False] * b + [True] * c + [False] * both_fail
    return ref, rung


def test_significant_degradation():
    ref, rung = _outcomes(80, 12, 1, 7)  # n = 100; rung 11 cases worse
    d = paired_degradation(ref, rung)
    assert (d.b, d.c, d.n) == (12, 1, 100)
    assert d.delta_pp == pytest.approx(-11.0)
    assert d.p_value == pytest.approx(2 * 14 / 2 ** 13)
    assert d.significant
    assert d.label == "\u221211.0 pp, significant (p=0.0034)"


def test_degradation_within_noise():
    ref, rung = _outcomes(40, 6, 2, 12)  # n = 60
    d = paired_degradation(ref, rung)
    assert d.delta_pp == pytest.approx(-400 / 60)
    assert d.p_value == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert not d.significant
    assert d.label == "\u22126.7 pp, within noise (p=0.29)"


def test_improvement_and_no_change_labels():
    ref, rung = _outcomes(10, 0, 3, 0)
    assert paired_degradation(ref, rung).label == "+23.1 pp, within noise (p=0.25)"
    same = [True, False, True]
    d = paired_degradation(same, same)
    assert d.delta_pp == 0.0 and d.p_value == 1.0 and d.label == "0.0 pp, within noise (p=1)"
    assert paired_degradation([], []).n == 0


def test_alpha_is_respected():
    ref, rung = _outcomes(20, 7, 1, 0)  # p = 0.0703125
    assert not paired_degradation(ref, rung).significant
    assert paired_degradation(ref, rung, alpha=0.1).significant


def test_tiny_p_values_are_shown_as_a_bound():
    ref, rung = _outcomes(0, 30, 0, 0)
    assert paired_degradation(ref, rung).label == "\u2212100.0 pp, significant (p<0.001)"


def test_paired_lengths_must_match():
    with pytest.raises(ValueError):
        paired_degradation([True, False], [True])


# ---------------------------------------------------------------------------
# Jaccard


def test_jaccard_normalizes_items():
    assert normalize_item("  Severe   Malaria. ") == "severe malaria"
    assert normalize_item("- (meningitis)") == "meningitis"
    assert jaccard(["Malaria", "meningitis."], ["malaria ", "Typhoid"]) == pytest.approx(1 / 3)
    assert jaccard(["Severe  malaria;"], ["severe malaria"]) == 1.0
    assert jaccard(["a", "A", "b"], ["a"]) == pytest.approx(1 / 2)


def test_jaccard_empty_sets():
    assert jaccard([], []) == 1.0
    assert jaccard(["", " . "], []) == 1.0
    assert jaccard(["malaria"], []) == 0.0


# ---------------------------------------------------------------------------
# Newcombe's hybrid score interval for paired proportions, and non-inferiority

from edgequant.bench.quality_stats import (cases_needed, combined_verdict, kld_statistics,  # noqa: E402
                                           llama_percentile, newcombe_paired_interval, non_inferiority,
                                           non_inferiority_table, paired_table)


def test_newcombe_paired_matches_the_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: complete
    # response before and after consolidation therapy (Cavo et al. 2012), a=59 b=6 c=16 d=80:
    # Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046.
    theta, low, high = newcombe_paired_interval(59, 6, 16, 80)
    assert theta == pytest.approx(-0.0621, abs=5e-5)
    assert low == pytest.approx(-0.1186, abs=5e-5)
    assert high == pytest.approx(-0.0046, abs=5e-5)


def test_newcombe_paired_by_hand_without_correlation():
    # a=5 b=5 c=0 d=0 (n=10): p1 = 10/10, p2 = 5/10; one margin is 0, so phi = 0.
    # Wilson 10/10 = (10/13.8416, 1) = (0.722460, 1); Wilson 5/10: centre 0.69208, half
    # 1.96*sqrt(0.025 + 0.009604) = 0.364603, over 1.38416 -> (0.236590, 0.763410).
    # low = 0.5 - sqrt(0.277540^2 + 0.263410^2) = 0.5 - 0.382640 = 0.117360; high = 0.5 + 0.263410.
    theta, low, high = newcombe_paired_interval(5, 5, 0, 0)
    assert theta == 0.5
    assert low == pytest.approx(0.117360, abs=2e-5)
    assert high == pytest.approx(0.763410, abs=2e-5)


def test_paired_table_counts_each_cell():
    ref = [True, True, False, False, True]
    rung = [True, False, True, False, False]
    # both right: case 0; rung right only: case 2; reference right only: 1 and 4; both wrong: 3
    assert paired_table(ref, rung) == (1, 1, 2, 1)


def test_non_inferiority_verdicts():
    # identical perfect answers on 25 cases: the Wilson bound of 25/25 is 25/28.8416 = 0.8668, so the
    # interval reaches -13.3 pp: the suite cannot show "no worse than 5 points".  By hand the same rates
    # settle it when n/(n + 1.96^2) > 0.95, i.e. n > 72.99: 73 cases.
    same = non_inferiority([True] * 25, [True] * 25, 0.05)
    assert same.verdict == "INCONCLUSIVE" and same.delta == 0
    assert same.low == pytest.approx(-(1 - 25 / (25 + 1.959964 ** 2)), abs=1e-9)
    assert same.needed == 73 and "about 73 cases" in same.label
    # 1000 identical perfect answers: the interval stays within 0.4 pp
    assert non_inferiority([True] * 1000, [True] * 1000, 0.05).verdict == "PASS"
    # a rung that gets every case wrong that the reference got right
    broke = non_inferiority([True] * 25, [False] * 25, 0.05)
    assert broke.verdict == "FAIL" and broke.delta == -1.0 and broke.needed is None
    assert broke.high < -0.05


def test_non_inferiority_table_and_cases_needed_agree():
    # 20 of 25 right at the reference, 18 at the rung (two right -> wrong): -8 pp, inconclusive;
    # at 2x, 4x, ... the same rates narrow the interval until its upper bound falls below -5 pp
    ni = non_inferiority_table(18, 0, 2, 5, margin=0.05)
    assert ni.verdict == "INCONCLUSIVE" and ni.delta == pytest.approx(-0.08)
    n = ni.needed
    s = n / 25
    assert newcombe_paired_interval(18 * s, 0, 2 * s, 5 * s)[2] < -0.05
    s = (n - 1) / 25
    assert newcombe_paired_interval(18 * s, 0, 2 * s, 5 * s)[2] >= -0.05
    assert cases_needed(0, 0, 0, 0, 0.05) is None
    with pytest.raises(ValueError):
        non_inferiority_table(1, 0, 0, 0, margin=1.0)


def test_combined_verdict():
    assert combined_verdict(["PASS", "INCONCLUSIVE", "PASS"]) == "INCONCLUSIVE"
    assert combined_verdict(["PASS", "INCONCLUSIVE", "FAIL"]) == "FAIL"
    assert combined_verdict(["PASS"]) == "PASS"


# ---------------------------------------------------------------------------
# llama-perplexity's KLD statistics


def test_llama_percentile_by_hand():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert llama_percentile(values, 0.9) == pytest.approx(4.6)      # position 3.6: 0.4*4 + 0.6*5
    assert llama_percentile(values, 0.5) == 3.0
    assert llama_percentile(values, 0.999) == pytest.approx(4.996)  # position 3.996
    assert llama_percentile(values, 1.0) == 5.0 and llama_percentile(values, 0.0) == 1.0


def test_kld_statistics_by_hand():
    st = kld_statistics([0.1, 0.4, 0.2, 0.3], [0.1, -0.2, 0.2, 0.0], [True, False, True, True])
    # sorted 0.1 0.2 0.3 0.4
    assert st["mean_kld"] == pytest.approx(0.25)
    assert st["median_kld"] == pytest.approx(0.25)          # even count: mean of 0.2 and 0.3
    assert st["p90_kld"] == pytest.approx(0.37)             # position 2.7: 0.3*0.3 + 0.7*0.4
    assert st["p95_kld"] == pytest.approx(0.385)            # position 2.85
    assert st["p99_kld"] == pytest.approx(0.397)            # position 2.97
    assert st["p999_kld"] == pytest.approx(0.3997)          # position 2.997
    assert st["max_kld"] == 0.4
    assert st["rms_dp"] == pytest.approx(0.15)              # sqrt((0.01 + 0.04 + 0.04 + 0) / 4)
    assert st["same_top_p"] == 0.75
    odd = kld_statistics([3.0, 1.0, 2.0], None, [])
    assert odd["median_kld"] == 2.0 and "rms_dp" not in odd and "same_top_p" not in odd
    assert kld_statistics([], None, []) == {}
