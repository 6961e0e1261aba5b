"""Scoring persistence and the scoring job on SQLite and PostgreSQL: one transaction per equipment and window,
idempotent rescoring, crash safety, per-equipment failures, alert transitions with audit rows, alert queries,
and `rmamba score` end to end with a champion registered in MLflow."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from app.alerts import (
    SEVERITIES,
    InvalidTransition,
    alert_history,
    alerts_frame,
    list_alerts,
    transition_alert,
)
from app.db import make_engine, upgrade_to_head
from app.db import scoring_store as store
from app.db.migrate import downgrade
from app.scoring import NoChampionError, load_champion, score_plant
from pipelines.config import load_plant_config
from pipelines.ingest.store import UTC_US, partition_file, store_schema, write_months
from pipelines.score import SEVERITIES as STAGE_SEVERITIES
from pipelines.score import ScoreConfig, score_equipment
from tests.test_score import ANOMALIES, CFG, SENSORS, T0, final_alerts, store_frame, tiny_detector

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SCORING_TABLES = {"alerts", "alert_audit", "score_series", "expert_usage", "scoring_runs", "model_states"}
NAME, V1 = "plant-detector", "1"


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 (any failure means: skip with the reason)
        return f"PostgreSQL at 127.0.0.1:5432/test unreachable: {type(exc).__name__}: {exc}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    """A migrated database: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        eng = upgrade_to_head(f"sqlite:///{tmp_path / 'app.db'}")
        yield eng
        eng.dispose()
        return
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    schema = f"rmamba_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_URL)
    with admin.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    eng = upgrade_to_head(PG_URL, schema=schema)
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def det():
    return tiny_detector()


@pytest.fixture(scope="module")
def days(det):
    """Two days of one pump scored at once, and as day 1 then day 2 with the saved state."""
    frame = store_frame(2880, anomalies=ANOMALIES)
    full = score_equipment(det, frame, "pump", "P-1", CFG)
    d1 = score_equipment(det, frame.filter(pl.col("timestamp") < T0 + timedelta(days=1)), "pump", "P-1", CFG)
    d2 = score_equipment(det, frame, "pump", "P-1", CFG, state=d1.state)
    return full, d1, d2


def _count(engine, table: str, where: str = "") -> int:
    with engine.connect() as c:
        return c.execute(sa.text(f"SELECT count(*) FROM {table} {where}")).scalar()


def _counts(engine) -> dict[str, int]:
    return {t: _count(engine, t) for t in sorted(SCORING_TABLES)}


# --- migrations and the store ------------------------------------------------------------------------------


def test_migration_0002_creates_and_drops_the_scoring_tables(engine):
    assert SCORING_TABLES <= set(sa.inspect(engine).get_table_names())
    downgrade(engine, "0001_ingest")
    assert not SCORING_TABLES & set(sa.inspect(engine).get_table_names())
    upgrade_to_head(engine)
    assert SCORING_TABLES <= set(sa.inspect(engine).get_table_names())


def test_saving_the_same_window_twice_leaves_one_set_of_rows(engine, days):
    full, _, _ = days
    first = store.save_window(engine, full, NAME, V1, "run-a")
    assert (first.buckets, first.alerts_inserted, first.alerts_updated) == (full.downsampled.height, 3, 0)
    counts = _counts(engine)
    assert counts == {"alerts": 3, "alert_audit": 0, "score_series": full.downsampled.height,
                      "expert_usage": full.expert_usage.height, "scoring_runs": 0, "model_states": 1}
    again = store.save_window(engine, full, NAME, V1, "run-b")
    assert (again.alerts_inserted, again.alerts_updated, again.alerts_deleted) == (0, 3, 0)
    assert _counts(engine) == counts
    assert {a.scoring_run_id for a in list_alerts(engine)} == {"run-b"}
    # another model version keeps its own rows
    store.save_window(engine, full, NAME, "2", "run-c")
    assert _count(engine, "alerts") == 6 and store.window_counts(engine, "P-1", NAME, "2")["score_series"] == \
        full.downsampled.height
    saved = store.load_state(engine, "P-1", NAME, V1)
    assert saved.state == full.state and saved.scored_until == full.scored_until == T0 + timedelta(minutes=2879)
    assert store.latest_state(engine, "P-1", NAME).model_version == "2"


