"""Metrics of an evaluation task: each turns per-example scores into one value and its standard error.

Per-example metrics (`acc`, `acc_norm`, `exact_match`, `pass@k`) are means over examples; their standard error is
the sample standard deviation over sqrt(n). Corpus metrics (`perplexity`, `bits_per_byte`) are ratios of sums
(negative log-likelihood over tokens or bytes of every example together, so a long document weighs more than a
short one); their standard error comes from the delta method for a ratio estimator. n = 1 gives no standard
error (None).
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

LN2 = math.log(2.0)
# every metric a task may ask for; pass@k is spelled with its k (pass@1, pass@10), or `pass@k` in a task file
# to mean the task's code.k
MEAN_METRICS = ("acc", "acc_norm", "exact_match")
RATIO_METRICS = ("perplexity", "bits_per_byte")
PASS_AT = re.compile(r"^pass@([1-9][0-9]{0,3})$")
LOWER_IS_BETTER = frozenset(RATIO_METRICS)


def is_metric(name: str) -> bool:
    """Whether `name` is a metric aifab computes (`pass@k` needs its number here)."""
    return name in MEAN_METRICS or name in RATIO_METRICS or PASS_AT.fullmatch(name) is not None


def higher_is_better(metric: str) -> bool:
    """True when a larger value of `metric` is a better model (acc, exact_match, pass@k); False for perplexity
    and bits_per_byte. A ValueError names an unknown metric and the known ones."""
    if not is_metric(metric):
        known = ", ".join((*MEAN_METRICS, *RATIO_METRICS, "pass@K"))
        raise ValueError(f"unknown metric {metric!r} (known: {known})")
    return metric not in LOWER_IS_BETTER


def pass_at_k_of(metric: str) -> int:
    """The k of a `pass@k` metric name; ValueError for any other name."""
    m = PASS_AT.fullmatch(metric)
    if m is None:
        raise ValueError(f"{metric!r} is not a pass@k metric")
    return int(m.group(1))


@dataclass(frozen=True)
class Value:
    """One metric over a task's examples: its value, standard error (None for one example) and example count."""

    value: float
    stderr: float | None
    examples: int


def mean(values: Sequence[float]) -> Value:
    """The mean of per-example values and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        raise ValueError("no examples to average")
    m = math.fsum(values) / n
    if n == 1:
        return Value(m, None, 1)
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return Value(m, math.sqrt(var / n), n)


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Value:
    """sum(numerators) / sum(denominators), with the delta-method standard error of a ratio estimator:
    sqrt(sum((y_i - R x_i)^2) / (n (n - 1))) / mean(x)."""
    n = len(numerators)
    if n == 0 or n != len(denominators):
        raise ValueError("a ratio needs as many denominators as numerators, at least one")
    total_x = math.fsum(denominators)
    if total_x <= 0:
        raise ValueError("a ratio needs a positive total denominator")
    r = math.fsum(numerators) / total_x
    if n == 1:
        return Value(r, None, 1)
    resid = math.fsum((y - r * x) ** 2 for y, x in zip(numerators, denominators, strict=True))
    return Value(r, math.sqrt(resid / (n * (n - 1))) / (total_x / n), n)


def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> Value:
    """exp(total negative log-likelihood (nats) / total tokens); its standard error by the delta method."""
    per_token = ratio(nll, [float(t) for t in tokens])
    value = math.exp(min(per_token.value, 700.0))  # exp overflows a float past ~709
    stderr = None if per_token.stderr is None else value * per_token.stderr
    return Value(value, stderr, per_token.examples)


def bits_per_byte(nll: Sequence[float], nbytes: Sequence[int]) -> Value:
    """Total negative log-likelihood in bits over total UTF-8 bytes: comparable across tokenizers."""
    nats = ratio(nll, [float(b) for b in nbytes])
    return Value(nats.value / LN2, None if nats.stderr is None else nats.stderr / LN2, nats.examples)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as a
    product so large n does not overflow. Needs n >= k."""
    if not 0 <= c <= n or k < 1 or n < k:
        raise ValueError(f"pass@{k} needs 0 <= passed <= samples and samples >= k (samples {n}, passed {c})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss
