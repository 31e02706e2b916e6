"""The metadata database: SQLite pragmas, Alembic migrations, AIFAB_DB, and errors a user can act on."""

import sqlite3
from pathlib import Path

import alembic.command
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from aifab.errors import StoreError
from aifab.store import Store
from aifab.store.db import SQLITE_BUSY_TIMEOUT_MS, Database, _redact, table_names
from aifab.store.schema import Base, DatasetVersion, Run, RunMetric
from helpers import dataset_row

TABLES = {
    "dataset_versions", "runs", "run_metrics", "model_versions", "model_aliases", "lineage_edges", "ledger",
    "jobs", "job_events", "stage_runs", "promotions", "alias_events", "eval_results",
}  # fmt: skip


def _pragma(db: Database, name: str) -> object:
    with db.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


# ---- SQLite pragmas -------------------------------------------------------------------------------------


def test_sqlite_pragmas_set_on_every_fresh_connection(store: Store) -> None:
    store.db.engine.dispose()  # drop pooled connections: the next one is opened (and configured) afresh
    assert str(_pragma(store.db, "journal_mode")).lower() == "wal"
    assert _pragma(store.db, "foreign_keys") == 1
    assert _pragma(store.db, "busy_timeout") == SQLITE_BUSY_TIMEOUT_MS
    assert SQLITE_BUSY_TIMEOUT_MS > 0


