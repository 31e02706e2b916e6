"""Task files: a valid one loads with its rows and digest; every bad one is refused in one line naming the file,
the line and the key, before any model is loaded."""

import json
from pathlib import Path

import pytest

from aifab.evaluate.tasks import TaskError, load_task, render_examples
from aifab.store import Store
from evalkit import curated_dataset, write_task

ROWS = [
    {"q": "one plus one", "a": "two", "opts": ["two", "three"], "gold": 0},
    {"q": "two plus one", "a": "three", "opts": ["two", "three"], "gold": "three"},
    {"q": "one plus two", "a": "three", "opts": ["three", "four"], "gold": 0},
]
MC = """
    name: sums
    output_type: multiple_choice
    dataset:
      path: data.jsonl
    input: "Q: {{ q }}"
    choices: "{{ opts }}"
    gold: "{{ gold }}"
    fewshot: 1
"""


def error_of(path: Path, store: Store | None = None) -> str:
    with pytest.raises(TaskError) as e:
        load_task(path, store)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_valid_task_loads_renders_and_has_a_digest(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, MC, ROWS))
    assert task.spec.name == "sums" and len(task.rows) == 3 and len(task.digest) == 64
    examples = render_examples(task, None)
    assert [e.gold for e in examples] == [0, 1, 0]
    assert examples[1].choices == ("two", "three")
    # one few-shot example, another row with its right answer, before the question
    assert examples[0].context.endswith("\n\nQ: one plus one") and examples[0].context.count("Q: ") == 2
    assert render_examples(task, 2)[-1].index == 1
    assert task.spec.metric_names() == ["acc", "acc_norm"]


def test_the_digest_changes_with_the_task_and_with_its_data(tmp_path: Path) -> None:
    first = load_task(write_task(tmp_path, MC, ROWS)).digest
    assert load_task(write_task(tmp_path, MC, ROWS)).digest == first
    assert load_task(write_task(tmp_path, MC + "    fewshot_seed: 7\n", ROWS)).digest != first
    assert load_task(write_task(tmp_path, MC, [*ROWS, ROWS[0]])).digest != first


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("output_type: loglikelihood\ndataset: {path: data.jsonl}\ninput: x\ntarget: y\n", ":1: name: Field required"),
        (MC.replace("fewshot: 1", "fewshot: two"), ":8: fewshot: Input should be a valid integer"),
        (MC + "    temprature: 0.5\n", ":9: temprature: unknown key"),
        (MC.replace("multiple_choice", "ranking"), ":2: output_type: Input should be"),
        (MC.replace('"Q: {{ q }}"', '"Q: {{ q "'), ":5: input: template does not compile"),
        (
            MC.replace('"Q: {{ q }}"', '"Q: {{ question }}"'),
            ":5: input: row 1: template fails: 'question' is undefined",
        ),
        (MC.replace("data.jsonl", "missing.jsonl"), ":4: dataset.path: dataset file"),
        (MC.replace("path: data.jsonl", "path: ../../../etc/passwd"), ":4: dataset.path: dataset file"),
        (MC.replace("path: data.jsonl", "path: data.jsonl\n      registered: docs"), ":3: dataset: give exactly one"),
        (MC + "    metrics: [acc, perplexity]\n", ":9: metrics.1: multiple_choice cannot compute 'perplexity'"),
        (MC + "    metrics: [acc, accuracy]\n", ":9: metrics.1: unknown metric 'accuracy'"),
        (MC.replace('    gold: "{{ gold }}"\n', ""), ":2: gold: required for output_type multiple_choice"),
        (MC.replace("fewshot: 1", "fewshot: 3"), ":8: fewshot: 3 few-shot examples need more than 3 rows"),
        (MC.replace('"{{ opts }}"', '"{{ q }}"'), ":6: choices: row 1: choices must evaluate to a list"),
        (
            MC.replace('"{{ opts }}"', '"Q {{ opts }}"'),
            ":6: choices: row 1: choices must be a list of templates or one",
        ),
        (MC.replace('"{{ gold }}"', '"{{ gold + 5 }}"'), ":7: gold: "),
        (
            MC.replace('"Q: {{ q }}"', "\"{{ ''.__class__.__mro__[1].__subclasses__() }}\""),
            ":5: input: row 1: template fails: access to attribute '__class__'",
        ),
        ("- a\n- b\n", ":1: a task file must be a mapping"),
        ("name: [unclosed\n", ":2: malformed YAML"),
        ("", ":1: a task file must be a mapping of keys, got an empty file"),
    ],
)
def test_a_bad_task_file_is_refused_in_one_line(tmp_path: Path, body: str, expected: str) -> None:
    path = write_task(tmp_path, body, ROWS)
    msg = error_of(path)
    assert msg.startswith(str(path) + ":") and expected in msg, msg


def test_a_later_row_that_fails_is_named_by_row_and_key(tmp_path: Path) -> None:
    rows = [*ROWS, {"q": "x", "a": "y", "opts": ["y", "z"], "gold": 9}]
    task = load_task(write_task(tmp_path, MC.replace("fewshot: 1", "fewshot: 0"), rows))  # the first row renders
    with pytest.raises(TaskError, match=r"task.yaml:7: gold: row 4: gold index 9 is out of range for 2 choices"):
        render_examples(task, None)
    assert len(render_examples(task, 3)) == 3  # within the limit, nothing fails


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"q": 1}\nnot json\n', "data.jsonl line 2: not valid JSON"),
        ('{"q": 1}\n[1, 2]\n', "data.jsonl line 2: expected a JSON object, got list"),
        ("\n\n", "has no rows"),
    ],
)
def test_a_malformed_dataset_is_refused_naming_its_line(tmp_path: Path, data: str, expected: str) -> None:
    path = write_task(tmp_path, MC)
    (tmp_path / "data.jsonl").write_text(data)
    msg = error_of(path)
    assert f"{path}:4: dataset.path: " in msg and expected in msg, msg


