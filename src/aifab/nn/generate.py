"""Autoregressive generation for one sequence with a KV cache (prefill the prompt, then one token a step), and
the one check that a prompt and its token budget fit a model's context, which the serving engine and its HTTP
API apply too."""

from collections.abc import Iterator
from typing import Literal

import torch

from aifab.nn.sampling import SamplingParams, make_generator, sample
from aifab.nn.transformer import KVCache, Transformer


class ContextError(ValueError):
    """A prompt and its token budget do not fit the context. `part` is what to shorten: "prompt" when the prompt
    is empty or leaves no room for one new token, else "max_tokens"."""

    def __init__(self, message: str, part: Literal["prompt", "max_tokens"]) -> None:
        super().__init__(message)
        self.part = part


def check_fits(prompt_tokens: int, max_tokens: int, context_len: int, *, prefix_tokens: int = 0) -> None:
    """Raise ContextError unless a non-empty prompt of `prompt_tokens`, after the `prefix_tokens` a server puts
    before every prompt, plus `max_tokens` new tokens fit in `context_len`. The message counts the prompt as
    its sender made it and names the prefix apart, so its sums add up."""
    if prompt_tokens == 0:
        raise ContextError("the prompt is empty", "prompt")
    used = prefix_tokens + prompt_tokens
    if used + max_tokens <= context_len:
        return
    prompt = f"the prompt's {_tokens(prompt_tokens)}"
    if prefix_tokens:
        prompt += f" and {_tokens(prefix_tokens)} put before it"
    if used >= context_len:  # not even one new token would fit, whatever the budget
        raise ContextError(f"{prompt} leave no room in the {context_len}-token context", "prompt")
    raise ContextError(f"{max_tokens} new tokens after {prompt} exceed the {context_len}-token context", "max_tokens")


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield up to `params.max_tokens` new token ids. The caller stops early (EOS, stop string, cancel)
    simply by not asking for the next one. Raises ContextError (a ValueError) if the prompt is empty or
    prompt + max_tokens exceeds the context."""
    check_fits(len(prompt_ids), params.max_tokens, model.config.context_len)
    device = next(model.parameters()).device
    cache = KVCache(model.config, 1, len(prompt_ids) + params.max_tokens, device, next(model.parameters()).dtype)
    gen = make_generator(params, device)
    idx = torch.tensor([prompt_ids], device=device)
    logits, _ = model(idx, cache=cache, pos=0)  # prefill: (1, P, V)
    pos = len(prompt_ids)
    for i in range(params.max_tokens):
        token = sample(logits[0, -1], params, gen)
        yield token
        if i + 1 == params.max_tokens:
            return
        logits, _ = model(torch.tensor([[token]], device=device), cache=cache, pos=pos)
        pos += 1
