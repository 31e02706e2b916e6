"""Scoring: each output type and metric on a model whose answers are known (the counting model), the batched path
equal to the one-at-a-time loop, rolling windows, and examples that do not fit the context."""

import math
from typing import Any

import pytest

from aifab.evaluate.lm import EvalModel
from aifab.evaluate.runners import run_task
from aifab.evaluate.scoring import Span, batches, generate_batch, score_one, score_spans, windows
from aifab.evaluate.tasks import DatasetSpec, GenerationSpec, Task, TaskSpec, builtin_task, render_examples
from evalkit import LOGIT, char_tokenizer, counting_model, random_model

# log-probability of a token the counting model does not predict: the RMS-normalised one-hot embedding has length
# 1 / sqrt(1/64 + eps) (d_model 64, eps 1e-5), so the predicted token's logit is LOGIT times that, the others' 0
WRONG = -LOGIT / math.sqrt(1 / 64 + 1e-5)


def lm_of(model: Any) -> EvalModel:
    return EvalModel.of(model, char_tokenizer())


def task(output_type: str, rows: list[dict[str, Any]], **kw: Any) -> Task:
    spec = TaskSpec(name="t", output_type=output_type, dataset=DatasetSpec(path="x.jsonl"), **kw)  # type: ignore[arg-type]
    return builtin_task(spec, rows, "test", "digest")


def run(lm: EvalModel, t: Task, naive: bool = False) -> Any:
    return run_task(lm, t, render_examples(t, None), naive=naive)


def test_loglikelihood_of_a_continuation_the_model_predicts_and_one_it_does_not() -> None:
    lm = lm_of(counting_model())
    assert lm.prefix == (0,)  # a model trained here reads every text after EOT
    right = score_one(lm.model, lm.span(*lm.pair("abc", "def"))[0])  # type: ignore[arg-type]
    wrong = score_one(lm.model, lm.span(*lm.pair("abc", "dxf"))[0])  # type: ignore[arg-type]
    assert right.greedy and right.tokens == 3 and right.logprob == pytest.approx(0.0, abs=1e-6)
    assert not wrong.greedy and wrong.logprob == pytest.approx(2 * WRONG, rel=1e-6)  # x is wrong; so is f after x


def test_loglikelihood_task_metrics() -> None:
    rows = [{"c": "abc", "t": "def"}, {"c": "mno", "t": "pqz"}]
    t = task("loglikelihood", rows, input="{{ c }}", target="{{ t }}", target_delimiter="",
             metrics=["acc", "perplexity", "bits_per_byte"])  # fmt: skip
    scores = run(lm_of(counting_model()), t)
    assert scores.values["acc"].value == 0.5  # only the first continuation is the greedy one
    nll = -WRONG  # one wrong token in six
    assert scores.values["perplexity"].value == pytest.approx(math.exp(nll / 6), rel=1e-5)
    assert scores.values["bits_per_byte"].value == pytest.approx(nll / 6 / math.log(2), rel=1e-6)
    assert scores.examples == 2 and scores.truncated == scores.skipped == 0


def test_multiple_choice_picks_the_likeliest_choice_and_acc_norm_divides_by_bytes() -> None:
    rows = [
        {"c": "abcd", "opts": ["efg", "xyz", "efz"], "g": 0},
        {"c": "klm", "opts": ["zzzz", "nop"], "g": 0},  # the model picks "nop": wrong
        {"c": "uv", "opts": ["wxyz", "w"], "g": 0},  # both fully predicted: equal (0) log-likelihoods
    ]
    t = task("multiple_choice", rows, input="{{ c }}", choices="{{ opts }}", gold="{{ g }}", target_delimiter="")
    scores = run(lm_of(counting_model()), t)
    assert scores.values["acc"].value == pytest.approx(2 / 3)
    assert scores.values["acc_norm"].value == pytest.approx(2 / 3)
    rows = [{"c": "ab", "opts": ["cd", "cz"], "g": 1}]  # the gold choice is the unlikely one
    assert run(lm_of(counting_model()), task("multiple_choice", rows, input="{{ c }}", choices="{{ opts }}",
               gold="{{ g }}", target_delimiter="")).values["acc"].value == 0.0  # fmt: skip


