"""Persistence of scoring: runs, each equipment's model state, and what a window of scoring produced.

`save_window` writes one equipment's window in ONE transaction: the display buckets and expert-usage days the
window covers are replaced (delete, then insert), alerts are upserted on their natural key (equipment, start, model
name, version) so their id, operator state and audit trail survive rescoring, and the model state moves forward.
A crash leaves the previous window's rows and state; scoring the same window twice leaves one set of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, and_, delete, exists, func, insert, select
from sqlalchemy.orm import Session

from app.db.models import Alert, AlertAudit, ExpertUsage, ModelState, ScoreBucket, ScoringRun, utcnow

if TYPE_CHECKING:
    from pipelines.score import ScoreOutput

# alert fields the scorer owns (rescoring updates them); state, created_at and the audit trail belong to operators
_MEASURED = ("equipment_type", "end", "steps", "flagged_steps", "peak_score", "peak_at", "threshold", "severity",
             "open", "top_sensors", "experts")


@dataclass(frozen=True)
class SavedState:
    """A stored model state: bytes for `pipelines.score.score_equipment` and the last timestamp it covers."""

    equipment_type: str
    equipment: str
    model_name: str
    model_version: str
    state: bytes
    scored_until: datetime


def _saved(row: ModelState) -> SavedState:
    return SavedState(row.equipment_type, row.equipment, row.model_name, row.model_version, bytes(row.state),
                      row.scored_until)


def load_state(engine: Engine, equipment: str, model_name: str, model_version: str) -> SavedState | None:
    """The state saved for ``equipment`` under this model version (None: never scored with it)."""
    with Session(engine) as s:
        row = s.get(ModelState, (equipment, model_name, model_version))
        return None if row is None else _saved(row)


def latest_state(engine: Engine, equipment: str, model_name: str) -> SavedState | None:
    """The most recently written state of ``equipment`` under any version of ``model_name``."""
    with Session(engine) as s:
        row = s.scalars(select(ModelState).where(ModelState.equipment == equipment,
                                                 ModelState.model_name == model_name)
                        .order_by(ModelState.updated_at.desc()).limit(1)).first()
        return None if row is None else _saved(row)


@dataclass(frozen=True)
class WindowWrite:
    """What `save_window` changed."""

    buckets: int
    usage_rows: int
    alerts_inserted: int
    alerts_updated: int
    alerts_deleted: int


def save_window(engine: Engine, out: ScoreOutput, model_name: str, model_version: str, run_id: str) -> WindowWrite:
    """Persist one equipment's window (a `pipelines.score.ScoreOutput`) and its new state in one transaction."""
    key = {"equipment": out.equipment, "model_name": model_name, "model_version": model_version}
    with Session(engine) as s, s.begin():
        buckets = _replace_series(s, out, key)
        usage = _replace_usage(s, out, key)
        inserted, updated, deleted = _upsert_alerts(s, out, key, run_id)
        _save_state(s, out, key, run_id)
    return WindowWrite(buckets, usage, inserted, updated, deleted)


def _replace_series(s: Session, out: ScoreOutput, key: dict[str, str]) -> int:
    rows = out.downsampled.to_dicts()
    if not rows:
        return 0
    lo, hi = rows[0]["timestamp"], rows[-1]["timestamp"]
    s.execute(delete(ScoreBucket).where(*_match(ScoreBucket, key), ScoreBucket.ts >= lo, ScoreBucket.ts <= hi))
    s.execute(insert(ScoreBucket), [
        {**key, "equipment_type": out.equipment_type, "ts": r["timestamp"], "mean": r["mean"], "max": r["max"],
         "n_scored": r["n_scored"], "n_flagged": r["n_flagged"], "threshold": r["threshold"]} for r in rows])
    return len(rows)


def _replace_usage(s: Session, out: ScoreOutput, key: dict[str, str]) -> int:
    rows = out.expert_usage.to_dicts()
    if not rows:
        return 0
    days = [r["day"] for r in rows]
    s.execute(delete(ExpertUsage).where(*_match(ExpertUsage, key), ExpertUsage.day >= min(days),
                                        ExpertUsage.day <= max(days)))
    s.execute(insert(ExpertUsage), [{**key, "equipment_type": out.equipment_type, **r} for r in rows])
    return len(rows)


