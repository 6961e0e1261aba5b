"""The scoring job: score every equipment of the store with the champion model and persist what comes out.

    score_plant(plant, since=None, equipment=None) -> ScoringRunReport

For each equipment in the store: load its saved state (when it belongs to the champion's version) and score the
rows after it; without one, start fresh with a warm-up window before ``since`` (or before the point where the
previous model version stopped, or at the start of the store). ``since`` given: rescore from there (fresh state).
The work is `pipelines.score.score_equipment`; each window of ``[score] window_days`` store days is committed in
one transaction (`app.db.scoring_store.save_window`). An equipment that fails (model/data mismatch, too little
history, any error) is recorded with its reason in the run record; the others are still scored.
"""

from __future__ import annotations

import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from app.db import scoring_store
from app.db.migrate import upgrade_to_head

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from pipelines.config import PlantConfig
    from pipelines.detector import RoMDetector
    from pipelines.score import ScoreConfig

# (model name, tracking URI) -> (detector, version); the default asks the registry for the champion
ModelLoader = Callable[[str, str], tuple["RoMDetector", str]]


class NoChampionError(ValueError):
    """The registered model has no 'champion' version to score with."""


@dataclass
class EquipmentOutcome:
    """How one equipment went: status ok | failed | up_to_date; on failure the reason (ScoringDataError.reason,
    or 'error') and the message."""

    equipment_type: str
    equipment: str
    status: str = "ok"
    reason: str | None = None
    error: str | None = None
    start: str | None = None         # how the model state started: resumed | since | version_change | store_start
    windows: int = 0
    rows_new: int = 0
    steps_reported: int = 0
    flagged_steps: int = 0
    alerts: int = 0
    alerts_open: int = 0
    restarts: int = 0
    scored_from: str | None = None   # ISO 8601 UTC
    scored_until: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScoringRunReport:
    run_id: str
    plant: str
    model_name: str
    model_version: str
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    outcomes: list[EquipmentOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[EquipmentOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["finished_at"] = None if self.finished_at is None else self.finished_at.isoformat()
        return d


def load_champion(model_name: str, tracking_uri: str) -> tuple[RoMDetector, str]:
    """The champion detector and its version from the registry; `NoChampionError` when there is none."""
    from pipelines import registry

    for _ in range(2):  # the alias could move while we download: accept the model only if it stayed put
        before = registry.alias_versions(model_name, tracking_uri=tracking_uri).get(registry.CHAMPION)
        if before is None:
            raise NoChampionError(f"model {model_name!r} has no '{registry.CHAMPION}' version at {tracking_uri}: "
                                  f"train and promote one first (rmamba train --config ...; rmamba promote ...)")
        detector = registry.load_detector(model_name, tracking_uri=tracking_uri, alias=registry.CHAMPION)
        if registry.alias_versions(model_name, tracking_uri=tracking_uri).get(registry.CHAMPION) == before:
            return detector, before
    raise RuntimeError(f"model {model_name!r}: the '{registry.CHAMPION}' alias kept moving while loading; retry")


def store_index(store: Any) -> list[tuple[str, str, date, date]]:
    """(equipment type, equipment, first day, last day) of every equipment in the store, sorted."""
    from pipelines.ingest.store import store_index as index

    return index(store)


def type_grid(plant: PlantConfig, equipment_type: str) -> timedelta | None:
    """The grid of the type's sources when they agree (None: let the stage infer it from the data)."""
    grids = {s.grid_timedelta for s in plant.sources if s.equipment_type == equipment_type}
    return grids.pop() if len(grids) == 1 else None


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def score_plant(plant: PlantConfig, since: datetime | None = None, equipment: str | None = None, *,
                engine: Engine | None = None, load_model: ModelLoader | None = None, model_name: str | None = None,
                progress: bool = False) -> ScoringRunReport:
    """Score the plant's store with the champion model; returns the run report (also kept in scoring_runs).

    since: rescore from this instant (UTC; naive = UTC) with a fresh state warmed up on the steps before it.
    equipment: only this equipment id. engine: the application database (default: plant.database_url, migrated).
    load_model: (name, tracking URI) -> (detector, version) (default: the registry's champion).
    """
    from tqdm import tqdm

    from app.commands.train import model_name as default_model_name
    from pipelines.score import ScoreConfig, ScoringDataError

    cfg = ScoreConfig.from_dict(plant.score)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    engine = engine or upgrade_to_head(plant.database_url)
    name = default_model_name(plant, model_name)
    index = store_index(plant.store)
    if equipment is not None:
        known = [e for _, e, _, _ in index]
        if equipment not in known:
            raise ValueError(f"--equipment: {equipment!r} is not in the store {plant.store} (found: "
                             f"{', '.join(known[:20]) or 'no equipment'})")
        index = [row for row in index if row[1] == equipment]

    run_id = uuid.uuid4().hex
    started = datetime.now(UTC)
    scoring_store.start_run(engine, run_id, plant.name, since=since, equipment_filter=equipment)
    try:
        detector, version = (load_model or load_champion)(name, plant.mlflow_tracking_uri)
    except Exception as exc:
        scoring_store.finish_run(engine, run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    scoring_store.set_run_model(engine, run_id, name, version)
    report = ScoringRunReport(run_id, plant.name, name, version, "running", started)
    bar = tqdm(index, unit="equipment", desc="score", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for etype, eq, first, last in bar:
        bar.set_postfix_str(eq, refresh=False)
        outcome = EquipmentOutcome(etype, eq)
        try:
            _score_one(plant, engine, detector, name, version, cfg, etype, eq, first, last, since, run_id, outcome)
            if outcome.rows_new == 0:
                outcome.status = "up_to_date"
        except Exception as exc:  # recorded; the other equipment is still scored
            outcome.status = "failed"
            if isinstance(exc, ScoringDataError):
                outcome.reason, outcome.error = exc.reason, str(exc)
            else:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                outcome.reason = "error"
                outcome.error = f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
        report.outcomes.append(outcome)
        scoring_store.record_outcome(engine, run_id, eq, outcome.to_dict())
    bar.close()
    n_failed = len(report.failed)
    report.status = "ok" if n_failed == 0 else "failed" if n_failed == len(report.outcomes) else "partial"
    scoring_store.finish_run(engine, run_id, report.status)
    report.finished_at = datetime.now(UTC)
    return report


def _score_one(plant: PlantConfig, engine: Engine, detector: RoMDetector, name: str, version: str, cfg: ScoreConfig,
               etype: str, eq: str, first: date, last: date, since: datetime | None, run_id: str,
               outcome: EquipmentOutcome) -> None:
    """Score one equipment window by window; each window is committed with the state it ends in."""
    import polars as pl

    from pipelines.ingest.store import TS, read_range
    from pipelines.score import ScoringDataError, score_equipment

    etype_cfg = plant.equipment_types.get(etype)
    if etype_cfg is None:
        raise ScoringDataError(etype, eq, "equipment_type", f"equipment type {etype!r} is in the store but not in "
                                                            f"plant.toml ({', '.join(plant.equipment_types)})")
    grid = type_grid(plant, etype)
    warmup = grid * cfg.warmup_steps if grid is not None else timedelta(days=1)
    state: bytes | None = None
    report_from: datetime | None = None
    read_from: datetime | None = None  # None: from the first stored day
    saved = scoring_store.load_state(engine, eq, name, version)
    if since is not None:
        outcome.start, report_from, read_from = "since", since, since - warmup
    elif saved is not None:
        outcome.start, state, read_from = "resumed", saved.state, saved.scored_until
    else:
        other = scoring_store.latest_state(engine, eq, name)
        if other is not None:  # a new champion: carry on where the previous version stopped
            report_from = other.scored_until + timedelta(microseconds=1)
            outcome.start, read_from = "version_change", report_from - warmup
        else:
            outcome.start = "store_start"
    day = max(first, read_from.date()) if read_from is not None else first
    alerts: set[datetime] = set()
    while day <= last:
        end = min(day + timedelta(days=cfg.window_days - 1), last)
        frame = read_range(plant.store, etype_cfg, eq, day, end)
        if read_from is not None and state is None:
            frame = frame.filter(pl.col(TS) >= read_from)
        out = score_equipment(detector, frame, etype, eq, cfg, state=state, report_from=report_from, grid=grid,
                              final=end == last)
        day = end + timedelta(days=1)
        if out.report["rows_new"] == 0:
            continue
        scoring_store.save_window(engine, out, name, version, run_id)
        state = out.state
        r = out.report
        outcome.windows += 1
        outcome.rows_new += r["rows_new"]
        outcome.steps_reported += r["steps_reported"]
        outcome.flagged_steps += r["flagged_steps"]
        outcome.restarts += r["restarts"]
        outcome.alerts_open = r["alerts_open"]
        alerts.update(out.alerts["start"].to_list())  # an alert open across windows is counted once
        outcome.alerts = len(alerts)
        if out.series.height and outcome.scored_from is None:
            outcome.scored_from = _iso(out.series["timestamp"][0])
        outcome.scored_until = _iso(out.scored_until)


__all__ = ["EquipmentOutcome", "ModelLoader", "NoChampionError", "ScoringRunReport", "load_champion", "score_plant",
           "store_index", "type_grid"]
