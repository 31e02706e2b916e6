"""Content-addressed artifacts under one root: `root/ab/cdef...` holds the bytes whose sha256 is `abcdef...`.

Contract:
- A key is exactly 64 lowercase hex digits. Nothing else (names, `..`, absolute or encoded paths) is
  accepted, and the resolved path is checked to stay inside the root even if a directory is a symlink.
- Writes are atomic: bytes go to a temp file in `root/tmp`, are fsynced, renamed into place, and the
  directory is fsynced. A reader never sees half an artifact; writing existing content is a no-op.
- Every read verifies the digest; a mismatch raises `ArtifactCorrupt` and leaves the file for inspection.
"""

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from aifab.errors import ArtifactCorrupt, ArtifactError

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def check_key(key: object) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ArtifactError(f"invalid artifact key {key!r}: expected 64 lowercase hex digits (a sha256)")
    return key


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory after a rename makes the rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    # ---- addressing -------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """The file that holds `key` (it may not exist). Raises on any key that is not a plain digest."""
        key = check_key(key)
        path = self.root / key[:2] / key[2:]
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ArtifactError(f"artifact {key} resolves outside the store ({resolved}); refusing")
        return path

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    # ---- writing ----------------------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        return self.put_chunks([data])

    def put_file(self, src: str | Path) -> str:
        with open(src, "rb") as f:
            return self.put_stream(f)

    def put_stream(self, f: BinaryIO) -> str:
        return self.put_chunks(iter(lambda: f.read(CHUNK), b""))

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        """Write the concatenation of `chunks` atomically and return its sha256 key."""
        h = hashlib.sha256()
        fd, tmp_name = self.temp_file("put")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            key = h.hexdigest()
            final = self.path(key)
            if final.is_file():
                return key  # same content already stored: content addressing makes this a no-op
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp_name, 0o444)
            os.replace(tmp_name, final)
            fsync_path(final.parent)
            return key
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    def temp_file(self, kind: str) -> tuple[int, str]:
        """An open (fd, path) in `root/tmp`, named after this process so a crashed writer's leftovers can be
        told apart from a live writer's files (see `clean_stale_tmp`)."""
        return tempfile.mkstemp(dir=self.tmp, prefix=f"{kind}-{os.getpid()}-")

    def clean_stale_tmp(self) -> int:
        """Delete temp files left by processes that no longer run (a killed ingest or put); return the count."""
        removed = 0
        for path in self.tmp.iterdir():
            parts = path.name.split("-")
            if len(parts) < 3 or not parts[1].isdigit() or _alive(int(parts[1])):
                continue
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    # ---- reading ----------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        """Return the artifact's bytes after checking they hash to `key`."""
        path = self._existing(key)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != key:
            raise ArtifactCorrupt(f"artifact {key} is corrupt: its content no longer matches its digest ({path})")
        return data

    def verified_path(self, key: str) -> Path:
        """Hash the file in place and return its path, for readers that memory-map or stream it."""
        path = self._existing(key)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
        if h.hexdigest() != key:
            raise ArtifactCorrupt(f"artifact {key} is corrupt: its content no longer matches its digest ({path})")
        return path

    def _existing(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise ArtifactError(f"artifact {key} is missing from {self.root}")
        return path