def test_day_by_day_windows_store_what_one_pass_stores(engine, days):
    full, d1, d2 = days
    store.save_window(engine, d1, NAME, V1, "r1")
    open_alert = list_alerts(engine, equipment="P-1")[0]
    assert open_alert.open and open_alert.start == T0 + timedelta(minutes=1432)
    store.save_window(engine, d2, NAME, V1, "r2")
    store.save_window(engine, full, NAME, "full", "r3")
    by_day = list_alerts(engine, model_version=V1)
    at_once = list_alerts(engine, model_version="full")
    assert [(a.start, a.end, a.steps, a.open, a.severity) for a in by_day] == \
        [(a.start, a.end, a.steps, a.open, a.severity) for a in at_once]
    # the alert open at midnight kept its row (id) and was closed by day 2
    same = next(a for a in by_day if a.start == open_alert.start)
    assert same.id == open_alert.id and not same.open and same.end > T0 + timedelta(days=1)
    with engine.connect() as c:
        rows = {v: c.execute(sa.text("SELECT ts, n_scored, n_flagged FROM score_series WHERE model_version = :v "
                                     "ORDER BY ts"), {"v": v}).all() for v in (V1, "full")}
        usage = {v: c.execute(sa.text("SELECT day, layer, expert, count, steps FROM expert_usage WHERE "
                                      "model_version = :v ORDER BY day, layer, expert"), {"v": v}).all()
                 for v in (V1, "full")}
    assert rows[V1] == rows["full"] and usage[V1] == usage["full"]
    assert store.load_state(engine, "P-1", NAME, V1).scored_until == full.scored_until


def test_a_crash_inside_the_transaction_leaves_no_partial_window(engine, days, monkeypatch):
    _, d1, d2 = days
    store.save_window(engine, d1, NAME, V1, "r1")
    before = _counts(engine)
    alerts_before = [(a.id, a.end, a.open) for a in list_alerts(engine)]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_save_state", boom)  # the last step: series, usage and alerts are already written
    with pytest.raises(RuntimeError, match="disk full"):
        store.save_window(engine, d2, NAME, V1, "r2")
    assert _counts(engine) == before
    assert [(a.id, a.end, a.open) for a in list_alerts(engine)] == alerts_before
    assert store.load_state(engine, "P-1", NAME, V1).scored_until == d1.scored_until
    monkeypatch.undo()
    store.save_window(engine, d2, NAME, V1, "r2")  # the retry goes through
    assert _count(engine, "alerts") == final_alerts([d1, d2]).height


def test_stale_alerts_are_replaced_unless_an_operator_touched_them(engine, det):
    frame = store_frame(1440, anomalies=((500, 10, 1), (900, 10, 2)))
    out = score_equipment(det, frame, "pump", "P-1", CFG)
    store.save_window(engine, out, NAME, V1, "r1")
    first, second = sorted(list_alerts(engine), key=lambda a: a.start)
    transition_alert(engine, second.id, "acknowledge", "ana")
    # rescoring the window with a stricter config finds neither alert: the untouched one goes, the other stays
    strict = score_equipment(det, frame, "pump", "P-1", ScoreConfig(**{**CFG.to_dict(), "min_alert_steps": 50}))
    assert strict.alerts.height == 0
    w = store.save_window(engine, strict, NAME, V1, "r2")
    assert w.alerts_deleted == 1
    assert [a.id for a in list_alerts(engine)] == [second.id]


# --- operator actions and queries --------------------------------------------------------------------------


