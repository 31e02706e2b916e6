"""The one context check (`check_fits`) that generation, the serving engine and its HTTP API share, and
generate() refusing what does not fit."""

import pytest
import torch

from aifab.nn.config import ModelConfig
from aifab.nn.generate import ContextError, check_fits, generate
from aifab.nn.sampling import SamplingParams
from aifab.nn.transformer import Transformer


def test_what_fits_passes_up_to_the_last_position() -> None:
    check_fits(10, 22, 32)  # exactly the context
    check_fits(9, 22, 32, prefix_tokens=1)
    check_fits(32, 0, 32)  # no new tokens: the prompt alone may fill the context


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "prefix", "part", "fragment"),
    [
        (0, 5, 0, "prompt", "the prompt is empty"),
        (0, 5, 1, "prompt", "the prompt is empty"),  # the server's prefix is not a prompt
        (32, 1, 0, "prompt", "the prompt's 32 tokens leave no room in the 32-token context"),
        (31, 4, 1, "prompt", "the prompt's 31 tokens and 1 token put before it leave no room"),
        (10, 23, 0, "max_tokens", "23 new tokens after the prompt's 10 tokens exceed the 32-token context"),
        (10, 22, 1, "max_tokens", "22 new tokens after the prompt's 10 tokens and 1 token put before it exceed"),
    ],
)
def test_what_does_not_fit_names_the_part_to_shorten(
    prompt: int, max_tokens: int, prefix: int, part: str, fragment: str
) -> None:
    with pytest.raises(ContextError, match=fragment) as info:
        check_fits(prompt, max_tokens, 32, prefix_tokens=prefix)
    assert info.value.part == part
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_generate_refuses_what_does_not_fit_before_any_compute() -> None:
    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, context_len=8)).eval()
    with pytest.raises(ContextError, match="empty"):
        next(generate(model, [], SamplingParams(max_tokens=1)))
    with pytest.raises(ContextError, match="exceed the 8-token context"):
        next(generate(model, [1, 2, 3], SamplingParams(max_tokens=6)))
    torch.manual_seed(0)
    assert len(list(generate(model, [1, 2, 3], SamplingParams(max_tokens=5, temperature=0)))) == 5