def test_wal_is_persistent_in_the_file(store: Store) -> None:
    # WAL is a property of the database file: a plain sqlite3 connection without our pragmas sees it too.
    conn = sqlite3.connect(store.home / "aifab.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# ---- migrations -----------------------------------------------------------------------------------------


def test_migrations_create_every_table(store: Store) -> None:
    names = set(table_names(store.db.engine))
    assert set(Base.metadata.tables) == TABLES
    assert TABLES | {"alembic_version"} == names


def test_migrations_match_the_orm_schema(store: Store) -> None:
    """A column added to schema.py without a migration (or the reverse) shows up here."""
    with store.db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_database_is_at_head_revision(store: Store) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from aifab.store.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with store.db.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head


def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    first = Store(home)
    with first.db.session() as s:
        s.add(dataset_row(name="d"))
        s.add(Run(id="r1", kind="train", status="completed", params={"lr": 0.1}))
        s.add(RunMetric(run_id="r1", step=1, key="loss", value=2.5, elapsed_s=0.1))
    first.close()

    def no_upgrade(*args: object, **kwargs: object) -> None:
        raise AssertionError("a database already at head must not be migrated again")

    monkeypatch.setattr(alembic.command, "upgrade", no_upgrade)
    second = Store(home)
    try:
        with second.db.session() as s:
            assert s.scalar(select(DatasetVersion.name)) == "d"
            run = s.get(Run, "r1")
            assert run is not None and run.params == {"lr": 0.1}
            assert s.scalar(select(func.count()).select_from(RunMetric)) == 1
            assert s.scalar(select(func.count()).select_from(DatasetVersion)) == 1
        with second.db.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").fetchall()
        assert len(rows) == 1
    finally:
        second.close()


def test_session_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.db.session() as s:
        s.add(Run(id="r1", kind="train", status="running"))
        s.flush()
        raise RuntimeError("boom")
    with store.db.session() as s:
        assert s.get(Run, "r1") is None


# ---- integrity ------------------------------------------------------------------------------------------


def test_foreign_keys_enforced(store: Store) -> None:
    with pytest.raises(IntegrityError), store.db.session() as s:
        s.add(RunMetric(run_id="no-such-run", step=1, key="loss", value=1.0, elapsed_s=0.0))
    with store.db.session() as s:
        assert s.scalar(select(func.count()).select_from(RunMetric)) == 0


def test_foreign_key_to_dataset_enforced(store: Store) -> None:
    with pytest.raises(IntegrityError), store.db.session() as s:
        s.add(Run(id="r1", kind="train", status="running", dataset_version_id=12345))


def test_delete_run_cascades_to_metrics(store: Store) -> None:
    with store.db.session() as s:
        s.add(Run(id="r1", kind="train", status="completed"))
        s.flush()
        s.add_all(RunMetric(run_id="r1", step=i, key="loss", value=1.0 / (i + 1), elapsed_s=i) for i in range(3))
    with store.db.session() as s:
        s.execute(Base.metadata.tables["runs"].delete().where(Base.metadata.tables["runs"].c.id == "r1"))
    with store.db.session() as s:
        assert s.scalar(select(func.count()).select_from(RunMetric)) == 0


def test_unique_dataset_name_version(store: Store) -> None:
    with store.db.session() as s:
        s.add(dataset_row(name="d", version=1))
    with pytest.raises(IntegrityError), store.db.session() as s:
        s.add(dataset_row(name="d", version=1))


def test_counts_beyond_32_bits_round_trip(store: Store) -> None:
    big = 10_000_000_000  # a 10B-token dataset
    with store.db.session() as s:
        s.add(dataset_row(bytes=4 * big, tokens=big, train_tokens=big - 1))
    with store.db.session() as s:
        ds = s.scalars(select(DatasetVersion)).one()
        assert (ds.bytes, ds.tokens, ds.train_tokens) == (4 * big, big, big - 1)


# ---- where the database lives ---------------------------------------------------------------------------


def test_default_database_is_under_home(store: Store) -> None:
    assert store.db.url == f"sqlite:///{store.home / 'aifab.db'}"
    assert (store.home / "aifab.db").is_file()


def test_aifab_db_env_selects_another_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere" / "other.db"
    other.parent.mkdir()
    url = f"sqlite:///{other}"
    monkeypatch.setenv("AIFAB_DB", url)
    s = Store(tmp_path / "home")
    try:
        assert s.db.url == url
        with s.db.session() as sess:
            sess.add(Run(id="r-env", kind="train", status="running"))
    finally:
        s.close()
    assert other.is_file()
    assert not (tmp_path / "home" / "aifab.db").exists()
    # the row really went to the other file
    db = Database(url)
    try:
        with db.session() as sess:
            assert sess.get(Run, "r-env") is not None
    finally:
        db.close()


# ---- errors ---------------------------------------------------------------------------------------------


def test_unknown_dialect_is_a_store_error() -> None:
    with pytest.raises(StoreError) as exc:
        Database("nosuchdb://x")
    msg = str(exc.value)
    assert "nosuchdb" in msg
    assert "\n" not in msg


def test_unparseable_url_is_a_store_error() -> None:
    with pytest.raises(StoreError) as exc:
        Database("not a url")
    assert "not a url" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_connection_failure_hides_password_and_is_one_line() -> None:
    # port 1 on loopback refuses at once: no network, no waiting
    with pytest.raises(StoreError) as exc:
        Database("postgresql+psycopg://alice:s3cretpw@127.0.0.1:1/aifab")
    msg = str(exc.value)
    assert "s3cretpw" not in msg
    assert "alice" in msg and "127.0.0.1" in msg
    assert "\n" not in msg


def test_unopenable_sqlite_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as exc:
        Database(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    assert "\n" not in str(exc.value)
    assert "x.db" in str(exc.value)


def test_garbage_file_is_a_store_error_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "aifab.db"
    junk = b"this is not a sqlite database " * 200
    path.write_bytes(junk)
    with pytest.raises(StoreError) as exc:
        Database(f"sqlite:///{path}")
    assert "\n" not in str(exc.value)
    assert path.read_bytes() == junk


def test_database_from_a_newer_aifab_is_a_store_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'aifab.db'}"
    Database(url).close()
    conn = sqlite3.connect(tmp_path / "aifab.db")
    conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as exc:
        Database(url)
    assert "9999_from_the_future" in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://u:secret@host/db", "secret"),
        ("postgresql+psycopg://user:hunter2@db.example.com:5432/aifab", "hunter2"),
        ("mysql://root:p%40ss@localhost/x", "p%40ss"),
    ],
)
def test_redact_hides_password(url: str, secret: str) -> None:
    red = _redact(url)
    assert secret not in red
    assert red.endswith(url.rsplit("@", 1)[1])
    assert red.startswith(url.split("://", 1)[0] + "://")