def test_alert_transitions_write_audit_rows_and_refuse_invalid_ones(engine, days):
    full, _, _ = days
    store.save_window(engine, full, NAME, V1, "r1")
    a = list_alerts(engine)[0]
    assert a.state == "new"
    assert transition_alert(engine, a.id, "acknowledge", "ana", "looking").state == "acknowledged"
    with pytest.raises(ValueError, match="shelving needs a reason"):
        transition_alert(engine, a.id, "shelve", "ana")
    assert transition_alert(engine, a.id, "shelve", "bo", "  maintenance on P-1 ").state == "shelved"
    assert transition_alert(engine, a.id, "unshelve", "bo").state == "acknowledged"  # back to where it was
    with pytest.raises(InvalidTransition, match=r"alert \d+ is 'acknowledged': cannot acknowledge it \(allowed: "
                                                r"shelve, clear\)"):
        transition_alert(engine, a.id, "acknowledge", "ana")
    assert transition_alert(engine, a.id, "clear", "ana", "bearing replaced").state == "cleared"
    with pytest.raises(InvalidTransition, match="cannot unshelve it.*none, the alert is closed"):
        transition_alert(engine, a.id, "unshelve", "ana")
    with pytest.raises(ValueError, match="action: expected one of acknowledge, shelve, unshelve, clear"):
        transition_alert(engine, a.id, "silence", "ana")
    with pytest.raises(ValueError, match="user: expected the name"):
        transition_alert(engine, a.id, "clear", " ")
    with pytest.raises(ValueError, match="alert_id: no alert 999999"):
        transition_alert(engine, 999_999, "acknowledge", "ana")
    trail = alert_history(engine, a.id)
    assert [(t.action, t.user, t.from_state, t.to_state) for t in trail] == [
        ("acknowledge", "ana", "new", "acknowledged"), ("shelve", "bo", "acknowledged", "shelved"),
        ("unshelve", "bo", "shelved", "acknowledged"), ("clear", "ana", "acknowledged", "cleared")]
    assert trail[1].comment == "maintenance on P-1" and trail[0].at.tzinfo is not None
    assert all(t.at >= a.created_at for t in trail)
    # rescoring the window updates measurements but keeps the operator's state and trail
    store.save_window(engine, full, NAME, V1, "r2")
    again = next(x for x in list_alerts(engine) if x.id == a.id)
    assert again.state == "cleared" and len(alert_history(engine, a.id)) == 4
    # an alert unshelved without having been acknowledged goes back to new
    b = list_alerts(engine)[1]
    transition_alert(engine, b.id, "shelve", "ana", "sensor swap")
    assert transition_alert(engine, b.id, "unshelve", "ana").state == "new"


def test_list_alerts_filters(engine, days):
    full, _, _ = days
    store.save_window(engine, full, NAME, V1, "r1")
    store.save_window(engine, full.__class__(**{**full.__dict__, "equipment": "P-2",
                                                "alerts": full.alerts.with_columns(equipment=pl.lit("P-2"))}),
                      NAME, V1, "r1")
    alerts = list_alerts(engine)
    assert len(alerts) == 6 and alerts == sorted(alerts, key=lambda a: (a.start, a.id), reverse=True)
    assert {a.equipment for a in list_alerts(engine, equipment="P-2")} == {"P-2"}
    assert len(list_alerts(engine, equipment=["P-1", "P-2"], equipment_type="pump")) == 6
    assert list_alerts(engine, equipment_type="fan") == []
    day2 = list_alerts(engine, start=T0 + timedelta(days=1), end=T0 + timedelta(days=2))
    assert {a.start for a in day2} == {T0 + timedelta(minutes=1432), T0 + timedelta(minutes=2300)}  # overlapping
    naive = list_alerts(engine, start=datetime(2026, 3, 2), end=datetime(2026, 3, 3))
    assert [a.id for a in naive] == [a.id for a in day2]
    sev = alerts[0].severity
    assert all(a.severity == sev for a in list_alerts(engine, severity=sev))
    worst = list_alerts(engine, min_severity="high")
    assert all(a.severity in ("high", "critical") for a in worst)
    transition_alert(engine, alerts[0].id, "acknowledge", "ana")
    assert [a.id for a in list_alerts(engine, state="acknowledged")] == [alerts[0].id]
    assert len(list_alerts(engine, state=["new", "acknowledged"], limit=4)) == 4
    with pytest.raises(ValueError, match="state: expected one of new, acknowledged, shelved, cleared, got 'open'"):
        list_alerts(engine, state="open")
    frame = alerts_frame(list_alerts(engine, equipment="P-1"))
    assert frame.height == 3 and frame.schema["start"] == pl.Datetime("us", "UTC")
    assert frame["top_sensors"].list.first().struct.field("sensor").to_list()[::-1] == ["b", "a", "c"]
    assert SEVERITIES == STAGE_SEVERITIES


