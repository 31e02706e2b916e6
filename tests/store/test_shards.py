"""The shard format and the batch loader the trainer resumes from."""

import numpy as np
import pytest

from aifab.errors import ArtifactError
from aifab.store import Store
from aifab.store.shards import Manifest, TokenShards


def make_shards(store: Store, sizes: dict[str, list[int]]) -> TokenShards:
    """Shards whose tokens are consecutive integers, so a window's first token says where it came from."""
    splits, start = {}, 0
    for split, lengths in sizes.items():
        splits[split] = []
        for n in lengths:
            data = np.arange(start, start + n, dtype=np.uint16).tobytes()
            splits[split].append({"digest": store.artifacts.put_bytes(data), "tokens": n})
            start += n
    manifest = Manifest(tokenizer_digest="0" * 64, vocab_size=65535, eot_id=0, dtype="uint16", splits=splits)
    return TokenShards(store.artifacts, store.artifacts.put_bytes(manifest.to_json()))


def test_manifest_records_counts_dtype_and_digests(store: Store) -> None:
    shards = make_shards(store, {"train": [100, 50], "val": [40]})
    m = shards.manifest
    assert (m.tokens("train"), m.tokens("val"), m.dtype) == (150, 40, "uint16")
    assert all(len(s["digest"]) == 64 for s in m.splits["train"])


def test_random_batches_are_a_function_of_seed_and_position(store: Store) -> None:
    shards = make_shards(store, {"train": [500, 300], "val": [100]})
    loader = shards.loader("train", 4, 16, seed=3)
    first = [next(loader) for _ in range(5)]
    resumed = shards.loader("train", 4, 16, seed=3, position=3)
    for k in (3, 4):
        x, y = next(resumed)
        assert (x == first[k][0]).all() and (y == first[k][1]).all()
    other = shards.loader("train", 4, 16, seed=4).batch_at(0)[0]
    assert not (other == first[0][0]).all()
    for x, y in first:
        assert x.shape == (4, 16) and x.dtype == np.int64
        assert (np.diff(x, axis=1) == 1).all()  # a window never spans two shards
        assert (y == x + 1).all()


def test_sequential_batches_cover_every_window_once_per_pass(store: Store) -> None:
    shards = make_shards(store, {"train": [65, 49], "val": [40]})
    loader = shards.loader("train", 2, 16, order="sequential")
    assert loader.windows == 4 + 3  # (65-1)//16 + (49-1)//16
    starts = [int(row[0]) for x, _ in (loader.batch_at(k) for k in range(4)) for row in x]
    assert starts[:7] == [0, 16, 32, 48, 65, 81, 97]
    assert starts[7] == 0  # the eighth window wraps around to the start
    x, y = loader.batch_at(1)
    assert (y[:, :-1] == x[:, 1:]).all()


def test_bad_loader_arguments(store: Store) -> None:
    shards = make_shards(store, {"train": [20], "val": [40]})
    with pytest.raises(ArtifactError, match="train split has no shard longer than the context"):
        shards.loader("train", 2, 32)
    with pytest.raises(ValueError, match="order"):
        shards.loader("val", 2, 8, order="shuffled")


def test_check_fits_names_the_split(store: Store) -> None:
    shards = make_shards(store, {"train": [200], "val": [10]})
    with pytest.raises(ArtifactError, match="the val split has 10 tokens"):
        shards.check_fits(16)
