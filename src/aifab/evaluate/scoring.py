"""Batched scoring with an aifab Transformer: log-likelihoods of many token spans in one padded forward pass, and
greedy (or seeded sampled) generation of many prompts at once through a KV cache.

A `Span` is a token sequence whose last `scored` tokens are scored, each predicted from every token before it.
A (context, continuation) pair is one span; a long document is several (rolling windows). `score_spans` sorts
spans by length, packs them into batches of at most `max_batch_tokens` padded tokens, pads on the right (a
causal model's earlier positions never see the padding, so a padded row scores exactly as it would alone), and
computes logits only at the positions some row scores. `score_one` is the plain loop: one span, one forward.

`generate_batch` pads prompts on the left so every row's next token is at the same position, and masks the
padding's keys (`PaddedCache`). With rotary positions only relative positions matter, so a left-padded row
generates what it would alone; a model with learned absolute positions is batched only with prompts of its
own length (`batches_for_generation`).
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aifab.nn.transformer import KVCache, Transformer

MAX_BATCH_TOKENS = 8192  # padded tokens per forward: logits at scored positions only, so memory stays small
MAX_BATCH_ROWS = 64


@dataclass(frozen=True)
class Span:
    """`tokens` fits the context plus one (the last token is only a target); the last `scored` are scored."""

    tokens: tuple[int, ...]
    scored: int


@dataclass(frozen=True)
class SpanScore:
    logprob: float  # sum of the natural-log probabilities of the scored tokens
    greedy: bool  # every scored token was the model's most likely next token
    tokens: int  # how many were scored


def batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each at most `max_rows` rows of at most `max_tokens` padded
    tokens (a longer single row is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        # the first row of a batch is its longest: the padded size is rows * that length
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def device_of(model: Transformer) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_spans(
    model: Transformer,
    spans: Sequence[Span],
    *,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    max_batch_rows: int = MAX_BATCH_ROWS,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[SpanScore]:
    """Score every span, batched; results in the order given. `on_batch(n)` after each batch of n spans."""
    out: list[SpanScore | None] = [None] * len(spans)
    for group in batches([len(s.tokens) - 1 for s in spans], max_batch_tokens, max_batch_rows):
        for i, score in zip(group, _score_batch(model, [spans[i] for i in group]), strict=True):
            out[i] = score
        on_batch(len(group))
    return [s for s in out if s is not None]


def _score_batch(model: Transformer, spans: list[Span]) -> list[SpanScore]:
    device = device_of(model)
    if any(not 1 <= s.scored < len(s.tokens) for s in spans):
        raise ValueError("a span must score at least one token and have one before each scored token")
    T = max(len(s.tokens) for s in spans) - 1
    idx = torch.zeros(len(spans), T, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for r, s in enumerate(spans):
        n = len(s.tokens) - 1
        idx[r, :n] = torch.tensor(s.tokens[:-1])
        rows += [r] * s.scored
        cols += range(n - s.scored, n)
        targets += s.tokens[n - s.scored + 1 :]
    at = sorted(set(cols))  # logits only where some row scores a token: (B, K, V), not (B, T, V)
    where = {c: k for k, c in enumerate(at)}
    logits, _ = model(idx.to(device), logits_at=torch.tensor(at, device=device))
    picked = logits[torch.tensor(rows, device=device), torch.tensor([where[c] for c in cols], device=device)].float()
    tgt = torch.tensor(targets, device=device)
    logprobs = picked.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)  # (N,)
    hits = picked.argmax(dim=-1) == tgt
    lp, hit = logprobs.cpu().tolist(), hits.cpu().tolist()  # one device sync for the batch
    out, start = [], 0
    for s in spans:
        end = start + s.scored
        out.append(SpanScore(sum(lp[start:end]), all(hit[start:end]), s.scored))
        start = end
    return out


@torch.inference_mode()
def score_one(model: Transformer, span: Span) -> SpanScore:
    """One span in its own forward pass over every position: the naive loop `score_spans` is measured against."""
    device = device_of(model)
    tokens = torch.tensor([span.tokens], device=device)
    logits, _ = model(tokens[:, :-1])
    logprobs = torch.log_softmax(logits[0, -span.scored :].float(), dim=-1)
    tgt = tokens[0, -span.scored :]
    lp = logprobs.gather(1, tgt[:, None]).sum()
    return SpanScore(float(lp), bool((logprobs.argmax(-1) == tgt).all()), span.scored)


class PaddedCache:
    """A KVCache for a batch of left-padded prompts: no query attends to a padding key (except a padding query to
    itself, which keeps its own output finite; nothing reads it)."""

    def __init__(self, model: Transformer, valid: Tensor) -> None:
        p = next(model.parameters())
        self.kv = KVCache(model.config, valid.size(0), valid.size(1), p.device, p.dtype)
        self.valid = valid.to(p.device)  # (B, max_len) bool: the positions that hold real tokens
        self._mask: tuple[tuple[int, int], Tensor] | None = None

    def mask(self, pos: int, T: int) -> Tensor:
        """(B, 1, T, pos+T): query i (at pos+i) sees valid keys up to pos+i, and itself. Built once per step,
        shared by every layer."""
        if self._mask is None or self._mask[0] != (pos, T):
            device = self.valid.device
            causal = torch.ones(T, pos + T, dtype=torch.bool, device=device).tril(diagonal=pos)
            own = torch.zeros(T, pos + T, dtype=torch.bool, device=device)
            own[torch.arange(T), pos + torch.arange(T)] = True
            self._mask = ((pos, T), ((causal & self.valid[:, None, : pos + T]) | own)[:, None])
        return self._mask[1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos: int, gqa: bool) -> Tensor:
        k, v = self.kv.update(layer, pos, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(pos, q.size(2)), enable_gqa=gqa)


def batches_for_generation(model: Transformer, lengths: Sequence[int], max_rows: int) -> list[list[int]]:
    """Groups of prompts to generate together: any lengths with rotary positions, equal lengths otherwise."""
    if model.config.pos == "rope":
        return batches(lengths, 1 << 62, max_rows)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    return [group[j : j + max_rows] for group in by_length.values() for j in range(0, len(group), max_rows)]


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    done: Callable[[int, list[int]], bool] = lambda i, ids: False,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (each non-empty; prompt + max_tokens must fit the context): greedy at
    temperature 0, else sampled with a generator seeded by `seed`. A row stops once `done(row, its tokens)`."""
    device = device_of(model)
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_tokens > model.config.context_len or min(len(p) for p in prompts) == 0:
        raise ValueError(f"prompts of up to {P} tokens and {max_tokens} new ones exceed the context or are empty")
    idx = torch.zeros(B, P, dtype=torch.long)
    valid = torch.ones(B, P + max_tokens, dtype=torch.bool)
    for r, p in enumerate(prompts):
        idx[r, P - len(p) :] = torch.tensor(list(p))
        valid[r, : P - len(p)] = False
    cache = PaddedCache(model, valid)
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    logits, _ = model(idx.to(device), cache=cache, pos=0, logits_at=torch.tensor([P - 1], device=device))
    out: list[list[int]] = [[] for _ in prompts]
    alive = [True] * B
    for step in range(max_tokens):
        last = logits[:, -1].float()
        if gen is None:
            nxt = last.argmax(dim=-1)
        else:
            nxt = torch.multinomial(torch.softmax(last / temperature, dim=-1), 1, generator=gen).squeeze(1)
        for r, token in enumerate(nxt.tolist()):
            if alive[r]:
                out[r].append(token)
                alive[r] = not done(r, out[r])
        if not any(alive) or step + 1 == max_tokens:
            break
        logits, _ = model(nxt[:, None], cache=cache, pos=P + step)
    return out


def windows(tokens: Sequence[int], prefix: Sequence[int], context_len: int) -> Iterator[Span]:
    """Rolling windows that score every token of a document once: the first window scores up to context_len
    tokens after the prefix; each later one scores the next context_len // 2 tokens with the context_len // 2
    or more tokens before them as context (no token is scored from less than half a window, except the first
    window's)."""
    seq = [*prefix, *tokens]  # without a prefix the document's first token is not scored: nothing precedes it
    if len(seq) < 2:
        return
    stride = max(1, context_len // 2)
    end = min(len(seq), context_len + 1)
    yield Span(tuple(seq[:end]), end - 1)
    while end < len(seq):
        nxt = min(len(seq), end + stride)
        yield Span(tuple(seq[max(0, nxt - context_len - 1) : nxt]), nxt - end)
        end = nxt