# --- the scoring job ---------------------------------------------------------------------------------------


def write_store(store_dir: Path, plant, equipment: dict[str, tuple[str, pl.DataFrame]]) -> None:
    """Write frames into the store layout (one parquet file per equipment and UTC month)."""
    for eq, (etype, frame) in equipment.items():
        schema = store_schema(plant.equipment_types[etype])
        frame = frame.select([pl.col(c).cast(t) if c in frame.columns else pl.lit(True if t == pl.Boolean else None,
                                                                                     t).alias(c)
                              for c, t in schema.items()])
        write_months(frame, lambda m, etype=etype, eq=eq: partition_file(store_dir, etype, eq, m))


def plant_toml(tmp_path: Path, database_url: str, mlflow_uri: str = "sqlite:///mlflow.db") -> Path:
    sensors = "".join(f'[[equipment_types.pump.sensors]]\nname = "{s}"\n' for s in SENSORS)
    text = f"""
[plant]
name = "test-plant"
store = "store"
database_url = "{database_url}"
mlflow_tracking_uri = "{mlflow_uri}"

[equipment_types.pump]
{sensors}
[equipment_types.fan]
[[equipment_types.fan.sensors]]
name = "x"
[[equipment_types.fan.sensors]]
name = "y"

[[sources]]
name = "pumps"
path = "raw/pumps/*.parquet"
equipment_type = "pump"
timezone = "UTC"
equipment_id_column = "equipment_id"
grid = "1m"

[[sources]]
name = "fans"
path = "raw/fans/*.parquet"
equipment_type = "fan"
timezone = "UTC"
equipment_id_column = "equipment_id"
grid = "1m"

[score]
chunk_len = 1024
warmup_steps = 64
min_alert_steps = 3
merge_gap_steps = 5
window_days = 1
"""
    path = tmp_path / "plant.toml"
    path.write_text(text)
    return path


def _plant(tmp_path, engine, mlflow_uri: str = "sqlite:///mlflow.db"):
    return load_plant_config(plant_toml(tmp_path, engine.url.render_as_string(hide_password=False), mlflow_uri))


def _fan_frame(L: int) -> pl.DataFrame:
    return store_frame(L).select("timestamp", x=pl.col("a"), y=pl.col("b"), x__missing=pl.col("a__missing"),
                                 y__missing=pl.col("b__missing"))