def _upsert_alerts(s: Session, out: ScoreOutput, key: dict[str, str], run_id: str) -> tuple[int, int, int]:
    """Insert new alerts, update the measurements of known ones; delete alerts that started in this window but are
    no longer found (only while no operator has touched them)."""
    now = utcnow()
    found = out.alerts.to_dicts()
    starts = [a["start"] for a in found]
    existing = {a.start: a for a in s.scalars(select(Alert).where(*_match(Alert, key), Alert.start.in_(starts)))
                } if starts else {}
    inserted = updated = 0
    for a in found:
        row = existing.get(a["start"])
        if row is None:
            s.add(Alert(**key, start=a["start"], **{k: a[k] for k in _MEASURED}, state="new", scoring_run_id=run_id,
                        created_at=now, updated_at=now))
            inserted += 1
        else:
            for k in _MEASURED:
                setattr(row, k, a[k])
            row.scoring_run_id, row.updated_at = run_id, now
            updated += 1
    deleted = 0
    if out.window_start is not None and out.scored_until is not None:
        stale = select(Alert.id).where(
            *_match(Alert, key), Alert.start >= out.window_start, Alert.start <= out.scored_until,
            Alert.state == "new", ~exists().where(AlertAudit.alert_id == Alert.id),
            *([Alert.start.not_in(starts)] if starts else []))
        ids = list(s.scalars(stale))
        if ids:
            deleted = s.execute(delete(Alert).where(Alert.id.in_(ids))).rowcount
    s.flush()
    return inserted, updated, deleted


def _save_state(s: Session, out: ScoreOutput, key: dict[str, str], run_id: str) -> None:
    if out.state is None or out.scored_until is None:
        return
    row = s.get(ModelState, (key["equipment"], key["model_name"], key["model_version"]))
    if row is None:
        s.add(ModelState(**key, equipment_type=out.equipment_type, state=out.state, scored_until=out.scored_until,
                         scoring_run_id=run_id, updated_at=utcnow()))
    else:
        row.equipment_type, row.state, row.scored_until = out.equipment_type, out.state, out.scored_until
        row.scoring_run_id, row.updated_at = run_id, utcnow()


def _match(model: Any, key: dict[str, str]) -> list[Any]:
    return [getattr(model, k) == v for k, v in key.items()]


# --- runs --------------------------------------------------------------------------------------------------


def start_run(engine: Engine, run_id: str, plant: str, *, since: datetime | None = None,
              equipment_filter: str | None = None) -> None:
    with Session(engine) as s, s.begin():
        s.add(ScoringRun(run_id=run_id, plant=plant, status="running", started_at=utcnow(), since=since,
                         equipment_filter=equipment_filter, equipment_ok=0, equipment_failed=0, steps_scored=0,
                         alerts_written=0, outcome={}))


def set_run_model(engine: Engine, run_id: str, model_name: str, model_version: str | None) -> None:
    with Session(engine) as s, s.begin():
        run = _run(s, run_id)
        run.model_name, run.model_version = model_name, model_version


def record_outcome(engine: Engine, run_id: str, equipment: str, outcome: dict[str, Any]) -> None:
    """Store one equipment's outcome (JSON-able: status, reason, error, counts) in the run record."""
    with Session(engine) as s, s.begin():
        run = _run(s, run_id)
        merged = dict(run.outcome or {})
        merged[equipment] = outcome
        run.outcome = merged  # a new object: JSON columns do not track in-place changes
        run.equipment_ok = sum(o.get("status") == "ok" for o in merged.values())
        run.equipment_failed = sum(o.get("status") == "failed" for o in merged.values())
        run.steps_scored = sum(int(o.get("steps_reported", 0)) for o in merged.values())
        run.alerts_written = sum(int(o.get("alerts", 0)) for o in merged.values())


def finish_run(engine: Engine, run_id: str, status: str, error: str | None = None) -> None:
    with Session(engine) as s, s.begin():
        run = _run(s, run_id)
        run.status, run.finished_at, run.error = status, utcnow(), error


def get_run(engine: Engine, run_id: str) -> ScoringRun:
    with Session(engine, expire_on_commit=False) as s:
        return _run(s, run_id)


def recent_runs(engine: Engine, limit: int = 20) -> list[ScoringRun]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(ScoringRun).order_by(ScoringRun.id.desc()).limit(limit)))


def _run(s: Session, run_id: str) -> ScoringRun:
    run = s.scalars(select(ScoringRun).where(ScoringRun.run_id == run_id)).first()
    if run is None:
        raise ValueError(f"run_id: no scoring run {run_id!r}")
    return run


def window_counts(engine: Engine, equipment: str, model_name: str, model_version: str) -> dict[str, int]:
    """Rows stored for one equipment and model version, per table (tests and the demo summary)."""
    key = {"equipment": equipment, "model_name": model_name, "model_version": model_version}
    with Session(engine) as s:
        out = {}
        for name, model in (("alerts", Alert), ("score_series", ScoreBucket), ("expert_usage", ExpertUsage),
                            ("model_states", ModelState)):
            out[name] = s.scalar(select(func.count()).select_from(model).where(and_(*_match(model, key)))) or 0
        return out


__all__ = ["SavedState", "WindowWrite", "finish_run", "get_run", "latest_state", "load_state", "recent_runs",
           "record_outcome", "save_window", "set_run_model", "start_run", "window_counts"]
