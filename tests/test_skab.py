"""The SKAB loader: the real development subset (read in place, never copied) and malformed files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.skab import SKAB_SENSORS, load_skab, read_skab_file

SKAB = Path("/work/shared/data/skab")
needs_skab = pytest.mark.skipif(not (SKAB / "valve1").is_dir(), reason=f"SKAB data not found at {SKAB}")
HEADER = ["datetime", *SKAB_SENSORS, "anomaly", "changepoint"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(ts: str = "2020-03-09 10:14:33", values: str = "0.02;0.04;1.33;0.05;79.3;26.0;233.0;32.0", labels="0;0"):
    return f"{ts};{values};{labels}" if labels is not None else f"{ts};{values}"


@pytest.fixture
def good(tmp_path) -> Path:
    return _write(tmp_path / "3.csv", [";".join(HEADER), _row(), _row("2020-03-09 10:14:34", labels="1.0;1.0")])


# --- the real data ---------------------------------------------------------------------------------------


@needs_skab
def test_loads_the_development_subset():
    series = load_skab(SKAB)
    assert [s.name for s in series][:4] == ["anomaly-free/anomaly-free", "valve1/0", "valve1/1", "valve1/2"]
    assert series[-1].name == "valve1/15" and len(series) == 17
    free = series[0]
    assert free.labels is None and free.changepoints is None and free.frame.height == 9405
    for s in series:
        assert s.frame.columns == ["timestamp", *SKAB_SENSORS]
        assert s.frame.schema["timestamp"] == pl.Datetime("us", "UTC")
        assert all(s.frame.schema[c] == pl.Float64 for c in SKAB_SENSORS)
        assert s.frame.null_count().sum_horizontal().item() == 0
        assert (s.frame["timestamp"].diff().drop_nulls().dt.total_seconds() > 0).all()
    for s in series[1:]:
        assert s.labels is not None and s.labels.dtype == np.int8 and len(s.labels) == s.frame.height
        assert 0.25 < s.labels.mean() < 0.45  # one collective anomaly, about 35% of the rows
        edges = np.flatnonzero(np.diff(np.concatenate([[0], s.labels, [0]])))
        assert len(edges) == 2 and 540 < edges[0] < 600, edges  # one contiguous anomaly near row 560
        assert set(np.unique(s.changepoints)) == {0, 1} and s.changepoints[edges[0]] == 1


@needs_skab
def test_first_row_matches_the_file():
    s = load_skab(SKAB / "valve1" / "0.csv")[0]
    first = s.frame.row(0, named=True)
    assert first["timestamp"] == datetime(2020, 3, 9, 10, 14, 33, tzinfo=UTC)
    assert first["Accelerometer1RMS"] == 0.0265878 and first["Volume Flow RateRMS"] == 32.0
    local = load_skab(SKAB / "valve1" / "0.csv", timezone="Europe/Moscow")[0]
    assert local.frame["timestamp"][0] == datetime(2020, 3, 9, 7, 14, 33, tzinfo=UTC)


@needs_skab
def test_subfolder_loads_in_numeric_order():
    names = [s.name for s in load_skab(SKAB / "valve1")]
    assert names == [str(i) for i in range(16)]


# --- errors ----------------------------------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="SKAB path not found: .*nope"):
        load_skab(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no SKAB csv files under"):
        load_skab(tmp_path)


def test_good_file(good):
    s = read_skab_file(good)
    assert s.name == "3" and s.frame.height == 2 and s.labels.tolist() == [0, 1] and s.changepoints.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty file"),
        (["time;" + ";".join(HEADER[1:]), _row()], "line 1, column 1: expected 'datetime', found 'time'"),
        ([";".join(h for h in HEADER if h != "Current"), _row(values="1;2;3;4;5;6;7")],
         r"line 1: missing column\(s\) \['Current'\]"),
        ([";".join([*HEADER, "extra"]), _row() + ";1"], r"unexpected or repeated column\(s\) \['extra'\]"),
        ([";".join(HEADER)], "no data rows"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:34") + ";9"], "line 3: expected 11 ';'-separated fields"),
        ([";".join(HEADER), _row(), _row("09.03.2020 10:14:34")],
         "line 3, column 'datetime': expected 'YYYY-MM-DD hh:mm:ss', found '09.03.2020 10:14:34'"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:33")], "line 3, column 'datetime': .* not after"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:34", "0.02;0.04;abc;0.05;79.3;26.0;233.0;32.0")],
         "line 3, column 'Current': expected a finite number, found 'abc'"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:34", "0.02;;1.3;0.05;79.3;26.0;233.0;32.0")],
         "line 3, column 'Accelerometer2RMS': expected a finite number, found an empty field"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:34", labels="0;")],
         "line 3, column 'changepoint': expected 0 or 1, found an empty field"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:34", labels="2;0")],
         "line 3, column 'anomaly': expected 0 or 1, found '2'"),
        ([";".join(HEADER), _row(), _row("2020-03-09 10:14:34", "0.02;inf;1.3;0.05;79.3;26.0;233.0;32.0")],
         "line 3, column 'Accelerometer2RMS': expected a finite number, found 'inf'"),
    ],
)
def test_malformed_files_name_file_line_and_column(tmp_path, lines, message):
    path = _write(tmp_path / "bad.csv", lines) if lines else (tmp_path / "bad.csv")
    if not lines:
        path.write_text("")
    with pytest.raises(ValueError, match=message) as info:
        read_skab_file(path)
    assert str(path) in str(info.value)


def test_bad_file_inside_a_folder_is_named(tmp_path, good):
    folder = tmp_path / "valve9"
    folder.mkdir()
    good.rename(folder / "1.csv")
    _write(folder / "2.csv", [";".join(HEADER), _row(labels="0;x")])
    with pytest.raises(ValueError, match=r"valve9/2\.csv: line 2, column 'changepoint'"):
        load_skab(tmp_path)


# --- round trip ------------------------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.tuples(st.lists(finite, min_size=8, max_size=8), st.booleans(), st.booleans()),
                  min_size=1, max_size=30),
    steps=st.lists(st.integers(1, 90), min_size=30, max_size=30),
    labelled=st.booleans(),
)
def test_round_trip(tmp_path_factory, rows, steps, labelled):
    start = datetime(2020, 3, 9, 10, 14, 33)
    stamps = [start + timedelta(seconds=sum(steps[:i])) for i in range(len(rows))]
    header = HEADER if labelled else HEADER[:9]
    lines = [";".join(header)]
    for ts, (values, a, c) in zip(stamps, rows):
        text = ";".join(repr(v) for v in values)
        lines.append(_row(ts.strftime("%Y-%m-%d %H:%M:%S"), text, f"{float(a)};{float(c)}" if labelled else None))
    path = _write(tmp_path_factory.mktemp("rt") / "x.csv", lines)
    s = read_skab_file(path)
    assert s.frame["timestamp"].to_list() == [t.replace(tzinfo=UTC) for t in stamps]
    assert s.frame.select(SKAB_SENSORS).rows() == [tuple(v) for v, _, _ in rows]
    if labelled:
        assert s.labels.tolist() == [int(a) for _, a, _ in rows]
        assert s.changepoints.tolist() == [int(c) for _, _, c in rows]
    else:
        assert s.labels is None and s.changepoints is None