def test_rolling_loglikelihood_scores_every_token_of_a_long_document_once() -> None:
    doc = "abcdefghijklmnopqrstuvwxyz" * 2  # 52 tokens in a 16-token context
    t = task("loglikelihood_rolling", [{"text": doc}, {"text": "ab"}], input="{{ text }}")
    scores = run(lm_of(counting_model(context_len=16)), t)
    assert scores.values["perplexity"].value == pytest.approx(1.0, abs=1e-5)
    assert scores.values["bits_per_byte"].value == pytest.approx(0.0, abs=1e-5)
    assert scores.windowed == 1 and scores.examples == 2
    spans = list(windows(list(range(1, 53)), (0,), 16))
    assert sum(s.scored for s in spans) == 52  # each token once
    assert all(len(s.tokens) <= 17 for s in spans)  # context + the last target
    assert all(len(s.tokens) - s.scored >= 8 for s in spans[1:])  # at least half a window of context
    assert list(windows([5], (), 16)) == []  # one token, nothing before it: nothing to score


def test_generate_until_stops_at_the_stop_string_and_exact_match() -> None:
    rows = [{"c": "abc", "t": "defg"}, {"c": "xy", "t": "zz"}]
    t = task("generate_until", rows, input="{{ c }}", target="{{ t }}",
             generation=GenerationSpec(until=["h", "b"], max_tokens=8))  # fmt: skip
    scores = run(lm_of(counting_model()), t)
    assert scores.values["exact_match"].value == 0.5  # "defg" and "za"


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_scores_equal_the_one_at_a_time_loop(seed: int) -> None:
    import random

    model = random_model(context_len=32, seed=seed)
    rng = random.Random(seed)
    spans = []
    for _ in range(40):
        n = rng.randint(2, 33)
        spans.append(Span(tuple(rng.randrange(1, 50) for _ in range(n)), rng.randint(1, n - 1)))
    batched = score_spans(model, spans, max_batch_tokens=200, max_batch_rows=8)
    naive = [score_one(model, s) for s in spans]
    for b, n in zip(batched, naive, strict=True):
        assert b.logprob == pytest.approx(n.logprob, abs=1e-5) and b.greedy == n.greedy and b.tokens == n.tokens


@pytest.mark.parametrize("longest", [1, 6])
def test_spans_sharing_a_context_score_as_they_would_alone(longest: int) -> None:
    """Choices of one question share its context: one pass over it, then all continuations (or, when every
    continuation is one token, none)."""
    import random

    model = random_model(context_len=32, seed=7)
    rng = random.Random(longest)
    spans = []
    for _ in range(12):
        context = tuple(rng.randrange(1, 50) for _ in range(rng.randint(1, 24)))
        for _ in range(rng.randint(2, 4)):
            n = rng.randint(1, longest)
            spans.append(Span(context + tuple(rng.randrange(1, 50) for _ in range(n)), n))
    spans.append(Span((1, 2, 3), 1))  # a context of its own
    rng.shuffle(spans)
    batched = score_spans(model, spans, max_batch_tokens=300)
    for b, s in zip(batched, spans, strict=True):
        n = score_one(model, s)
        assert b.logprob == pytest.approx(n.logprob, abs=1e-5) and b.greedy == n.greedy and b.tokens == n.tokens


