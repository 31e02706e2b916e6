"""Alembic environment: migrations run on the connection aifab hands over (see store/db.py:migrate)."""

from alembic import context

from aifab.store.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("aifab migrations run through aifab.store.db.migrate(), which passes a connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
