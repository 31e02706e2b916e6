"""Dataset versions record their parent, engine, curated documents, per-file index and curation report.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_versions") as batch:
        batch.add_column(sa.Column("parent_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("engine", sa.String(16), nullable=True))
        batch.add_column(sa.Column("curated_digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("index_digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("stages", sa.JSON, nullable=True))
        batch.create_foreign_key("fk_dataset_versions_parent", "dataset_versions", ["parent_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("dataset_versions") as batch:
        batch.drop_constraint("fk_dataset_versions_parent", type_="foreignkey")
        for column in ("stages", "index_digest", "curated_digest", "engine", "parent_id"):
            batch.drop_column(column)
