"""The dataset column that names where curation ran is `executor` (local or ray), not `engine`: in aifab the
engine is the serving loop alone. The values are unchanged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_versions") as batch:
        batch.alter_column("engine", new_column_name="executor")


def downgrade() -> None:
    with op.batch_alter_table("dataset_versions") as batch:
        batch.alter_column("executor", new_column_name="engine")
