"""Autoregressive generation for one sequence with a KV cache: prefill the prompt, then one token a step."""

from collections.abc import Iterator

import torch

from aifab.nn.transformer import KVCache, Transformer
from aifab.serve.sampling import SamplingParams, make_generator, sample


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield up to `params.max_tokens` new token ids. The caller stops early (EOS, stop string, cancel)
    simply by not asking for the next one. Raises ValueError if prompt + max_tokens exceeds the context."""
    ctx = model.config.context_len
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > ctx:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {ctx}"
        )
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
