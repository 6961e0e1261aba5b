"""The scoring stage (pipelines/score.py): alert extraction, chunked scoring with carried state, gaps, mismatch
errors, the [score] config and the streaming entry point. No database here (tests/test_scoring_store.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.detector import RobustScaler, RoMDetector
from pipelines.score import (
    SEVERITIES,
    ScoreConfig,
    ScoredSteps,
    ScoringDataError,
    extract_alerts,
    score_equipment,
    severity,
    stream_score,
)
from rmamba import RoMConfig, RoMForecaster

T0 = datetime(2026, 3, 1, tzinfo=UTC)
MIN_US = 60_000_000
SENSORS = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- helpers shared with tests/test_scoring_store.py -------------------------------------------------------


def normal_values(L: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(L)
    return np.stack([50 + 5 * np.sin(t / 30) + rng.normal(0, 0.5, L), 3 + 0.2 * np.cos(t / 30)
                     + rng.normal(0, 0.05, L), rng.normal(60, 1, L)], 1)


def tiny_detector(seed: int = 0, types: dict[str, list[str]] | None = None, calibrate: bool = True) -> RoMDetector:
    """An untrained 2-layer RoM (4 experts, top-1) whose threshold sits above every score of normal data, so only
    injected anomalies are flagged."""
    types = types or {"pump": SENSORS}
    torch.manual_seed(seed)
    model = RoMForecaster(RoMConfig(d_model=8, n_layers=2, d_state=4, num_experts=4, top_k=1),
                          {t: len(s) for t, s in types.items()})
    normal = normal_values(3000, seed=123)
    scalers = {t: RobustScaler.fit(normal[:, :len(s)]) for t, s in types.items()}
    det = RoMDetector(model, types, scalers, {t: 0.0 for t in types})
    if calibrate:
        for t, s in types.items():
            sc = det.score(normal[:, :len(s)], t, chunk_len=1024).score
            det.threshold_[t] = float(np.nanmax(sc[64:])) + 1.0
    return det


def store_frame(L: int, start: datetime = T0, seed: int = 0, anomalies: tuple[tuple[int, int, int], ...] = (),
                missing: float = 0.02, step: timedelta = timedelta(minutes=1)) -> pl.DataFrame:
    """A store-layout frame (timestamp, sensors, <sensor>__missing) with spikes (first row, rows, sensor)."""
    v = normal_values(L, seed)
    for i0, n, j in anomalies:
        v[i0:i0 + n, j] += 40.0 * (1 + np.arange(n) % 2)
    rng = np.random.default_rng(seed + 1)
    miss = rng.random(v.shape) < missing
    ts = pl.datetime_range(start, start + step * (L - 1), step, eager=True, time_unit="us", time_zone="UTC")
    cols = {"timestamp": ts}
    for j, s in enumerate(SENSORS):
        cols[s] = np.where(miss[:, j], v[:, j] if j == 0 else np.nan, v[:, j])  # a: forward-filled, flagged
        cols[s + "__missing"] = miss[:, j]
    return pl.DataFrame(cols)


def final_alerts(outputs: list) -> pl.DataFrame:
    """The alerts a store would hold after these windows: the last version of each start (as the DB upsert)."""
    frames = [o.alerts for o in outputs if o.alerts.height]
    if not frames:
        return outputs[0].alerts
    return pl.concat(frames).unique("start", keep="last", maintain_order=True).sort("start")


# --- alert extraction on synthetic score arrays ------------------------------------------------------------


def steps(flags: str, n_sensors: int = 3, heavy: int = 1, expert: int = 2) -> ScoredSteps:
    """'..##.#..' -> scored steps on a 1-minute grid; flagged steps score 10 + position, others 0; attribution
    lands on sensor ``heavy`` while flagged; layer 0 routes flagged steps to ``expert``."""
    f = np.array([c == "#" for c in flags])
    L = len(f)
    ts = (np.arange(L, dtype=np.int64) + 1_000) * MIN_US
    score = np.where(f, 10.0 + np.arange(L), 0.0)
    attr = np.full((L, n_sensors), 0.1)
    attr[f, heavy] = 5.0
    top = np.zeros((2, L, 1), dtype=np.int16)
    top[0, f, 0] = expert
    top[1, :, 0] = 1
    return ScoredSteps(ts, score, f, attr, top)


def run_alerts(flags: str, cfg: ScoreConfig, split: tuple[int, ...] = ()) -> list[tuple[int, int, bool, dict]]:
    """Alerts as (start index, end index, open, row) after feeding ``flags`` in pieces cut at ``split``."""
    from pipelines.score import alert_row

    w = steps(flags)
    cuts = [0, *split, len(flags)]
    pending, latest = None, {}
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = ScoredSteps(w.ts[a:b], w.score[a:b], w.flag[a:b], w.attr[a:b], w.top[:, a:b])
        found, pending = extract_alerts(part, pending, int(w.ts[b - 1]), MIN_US, cfg, (2, 4))
        for alert, is_open in found:
            latest[alert.start] = (alert, is_open)
    out = []
    for alert, is_open in sorted(latest.values(), key=lambda x: x[0].start):
        row = alert_row(alert, is_open, SENSORS, 9.0, MIN_US, cfg)
        out.append((int(alert.start // MIN_US - 1_000), int(alert.end // MIN_US - 1_000), is_open, row))
    return out


def test_min_length_and_merge_gap():
    cfg = ScoreConfig(min_alert_steps=3, merge_gap_steps=2)
    assert run_alerts("..##......", cfg) == []                                # 2 steps < 3
    assert [a[:3] for a in run_alerts("..###.....", cfg)] == [(2, 4, False)]
    # gap of 2 unflagged steps merges, a gap of 3 does not; merged span counts for the length
    assert [a[:3] for a in run_alerts(".#..#.....", cfg)] == [(1, 4, False)]
    assert [a[:3] for a in run_alerts(".#...#....", cfg)] == []
    assert [a[:3] for a in run_alerts("###...###...", cfg)] == [(0, 2, False), (6, 8, False)]
    # still running (or within the merge gap) at the end of the data: open
    assert [a[:3] for a in run_alerts("....####", cfg)] == [(4, 7, True)]
    assert [a[:3] for a in run_alerts("...####..", cfg)] == [(3, 6, True)]
    assert [a[:3] for a in run_alerts("...####...", cfg)] == [(3, 6, False)]


def test_alert_carries_top_sensors_experts_peak_and_severity():
    cfg = ScoreConfig(min_alert_steps=2, merge_gap_steps=1)
    (s, e, is_open, row), = run_alerts("....##.##.....", cfg)
    assert (s, e, is_open) == (4, 8, False)
    assert row["flagged_steps"] == 4 and row["steps"] == 5
    assert row["peak_score"] == 10.0 + 8 and row["peak_at"] == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        minutes=1_008)
    top = row["top_sensors"]
    assert [t["sensor"] for t in top] == ["b", "a", "c"] and top[0]["share"] > 0.9
    assert top[0]["nll"] == pytest.approx(4 * 5.0 + 0.1)
    layer0 = [x for x in row["experts"] if x["layer"] == 0]
    assert layer0[0] == {"layer": 0, "expert": 2, "share": pytest.approx(4 / 5)}  # 4 of the 5 steps
    assert {"layer": 1, "expert": 1, "share": 1.0} in row["experts"]
    assert row["severity"] == severity(18.0, 9.0) == "high"  # excess 9 nats: in [5, 10)
    assert severity(9.5, 9.0) == "low" and severity(12.0, 9.0) == "medium"
    assert severity(15.0, 9.0) == "high" and severity(19.0, 9.0) == "critical"
    assert severity(-3.0, -8.0) == "high"  # NLL thresholds may be negative: the excess still reads right
    assert SEVERITIES == ("low", "medium", "high", "critical")


@pytest.mark.parametrize("flags", ["..###..#.####....##.#....###", "####..##..###.", "#.#.#.#.#.#.#.#..",
                                   "....######################"])
def test_alerts_are_the_same_whatever_the_window_cuts(flags):
    """Feeding the steps in windows (the alert carried across each cut) gives the alerts of one pass."""
    cfg = ScoreConfig(min_alert_steps=3, merge_gap_steps=2)
    whole = run_alerts(flags, cfg)
    for cut in range(1, len(flags)):
        for cut2 in (None, min(cut + 3, len(flags) - 1)):
            split = (cut,) if cut2 is None or cut2 <= cut else (cut, cut2)
            got = run_alerts(flags, cfg, split)
            assert [g[:3] for g in got] == [w[:3] for w in whole], split
            for (_, _, _, g), (_, _, _, w) in zip(got, whole):
                assert [t["sensor"] for t in g["top_sensors"]] == [t["sensor"] for t in w["top_sensors"]]
                assert [t["nll"] for t in g["top_sensors"]] == pytest.approx([t["nll"] for t in w["top_sensors"]])
                assert g["experts"] == w["experts"]
                assert (g["peak_score"], g["flagged_steps"], g["steps"]) == (w["peak_score"], w["flagged_steps"],
                                                                             w["steps"])


# --- the stage on store frames -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def det() -> RoMDetector:
    return tiny_detector()


CFG = ScoreConfig(chunk_len=256, warmup_steps=64, min_alert_steps=3, merge_gap_steps=5, downsample="15m")
ANOMALIES = ((700, 12, 1), (1432, 20, 0), (2300, 6, 2))  # the second one spans midnight of day 1


def test_flags_injected_anomalies_with_the_right_sensor(det):
    out = score_equipment(det, store_frame(2880, anomalies=ANOMALIES), "pump", "P-1", CFG)
    a = out.alerts
    assert a.height == 3, a
    assert a["start"].to_list() == [T0 + timedelta(minutes=i) for i, _, _ in ANOMALIES]
    assert [t[0]["sensor"] for t in a["top_sensors"].to_list()] == ["b", "a", "c"]
    assert a["open"].to_list() == [False, False, False] and set(a["severity"]) <= set(SEVERITIES)
    assert (a["peak_score"] > a["threshold"]).all()
    r = out.report
    assert (r["rows_new"], r["warmup_steps"], r["steps_reported"], r["restarts"]) == (2880, 64, 2816, 1)
    assert out.series.height == 2816 and out.series["timestamp"][0] == T0 + timedelta(minutes=64)
    assert out.scored_until == T0 + timedelta(minutes=2879)
    # display buckets: 15 min, mean <= max, counts add up to the scored steps
    d = out.downsampled
    assert d["n_scored"].sum() == int(np.isfinite(out.series["score"].to_numpy()).sum())
    assert (d["mean"] <= d["max"]).all() and d["n_flagged"].sum() == r["flagged_steps"]
    # expert usage: one row per day, layer and expert; shares sum to 1 per day and layer
    u = out.expert_usage
    assert u.height == 2 * 2 * 4
    assert np.allclose(u.group_by("day", "layer").agg(pl.col("share").sum())["share"].to_numpy(), 1.0)


def test_day_by_day_with_saved_state_equals_both_days_at_once(det):
    frame = store_frame(2880, anomalies=ANOMALIES)
    full = score_equipment(det, frame, "pump", "P-1", CFG)
    day1 = score_equipment(det, frame.filter(pl.col("timestamp") < T0 + timedelta(days=1)), "pump", "P-1", CFG)
    assert day1.alerts["open"].to_list()[-1] is True  # the midnight anomaly is still running
    day2 = score_equipment(det, frame, "pump", "P-1", CFG, state=day1.state, scored_until=day1.scored_until)
    assert day2.report["rows_new"] == 1440 and day2.report["restarts"] == 0 and day2.report["warmup_steps"] == 0
    series = pl.concat([day1.series, day2.series])
    assert series["timestamp"].equals(full.series["timestamp"])
    np.testing.assert_allclose(series["score"].to_numpy(), full.series["score"].to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(series["attr__b"].to_numpy(), full.series["attr__b"].to_numpy(), rtol=1e-5,
                               atol=1e-5)
    assert series["flag"].equals(full.series["flag"])
    got, want = final_alerts([day1, day2]), full.alerts
    for col in ("start", "end", "steps", "flagged_steps", "open", "severity"):
        assert got[col].to_list() == want[col].to_list(), col
    np.testing.assert_allclose(got["peak_score"].to_numpy(), want["peak_score"].to_numpy(), rtol=1e-5)
    assert [[t["sensor"] for t in x] for x in got["top_sensors"].to_list()] == \
        [[t["sensor"] for t in x] for x in want["top_sensors"].to_list()]
    assert [[(e["layer"], e["expert"]) for e in x] for x in got["experts"].to_list()] == \
        [[(e["layer"], e["expert"]) for e in x] for x in want["experts"].to_list()]
    # display buckets and expert usage: the bucket/day at the cut is written whole by the second window
    down = pl.concat([day1.downsampled, day2.downsampled]).unique("timestamp", keep="last", maintain_order=True)
    assert down.select("timestamp", "n_scored", "n_flagged").equals(full.downsampled.select(
        "timestamp", "n_scored", "n_flagged"))
    np.testing.assert_allclose(down["mean"].to_numpy(), full.downsampled["mean"].to_numpy(), rtol=1e-5)
    usage = pl.concat([day1.expert_usage, day2.expert_usage]).unique(["day", "layer", "expert"], keep="last",
                                                                     maintain_order=True)
    assert usage.sort("day", "layer", "expert").equals(full.expert_usage.sort("day", "layer", "expert"))
    # rescoring with the state: nothing new, state kept
    again = score_equipment(det, frame, "pump", "P-1", CFG, state=day2.state)
    assert again.report["rows_new"] == 0 and again.state == day2.state and again.alerts.height == 0


def test_cut_inside_a_display_bucket_and_mid_alert(det):
    """Windows cut at an odd minute (inside a 15-min bucket and inside the alert): same buckets and alerts."""
    frame = store_frame(1500, anomalies=((900, 30, 1),))
    full = score_equipment(det, frame, "pump", "P-1", CFG)
    outs, state = [], None
    for cut in (500, 913, 1500):
        outs.append(score_equipment(det, frame.filter(pl.col("timestamp") < T0 + timedelta(minutes=cut)), "pump",
                                    "P-1", CFG, state=state))
        state = outs[-1].state
    got = final_alerts(outs)
    assert got.select("start", "end", "steps", "open").equals(full.alerts.select("start", "end", "steps", "open"))
    down = pl.concat([o.downsampled for o in outs]).unique("timestamp", keep="last", maintain_order=True)
    assert down["n_scored"].to_list() == full.downsampled["n_scored"].to_list()
    np.testing.assert_allclose(down["max"].to_numpy(), full.downsampled["max"].to_numpy(), rtol=1e-5)


def test_short_gaps_are_stepped_through_and_long_gaps_restart(det):
    frame = store_frame(1000)
    holes = frame.with_row_index().filter(~pl.col("index").is_between(300, 309) & ~pl.col("index").is_between(
        600, 799)).drop("index")
    cfg = ScoreConfig(warmup_steps=50, max_gap_steps=60, chunk_len=256)
    out = score_equipment(det, holes, "pump", "P-1", cfg)
    r = out.report
    assert r["gap_rows"] == 10 and r["restarts"] == 2 and r["warmup_steps"] == 100
    # the 10 filled rows are reported (not scored); the 200-step gap is not filled
    assert r["steps_reported"] == 1000 - 200 - 100
    ts = out.series["timestamp"]
    assert ts.is_sorted() and (T0 + timedelta(minutes=305)) in ts.to_list()
    assert np.isnan(out.series.filter(pl.col("timestamp") == T0 + timedelta(minutes=305))["score"][0])
    assert ts.filter(ts > T0 + timedelta(minutes=599))[0] == T0 + timedelta(minutes=850)  # warm-up after restart
    # resuming across a gap longer than max_gap_steps also restarts
    first = score_equipment(det, frame.head(400), "pump", "P-1", cfg)
    later = score_equipment(det, frame.tail(100), "pump", "P-1", cfg, state=first.state)
    assert later.report["restarts"] == 1 and later.report["steps_reported"] == 50


def test_report_from_skips_but_warms_up(det):
    frame = store_frame(600)
    since = T0 + timedelta(minutes=300)
    out = score_equipment(det, frame.filter(pl.col("timestamp") >= since - timedelta(minutes=64)), "pump", "P-1",
                          CFG, report_from=since)
    assert out.series["timestamp"][0] == since and out.series.height == 300


def test_mismatches_are_named(det):
    frame = store_frame(500)
    with pytest.raises(ScoringDataError, match=r"'P-9' \(pump\): sensor set differs.*missing from the data: \['c'\]"
                       ) as e:
        score_equipment(det, frame.drop("c", "c__missing"), "pump", "P-9", CFG)
    assert e.value.reason == "sensors" and e.value.equipment == "P-9"
    with pytest.raises(ScoringDataError, match=r"not known to the model: \['d'\]"):
        score_equipment(det, frame.with_columns(d=pl.lit(1.0)), "pump", "P-9", CFG)
    with pytest.raises(ScoringDataError, match="does not know equipment type 'fan'") as e:
        score_equipment(det, frame, "fan", "F-1", CFG)
    assert e.value.reason == "equipment_type"
    dead = frame.with_columns(*[pl.lit(None, pl.Float64).alias(s) for s in SENSORS])
    with pytest.raises(ScoringDataError, match="all 500 new rows .* have no observed value") as e:
        score_equipment(det, dead, "pump", "P-9", CFG)
    assert e.value.reason == "all_missing"
    through = score_equipment(det, dead, "pump", "P-9", CFG, final=False)  # more data follows: stepped through
    assert through.series.height == 500 - 64 and through.series["score"].is_nan().all()
    with pytest.raises(ScoringDataError, match=r"too little history: 40 steps .* warmup_steps=64") as e:
        score_equipment(det, frame.head(40), "pump", "P-9", CFG)
    assert e.value.reason == "history"
    # while more windows follow, a short first window only warms up
    part = score_equipment(det, frame.head(40), "pump", "P-9", CFG, final=False)
    assert part.series.height == 0 and part.state is not None
    rest = score_equipment(det, frame, "pump", "P-9", CFG, state=part.state)
    assert rest.series["timestamp"][0] == T0 + timedelta(minutes=64)
    with pytest.raises(ScoringDataError, match="saved state belongs to equipment type 'pump'"):
        score_equipment(tiny_detector(types={"pump": SENSORS, "fan": SENSORS}, calibrate=False), frame, "fan", "F",
                        CFG, state=part.state)


def test_score_config_validation():
    assert ScoreConfig.from_dict(None) == ScoreConfig()
    cfg = ScoreConfig.from_dict({"min_alert_steps": 5, "merge_gap_steps": 0, "chunk_len": 128, "downsample": "1h",
                                 "severity_nats": [1, 2, 3]})
    assert cfg.bucket_us == 3_600_000_000 and cfg.severity_nats == (1.0, 2.0, 3.0)
    for bad, msg in [({"min_alert_steps": 0}, r"score.min_alert_steps: expected an integer >= 1, got 0"),
                     ({"merge_gap_steps": "2"}, r"score.merge_gap_steps: expected an integer >= 0, got '2'"),
                     ({"chunk_len": True}, r"score.chunk_len: expected an integer >= 1, got True"),
                     ({"downsample": "15 minutes"}, r"score.downsample: expected a duration like '1m'"),
                     ({"severity_nats": [5, 2, 9]}, r"score.severity_nats: expected three increasing numbers"),
                     ({"min_alert": 3}, r"score.min_alert: unknown key \(expected one of: chunk_len, ")]:
        with pytest.raises(ValueError, match=msg):
            ScoreConfig.from_dict(bad)


def test_stream_score_matches_one_pass(det):
    v = normal_values(1000)
    whole = det.score(v, "pump", chunk_len=300)
    parts = list(stream_score(det, (v[i:i + 170] for i in range(0, 1000, 170)), "pump", chunk_len=64))
    np.testing.assert_allclose(np.concatenate([p.score for p in parts]), whole.score, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.concatenate([p.top_experts for p in parts], axis=1), whole.top_experts)


def test_a_dense_model_scores_without_experts():
    torch.manual_seed(0)
    model = RoMForecaster(RoMConfig(d_model=8, n_layers=1, d_state=4, num_experts=0), {"pump": 3})
    dense = RoMDetector(model, {"pump": SENSORS}, {"pump": RobustScaler.fit(normal_values(500))}, {"pump": 30.0})
    out = score_equipment(dense, store_frame(600, anomalies=((400, 10, 1),)), "pump", "P-1", CFG)
    assert out.expert_usage.height == 0 and out.alerts.height == 1
    assert out.alerts["experts"].to_list() == [[]] and out.alerts["top_sensors"][0][0]["sensor"] == "b"
