"""ORM models of the application database. The schema itself is created by the migrations.

Each later feature (alerts, audit, scores, expert usage, job runs) adds its models here and a revision in
migrations/versions; tests check that the migrations and these models agree.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so that later migrations can refer to (and drop) them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: expected a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class IngestRun(Base):
    """One `rmamba ingest` invocation and its totals."""

    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    plant: Mapped[str] = mapped_column(String(200))
    sources: Mapped[str] = mapped_column(Text, default="")  # comma-separated source names
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | ok | failed
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    files_read: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_in: Mapped[int] = mapped_column(BigInteger, default=0)
    kept: Mapped[int] = mapped_column(BigInteger, default=0)
    deduplicated: Mapped[int] = mapped_column(BigInteger, default=0)
    quarantined: Mapped[int] = mapped_column(BigInteger, default=0)
    report_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class IngestWatermark(Base):
    """Newest ingested timestamp (UTC) of one equipment from one source."""

    __tablename__ = "ingest_watermarks"

    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    equipment: Mapped[str] = mapped_column(String(200), primary_key=True)
    max_ts: Mapped[datetime] = mapped_column(UTCDateTime())
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IngestFile(Base):
    """A file a source has ingested: size, mtime and hash to recognise it, lines to resume it."""

    __tablename__ = "ingest_files"

    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    lines: Mapped[int] = mapped_column(BigInteger, default=0)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# --- scoring (issue 4): alerts and their audit trail, display series, expert usage, runs, model states ------------

ALERT_STATES = ("new", "acknowledged", "shelved", "cleared")


class Alert(Base):
    """A run of flagged steps of one equipment (pipelines/score.py), and its operator state (ISA-18.2).

    Natural key (equipment, start, model name, version): rescoring the same data updates the row in place, keeping
    its id, operator state and audit trail. ``open``: still running when last scored (``end`` may still move)."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("equipment", "start", "model_name", "model_version", name="uq_alerts_natural_key"),
        CheckConstraint("state IN ('new', 'acknowledged', 'shelved', 'cleared')", name="state"),
        Index("ix_alerts_equipment_type_start", "equipment_type", "start"),
        Index("ix_alerts_state_start", "state", "start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    equipment_type: Mapped[str] = mapped_column(String(200))
    equipment: Mapped[str] = mapped_column(String(200))
    start: Mapped[datetime] = mapped_column(UTCDateTime())
    end: Mapped[datetime] = mapped_column(UTCDateTime())
    steps: Mapped[int] = mapped_column(BigInteger)          # grid steps from start to end inclusive
    flagged_steps: Mapped[int] = mapped_column(BigInteger)
    peak_score: Mapped[float] = mapped_column(Float)
    peak_at: Mapped[datetime] = mapped_column(UTCDateTime())
    threshold: Mapped[float] = mapped_column(Float)
    severity: Mapped[str] = mapped_column(String(16))         # low | medium | high | critical
    open: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="new")
    top_sensors: Mapped[list] = mapped_column(JSON)            # [{sensor, nll, share}]
    experts: Mapped[list] = mapped_column(JSON)                # [{layer, expert, share}]
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))
    scoring_run_id: Mapped[str] = mapped_column(String(64))  # the last run that wrote the row
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AlertAudit(Base):
    """One operator action on an alert (acknowledge, shelve, ...): who, when, why, and the state change."""

    __tablename__ = "alert_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    comment: Mapped[str] = mapped_column(Text, default="")
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))


class ScoreBucket(Base):
    """The display series: per equipment and bucket (the [score] downsample), mean and max of the score."""

    __tablename__ = "score_series"
    __table_args__ = (UniqueConstraint("equipment", "ts", "model_name", "model_version",
                                       name="uq_score_series_natural_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    equipment_type: Mapped[str] = mapped_column(String(200))
    equipment: Mapped[str] = mapped_column(String(200))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())       # bucket start (UTC)
    mean: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    n_scored: Mapped[int] = mapped_column(Integer)
    n_flagged: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))


class ExpertUsage(Base):
    """Per equipment, UTC day, layer and expert: top-K slots routed to the expert (share sums to 1 per layer)."""

    __tablename__ = "expert_usage"
    __table_args__ = (UniqueConstraint("equipment", "day", "model_name", "model_version", "layer", "expert",
                                       name="uq_expert_usage_natural_key"),
                      Index("ix_expert_usage_equipment_type_day", "equipment_type", "day"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    equipment_type: Mapped[str] = mapped_column(String(200))
    equipment: Mapped[str] = mapped_column(String(200))
    day: Mapped[date] = mapped_column(Date)
    layer: Mapped[int] = mapped_column(Integer)
    expert: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(BigInteger)
    share: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))


class ScoringRun(Base):
    """One `rmamba score` invocation: per-equipment outcome (rows, alerts, or the failure and its reason)."""

    __tablename__ = "scoring_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    plant: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | ok | partial | failed
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    equipment_filter: Mapped[str | None] = mapped_column(String(200), nullable=True)
    equipment_ok: Mapped[int] = mapped_column(Integer, default=0)
    equipment_failed: Mapped[int] = mapped_column(Integer, default=0)
    steps_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    alerts_written: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[dict] = mapped_column(JSON, default=dict)  # {equipment: {status, reason, error, counts ...}}
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ModelState(Base):
    """The streaming state of one equipment under one model version, and the last timestamp it covers."""

    __tablename__ = "model_states"

    equipment: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    equipment_type: Mapped[str] = mapped_column(String(200))
    state: Mapped[bytes] = mapped_column(LargeBinary)
    scored_until: Mapped[datetime] = mapped_column(UTCDateTime())
    scoring_run_id: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