def test_every_output_type_scores_the_same_batched_and_naive() -> None:
    lm = lm_of(random_model(context_len=24, seed=3))
    words = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta", "iota kappa lambda mu nu xi omicron pi"]
    rows = [
        {"c": w, "t": words[(i + 1) % 5], "o": [words[(i + 1) % 5], words[(i + 2) % 5]]} for i, w in enumerate(words)
    ]
    tasks = [
        task("loglikelihood", rows, input="{{ c }}", target="{{ t }}", metrics=["acc", "perplexity", "bits_per_byte"]),
        task("multiple_choice", rows, input="{{ c }}", choices="{{ o }}", gold="0"),
        task("loglikelihood_rolling", rows, input="{{ c }} {{ t }} {{ c }}"),
        task(
            "generate_until",
            rows,
            input="{{ c }}",
            target="{{ t }}",
            generation=GenerationSpec(until=["q"], max_tokens=6),
        ),
    ]
    for t in tasks:
        batched, naive = run(lm, t), run(lm, t, naive=True)
        assert batched.values.keys() == naive.values.keys()
        for metric, v in batched.values.items():
            assert v.value == pytest.approx(naive.values[metric].value, abs=1e-5), (t.spec.output_type, metric)


def test_batched_generation_equals_one_prompt_at_a_time() -> None:
    model = random_model(context_len=32, seed=5)
    prompts = [[0, 3, 4, 5], [0, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 7, 7]]
    together = generate_batch(model, prompts, 10)
    alone = [generate_batch(model, [p], 10)[0] for p in prompts]
    assert together == alone and all(len(o) == 10 for o in together)
    stopped = generate_batch(model, prompts, 10, done=lambda i, ids: i == 1 and len(ids) == 3)
    assert len(stopped[1]) == 3 and stopped[0] == alone[0]
    with pytest.raises(ValueError, match="exceed the context"):
        generate_batch(model, [[0] * 30], 5)


def test_sampled_generation_is_seeded() -> None:
    model = random_model(context_len=32, seed=5)
    a = generate_batch(model, [[0, 1], [0, 2]], 8, temperature=1.0, seed=3)
    assert a == generate_batch(model, [[0, 1], [0, 2]], 8, temperature=1.0, seed=3)
    assert a != generate_batch(model, [[0, 1], [0, 2]], 8, temperature=1.0, seed=4)


def test_examples_that_do_not_fit_are_cut_on_the_left_or_skipped_and_counted() -> None:
    lm = lm_of(counting_model(context_len=16))
    rows = [
        {"c": "abcdefghijklmnopqrstuvwxyz", "t": "abc"},  # 1 + 26 + 3 tokens: the context is cut on the left
        {"c": "ab", "t": "cdefghijklmnopqrstuvwxyz"},  # a 24-token continuation cannot fit 16 tokens
        {"c": "ab", "t": "cd"},
    ]
    t = task("loglikelihood", rows, input="{{ c }}", target="{{ t }}", target_delimiter="")
    scores = run(lm, t)
    assert (scores.truncated, scores.skipped, scores.examples) == (1, 1, 2)
    assert scores.values["acc"].value == 1.0  # the cut context still ends with "z", so "abc" is still predicted
    span, cut = lm.span(*lm.pair("abcdefghijklmnopqrstuvwxyz", "abc"))
    assert cut and span is not None and len(span.tokens) == 17 and span.scored == 3
    with pytest.raises(ValueError, match="none of its examples fit"):
        run(lm, task("loglikelihood", rows[1:2], input="{{ c }}", target="{{ t }}", target_delimiter=""))
    gen = task("generate_until", rows, input="{{ c }}", target="{{ t }}", generation=GenerationSpec(max_tokens=8))
    assert run(lm, gen).truncated == 1  # 27 prompt tokens leave no room for 8 new ones in 16: cut on the left


def test_batches_are_longest_first_and_within_the_token_budget() -> None:
    groups = batches([5, 50, 10, 40, 30], max_tokens=100, max_rows=3)
    assert groups[0][0] == 1  # the longest first
    lengths = [5, 50, 10, 40, 30]
    assert all(len(g) * max(lengths[i] for i in g) <= 100 or len(g) == 1 for g in groups)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert batches([500], max_tokens=100, max_rows=3) == [[0]]  # too long for the budget: alone
