from collections import Counter

import pytest
import torch

from aifab.nn.sampling import SamplingParams, make_generator, sample

V = 50


def random_logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    gen = make_generator(params)
    return [sample(logits, params, gen) for _ in range(n)]


def test_temperature_zero_is_argmax_and_needs_no_generator() -> None:
    params = SamplingParams(temperature=0.0)
    assert make_generator(params) is None
    for seed in range(20):
        logits = random_logits(seed)
        assert sample(logits, params, None) == int(logits.argmax())


def test_seeded_sampling_is_reproducible() -> None:
    logits = random_logits(0, scale=0.5)  # flat enough that draws vary
    params = SamplingParams(temperature=1.0, seed=1234)
    first = draws(logits, params, 100)
    assert first == draws(logits, params, 100)
    assert len(set(first)) > 5  # it really samples
    assert first != draws(logits, SamplingParams(temperature=1.0, seed=4321), 100)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_top_k_one_is_argmax_at_any_temperature(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=1, seed=7)
    gen = make_generator(params)
    for seed in range(30):
        logits = random_logits(seed, scale=0.1)  # nearly uniform: only the cut can make this argmax
        assert sample(logits, params, gen) == int(logits.argmax())


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    params = SamplingParams(temperature=2.0, top_p=1e-6, seed=3)
    gen = make_generator(params)
    for seed in range(30):
        logits = random_logits(seed, scale=0.1)
        assert sample(logits, params, gen) == int(logits.argmax())


def test_samples_never_leave_the_top_k() -> None:
    logits = random_logits(5, scale=1.0)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    seen = Counter(draws(logits, SamplingParams(temperature=1.5, top_k=5, seed=0), 2000))
    assert set(seen) <= allowed
    assert len(seen) == 5  # and every one of the top 5 does appear


def test_samples_never_leave_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.1, 0.1: with top_p 0.7 the nucleus is the first two tokens
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    seen = Counter(draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=0), 2000))
    assert set(seen) == {0, 1}
    assert seen[0] > seen[1]  # renormalised, 0.625 vs 0.375


def test_top_k_larger_than_vocab_is_no_limit() -> None:
    logits = torch.zeros(4)
    seen = set(draws(logits, SamplingParams(temperature=1.0, top_k=10, seed=0), 400))
    assert seen == {0, 1, 2, 3}


def test_unseeded_generators_differ() -> None:
    logits = random_logits(0, scale=0.1)
    params = SamplingParams(temperature=1.0)
    assert draws(logits, params, 50) != draws(logits, params, 50)