def test_failures_are_recorded_per_equipment_and_the_rest_is_scored(engine, tmp_path, det):
    plant = _plant(tmp_path, engine)
    day2 = pl.col("timestamp") >= T0 + timedelta(days=1)
    dead = store_frame(2880).with_columns(  # the second day: no sensor observed (values forward-filled)
        [(pl.col(s + "__missing") | day2).alias(s + "__missing") for s in SENSORS])
    write_store(plant.store, plant, {"P-1": ("pump", store_frame(2880, anomalies=ANOMALIES)),
                                     "P-2": ("pump", store_frame(30, seed=3)),
                                     "P-3": ("pump", dead),
                                     "F-1": ("fan", _fan_frame(200))})
    report = score_plant(plant, engine=engine, load_model=lambda name, uri: (det, V1))
    by_eq = {o.equipment: o for o in report.outcomes}
    assert report.status == "partial" and report.model_version == V1 and report.model_name == "test-plant-detector"
    assert (by_eq["P-1"].status, by_eq["P-1"].windows, by_eq["P-1"].alerts, by_eq["P-1"].start) == (
        "ok", 2, 3, "store_start")
    assert (by_eq["F-1"].status, by_eq["F-1"].reason) == ("failed", "equipment_type")
    assert "does not know equipment type 'fan'" in by_eq["F-1"].error and "'F-1'" in by_eq["F-1"].error
    assert (by_eq["P-2"].reason, by_eq["P-3"].reason) == ("history", "all_missing")
    assert "too little history: 30 steps" in by_eq["P-2"].error
    run = store.get_run(engine, report.run_id)
    assert (run.status, run.equipment_ok, run.equipment_failed, run.alerts_written) == ("partial", 1, 3, 3)
    assert run.outcome["P-3"]["reason"] == "all_missing" and run.finished_at is not None
    assert store.window_counts(engine, "P-1", "test-plant-detector", V1)["alerts"] == 3
    assert store.window_counts(engine, "F-1", "test-plant-detector", V1) == dict.fromkeys(
        ("alerts", "score_series", "expert_usage", "model_states"), 0)
    # P-3's first day was scored and committed; its dead second day waits for data
    assert store.load_state(engine, "P-3", "test-plant-detector", V1).scored_until == T0 + timedelta(minutes=1439)

    # the next run resumes from the saved states: nothing new for P-1
    again = score_plant(plant, engine=engine, load_model=lambda name, uri: (det, V1), equipment="P-1")
    assert [(o.status, o.start, o.rows_new) for o in again.outcomes] == [("up_to_date", "resumed", 0)]
    with pytest.raises(ValueError, match="--equipment: 'P-9' is not in the store"):
        score_plant(plant, engine=engine, load_model=lambda name, uri: (det, V1), equipment="P-9")


def test_resume_since_and_a_new_model_version(engine, tmp_path, det):
    plant = _plant(tmp_path, engine)
    frame = store_frame(3 * 1440, anomalies=ANOMALIES)
    write_store(plant.store, plant, {"P-1": ("pump", frame.head(2880))})
    load = lambda name, uri: (det, V1)  # noqa: E731
    name = "test-plant-detector"
    score_plant(plant, engine=engine, load_model=load)
    write_store(plant.store, plant, {"P-1": ("pump", frame)})  # day 3 arrives
    o, = score_plant(plant, engine=engine, load_model=load).outcomes
    assert (o.start, o.rows_new, o.windows, o.scored_from) == ("resumed", 1440, 1, (T0 + timedelta(days=2)).isoformat())
    counts = store.window_counts(engine, "P-1", name, V1)
    # the same as scoring the three days at once
    whole = score_equipment(det, frame, "pump", "P-1", CFG)
    assert counts["alerts"] == whole.alerts.height and counts["score_series"] == whole.downsampled.height
    # --since: rescored from there with a fresh state; rows replaced, not duplicated
    o, = score_plant(plant, engine=engine, load_model=load, since=T0 + timedelta(days=1, hours=12)).outcomes
    assert o.start == "since" and o.scored_from == (T0 + timedelta(days=1, hours=12)).isoformat()
    assert store.window_counts(engine, "P-1", name, V1)["score_series"] == whole.downsampled.height
    # a new champion version continues where the previous one stopped, warmed up on the steps before
    write_store(plant.store, plant, {"P-1": ("pump", store_frame(4 * 1440, anomalies=ANOMALIES))})
    o, = score_plant(plant, engine=engine, load_model=lambda name, uri: (det, "2")).outcomes
    assert (o.start, o.scored_from, o.steps_reported) == ("version_change", (T0 + timedelta(days=3)).isoformat(),
                                                          1440)


def test_a_crash_while_persisting_one_equipment_leaves_it_empty_and_the_others_scored(engine, tmp_path, det,
                                                                                      monkeypatch):
    plant = _plant(tmp_path, engine)
    write_store(plant.store, plant, {"P-1": ("pump", store_frame(1440)), "P-2": ("pump", store_frame(1440, seed=5))})
    real = store._upsert_alerts

    def flaky(s, out, key, run_id):
        done = real(s, out, key, run_id)  # P-2's series, usage and alerts are written in the transaction ...
        if out.equipment == "P-2":
            raise OSError("connection lost")  # ... when it fails
        return done

    monkeypatch.setattr(store, "_upsert_alerts", flaky)
    report = score_plant(plant, engine=engine, load_model=lambda name, uri: (det, V1))
    by_eq = {o.equipment: o for o in report.outcomes}
    assert by_eq["P-1"].status == "ok" and by_eq["P-2"].status == "failed" and by_eq["P-2"].reason == "error"
    assert by_eq["P-2"].error.startswith("OSError: connection lost")
    assert store.window_counts(engine, "P-2", "test-plant-detector", V1) == dict.fromkeys(
        ("alerts", "score_series", "expert_usage", "model_states"), 0)
    assert store.window_counts(engine, "P-1", "test-plant-detector", V1)["score_series"] > 0


