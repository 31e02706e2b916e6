"""Quality control: evaluation results per model version, promotion decisions with each gate's verdict, and the
history of every alias move (which rollback reads).

Existing aliases get no history: their first recorded move is the next one.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    versions = "model_versions.id"
    op.create_table(
        "promotions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("candidate_id", sa.Integer, sa.ForeignKey(versions, ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("champion_id", sa.Integer, sa.ForeignKey(versions, ondelete="SET NULL"), nullable=True),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("moved", sa.Boolean, nullable=False),
        sa.Column("gates", sa.JSON, nullable=False),
    )
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("from_version_id", sa.Integer, sa.ForeignKey(versions, ondelete="SET NULL"), nullable=True),
        sa.Column("to_version_id", sa.Integer, sa.ForeignKey(versions, ondelete="SET NULL"), nullable=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("promotion_id", sa.Integer, sa.ForeignKey("promotions.id"), nullable=True),
    )
    op.create_table(
        "eval_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column(
            "model_version_id", sa.Integer, sa.ForeignKey(versions, ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("suite", sa.String(64), nullable=True),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("stderr", sa.Float, nullable=True),
        sa.Column("examples", sa.BigInteger, nullable=False),
        sa.Column("task_digest", sa.String(64), nullable=False),
        sa.Column("energy_j", sa.Float, nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("eval_results")
    op.drop_table("alias_events")
    op.drop_table("promotions")
