"""Alerts for people: query them with filters, and move them through the operator states with an audit trail.

ISA-18.2 style life cycle (every change writes one alert_audit row: action, user, time, comment, from -> to):

    acknowledge   new -> acknowledged
    shelve        new | acknowledged -> shelved        (a comment, the reason, is required)
    unshelve      shelved -> the state it was shelved from
    clear         new | acknowledged | shelved -> cleared   (cleared is final)

The dashboard and the demo summary read alerts through `list_alerts`; they do not query the tables themselves.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.db.models import ALERT_STATES, Alert, AlertAudit, utcnow

if TYPE_CHECKING:
    import polars as pl

SEVERITIES = ("low", "medium", "high", "critical")  # as pipelines.score.SEVERITIES, least to most severe
# action -> (states it applies to, target state; None: the state before the last shelve)
ACTIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "acknowledge": (("new",), "acknowledged"),
    "shelve": (("new", "acknowledged"), "shelved"),
    "unshelve": (("shelved",), None),
    "clear": (("new", "acknowledged", "shelved"), "cleared"),
}


class InvalidTransition(ValueError):
    """An action that the alert's current state does not allow."""


@dataclass(frozen=True)
class AlertRecord:
    """An alert as the dashboard shows it (datetimes UTC)."""

    id: int
    equipment_type: str
    equipment: str
    start: datetime
    end: datetime
    steps: int
    flagged_steps: int
    peak_score: float
    peak_at: datetime
    threshold: float
    severity: str
    open: bool
    state: str
    top_sensors: list[dict[str, Any]]
    experts: list[dict[str, Any]]
    model_name: str
    model_version: str
    scoring_run_id: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Alert) -> AlertRecord:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditRecord:
    id: int
    alert_id: int
    action: str
    user: str
    at: datetime
    comment: str
    from_state: str
    to_state: str