# --- end to end through MLflow and the CLI (SQLite only: the registry part is the same on both) --------------


def test_cli_scores_with_the_registered_champion(tmp_path, det, capsys):
    from app.cli import main
    from pipelines import registry
    from pipelines.train import HISTORY_SCHEMA, TrainResult

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    db_url = f"sqlite:///{tmp_path / 'app.db'}"
    plant = load_plant_config(plant_toml(tmp_path, db_url, mlflow_uri))
    name = "test-plant-detector"
    with pytest.raises(NoChampionError, match="has no 'champion' version"):
        load_champion(name, mlflow_uri)
    assert main(["score", "--config", str(tmp_path / "plant.toml"), "--no-progress"]) == 2
    assert "has no 'champion' version" in capsys.readouterr().err
    engine = make_engine(db_url)
    assert store.recent_runs(engine)[0].status == "failed"

    result = TrainResult(detector=det, history=pl.DataFrame(schema=HISTORY_SCHEMA), routing_usage={},
                         val_scores={}, metrics={"val_nll": 1.0})
    registry.log_training(result, tracking_uri=mlflow_uri, model_name=name, artifact_location=str(tmp_path / "art"))
    assert registry.promote(name, tracking_uri=mlflow_uri).promoted
    write_store(plant.store, plant, {"P-1": ("pump", store_frame(2880, anomalies=ANOMALIES)),
                                     "F-1": ("fan", _fan_frame(200))})
    code = main(["score", "--config", str(tmp_path / "plant.toml"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1  # F-1 failed: the model does not know fans
    assert "model test-plant-detector version 1, status partial" in out
    assert "alerts written by this run: 3" in out
    assert out.count("P-1 ") >= 4 and "does not know equipment type 'fan'" in out
    alerts = list_alerts(engine, equipment="P-1")
    assert [a.model_version for a in alerts] == ["1"] * 3
    assert main(["score", "--config", str(tmp_path / "plant.toml"), "--equipment", "P-1", "--since",
                 "2026-03-02T00:00:00Z", "--no-progress"]) == 0
    assert "since" in capsys.readouterr().out
    assert main(["score", "--config", str(tmp_path / "plant.toml"), "--since", "yesterday"]) == 2
    assert "--since: expected an ISO 8601 time" in capsys.readouterr().err


def test_store_index_reads_partition_folders_and_first_and_last_times(tmp_path):
    from app.scoring import store_index

    d = datetime.fromisoformat
    for eq, times in (("P/2 x", ["2026-02-27T23:00", "2026-03-01T00:00", "2026-03-04T12:00"]),
                      ("P-1", ["2026-03-02T00:00"])):
        frame = pl.DataFrame({"timestamp": [d(t + "+00:00") for t in times]}, schema={"timestamp": UTC_US})
        write_months(frame, lambda m, eq=eq: partition_file(tmp_path, "pump", eq, m))
    assert (tmp_path / "equipment_type=pump" / "equipment=P%2F2%20x" / "month=2026-02" / "part-0.parquet").exists()
    (tmp_path / "equipment_type=pump" / "equipment=P-1" / "month=not-a-month").mkdir()
    (tmp_path / "equipment_type=pump" / "equipment=P-1" / "month=not-a-month" / "part-0.parquet").write_bytes(b"")
    assert store_index(tmp_path) == [("pump", "P-1", d("2026-03-02").date(), d("2026-03-02").date()),
                                     ("pump", "P/2 x", d("2026-02-27").date(), d("2026-03-04").date())]
    assert store_index(tmp_path / "nothing") == []
