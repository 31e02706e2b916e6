"""Content-addressed artifacts: round trips, digest checks, hostile keys, symlinks, atomic writes."""

import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import aifab.store.artifacts as artifacts_mod
from aifab.errors import ArtifactCorrupt, ArtifactError
from aifab.store.artifacts import ArtifactStore, check_key


@pytest.fixture
def arts(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def _stored_files(a: ArtifactStore) -> list[Path]:
    """Every file in the store outside its tmp directory."""
    return sorted(p for p in a.root.rglob("*") if p.is_file() and a.tmp not in p.parents)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- round trips ----------------------------------------------------------------------------------------


def test_put_get_round_trip(arts: ArtifactStore) -> None:
    data = b"hello artifacts\x00\xff"
    key = arts.put_bytes(data)
    assert key == _sha(data)
    assert arts.get_bytes(key) == data
    assert arts.exists(key)
    path = arts.verified_path(key)
    assert path == arts.root / key[:2] / key[2:]
    assert path.read_bytes() == data


def test_empty_artifact(arts: ArtifactStore) -> None:
    key = arts.put_bytes(b"")
    assert key == _sha(b"")
    assert arts.get_bytes(key) == b""


def test_put_file_and_stream_larger_than_a_chunk(arts: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(artifacts_mod.CHUNK * 2 + 12345)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    key = arts.put_file(src)
    assert key == _sha(data)
    assert arts.put_stream(io.BytesIO(data)) == key
    assert arts.verified_path(key).read_bytes() == data
    assert arts.get_bytes(key) == data


def test_put_chunks_hashes_the_concatenation(arts: ArtifactStore) -> None:
    key = arts.put_chunks([b"ab", b"", b"cd", b"e"])
    assert key == _sha(b"abcde")
    assert arts.get_bytes(key) == b"abcde"


def test_same_content_twice_is_one_file(arts: ArtifactStore) -> None:
    k1 = arts.put_bytes(b"same")
    k2 = arts.put_chunks([b"sa", b"me"])
    assert k1 == k2
    assert _stored_files(arts) == [arts.path(k1)]
    assert list(arts.tmp.iterdir()) == []


def test_distinct_content_distinct_files(arts: ArtifactStore) -> None:
    keys = {arts.put_bytes(bytes([i])) for i in range(5)}
    assert len(keys) == 5
    assert len(_stored_files(arts)) == 5


def test_stored_files_are_read_only(arts: ArtifactStore) -> None:
    key = arts.put_bytes(b"frozen")
    mode = stat.S_IMODE(arts.path(key).stat().st_mode)
    assert mode == 0o444


def test_store_reopens_on_the_same_root(arts: ArtifactStore) -> None:
    key = arts.put_bytes(b"persist")
    again = ArtifactStore(arts.root)
    assert again.get_bytes(key) == b"persist"


# ---- missing and corrupt ---------------------------------------------------------------------------------


def test_missing_key_raises_artifact_error(arts: ArtifactStore) -> None:
    key = _sha(b"never stored")
    assert not arts.exists(key)
    with pytest.raises(ArtifactError) as exc:
        arts.get_bytes(key)
    assert not isinstance(exc.value, ArtifactCorrupt)
    assert key in str(exc.value)
    with pytest.raises(ArtifactError):
        arts.verified_path(key)


def _corrupt(arts: ArtifactStore, key: str, data: bytes) -> Path:
    path = arts.path(key)
    path.chmod(0o644)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("replacement", [b"tampered", b"", b"hello artifacts!"])
def test_corrupt_artifact_detected_and_kept(arts: ArtifactStore, replacement: bytes) -> None:
    key = arts.put_bytes(b"hello artifacts")
    path = _corrupt(arts, key, replacement)
    with pytest.raises(ArtifactCorrupt) as exc:
        arts.get_bytes(key)
    assert key in str(exc.value)
    with pytest.raises(ArtifactCorrupt):
        arts.verified_path(key)
    assert path.read_bytes() == replacement  # left for inspection


def test_corrupt_large_artifact_detected_in_last_chunk(arts: ArtifactStore) -> None:
    data = b"x" * (artifacts_mod.CHUNK + 10)
    key = arts.put_bytes(data)
    _corrupt(arts, key, data[:-1] + b"y")
    with pytest.raises(ArtifactCorrupt):
        arts.verified_path(key)


def test_put_again_does_not_repair_or_clobber_silently(arts: ArtifactStore) -> None:
    # content addressing makes a second put a no-op: it must not hide corruption from the next reader
    key = arts.put_bytes(b"payload")
    _corrupt(arts, key, b"junk")
    assert arts.put_bytes(b"payload") == key
    with pytest.raises(ArtifactCorrupt):
        arts.get_bytes(key)


# ---- hostile keys ---------------------------------------------------------------------------------------

HOSTILE_KEYS: list[object] = [
    "../etc/passwd",
    "/etc/passwd",
    "/" + "a" * 63,
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f" + "a" * 55,
    "A" * 64,
    "a" * 32 + "B" * 32,
    "a" * 63,
    "a" * 65,
    "",
    "ab/" + "c" * 61,
    "a" * 31 + "/" + "a" * 32,
    "a" * 31 + "\\" + "a" * 32,
    "..",
    "." * 64,
    "a" * 64 + "\n",
    "\n" + "a" * 64,
    " " + "a" * 63,
    "a" * 63 + "\x00",
    "\x00",
    "g" * 64,
    "\uff10" * 64,  # full-width digit zero
    None,
    123,
    b"a" * 64,
    ["a" * 64],
]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_hostile_keys_rejected(arts: ArtifactStore, key: object) -> None:
    with pytest.raises(ArtifactError):
        check_key(key)
    with pytest.raises(ArtifactError):
        arts.path(key)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError):
        arts.get_bytes(key)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError):
        arts.exists(key)  # type: ignore[arg-type]


