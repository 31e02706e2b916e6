"""Running one task's rendered examples through a model: each output type becomes spans to score or prompts to
complete, and the scores become metric values.

- loglikelihood: the continuation (target_delimiter + target) after the context. `acc` is the share of examples
  whose every continuation token is the model's greedy choice; `perplexity` and `bits_per_byte` are over the
  continuations' tokens and bytes.
- multiple_choice: each choice as a continuation; `acc` picks the highest log-likelihood, `acc_norm` the highest
  log-likelihood per byte of the choice.
- loglikelihood_rolling: each example's text as a whole document, in rolling windows (scoring.windows).
- generate_until: a completion of the context until a stop string (or the model's EOS, or max_tokens), greedy
  unless the task sets a temperature. `exact_match` compares it with the target up to trailing whitespace, edge
  blank lines and common indentation; `pass@k` runs context + completion against the example's tests in the
  sandbox (aifab.evaluate.sandbox), `code.samples` completions per problem.

`naive=True` scores one span (or completes one prompt) per forward pass: the loop the batched path is checked
and benchmarked against.
"""

import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from aifab.evaluate import metrics as M
from aifab.evaluate.lm import EvalModel
from aifab.evaluate.scoring import (
    MAX_BATCH_ROWS,
    Span,
    SpanScore,
    batches_for_generation,
    generate_batch,
    score_one,
    score_spans,
    windows,
)
from aifab.evaluate.tasks import Example, Task


class Progress(Protocol):
    """Told the units of work of a task once they are known (spans to score, prompts to complete), then each
    batch as it finishes."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class Quiet:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass
class TaskScores:
    """What one task measured: a Value per metric, how many examples were scored, and the fitting counts."""

    values: dict[str, M.Value]
    examples: int
    truncated: int = 0  # examples whose context was cut on the left to fit
    skipped: int = 0  # examples that could not fit at all (not scored)
    windowed: int = 0  # documents longer than the context, scored in rolling windows
    details: dict[str, object] = field(default_factory=dict)


def score(lm: EvalModel, spans: Sequence[Span], naive: bool, progress: Progress) -> list[SpanScore]:
    progress.start(len(spans))
    if naive:
        out = []
        for s in spans:
            out.append(score_one(lm.model, s))
            progress.advance(1)
        return out
    return score_spans(lm.model, spans, on_batch=progress.advance)


def run_task(
    lm: EvalModel, task: Task, examples: list[Example], *, naive: bool = False, progress: Progress | None = None
) -> TaskScores:
    """Score `examples` of `task`. ValueError when none of them fits the model's context."""
    progress = progress or Quiet()
    kind = task.spec.output_type
    if kind == "multiple_choice":
        return _multiple_choice(lm, task, examples, naive, progress)
    if kind == "loglikelihood":
        return _loglikelihood(lm, task, examples, naive, progress)
    if kind == "loglikelihood_rolling":
        return _rolling(lm, task, examples, naive, progress)
    return _generate(lm, task, examples, naive, progress)


def _no_examples(task: Task, skipped: int) -> ValueError:
    return ValueError(f"task {task.spec.name}: none of its examples fit the model's context ({skipped} skipped)")


def _loglikelihood(lm: EvalModel, task: Task, examples: list[Example], naive: bool, progress: Progress) -> TaskScores:
    delim = task.spec.target_delimiter
    spans, nbytes, truncated, skipped = [], [], 0, 0
    for ex in examples:
        assert ex.target is not None
        span, cut = lm.span(*lm.pair(ex.context, delim + ex.target))
        if span is None:
            skipped += 1
            continue
        spans.append(span)
        nbytes.append(len((delim + ex.target).encode()))
        truncated += cut
    if not spans:
        raise _no_examples(task, skipped)
    scores = score(lm, spans, naive, progress)
    nll = [-s.logprob for s in scores]
    values = {
        "acc": M.mean([float(s.greedy) for s in scores]),
        "perplexity": M.perplexity(nll, [s.tokens for s in scores]),
        "bits_per_byte": M.bits_per_byte(nll, nbytes),
    }
    return _pick(task, values, len(spans), truncated, skipped)


def _multiple_choice(lm: EvalModel, task: Task, examples: list[Example], naive: bool, progress: Progress) -> TaskScores:
    delim = task.spec.target_delimiter
    spans: list[Span] = []
    kept: list[tuple[Example, int]] = []  # each scored example and where its choices' spans start
    truncated = skipped = 0
    for ex in examples:
        fitted = [lm.span(*lm.pair(ex.context, delim + choice)) for choice in ex.choices]
        if any(span is None for span, _ in fitted):
            skipped += 1
            continue
        kept.append((ex, len(spans)))
        spans += [span for span, _ in fitted if span is not None]
        truncated += any(cut for _, cut in fitted)
    if not kept:
        raise _no_examples(task, skipped)
    scores = score(lm, spans, naive, progress)
    acc, acc_norm = [], []
    for ex, start in kept:
        ll = [s.logprob for s in scores[start : start + len(ex.choices)]]
        per_byte = [v / max(1, len((delim + c).encode())) for v, c in zip(ll, ex.choices, strict=True)]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == ex.gold))
        acc_norm.append(float(max(range(len(ll)), key=per_byte.__getitem__) == ex.gold))
    values = {"acc": M.mean(acc), "acc_norm": M.mean(acc_norm)}
    return _pick(task, values, len(kept), truncated, skipped)