def _many(value: str | Collection[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _utc(t: datetime | None, name: str) -> datetime | None:
    if t is None:
        return None
    if not isinstance(t, datetime):
        raise ValueError(f"{name}: expected a datetime, got {t!r}")
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def list_alerts(engine: Engine, *, equipment_type: str | Collection[str] | None = None,
                equipment: str | Collection[str] | None = None, state: str | Collection[str] | None = None,
                severity: str | Collection[str] | None = None, min_severity: str | None = None,
                start: datetime | None = None, end: datetime | None = None, model_version: str | None = None,
                scoring_run_id: str | None = None, limit: int | None = None) -> list[AlertRecord]:
    """Alerts matching every filter given, newest start first. ``start``/``end`` select alerts overlapping that
    time range (naive datetimes are UTC); ``min_severity`` keeps that severity and worse."""
    for name, values, allowed in (("state", _many(state), ALERT_STATES), ("severity", _many(severity), SEVERITIES),
                                  ("min_severity", _many(min_severity), SEVERITIES)):
        bad = [v for v in values or [] if v not in allowed]
        if bad:
            raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {bad[0]!r}")
    q = select(Alert)
    for col, values in ((Alert.equipment_type, _many(equipment_type)), (Alert.equipment, _many(equipment)),
                        (Alert.state, _many(state)), (Alert.severity, _many(severity))):
        if values is not None:
            q = q.where(col.in_(values))
    if min_severity is not None:
        q = q.where(Alert.severity.in_(SEVERITIES[SEVERITIES.index(min_severity):]))
    lo, hi = _utc(start, "start"), _utc(end, "end")
    if lo is not None:
        q = q.where(Alert.end >= lo)
    if hi is not None:
        q = q.where(Alert.start <= hi)
    if model_version is not None:
        q = q.where(Alert.model_version == model_version)
    if scoring_run_id is not None:
        q = q.where(Alert.scoring_run_id == scoring_run_id)
    q = q.order_by(Alert.start.desc(), Alert.id.desc())
    if limit is not None:
        q = q.limit(limit)
    with Session(engine) as s:
        return [AlertRecord.of(r) for r in s.scalars(q)]


def alerts_frame(alerts: list[AlertRecord]) -> pl.DataFrame:
    """Alerts as a polars frame (top sensors and experts as lists of structs), for tables and charts."""
    import polars as pl

    utc = pl.Datetime("us", "UTC")
    schema = {"id": pl.Int64, "equipment_type": pl.String, "equipment": pl.String, "start": utc, "end": utc,
              "steps": pl.Int64, "flagged_steps": pl.Int64, "peak_score": pl.Float64, "peak_at": utc,
              "threshold": pl.Float64, "severity": pl.String, "open": pl.Boolean, "state": pl.String,
              "top_sensors": pl.List(pl.Struct({"sensor": pl.String, "nll": pl.Float64, "share": pl.Float64})),
              "experts": pl.List(pl.Struct({"layer": pl.Int64, "expert": pl.Int64, "share": pl.Float64})),
              "model_name": pl.String, "model_version": pl.String, "scoring_run_id": pl.String,
              "created_at": utc, "updated_at": utc}
    return pl.DataFrame([a.to_dict() for a in alerts], schema=schema)


def transition_alert(engine: Engine, alert_id: int, action: str, user: str, comment: str = "") -> AlertRecord:
    """Apply an operator action (see ACTIONS) and write its audit row, in one transaction. Raises
    `InvalidTransition` when the alert's state does not allow the action, ValueError on bad arguments."""
    if action not in ACTIONS:
        raise ValueError(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    if not isinstance(user, str) or not user.strip():
        raise ValueError("user: expected the name of the person acting, got an empty value")
    comment = (comment or "").strip()
    if action == "shelve" and not comment:
        raise ValueError("comment: shelving needs a reason (ISA-18.2), got none")
    allowed, target = ACTIONS[action]
    with Session(engine) as s, s.begin():
        row = s.scalars(select(Alert).where(Alert.id == alert_id).with_for_update()).first()
        if row is None:
            raise ValueError(f"alert_id: no alert {alert_id}")
        if row.state not in allowed:
            possible = [a for a, (src, _) in ACTIONS.items() if row.state in src]
            raise InvalidTransition(f"alert {alert_id} is {row.state!r}: cannot {action} it (allowed: "
                                    f"{', '.join(possible) or 'none, the alert is closed'})")
        if target is None:  # unshelve: back to the state it was shelved from
            last = s.scalars(select(AlertAudit).where(AlertAudit.alert_id == alert_id, AlertAudit.action == "shelve")
                             .order_by(AlertAudit.id.desc()).limit(1)).first()
            target = last.from_state if last is not None else "new"
        now = utcnow()
        s.add(AlertAudit(alert_id=alert_id, action=action, user=user.strip(), at=now, comment=comment,
                         from_state=row.state, to_state=target))
        row.state, row.updated_at = target, now
        s.flush()
        return AlertRecord.of(row)


def alert_history(engine: Engine, alert_id: int) -> list[AuditRecord]:
    """The audit trail of one alert, oldest first."""
    with Session(engine) as s:
        rows = s.scalars(select(AlertAudit).where(AlertAudit.alert_id == alert_id).order_by(AlertAudit.id))
        return [AuditRecord(r.id, r.alert_id, r.action, r.user, r.at, r.comment, r.from_state, r.to_state)
                for r in rows]


def format_alerts(alerts: list[AlertRecord], limit: int = 50) -> str:
    """A plain-text table of alerts (CLI and demo summary)."""
    if not alerts:
        return "no alerts"
    head = ("id", "equipment", "type", "start (UTC)", "end (UTC)", "steps", "peak", "severity", "state",
            "top sensors")
    rows = [(str(a.id), a.equipment, a.equipment_type, f"{a.start:%Y-%m-%d %H:%M}",
             f"{a.end:%Y-%m-%d %H:%M}" + (" (open)" if a.open else ""), str(a.steps), f"{a.peak_score:.1f}",
             a.severity, a.state, ", ".join(t["sensor"] for t in a.top_sensors)) for a in alerts[:limit]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(alerts) > limit:
        lines.append(f"... and {len(alerts) - limit} more")
    return "\n".join(lines)


__all__ = ["ACTIONS", "AlertRecord", "AuditRecord", "InvalidTransition", "SEVERITIES", "alert_history",
           "alerts_frame", "format_alerts", "list_alerts", "transition_alert"]