def test_hostile_key_message_is_one_line(arts: ArtifactStore) -> None:
    with pytest.raises(ArtifactError) as exc:
        arts.path("a" * 64 + "\n")
    assert "\n" not in str(exc.value)


def test_valid_key_accepted() -> None:
    key = "0123456789abcdef" * 4
    assert check_key(key) == key


# ---- symlinks -------------------------------------------------------------------------------------------


def test_symlinked_fanout_dir_is_refused(arts: ArtifactStore, tmp_path: Path) -> None:
    data = b"attack payload"
    key = _sha(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (arts.root / key[:2]).symlink_to(outside, target_is_directory=True)

    with pytest.raises(ArtifactError):
        arts.path(key)
    with pytest.raises(ArtifactError):
        arts.put_bytes(data)
    with pytest.raises(ArtifactError) as exc:
        arts.get_bytes(key)
    assert not isinstance(exc.value, ArtifactCorrupt)
    assert list(outside.iterdir()) == []
    assert list(arts.tmp.iterdir()) == []


def test_symlinked_fanout_dir_refused_even_when_outside_holds_the_bytes(arts: ArtifactStore, tmp_path: Path) -> None:
    data = b"looks legitimate"
    key = _sha(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / key[2:]).write_bytes(data)
    (arts.root / key[:2]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError):
        arts.get_bytes(key)
    with pytest.raises(ArtifactError):
        arts.verified_path(key)


def test_dangling_fanout_symlink_is_refused(arts: ArtifactStore, tmp_path: Path) -> None:
    data = b"dangling"
    key = _sha(data)
    target = tmp_path / "not-yet"
    (arts.root / key[:2]).symlink_to(target, target_is_directory=True)
    with pytest.raises(ArtifactError):
        arts.put_bytes(data)
    assert not target.exists()


def test_symlinked_artifact_file_is_refused(arts: ArtifactStore, tmp_path: Path) -> None:
    data = b"secret outside the store"
    key = _sha(data)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(data)
    (arts.root / key[:2]).mkdir()
    (arts.root / key[:2] / key[2:]).symlink_to(outside)
    with pytest.raises(ArtifactError):
        arts.get_bytes(key)


# ---- atomicity ------------------------------------------------------------------------------------------


def _failing_chunks() -> Iterator[bytes]:
    yield b"first half of the artifact "
    yield b"second part "
    raise RuntimeError("source went away mid-write")


def test_failed_put_leaves_nothing_behind(arts: ArtifactStore) -> None:
    with pytest.raises(RuntimeError, match="mid-write"):
        arts.put_chunks(_failing_chunks())
    assert sorted(p.name for p in arts.root.iterdir()) == ["tmp"]
    assert list(arts.tmp.iterdir()) == []
    partial = _sha(b"first half of the artifact second part ")
    assert not arts.exists(partial)


def test_failed_stream_leaves_nothing_behind(arts: ArtifactStore) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError("disk read error")
            return b"z" * 100

    with pytest.raises(OSError, match="disk read error"):
        arts.put_stream(Broken())  # type: ignore[arg-type]
    assert _stored_files(arts) == []
    assert list(arts.tmp.iterdir()) == []


def test_failed_rename_leaves_no_partial_file(arts: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(artifacts_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="no space"):
        arts.put_bytes(b"never lands")
    monkeypatch.undo()
    assert _stored_files(arts) == []
    assert list(arts.tmp.iterdir()) == []
    assert not arts.exists(_sha(b"never lands"))


def test_failed_put_does_not_touch_existing_artifacts(arts: ArtifactStore) -> None:
    key = arts.put_bytes(b"keep me")
    with pytest.raises(RuntimeError):
        arts.put_chunks(_failing_chunks())
    assert arts.get_bytes(key) == b"keep me"
    assert _stored_files(arts) == [arts.path(key)]


def test_put_writes_through_tmp_then_renames(arts: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final path only ever appears through os.replace from root/tmp: a reader never sees half a file."""
    seen: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append((Path(src), Path(dst)))
        assert not Path(dst).exists()
        real_replace(src, dst)

    monkeypatch.setattr(artifacts_mod.os, "replace", spy)
    key = arts.put_bytes(b"atomic")
    assert len(seen) == 1
    src, dst = seen[0]
    assert src.parent == arts.tmp
    assert dst == arts.path(key)


def test_clean_stale_tmp_removes_only_files_of_dead_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    store = ArtifactStore(tmp_path / "artifacts")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (store.tmp / f"put-{dead_pid}-abc").write_bytes(b"half")
    (store.tmp / f"shard-{os.getpid()}-def").write_bytes(b"mine, still being written")
    (store.tmp / "unrelated").write_bytes(b"not ours to judge")
    assert store.clean_stale_tmp() == 1
    assert sorted(p.name for p in store.tmp.iterdir()) == sorted([f"shard-{os.getpid()}-def", "unrelated"])
