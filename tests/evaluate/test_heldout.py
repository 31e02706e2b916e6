"""The heldout suite draws only from held-out text: no item's text occurs in the training split, whether the
training split is read as the curated documents or as the very tokens the model trained on."""

import random
from typing import Any

import numpy as np
import pytest

from aifab.evaluate.heldout import TrainText, held_out
from aifab.evaluate.suites import heldout_tasks
from aifab.evaluate.tasks import Task
from aifab.store import Store
from aifab.store.schema import DatasetVersion
from aifab.store.splits import document_splits, is_val
from evalkit import curated_dataset

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma", "omega"]


def item_texts(task: Task) -> list[str]:
    """What an item shows the model, as one text: a document, or a next-line context with its right line."""
    if task.spec.output_type == "loglikelihood_rolling":
        return [row["text"] for row in task.rows]
    return [row["context"] + "\n" + row["choices"][row["gold"]] for row in task.rows]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        lines = [f"# document {d}"]
        for i in range(rng.randint(6, 14)):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + f" {d}.{i}")
        docs.append("\n".join(lines))
    return docs


def with_split(prefix: str, val: bool, fraction: float) -> str:
    """`prefix` plus the first suffix that puts the text in the wanted split."""
    return next(t for i in range(10_000) if is_val(t := f"{prefix}\nsuffix {i}", fraction) == val)


def test_no_item_text_occurs_in_a_training_document(store: Store) -> None:
    texts = corpus(60)
    # plant leaks: a held-out document whose whole text is inside a training document, and a held-out document
    # whose first lines a training document repeats (so next-line items cut from those lines are not held out)
    whole = with_split("a held-out text\nthat training also holds\nword for word", True, 0.3)
    texts += [whole, with_split(whole + "\nand then some", False, 0.3)]
    shared = "\n".join(f"    shared line {i} {' '.join(WORDS[i : i + 4])}" for i in range(6))
    texts += [with_split(shared + "\nheld-out tail", True, 0.3), with_split("train head\n" + shared, False, 0.3)]
    ds = curated_dataset(store, texts, val_fraction=0.3)
    held = held_out(store, ds)
    train = [t for t, s in zip(texts, document_splits(texts, 0.3), strict=True) if s == "train"]
    assert whole not in held.documents and held.leaked == 1
    tasks = heldout_tasks(held)
    assert [t.spec.name for t in tasks] == ["heldout-bpb", "heldout-next-line"]
    assert all(t.rows for t in tasks)
    for task in tasks:
        for text in item_texts(task):
            assert not any(text in doc for doc in train), text
    next_line = tasks[1]
    assert any("occur in its training split" in n for n in next_line.notes)


def test_next_line_items_have_four_choices_of_the_same_indentation_from_other_documents(store: Store) -> None:
    texts = corpus(80, seed=1)
    held = held_out(store, curated_dataset(store, texts, val_fraction=0.3))
    task = heldout_tasks(held)[1]
    source = {line: d for d, text in enumerate(held.documents) for line in text.split("\n")}
    for row in task.rows:
        choices, gold = row["choices"], row["gold"]
        assert len(choices) == 4 and len(set(choices)) == 4
        indents = {c[: len(c) - len(c.lstrip())] for c in choices}
        assert len(indents) == 1
        assert row["context"].endswith(held.documents[source[choices[gold]]].split(choices[gold])[0].rstrip("\n")[-20:])
        assert all(source[c] != source[choices[gold]] for i, c in enumerate(choices) if i != gold)
    assert sorted(row["gold"] for row in task.rows) != [0] * len(task.rows)  # the right line's place is shuffled


def test_items_are_the_same_wherever_they_are_built(store: Store, tmp_path: Any) -> None:
    texts = corpus(40, seed=2)
    first = heldout_tasks(held_out(store, curated_dataset(store, texts, val_fraction=0.3)))
    other = Store(tmp_path / "other")
    again = heldout_tasks(held_out(other, curated_dataset(other, texts, val_fraction=0.3)))
    assert [t.rows for t in first] == [t.rows for t in again]
    assert [t.digest for t in first] == [t.digest for t in again]
    other.close()


def test_a_dataset_without_held_out_text_is_refused(store: Store) -> None:
    from aifab.errors import AifabError

    with store.db.session() as s:
        s.add(DatasetVersion(name="old", version=1, manifest_digest="a" * 64, tokenizer_digest="b" * 64, files=1,
                             bytes=1, documents=1, tokens=1, train_tokens=1, val_tokens=0, params={}))  # fmt: skip
    from aifab.store.datasets import resolve_dataset

    with pytest.raises(AifabError, match="records no curated documents"):
        held_out(store, resolve_dataset(store.db, "old"))
    val = with_split("only text", True, 0.5)
    with pytest.raises(AifabError, match="no held-out document that is not also in its training split"):
        held_out(store, curated_dataset(store, [val, with_split(val + "\nmore", False, 0.5)], name="leaky"))


def test_train_text_finds_passages_across_lines() -> None:
    train = TrainText.of(["one\ntwo\nthree\nfour", "five six"])
    assert train.contains("wo\nthree\nfo") and train.contains("six") and train.contains("two\nthree")
    assert not train.contains("three\nfive") and not train.contains("four\x00five") and not train.contains("x\ntwo\ny")


def test_the_trained_models_items_are_not_in_the_tokens_it_trained_on(trained: tuple[Store, str]) -> None:
    """The issue's test: decode the training split's shards (what the model saw) and look for every item."""
    from tokenizers import Tokenizer

    from aifab.evaluate.harness import training_dataset
    from aifab.registry.models import resolve
    from aifab.store.shards import TokenShards

    store, ref = trained
    ds = training_dataset(store, resolve(store, ref))
    assert ds is not None
    shards = TokenShards(store.artifacts, ds.manifest_digest)
    tok = Tokenizer.from_str(store.artifacts.get_bytes(ds.tokenizer_digest).decode())
    ids = np.concatenate([np.asarray(a) for a in shards.arrays["train"]]).tolist()
    eot = shards.manifest.eot_id
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    assert docs
    tasks = heldout_tasks(held_out(store, ds))
    for task in tasks:
        assert task.rows
        for text in item_texts(task):
            assert not any(text in doc for doc in docs), text


def test_the_items_are_built_once_per_dataset_version(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifab.evaluate.suites import build_suite
    from aifab.evaluate.suites import heldout as builder

    ds = curated_dataset(store, corpus(40, seed=3), val_fraction=0.3)
    first = build_suite("heldout", store, ds)
    index = next((store.home / "work" / "evaluate").glob("heldout-*"))

    def no_build(*a: object) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(builder, "held_out", no_build)
    again = build_suite("heldout", store, ds)
    assert [t.rows for t in again] == [t.rows for t in first] and [t.digest for t in again] == [t.digest for t in first]
    store.artifacts.path(index.read_text()).write_text("tampered")  # a corrupt entry is rebuilt, never read
    monkeypatch.undo()
    assert [t.rows for t in build_suite("heldout", store, ds)] == [t.rows for t in first]
