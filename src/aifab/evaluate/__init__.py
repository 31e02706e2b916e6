"""Evaluation: validation loss, perplexity and sampled completions of a checkpoint, read from the store."""

import math
from dataclasses import dataclass

import numpy as np

from aifab.store import Store
from aifab.store.shards import TokenShards


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    perplexity: float
    val_tokens: int
    samples: list[tuple[str, str]]  # (prompt, sampled completion)


def evaluate(
    store: Store,
    weights_digest: str,
    tokenizer_digest: str,
    manifest_digest: str,
    *,
    batches: int,
    batch_size: int,
    prompts: list[str],
    max_new_tokens: int,
    seed: int = 0,
) -> EvalResult:
    """Score the weights on `batches` random validation windows and complete each prompt (seeded sampling)."""
    import torch
    from tokenizers import Tokenizer

    from aifab.nn.generate import generate
    from aifab.nn.sampling import SamplingParams
    from aifab.nn.weights import from_bytes

    model = from_bytes(store.artifacts.get_bytes(weights_digest)).eval()
    tok = Tokenizer.from_str(store.artifacts.get_bytes(tokenizer_digest).decode())
    shards = TokenShards(store.artifacts, manifest_digest)
    T = model.config.context_len
    shards.check_fits(T)
    loader = shards.loader("val", batch_size, T, seed=seed + 2)
    losses = []
    with torch.inference_mode():
        for x, y in (loader.batch_at(k) for k in range(batches)):
            losses.append(model(torch.from_numpy(x), torch.from_numpy(y))[1].item())
    val_loss = float(np.mean(losses))

    eot = shards.manifest.eot_id
    samples = []
    room = T - 1
    for prompt in prompts:
        ids = [eot, *tok.encode(prompt).ids][:room]
        # sampled, not greedy: a small model's greedy text loops on its likeliest phrase; seeded, so repeatable
        params = SamplingParams(
            max_tokens=max(1, min(max_new_tokens, T - len(ids))), temperature=0.8, top_k=50, seed=seed
        )
        out: list[int] = []
        for token in generate(model, ids, params):
            if token == eot:
                break
            out.append(token)
        samples.append((prompt, tok.decode(out)))
    return EvalResult(val_loss, math.exp(min(val_loss, 50.0)), batches * batch_size * T, samples)
