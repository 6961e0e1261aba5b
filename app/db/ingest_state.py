"""Persistence of ingest state: runs, and each source's watermark (files seen, newest time per equipment).

The pipeline works on `pipelines.ingest.SourceWatermark`; these functions map it to and from the tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from app.db.models import IngestFile, IngestRun, IngestWatermark, utcnow
from pipelines.ingest import FileState, SourceWatermark


def load_watermark(engine: Engine, source: str) -> SourceWatermark:
    """The stored state of ``source`` (empty when it was never ingested)."""
    with Session(engine) as s:
        files = s.scalars(select(IngestFile).where(IngestFile.source == source)).all()
        marks = s.scalars(select(IngestWatermark).where(IngestWatermark.source == source)).all()
        return SourceWatermark(
            source=source,
            files={f.path: FileState(f.path, f.size, f.mtime_ns, f.sha256, f.lines) for f in files},
            max_ts={m.equipment: m.max_ts for m in marks},
        )


def save_watermark(engine: Engine, wm: SourceWatermark, run_id: str | None = None) -> None:
    """Store ``wm`` in one transaction: changed rows are updated, new ones inserted, stale files removed."""
    now = utcnow()
    with Session(engine) as s, s.begin():
        files = {f.path: f for f in s.scalars(select(IngestFile).where(IngestFile.source == wm.source))}
        for path, st in wm.files.items():
            row = files.pop(path, None)
            if row is None:
                s.add(IngestFile(source=wm.source, path=path, size=st.size, mtime_ns=st.mtime_ns, sha256=st.sha256,
                                 lines=st.lines, run_id=run_id, updated_at=now))
            elif (row.size, row.mtime_ns, row.sha256, row.lines) != (st.size, st.mtime_ns, st.sha256, st.lines):
                row.size, row.mtime_ns, row.sha256, row.lines = st.size, st.mtime_ns, st.sha256, st.lines
                row.run_id, row.updated_at = run_id, now
        for row in files.values():  # no longer in the watermark (the caller dropped it)
            s.delete(row)
        marks = {m.equipment: m for m in s.scalars(
            select(IngestWatermark).where(IngestWatermark.source == wm.source))}
        for eq, ts in wm.max_ts.items():
            if ts.tzinfo is None:
                raise ValueError(f"watermark of {wm.source}/{eq}: naive datetime {ts!r}, expected UTC-aware")
            ts = ts.astimezone(UTC)
            row = marks.get(eq)
            if row is None:
                s.add(IngestWatermark(source=wm.source, equipment=eq, max_ts=ts, run_id=run_id, updated_at=now))
            elif row.max_ts != ts:
                row.max_ts, row.run_id, row.updated_at = ts, run_id, now


def reset_source(engine: Engine, source: str) -> None:
    """Forget everything about ``source`` (its next ingest reads every file again)."""
    with Session(engine) as s, s.begin():
        s.execute(delete(IngestFile).where(IngestFile.source == source))
        s.execute(delete(IngestWatermark).where(IngestWatermark.source == source))


def start_run(engine: Engine, run_id: str, plant: str, sources: Iterable[str]) -> None:
    with Session(engine) as s, s.begin():
        s.add(IngestRun(run_id=run_id, plant=plant, sources=",".join(sources), status="running",
                        started_at=utcnow(), files_read=0, rows_in=0, kept=0, deduplicated=0, quarantined=0))


def finish_run(engine: Engine, run_id: str, status: str, totals: dict[str, int] | None = None,
               report_path: str | None = None, error: str | None = None) -> None:
    with Session(engine) as s, s.begin():
        run = s.scalars(select(IngestRun).where(IngestRun.run_id == run_id)).one()
        run.status, run.finished_at, run.report_path, run.error = status, utcnow(), report_path, error
        for k in ("files_read", "rows_in", "kept", "deduplicated", "quarantined"):
            if totals and k in totals:
                setattr(run, k, int(totals[k]))


def recent_runs(engine: Engine, limit: int = 20) -> list[IngestRun]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(IngestRun).order_by(IngestRun.id.desc()).limit(limit)))
