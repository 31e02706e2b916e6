"""Model versions record their generation settings: BOS/EOS token ids and strings, add_bos, chat template.

Existing rows get `{}` (nothing known).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("generation", sa.JSON, nullable=True))
    op.execute("UPDATE model_versions SET generation = '{}'")


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("generation")