def _rolling(lm: EvalModel, task: Task, examples: list[Example], naive: bool, progress: Progress) -> TaskScores:
    spans: list[Span] = []
    docs: list[tuple[int, int, int]] = []  # (first span, spans, bytes) of each scored document
    skipped = windowed = 0
    for ex in examples:
        doc = list(windows(lm.encode(ex.context), lm.prefix, lm.context_len))
        if not doc:
            skipped += 1
            continue
        docs.append((len(spans), len(doc), len(ex.context.encode())))
        spans += doc
        windowed += len(doc) > 1
    if not docs:
        raise _no_examples(task, skipped)
    scores = score(lm, spans, naive, progress)
    nll = [-sum(s.logprob for s in scores[a : a + n]) for a, n, _ in docs]
    tokens = [sum(s.tokens for s in scores[a : a + n]) for a, n, _ in docs]
    values = {"perplexity": M.perplexity(nll, tokens), "bits_per_byte": M.bits_per_byte(nll, [b for *_, b in docs])}
    out = _pick(task, values, len(docs), 0, skipped)
    out.windowed = windowed
    return out


def same_text(a: str, b: str) -> bool:
    """Equal up to trailing whitespace on each line, blank lines at either end and common indentation."""

    def norm(s: str) -> str:
        return textwrap.dedent("\n".join(line.rstrip() for line in s.splitlines()).strip("\n"))

    return norm(a) == norm(b)


def completions(
    lm: EvalModel, prompts: list[str], until: Sequence[str], max_tokens: int, temperature: float, seed: int,
    naive: bool, progress: Progress,
) -> tuple[list[str], int]:  # fmt: skip
    """Each prompt's completion, cut at its first stop string, and how many prompts were cut on the left to fit."""
    # a budget that leaves no room for a prompt is halved (and counted as a cut); prompts are cut on the left
    budget = max_tokens if max_tokens < lm.context_len else lm.context_len // 2
    room = lm.context_len - budget
    progress.start(len(prompts))
    ids = [[*lm.prefix, *lm.encode(p)] for p in prompts]
    truncated = sum(len(p) > room for p in ids)
    ids = [p[-room:] for p in ids]
    texts: list[str] = [""] * len(prompts)
    lengths = [len(p) for p in ids]
    groups = [[i] for i in range(len(ids))] if naive else batches_for_generation(lm.model, lengths, MAX_BATCH_ROWS)
    for group in groups:

        def done(row: int, new: list[int]) -> bool:
            return new[-1] in lm.stop_ids or any(u in lm.decode(new) for u in until)

        outs = generate_batch(lm.model, [ids[i] for i in group], budget, done=done, temperature=temperature, seed=seed)
        for i, new in zip(group, outs, strict=True):
            new = new[:-1] if new and new[-1] in lm.stop_ids else new
            text = lm.decode(new)
            cut = min((text.index(u) for u in until if u in text), default=len(text))
            texts[i] = text[:cut]
        progress.advance(len(group))
    return texts, truncated


def _generate(lm: EvalModel, task: Task, examples: list[Example], naive: bool, progress: Progress) -> TaskScores:
    spec, gen = task.spec, task.spec.generation
    samples = spec.code.samples if spec.code is not None else 1
    prompts = [ex.context for ex in examples for _ in range(samples)]
    texts, truncated = completions(lm, prompts, gen.until, gen.max_tokens, gen.temperature, gen.seed, naive, progress)
    per_example = [texts[i * samples : (i + 1) * samples] for i in range(len(examples))]
    firsts = [outs[0] for outs in per_example]
    values = {
        "exact_match": M.mean([float(same_text(t, ex.target or "")) for ex, t in zip(examples, firsts, strict=True)])
    }
    details: dict[str, object] = {}
    if spec.code is not None and any(m.startswith("pass@") for m in spec.metric_names()):
        passed = run_code(task, examples, per_example)
        for metric in spec.metric_names():
            if metric.startswith("pass@"):
                k = M.pass_at_k_of(metric)
                values[metric] = M.mean([M.pass_at_k(samples, c, k) for c in passed])
        details["passed"] = passed
    out = _pick(task, values, len(examples), truncated // samples, 0)
    out.details.update(details)
    return out


def run_code(task: Task, examples: list[Example], outs: list[list[str]]) -> list[int]:
    """How many completions of each example pass its tests in the sandbox (a few sandboxes at once: each is a
    subprocess that mostly waits)."""
    from aifab.evaluate.sandbox import run_tests

    code = task.spec.code
    assert code is not None

    def passed(job: tuple[Example, str]) -> bool:
        ex, text = job
        result = run_tests(
            ex.context + text, ex.tests or "", entry_point=ex.entry_point, timeout_s=code.timeout_s,
            memory_mb=code.memory_mb,
        )  # fmt: skip
        return bool(result.passed)

    jobs = [(ex, text) for ex, texts in zip(examples, outs, strict=True) for text in texts]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(passed, jobs))
    n = code.samples
    return [sum(results[i * n : (i + 1) * n]) for i in range(len(examples))]


def _pick(task: Task, values: dict[str, M.Value], examples: int, truncated: int, skipped: int) -> TaskScores:
    wanted = {m: values[m] for m in task.spec.metric_names() if m in values}
    return TaskScores(wanted, examples, truncated, skipped)
