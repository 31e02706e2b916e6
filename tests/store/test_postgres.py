"""The same store code on PostgreSQL. Runs only when AIFAB_TEST_PG_URL names a database, e.g.
`postgresql+psycopg://postgres@127.0.0.1:55432/aifab_test`. Each test gets its own schema, dropped afterwards.
"""

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import alembic.command
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, delete, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from aifab.store import Store
from aifab.store.db import Database, table_names
from aifab.store.lineage import link, upstream
from aifab.store.schema import (
    Base,
    DatasetVersion,
    LedgerEntry,
    ModelAlias,
    ModelVersion,
    Run,
    RunMetric,
)
from helpers import dataset_row

PG_URL = os.environ.get("AIFAB_TEST_PG_URL")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="set AIFAB_TEST_PG_URL to a PostgreSQL URL to run these"),
]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema (through search_path)."""
    assert PG_URL is not None
    schema = f"aifab_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def pg(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    yield db
    db.close()


def test_dialect_is_postgresql(pg: Database) -> None:
    assert pg.engine.dialect.name == "postgresql"


def test_migrations_apply_and_match_the_orm(pg: Database) -> None:
    assert set(table_names(pg.engine)) == set(Base.metadata.tables) | {"alembic_version"}
    with pg.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_reopen_does_not_migrate_again(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Database(pg_url)
    with first.session() as s:
        s.add(Run(id="r1", kind="train", status="running"))
    first.close()

    def no_upgrade(*args: object, **kwargs: object) -> None:
        raise AssertionError("a database already at head must not be migrated again")

    monkeypatch.setattr(alembic.command, "upgrade", no_upgrade)
    second = Database(pg_url)
    try:
        with second.session() as s:
            assert s.get(Run, "r1") is not None
    finally:
        second.close()


def test_round_trip_dataset_run_metrics_model(pg: Database) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pg.session() as s:
        ds = dataset_row()
        s.add(ds)
        s.flush()
        s.add(
            Run(
                id="run0001",
                kind="train",
                status="completed",
                params={"lr": 0.003, "layers": [2, 2]},
                summary={"loss": 1.25},
                dataset_version_id=ds.id,
                checkpoint_digest="c" * 64,
                started_at=started,
                elapsed_s=12.5,
            )
        )
        s.flush()
        s.add_all(RunMetric(run_id="run0001", step=i, key="loss", value=3.0 - i, elapsed_s=i * 0.5) for i in range(3))
        mv = ModelVersion(
            name="demo",
            version=1,
            run_id="run0001",
            weights_digest="d" * 64,
            tokenizer_digest="b" * 64,
            config={"n_layer": 2, "d_model": 32},
            params_count=123456,
            metrics={"val_loss": 1.5},
        )
        s.add(mv)
        s.flush()
        s.add(ModelAlias(name="demo", alias="prod", model_version_id=mv.id))
        link(s, ("dataset", ds.id), ("run", "run0001"), "input")
        link(s, ("run", "run0001"), ("model", mv.id), "produced")
        ds_id, mv_id = ds.id, mv.id

    with pg.session() as s:
        ds2 = s.get(DatasetVersion, ds_id)
        assert ds2 is not None
        assert ds2.params == {"extensions": [".py"], "val_fraction": 0.1}
        assert ds2.created_at.tzinfo is not None
        run = s.get(Run, "run0001")
        assert run is not None
        assert run.params == {"lr": 0.003, "layers": [2, 2]}
        assert run.dataset_version_id == ds_id
        assert run.started_at == started
        metrics = s.scalars(select(RunMetric).where(RunMetric.run_id == "run0001").order_by(RunMetric.step)).all()
        assert [(m.step, m.value) for m in metrics] == [(0, 3.0), (1, 2.0), (2, 1.0)]
        alias = s.get(ModelAlias, ("demo", "prod"))
        assert alias is not None and alias.model_version_id == mv_id
        mv2 = s.get(ModelVersion, mv_id)
        assert mv2 is not None and mv2.config == {"n_layer": 2, "d_model": 32} and mv2.params_count == 123456
        assert upstream(s, "model", mv_id) == [("run", "run0001", "produced"), ("dataset", str(ds_id), "input")]


def test_foreign_keys_and_cascade(pg: Database) -> None:
    with pytest.raises(IntegrityError), pg.session() as s:
        s.add(RunMetric(run_id="nope", step=0, key="loss", value=1.0, elapsed_s=0.0))
    with pg.session() as s:
        s.add(Run(id="r1", kind="train", status="completed"))
        s.flush()
        s.add(RunMetric(run_id="r1", step=0, key="loss", value=1.0, elapsed_s=0.0))
    with pg.session() as s:
        s.execute(delete(Run).where(Run.id == "r1"))
    with pg.session() as s:
        assert s.scalar(select(func.count()).select_from(RunMetric)) == 0


def test_unique_name_version(pg: Database) -> None:
    with pg.session() as s:
        s.add(dataset_row())
    with pytest.raises(IntegrityError), pg.session() as s:
        s.add(dataset_row())


def test_ledger_round_trip(pg: Database) -> None:
    with pg.session() as s:
        s.add(
            LedgerEntry(
                stage="train",
                subject_kind="run",
                subject_id="r1",
                device="cpu",
                sampler="estimate",
                estimated=True,
                elapsed_s=1.0,
                device_s=1.0,
                energy_j=15.0,
                cost_usd=1e-6,
                co2_g=0.002,
            )
        )
    with pg.session() as s:
        entry = s.scalars(select(LedgerEntry)).one()
        assert entry.estimated is True
        assert (entry.tokens_in, entry.tokens_out) == (0, 0)


def test_counts_beyond_32_bits(pg: Database) -> None:
    big = 10_000_000_000
    with pg.session() as s:
        s.add(dataset_row(bytes=4 * big, tokens=big, train_tokens=big - 1))
    with pg.session() as s:
        assert s.scalars(select(DatasetVersion)).one().tokens == big


def test_store_uses_aifab_db(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFAB_DB", pg_url)
    store = Store(tmp_path / "home")
    try:
        assert store.db.engine.dialect.name == "postgresql"
        assert not (tmp_path / "home" / "aifab.db").exists()
        with store.db.session() as s:
            s.add(Run(id="via-store", kind="train", status="running"))
        with store.db.session() as s:
            assert s.get(Run, "via-store") is not None
    finally:
        store.close()
