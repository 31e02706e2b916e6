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

# padded tokens per forward pass. On a CPU a batch that stays in cache is faster than a big one (2,048 tokens of
# the tiny preset beat 8,192 by 15% on 2 cores); a GPU wants large batches to be busy
BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}
MAX_BATCH_ROWS = 64
START_BUCKET = 64  # positions: spans whose scoring starts in the same bucket are batched together


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
    max_batch_tokens: int | None = None,
    max_batch_rows: int = MAX_BATCH_ROWS,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[SpanScore]:
    """Score every span, batched; results in the order given. `on_batch(n)` after each batch of n spans.

    Spans that share their context (a multiple-choice question's choices) are scored from one pass over that
    context: its keys and values are computed once, and every continuation attends to them (`_score_shared`).
    Other spans are packed into right-padded batches (`_score_batch`)."""
    if any(not 1 <= s.scored < len(s.tokens) for s in spans):
        raise ValueError("a span must score at least one token and have one before each scored token")
    max_batch_tokens = max_batch_tokens or BATCH_TOKENS.get(device_of(model).type, BATCH_TOKENS["cuda"])
    out: list[SpanScore | None] = [None] * len(spans)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(spans):
        by_context.setdefault(s.tokens[: len(s.tokens) - s.scored], []).append(i)
    # sharing needs left padding, under which only relative (rotary) positions give every row its own scores
    share = model.config.pos == "rope" and model.config.sliding_window is None
    shared = [members for members in by_context.values() if share and len(members) > 1]
    alone = [i for members in by_context.values() if not (share and len(members) > 1) for i in members]
    # rows whose scored positions start near each other share a batch: logits are computed from the first scored
    # position of any row on (rolling windows: a document's first window scores all, the later ones half)
    by_start: dict[int, list[int]] = {}
    for i in alone:
        by_start.setdefault((len(spans[i].tokens) - 1 - spans[i].scored) // START_BUCKET, []).append(i)
    for part in by_start.values():
        for group in batches([len(spans[i].tokens) - 1 for i in part], max_batch_tokens, max_batch_rows):
            for j, score in zip(group, _score_batch(model, [spans[part[j]] for j in group]), strict=True):
                out[part[j]] = score
            on_batch(len(group))
    # a shared batch's continuation pass is light (few tokens each, all scored): twice the budget measured best
    budget = 2 * max_batch_tokens
    for batch in _shared_batches([[spans[i] for i in m] for m in shared], model.config.context_len, budget):
        groups = [shared[g] for g in batch]
        scores = _score_shared(model, [[spans[i] for i in m] for m in groups])
        for members, got in zip(groups, scores, strict=True):
            for i, score in zip(members, got, strict=True):
                out[i] = score
        on_batch(sum(len(m) for m in groups))
    return [s for s in out if s is not None]


def _tally(spans: Sequence[Span], picked: Tensor, targets: list[int]) -> list[SpanScore]:
    """Scores from the logits at each scored position, (N, V) in span order, and their target tokens."""
    tgt = torch.tensor(targets, device=picked.device)
    picked = picked.float()
    logprobs = picked.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)  # (N,)
    hits = picked.argmax(dim=-1) == tgt
    lp, hit = logprobs.cpu().tolist(), hits.cpu().tolist()  # one device sync for the batch
    out, start = [], 0
    for s in spans:
        end = start + s.scored
        out.append(SpanScore(sum(lp[start:end]), all(hit[start:end]), s.scored))
        start = end
    return out


def _score_batch(model: Transformer, spans: list[Span]) -> list[SpanScore]:
    device = device_of(model)
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
    # logits only from the first position any row scores on: (B, K, V), not (B, T, V)
    at = list(range(min(cols), T))
    where = {c: k for k, c in enumerate(at)}
    logits, _ = model(idx.to(device), logits_at=torch.tensor(at, device=device))
    picked = logits[torch.tensor(rows, device=device), torch.tensor([where[c] for c in cols], device=device)]
    return _tally(spans, picked, targets)