def test_a_directory_or_an_oversize_file_is_not_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_task(tmp_path, MC.replace("data.jsonl", "dir.jsonl"))
    (tmp_path / "dir.jsonl").mkdir()
    assert "is not a regular file" in error_of(path)
    from aifab.evaluate import rows

    path = write_task(tmp_path, MC, ROWS)
    monkeypatch.setattr(rows, "MAX_BYTES", 10)
    assert "the limit is 10" in error_of(path)


def test_csv_and_parquet_datasets(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data.csv").write_text("q,a\none plus one,two\ntwo plus two,four\n")
    body = "name: t\noutput_type: generate_until\ndataset: {path: data.csv}\ninput: '{{ q }} ='\ntarget: '{{ a }}'\n"
    task = load_task(write_task(tmp_path, body))
    assert render_examples(task, None)[1].target == "four"
    (tmp_path / "data.csv").write_text("q,a\none,two,three\n")
    assert "line 2: more cells than the header has columns" in error_of(tmp_path / "task.yaml")
    pq.write_table(pa.table({"q": ["x", "y"], "a": ["1", "2"]}), tmp_path / "data.parquet")
    task = load_task(write_task(tmp_path, body.replace("data.csv", "data.parquet")))
    assert [e.target for e in render_examples(task, None)] == ["1", "2"]
    (tmp_path / "data.parquet").write_bytes(b"PAR1 not really")
    assert "not a readable Parquet file" in error_of(tmp_path / "task.yaml")
    assert "must end in .jsonl, .csv, .parquet" in error_of(write_task(tmp_path, body.replace("data.csv", "x.txt")))


def test_combinations_the_schema_alone_cannot_refuse(tmp_path: Path) -> None:
    gen = "name: g\noutput_type: generate_until\ndataset: {path: data.jsonl}\ninput: '{{ q }}'\ntarget: '{{ a }}'\n"
    cases = {
        gen + "metrics: [exact_match, pass@k]\n": ":6: metrics: pass@k runs tests: add a `code:` section",
        gen + "metrics: [pass@5]\ncode: {tests: x, samples: 2, temperature: 1}\n": "code.temperature: unknown key",
        gen + "metrics: [pass@5]\ncode: {tests: x, samples: 2}\n": ":7: code.samples: pass@5 needs at least 5",
        gen + "metrics: [pass@2]\ncode: {tests: x, samples: 2}\n": ":7: code.samples: several samples per problem",
        gen.replace("generate_until", "loglikelihood") + "code: {tests: x}\n": ":6: code: only a generate_until",
        gen + "code: {tests: x, entry_point: '{{ a }} b'}\n": ":6: code.entry_point: row 1: entry point 'two b'",
        gen.replace("generate_until", "loglikelihood_rolling") + "fewshot: 1\n": ":6: fewshot: a loglikelihood_rolling",
    }
    for body, expected in cases.items():
        msg = error_of(write_task(tmp_path, body, ROWS))
        assert expected in msg, (body, msg)


def test_a_registered_dataset_gives_its_held_out_documents(store: Store, tmp_path: Path) -> None:
    texts = [f"document number {i}\nwith a second line {i}" for i in range(40)]
    curated_dataset(store, texts, val_fraction=0.5)
    body = "name: docs\noutput_type: loglikelihood_rolling\ndataset: {registered: 'docs:1'}\ninput: '{{ text }}'\n"
    task = load_task(write_task(tmp_path, body), store)
    from aifab.store.splits import document_splits

    val = {t for t, s in zip(texts, document_splits(texts, 0.5), strict=True) if s == "val"}
    assert {r["text"] for r in task.rows} == val and task.dataset_version_id is not None
    assert ":3: dataset.registered: unknown dataset 'nope'" in error_of(
        write_task(tmp_path, body.replace("docs:1", "nope")), store
    )
    assert ":3: dataset.registered: invalid dataset name" in error_of(
        write_task(tmp_path, body.replace("docs:1", "../x")), store
    )
    assert "needs the store" in error_of(write_task(tmp_path, body))


def test_the_task_file_itself_missing_or_unreadable(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: file not found"
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    assert error_of(tmp_path / "bin.yaml").startswith(f"{tmp_path / 'bin.yaml'}: cannot read")


def test_rows_are_plain_json_values(tmp_path: Path) -> None:
    """A row's nested values reach the templates as they are in the file."""
    rows = [{"q": {"text": "a", "n": [1, 2]}, "a": "b"}]
    (tmp_path / "data.jsonl").write_text(json.dumps(rows[0]) + "\n")
    body = "name: n\noutput_type: loglikelihood\ndataset: {path: data.jsonl}\ninput: '{{ q.text }}{{ q.n[1] }}'\n"
    task = load_task(write_task(tmp_path, body + "target: '{{ doc[\"a\"] }}'\n"))
    ex = render_examples(task, None)[0]
    assert (ex.context, ex.target) == ("a2", "b")
