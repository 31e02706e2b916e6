"""Metrics: known values, standard errors, pass@k's unbiased estimator, and which way is better."""

import math

import pytest

from aifab.evaluate import metrics as M


def test_mean_and_its_standard_error() -> None:
    v = M.mean([1.0, 0.0, 1.0, 1.0])
    assert v.value == 0.75 and v.examples == 4
    # sample standard deviation sqrt(0.25) / sqrt(4)
    assert v.stderr == pytest.approx(math.sqrt((3 * 0.0625 + 0.5625) / 3) / 2)
    assert M.mean([0.3]).stderr is None
    with pytest.raises(ValueError):
        M.mean([])


def test_ratio_weighs_long_examples_more_and_has_a_delta_method_error() -> None:
    v = M.ratio([10.0, 1.0], [10.0, 10.0])
    assert v.value == pytest.approx(11 / 20)
    assert v.stderr is not None and v.stderr > 0
    assert M.ratio([2.0, 4.0], [1.0, 2.0]).stderr == pytest.approx(0.0)  # every example has the same ratio
    with pytest.raises(ValueError):
        M.ratio([1.0], [0.0])


def test_perplexity_and_bits_per_byte() -> None:
    nll = [math.log(4) * 3, math.log(4) * 5]  # every token had probability 1/4
    assert M.perplexity(nll, [3, 5]).value == pytest.approx(4.0)
    assert M.bits_per_byte(nll, [3, 5]).value == pytest.approx(2.0)  # 2 bits per token, one byte per token
    assert M.bits_per_byte(nll, [6, 10]).value == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(5, 2, 1, 0.4), (5, 2, 2, 1 - 3 / 10), (5, 0, 3, 0.0), (5, 5, 1, 1.0), (4, 2, 3, 1.0), (200, 1, 1, 0.005)],
)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int, expected: float) -> None:
    assert M.pass_at_k(n, c, k) == pytest.approx(expected)
    if n - c >= k:  # the closed form: 1 - C(n-c, k) / C(n, k)
        assert M.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_refuses_impossible_counts() -> None:
    for n, c, k in [(1, 2, 1), (3, 1, 4), (3, 1, 0)]:
        with pytest.raises(ValueError):
            M.pass_at_k(n, c, k)


def test_which_way_is_better() -> None:
    assert M.higher_is_better("acc") and M.higher_is_better("acc_norm") and M.higher_is_better("exact_match")
    assert M.higher_is_better("pass@1") and M.higher_is_better("pass@10")
    assert not M.higher_is_better("perplexity") and not M.higher_is_better("bits_per_byte")
    for bad in ("accuracy", "pass@0", "pass@k", ""):
        with pytest.raises(ValueError, match="unknown metric"):
            M.higher_is_better(bad)
    assert M.pass_at_k_of("pass@10") == 10
