"""Per-request sampling: temperature, top-k, top-p and a seed. Temperature 0 is greedy (argmax).

Log-probabilities are those of the model's distribution (before temperature, top-k and top-p), as OpenAI
reports them."""

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy: the same prompt always gives the same text
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 means no limit
    seed: int | None = None  # a seeded request is reproducible at any temperature
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    ignore_eos: bool = False  # generate max_tokens even past the model's EOS (benchmarks: fixed lengths)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from logits of shape (V,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the `params.logprobs` most likely tokens, best first


def logprobs_of(logits: Tensor, token: int, n_top: int) -> TokenLogprob:
    """The log-probability of `token` under logits (V,), and the top `n_top` alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if n_top > 0:
        values, ids = torch.topk(lp, min(n_top, lp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), top)


def score_tokens(logits: Tensor, tokens: list[int], n_top: int) -> list[TokenLogprob]:
    """`logprobs_of` for many positions in one pass: logits (K, V), `tokens` the K tokens to score (the token
    that followed each position), each with its top `n_top` alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (K, V)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    top: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if n_top > 0:
        values, ids = torch.topk(lp, min(n_top, lp.size(-1)))
        top = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, c, k) for t, c, k in zip(tokens, chosen, top, strict=True)]
