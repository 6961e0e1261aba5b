"""scoring: alerts and their audit trail, display score series, expert usage, scoring runs, model states

Revision ID: 0002_scoring
Revises: 0001_ingest
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_scoring"
down_revision = "0001_ingest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("equipment_type", sa.String(200), nullable=False),
        sa.Column("equipment", sa.String(200), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("steps", sa.BigInteger(), nullable=False),
        sa.Column("flagged_steps", sa.BigInteger(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("peak_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("top_sensors", sa.JSON(), nullable=False),
        sa.Column("experts", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("scoring_run_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('new', 'acknowledged', 'shelved', 'cleared')", name=op.f("ck_alerts_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("equipment", "start", "model_name", "model_version", name="uq_alerts_natural_key"),
    )
    op.create_index("ix_alerts_equipment_type_start", "alerts", ["equipment_type", "start"])
    op.create_index("ix_alerts_state_start", "alerts", ["state", "start"])
    op.create_table(
        "alert_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("user", sa.String(200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], name=op.f("fk_alert_audit_alert_id_alerts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_audit")),
    )
    op.create_index(op.f("ix_alert_audit_alert_id"), "alert_audit", ["alert_id"])
    op.create_table(
        "score_series",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("equipment_type", sa.String(200), nullable=False),
        sa.Column("equipment", sa.String(200), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("max", sa.Float(), nullable=False),
        sa.Column("n_scored", sa.Integer(), nullable=False),
        sa.Column("n_flagged", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_score_series")),
        sa.UniqueConstraint("equipment", "ts", "model_name", "model_version", name="uq_score_series_natural_key"),
    )
    op.create_table(
        "expert_usage",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("equipment_type", sa.String(200), nullable=False),
        sa.Column("equipment", sa.String(200), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("expert", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("steps", sa.BigInteger(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expert_usage")),
        sa.UniqueConstraint("equipment", "day", "model_name", "model_version", "layer", "expert",
                            name="uq_expert_usage_natural_key"),
    )
    op.create_index("ix_expert_usage_equipment_type_day", "expert_usage", ["equipment_type", "day"])
    op.create_table(
        "scoring_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("plant", sa.String(200), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("equipment_filter", sa.String(200), nullable=True),
        sa.Column("equipment_ok", sa.Integer(), nullable=False),
        sa.Column("equipment_failed", sa.Integer(), nullable=False),
        sa.Column("steps_scored", sa.BigInteger(), nullable=False),
        sa.Column("alerts_written", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scoring_runs")),
        sa.UniqueConstraint("run_id", name=op.f("uq_scoring_runs_run_id")),
    )
    op.create_table(
        "model_states",
        sa.Column("equipment", sa.String(200), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("equipment_type", sa.String(200), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("scored_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scoring_run_id", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("equipment", "model_name", "model_version", name=op.f("pk_model_states")),
    )


def downgrade() -> None:
    op.drop_table("model_states")
    op.drop_table("scoring_runs")
    op.drop_index("ix_expert_usage_equipment_type_day", table_name="expert_usage")
    op.drop_table("expert_usage")
    op.drop_table("score_series")
    op.drop_index(op.f("ix_alert_audit_alert_id"), table_name="alert_audit")
    op.drop_table("alert_audit")
    op.drop_index("ix_alerts_state_start", table_name="alerts")
    op.drop_index("ix_alerts_equipment_type_start", table_name="alerts")
    op.drop_table("alerts")