def test_redact_leaves_urls_without_credentials_alone() -> None:
    assert _redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_upgrading_a_first_schema_database_keeps_its_rows(tmp_path: Path) -> None:
    """A store made by the first release migrates to the current schema with its datasets intact."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from aifab.store.db import MIGRATIONS, Database, make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO dataset_versions (name, version, created_at, manifest_digest, tokenizer_digest, files,"
                " bytes, documents, tokens, train_tokens, val_tokens, params) VALUES ('old', 1, '2026-01-01 00:00:00',"
                " :d, :d, 1, 2, 3, 4, 3, 1, '{}')"
            ),
            {"d": "a" * 64},
        )
    engine.dispose()
    db = Database(url)
    try:
        with db.session() as s:
            row = s.scalars(select(DatasetVersion)).one()
            assert (row.name, row.tokens, row.parent_id, row.stages, row.curated_digest) == ("old", 4, None, None, None)
    finally:
        db.close()


def test_upgrading_a_0002_database_adds_model_generation_as_empty(tmp_path: Path) -> None:
    """0003 adds model_versions.generation; models registered before it read back `{}` (nothing known)."""
    from sqlalchemy import inspect

    from aifab.store.db import Database
    from aifab.store.schema import ModelVersion

    url = old_database(
        tmp_path,
        "0002",
        "model_versions",
        "generation",
        "INSERT INTO model_versions (name, version, created_at, weights_digest, tokenizer_digest, config,"
        " params_count, metrics) VALUES ('old', 1, '2026-01-01 00:00:00', :d, :d, '{}', 10, '{}')",
        d="a" * 64,
    )
    db = Database(url)
    try:
        assert "generation" in {c["name"] for c in inspect(db.engine).get_columns("model_versions")}
        with db.session() as s:
            row = s.scalars(select(ModelVersion)).one()
            assert (row.name, row.params_count, row.generation) == ("old", 10, {})
            s.add(
                ModelVersion(name="old", version=2, weights_digest="b" * 64, tokenizer_digest="b" * 64, params_count=1)
            )
        with db.session() as s:
            assert s.scalars(select(ModelVersion.generation).where(ModelVersion.version == 2)).one() == {}
    finally:
        db.close()


def test_upgrading_a_0003_database_adds_ledger_deployment(tmp_path: Path) -> None:
    """0004 adds ledger.deployment; rows written before it read back None and new rows keep their id."""
    from sqlalchemy import inspect

    from aifab.store.db import Database
    from aifab.store.schema import LedgerEntry

    url = old_database(
        tmp_path,
        "0003",
        "ledger",
        "deployment",
        "INSERT INTO ledger (created_at, stage, subject_kind, subject_id, device, sampler, estimated,"
        " elapsed_s, device_s, energy_j, cost_usd, co2_g, tokens_in, tokens_out) VALUES"
        " ('2026-01-01 00:00:00', 'serve', 'model', '1', 'cpu', 'rapl', 0, 1, 1, 12.5, 0.1, 2, 3, 4)",
    )
    db = Database(url)
    try:
        assert "deployment" in {c["name"] for c in inspect(db.engine).get_columns("ledger")}
        with db.session() as s:
            row = s.scalars(select(LedgerEntry)).one()
            assert (row.stage, row.energy_j, row.tokens_out, row.deployment) == ("serve", 12.5, 4, None)
            s.add(
                LedgerEntry(
                    stage="serve", subject_kind="model", subject_id="1", device="cpu", sampler="rapl",
                    estimated=False, elapsed_s=0, device_s=0, energy_j=1, cost_usd=0, co2_g=0,
                    deployment="dep-0123abcd",
                )
            )  # fmt: skip
        with db.session() as s:
            got = s.scalars(select(LedgerEntry.deployment).order_by(LedgerEntry.id)).all()
            assert got == [None, "dep-0123abcd"]
    finally:
        db.close()


def old_database(tmp_path: Path, revision: str, table: str, column: str, insert: str, **params: object) -> str:
    """A SQLite store migrated only up to `revision` (which must lack `table.column`), holding one row written
    by `insert`; returns its URL. Opening it with `Database` runs the later migrations."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect, text

    from aifab.store.db import MIGRATIONS, make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        assert column not in {c["name"] for c in inspect(conn).get_columns(table)}
        conn.execute(text(insert), params)
    engine.dispose()
    return url