def _shared_batches(groups: list[list[Span]], context_len: int, max_tokens: int) -> list[list[int]]:
    """Groups of spans with one context, batched: longest context first, while the padded contexts plus the
    continuations stay within `max_tokens` and the longest context plus the longest continuation fit the model."""
    ctx = [len(g[0].tokens) - g[0].scored for g in groups]
    cont = [max(s.scored for s in g) - 1 for g in groups]  # continuation inputs: all but the last token
    out: list[list[int]] = []
    P = M = rows = 0
    for i in sorted(range(len(groups)), key=lambda i: -ctx[i]):
        p, m, r = max(P, ctx[i]), max(M, cont[i]), rows + len(groups[i])
        if out and p + m <= context_len and (len(out[-1]) + 1) * p + r * (p + m) <= max_tokens:
            out[-1].append(i)
            P, M, rows = p, m, r
        else:
            out.append([i])
            P, M, rows = ctx[i], cont[i], len(groups[i])
    return out


def _score_shared(model: Transformer, groups: list[list[Span]]) -> list[list[SpanScore]]:
    """Score groups of spans that share a context: the contexts in one left-padded pass that fills a KV cache
    (its last position predicts every continuation's first token), then every continuation of every group in one
    right-padded pass that attends to its group's cached context."""
    device = device_of(model)
    contexts = [g[0].tokens[: len(g[0].tokens) - g[0].scored] for g in groups]
    G, P = len(groups), max(len(c) for c in contexts)
    idx = torch.zeros(G, P, dtype=torch.long)
    valid = torch.ones(G, P, dtype=torch.bool)
    for g, c in enumerate(contexts):
        idx[g, P - len(c) :] = torch.tensor(c)
        valid[g, : P - len(c)] = False
    cache = PaddedCache(model, valid)
    first, _ = model(idx.to(device), cache=cache, pos=0, logits_at=torch.tensor([P - 1], device=device))  # (G, 1, V)
    members = [(g, s) for g, spans in enumerate(groups) for s in spans]
    M = max(s.scored for _, s in members) - 1
    # every scored position as a row of one (G + R*M, V) matrix: the contexts' last logits, then the continuations'
    index: list[int] = []
    targets: list[int] = []
    for r, (g, s) in enumerate(members):
        cont = s.tokens[len(s.tokens) - s.scored :]
        index += [g, *(G + r * M + j for j in range(len(cont) - 1))]
        targets += cont
    rows = [first[:, 0]]
    if M > 0:
        x = torch.zeros(len(members), M, dtype=torch.long)
        for r, (_, s) in enumerate(members):
            cont = s.tokens[len(s.tokens) - s.scored :]
            x[r, : len(cont) - 1] = torch.tensor(cont[:-1])
        owner = torch.tensor([g for g, _ in members], device=device)
        logits, _ = model(x.to(device), cache=PrefixCache(cache, owner, M), pos=P)  # (R, M, V)
        rows.append(logits.reshape(-1, logits.size(-1)))
    picked = torch.cat(rows)[torch.tensor(index, device=device)]
    scores = iter(_tally([s for _, s in members], picked, targets))
    return [[next(scores) for _ in spans] for spans in groups]


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


class PrefixCache:
    """Continuations that attend to their group's context in a filled PaddedCache: row r of the batch is a
    continuation of context `owner[r]`. Its keys are that context's (padding masked), then its own, causally.
    The continuations' keys are not kept: one pass scores them all."""

    def __init__(self, context: PaddedCache, owner: Tensor, new_tokens: int) -> None:
        self.context, self.owner = context, owner
        valid = context.valid[owner]  # (R, P)
        causal = torch.ones(new_tokens, new_tokens, dtype=torch.bool, device=valid.device).tril()
        R, P = valid.shape
        self.mask = torch.cat(
            (valid[:, None, None, :].expand(R, 1, new_tokens, P), causal.expand(R, 1, new_tokens, new_tokens)), dim=-1
        )  # (R, 1, M, P + M)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos: int, gqa: bool) -> Tensor:
        P = self.context.valid.size(1)
        kc = self.context.kv.k[layer][self.owner, :, :P]  # (R, nkv, P, hs)
        vc = self.context.kv.v[layer][self.owner, :, :P]
        k, v = torch.cat((kc, k), dim=2), torch.cat((vc, v), dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=gqa)


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
