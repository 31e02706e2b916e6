"""The store: a metadata database plus content-addressed artifacts, both under one home directory.

The home is `--home`, else `$AIFAB_HOME`, else `./.aifab`. The database is `$AIFAB_HOME/aifab.db`
unless `AIFAB_DB` names another SQLAlchemy URL. store/ imports nothing of aifab above it.
"""

import os
from pathlib import Path

from aifab.store.artifacts import ArtifactStore
from aifab.store.db import Database


def resolve_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("AIFAB_HOME") or ".aifab").expanduser().absolute()


class Store:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = resolve_home(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.artifacts = ArtifactStore(self.home / "artifacts")
        url = os.environ.get("AIFAB_DB") or f"sqlite:///{self.home / 'aifab.db'}"
        self.db = Database(url)

    def work_dir(self, *parts: str) -> Path:
        """A scratch directory under the home for a job's own files (logs, temp checkpoints)."""
        path = self.home.joinpath("work", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        self.db.close()
