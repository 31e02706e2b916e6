"""The metadata database: one SQLAlchemy engine, migrated to the latest schema on open.

SQLite (the default, at `$AIFAB_HOME/aifab.db`) runs with WAL, a busy timeout and foreign keys on.
`AIFAB_DB` selects any other SQLAlchemy URL, e.g. `postgresql+psycopg://user@localhost/aifab`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from aifab.errors import StoreError

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def make_engine(url: str) -> Engine:
    """Create an engine for `url`; SQLite connections get WAL, busy_timeout and foreign keys."""
    try:
        engine = create_engine(url, future=True)
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise StoreError(f"cannot use database URL {_redact(url)!r}: {_one_line(e)}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses at most the last commit
    cur.close()


def _redact(url: str) -> str:
    """Hide a password in a URL before it reaches a message."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def _one_line(e: BaseException) -> str:
    """An exception's message on one line: the driver's own error, without SQLAlchemy's help link."""
    orig = getattr(e, "orig", None)
    return " ".join(str(orig if orig is not None else e).split())


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision (creating it on an empty database)."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    where = _redact(str(engine.url))
    try:
        with engine.begin() as conn:
            if MigrationContext.configure(conn).get_current_revision() == head:
                return
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as e:
        raise StoreError(f"cannot open database {where}: {e.__class__.__name__}: {_one_line(e)}") from None
    except CommandError as e:  # e.g. a revision this aifab does not know: the database is from a newer version
        raise StoreError(f"cannot migrate database {where}: {_one_line(e)}") from None


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())


class Database:
    """An engine plus a session factory. `with db.session() as s:` commits on success, rolls back on error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        try:
            migrate(self.engine)
        except BaseException:
            self.engine.dispose()  # release the pool's connections before the error reaches the user
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()
