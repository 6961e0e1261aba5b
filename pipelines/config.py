"""plant.toml: the one configuration file of a plant (contract: docs/plant_config.md).

`load_plant_config(path)` parses and validates the file into frozen dataclasses. Every error names the
key (``sources[1].format``), what was expected and what was found. Relative paths (store, quarantine,
reports, source globs, SQLite URLs) are resolved against the folder holding the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Top-level tables: the ones this loader knows, and those that later issues fill in (passed through raw).
KNOWN_TABLES = ("plant", "equipment_types", "sources", "model", "train", "score", "schedule", "evaluate")

# PI / historian state words met on numeric tags; each means "no valid value".
DEFAULT_STATE_WORDS = (
    "Shutdown", "I/O Timeout", "Bad", "Bad Input", "Comm Fail", "Scan Off", "Scan Timeout", "No Data",
    "Calc Failed", "Calc Timeout", "Out of Serv", "Not Connect", "Configure", "Over Range", "Under Range",
    "Invalid", "Intf Shut", "Pt Created", "Arc Off-line", "No Sample", "Error",
)

_DURATION_RE = re.compile(r"^(\d+(ns|us|ms|s|m|h|d|w))+$")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SensorConfig:
    """One sensor of an equipment type; ``min``/``max`` are physical limits in ``unit``."""

    name: str
    unit: str = ""
    min: float | None = None
    max: float | None = None
    required: bool = True
    stuck_steps: int | None = None  # overrides the source's stuck_steps for this sensor


@dataclass(frozen=True)
class EquipmentType:
    """An equipment type; its sensors in model input order."""

    name: str
    sensors: tuple[SensorConfig, ...]

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.sensors]

    def sensor(self, name: str) -> SensorConfig:
        return next(s for s in self.sensors if s.name == name)


@dataclass(frozen=True)
class SourceConfig:
    """One source of logs (a glob of files sharing one format and layout)."""

    name: str
    path: str  # absolute glob
    equipment_type: str
    format: str = "csv"  # csv | parquet
    layout: str = "wide"  # wide | long
    timestamp_column: str = "timestamp"
    timestamp_format: str | None = None  # strftime/chrono format; required for text timestamps
    timezone: str = "UTC"  # zone the timestamps are written in (ignored when the format carries %z)
    equipment_id_column: str | None = None
    equipment_id: str | None = None
    grid: str = "1m"
    max_ffill: int = 0
    sentinels: tuple[float, ...] = ()
    tag_column: str = "tag"
    value_column: str = "value"
    quality_column: str | None = None
    quality_suffix: str | None = None  # wide only: "<sensor><suffix>" holds that sensor's quality
    keep_uncertain: bool = False
    state_words: tuple[str, ...] = DEFAULT_STATE_WORDS
    delimiter: str = ","
    decimal_comma: bool = False
    ambiguous: str = "infer"  # infer | earliest | latest | quarantine (repeated local hour at DST end)
    stuck_steps: int = 60

    @property
    def grid_timedelta(self) -> timedelta:
        return parse_duration(self.grid)


@dataclass(frozen=True)
class PlantConfig:
    """The whole plant.toml. ``model`` and the later tables are passed through unvalidated."""

    name: str
    store: Path
    quarantine: Path
    reports: Path
    database_url: str
    mlflow_tracking_uri: str
    equipment_types: dict[str, EquipmentType]
    sources: tuple[SourceConfig, ...]
    config_path: Path | None = None
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ValueError(f"no source named {name!r} (sources: {', '.join(s.name for s in self.sources)})")


def parse_duration(text: str) -> timedelta:
    """Fixed-length polars duration string ('1m', '30s', '1h30m') to a timedelta."""
    if not isinstance(text, str) or not _DURATION_RE.match(text):
        raise ValueError(f"expected a duration like '1m', '30s' or '1h', got {text!r}")
    seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+)(ns|us|ms|s|m|h|d|w)", text))
    if seconds <= 0:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return timedelta(seconds=seconds)


# --- validation helpers -------------------------------------------------------------------------------


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _fail(key: str, expected: str, got: Any) -> ValueError:
    shown = repr(got) if isinstance(got, str | int | float | bool) else _tname(got)
    return ValueError(f"{key}: expected {expected}, got {shown}")


class _Table:
    """Reads typed keys out of one TOML table and rejects keys nobody read."""

    def __init__(self, data: Any, key: str):
        if not isinstance(data, dict):
            raise _fail(key, "a table", data)
        self.data, self.key, self.used = data, key, set()

    def _k(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., expected: str = "") -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is ...:
                raise ValueError(f"{self._k(name)}: missing (expected {expected or _tname(kind())})")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise _fail(self._k(name), expected or " or ".join(_tname(k()) for k in kinds), value)
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default, expected=_options(options))
        if value not in options:
            raise _fail(self._k(name), _options(options), value)
        return value

    def finish(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise ValueError(f"{self._k(extra[0])}: unknown key (expected one of: {', '.join(sorted(self.used))})")


def _options(options: tuple[str, ...]) -> str:
    quoted = [repr(o) for o in options]
    return " or ".join(quoted) if len(quoted) <= 2 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _resolve_path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _resolve_sqlite_url(base: Path, url: str) -> str:
    """Make ``sqlite:///relative.db`` relative to the config folder (SQLAlchemy would use the CWD)."""
    m = re.match(r"^(sqlite(?:\+\w+)?):///(.*)$", url)
    if not m or not m.group(2) or m.group(2).startswith("/") or m.group(2).startswith(":memory:"):
        return url
    return f"{m.group(1)}:///{(base / m.group(2)).as_posix()}"


# --- loading -------------------------------------------------------------------------------------------


def load_plant_config(path: str | Path) -> PlantConfig:
    """Read and validate a plant.toml file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plant config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    try:
        return parse_plant_config(raw, base=path.resolve().parent, config_path=path.resolve())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def parse_plant_config(raw: dict[str, Any], base: Path, config_path: Path | None = None) -> PlantConfig:
    """Validate an already parsed TOML document; relative paths resolve against ``base``."""
    unknown = sorted(set(raw) - set(KNOWN_TABLES))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown top-level table (expected one of: {', '.join(KNOWN_TABLES)})")
    for name in ("model", "train", "score", "schedule", "evaluate"):
        if name in raw and not isinstance(raw[name], dict):
            raise _fail(name, "a table", raw[name])

    for table, expected in (("plant", "a [plant] table with at least name"),
                            ("equipment_types", "at least one [equipment_types.<name>] table"),
                            ("sources", "at least one [[sources]] entry")):
        if table not in raw:
            raise ValueError(f"{table}: missing (expected {expected})")
    plant = _Table(raw["plant"], "plant")
    name = plant.get("name", str, expected="a string (the plant's name)")
    store = _resolve_path(base, plant.get("store", str, "store"))
    quarantine = _resolve_path(base, plant.get("quarantine", str, "quarantine"))
    reports = _resolve_path(base, plant.get("reports", str, "reports"))
    db_url = _resolve_sqlite_url(base, plant.get("database_url", str, "sqlite:///rmamba.db"))
    mlflow_uri = _resolve_sqlite_url(base, plant.get("mlflow_tracking_uri", str, "sqlite:///mlflow.db"))
    plant.finish()

    types = _parse_equipment_types(raw["equipment_types"])
    sources = _parse_sources(raw["sources"], base, types)
    return PlantConfig(
        name=name, store=store, quarantine=quarantine, reports=reports, database_url=db_url,
        mlflow_tracking_uri=mlflow_uri, equipment_types=types, sources=sources, config_path=config_path,
        model=dict(raw.get("model", {})), train=dict(raw.get("train", {})), score=dict(raw.get("score", {})),
        schedule=dict(raw.get("schedule", {})), evaluate=dict(raw.get("evaluate", {})),
    )


def _parse_equipment_types(data: Any) -> dict[str, EquipmentType]:
    if not isinstance(data, dict) or not data:
        raise _fail("equipment_types", "a table of equipment types", data)
    out: dict[str, EquipmentType] = {}
    for tname, tdata in data.items():
        key = f"equipment_types.{tname}"
        if not _NAME_RE.match(tname):
            raise _fail(key, "a name of letters, digits and underscores", tname)
        t = _Table(tdata, key)
        sensors_raw = t.get("sensors", list, expected="an array of [[sensors]] tables")
        t.finish()
        if not sensors_raw:
            raise _fail(f"{key}.sensors", "at least one sensor", sensors_raw)
        sensors: list[SensorConfig] = []
        for i, sdata in enumerate(sensors_raw):
            s = _Table(sdata, f"{key}.sensors[{i}]")
            sname = s.get("name", str, expected="a string")
            if not _NAME_RE.match(sname) or "__" in sname:
                raise _fail(f"{key}.sensors[{i}].name", "letters, digits and single underscores", sname)
            lo = s.get("min", float, None)
            hi = s.get("max", float, None)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{key}.sensors[{i}]: expected min <= max, got min={lo} > max={hi}")
            stuck = s.get("stuck_steps", int, None)
            if stuck is not None and stuck < 0:
                raise _fail(f"{key}.sensors[{i}].stuck_steps", "an integer >= 0", stuck)
            sensors.append(SensorConfig(name=sname, unit=s.get("unit", str, ""), min=lo, max=hi,
                                        required=s.get("required", bool, True), stuck_steps=stuck))
            s.finish()
            if sname in [x.name for x in sensors[:-1]]:
                raise ValueError(f"{key}.sensors[{i}].name: duplicate sensor {sname!r}")
        out[tname] = EquipmentType(name=tname, sensors=tuple(sensors))
    return out


def _parse_sources(data: Any, base: Path, types: dict[str, EquipmentType]) -> tuple[SourceConfig, ...]:
    if not isinstance(data, list) or not data:
        raise _fail("sources", "an array of [[sources]] tables", data)
    out: list[SourceConfig] = []
    for i, sdata in enumerate(data):
        key = f"sources[{i}]"
        t = _Table(sdata, key)
        name = t.get("name", str, expected="a string")
        if not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise _fail(f"{key}.name", "letters, digits, '_', '-' or '.'", name)
        if name in [s.name for s in out]:
            raise ValueError(f"{key}.name: duplicate source name {name!r}")
        path = str(_resolve_path(base, t.get("path", str, expected="a file glob such as 'raw/*.csv'")))
        default_fmt = "parquet" if path.endswith(".parquet") else "csv"
        fmt = t.choice("format", ("csv", "parquet"), default_fmt)
        layout = t.choice("layout", ("wide", "long"), "wide")
        etype = t.get("equipment_type", str, expected="the name of an [equipment_types] table")
        if etype not in types:
            raise _fail(f"{key}.equipment_type", _options(tuple(types)), etype)
        ts_format = t.get("timestamp_format", str, None)
        if ts_format is None and fmt == "csv":
            raise ValueError(f"{key}.timestamp_format: missing (expected a format such as '%Y-%m-%d %H:%M:%S')")
        if ts_format is not None and "%" not in ts_format:
            raise _fail(f"{key}.timestamp_format", "a strftime format such as '%Y-%m-%d %H:%M:%S'", ts_format)
        tz = t.get("timezone", str, expected="an IANA time zone such as 'Europe/Berlin' or 'UTC'")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise _fail(f"{key}.timezone", "an IANA time zone such as 'Europe/Berlin' or 'UTC'", tz) from None
        eq_col = t.get("equipment_id_column", str, None)
        eq_id = t.get("equipment_id", str, None)
        if eq_col is not None and eq_id is not None:
            raise ValueError(f"{key}: expected one of equipment_id_column or equipment_id, got both")
        if layout == "wide" and eq_col is None and eq_id is None:
            raise ValueError(f"{key}.equipment_id_column: missing (expected equipment_id_column or equipment_id)")
        grid = t.get("grid", str, "1m", expected="a duration such as '1m'")
        try:
            parse_duration(grid)
        except ValueError as exc:
            raise ValueError(f"{key}.grid: {exc}") from None
        max_ffill = t.get("max_ffill", int, 0)
        if max_ffill < 0:
            raise _fail(f"{key}.max_ffill", "an integer >= 0", max_ffill)
        sentinels = t.get("sentinels", list, [])
        for j, v in enumerate(sentinels):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _fail(f"{key}.sentinels[{j}]", "a number", v)
        state_words = t.get("state_words", list, list(DEFAULT_STATE_WORDS))
        for j, v in enumerate(state_words):
            if not isinstance(v, str):
                raise _fail(f"{key}.state_words[{j}]", "a string", v)
        delimiter = t.get("delimiter", str, ",")
        if len(delimiter.encode()) != 1 or delimiter in "\"\r\n":
            raise _fail(f"{key}.delimiter", "a single character such as ',' ';' or '\\t'", delimiter)
        stuck = t.get("stuck_steps", int, 60)
        if stuck < 0:
            raise _fail(f"{key}.stuck_steps", "an integer >= 0 (0 turns the check off)", stuck)
        src = SourceConfig(
            name=name, path=path, equipment_type=etype, format=fmt, layout=layout,
            timestamp_column=t.get("timestamp_column", str, "timestamp"), timestamp_format=ts_format,
            timezone=tz, equipment_id_column=eq_col, equipment_id=eq_id, grid=grid, max_ffill=max_ffill,
            sentinels=tuple(float(v) for v in sentinels),
            tag_column=t.get("tag_column", str, "tag"), value_column=t.get("value_column", str, "value"),
            quality_column=t.get("quality_column", str, None), quality_suffix=t.get("quality_suffix", str, None),
            keep_uncertain=t.get("keep_uncertain", bool, False), state_words=tuple(state_words),
            delimiter=delimiter, decimal_comma=t.get("decimal_comma", bool, False),
            ambiguous=t.choice("ambiguous", ("infer", "earliest", "latest", "quarantine"), "infer"),
            stuck_steps=stuck,
        )
        # tag_column / value_column / quality_column are read only for long layouts (the documented example
        # lists them under a wide source too, so they are accepted and ignored there).
        if layout == "long" and src.quality_suffix is not None:
            raise ValueError(f"{key}.quality_suffix: applies to layout = 'wide' only")
        if fmt == "parquet" and (src.delimiter != "," or src.decimal_comma):
            raise ValueError(f"{key}: delimiter/decimal_comma apply to format = 'csv' only")
        t.finish()
        out.append(src)
    return tuple(out)


EXAMPLE_PLANT_TOML = '''\
# plant.toml: the one configuration file of a plant (see docs/plant_config.md).
# Relative paths are resolved against the folder holding this file.

[plant]
name = "demo-plant"
store = "store"                       # ingested parquet dataset (equipment_type=/equipment=/month=)
quarantine = "quarantine"             # rejected rows with file, line and reason (one parquet per run)
reports = "reports"                   # ingest reports (JSON)
database_url = "sqlite:///rmamba.db"  # application database (or postgresql+psycopg://user@host/db)
mlflow_tracking_uri = "sqlite:///mlflow.db"

# One table per equipment type: its sensors, in the model's input order.
[equipment_types.pump]
[[equipment_types.pump.sensors]]
name = "flow"          # column name in wide logs, or the part after "<equipment>." in long-log tags
unit = "m3/h"
min = 0.0              # physical limits: values outside become null (counted)
max = 400.0
required = true        # missing from a file -> error naming the file and the sensor

[[equipment_types.pump.sensors]]
name = "pressure"
unit = "bar"
min = 0.0
max = 25.0

[[equipment_types.pump.sensors]]
name = "vibration"
unit = "mm/s"
min = 0.0
max = 50.0
required = false
stuck_steps = 240      # this sensor may legitimately sit still longer than the source default

# One [[sources]] entry per set of log files.
[[sources]]
name = "pumps-wide"
path = "raw/pumps/*.csv"              # glob
format = "csv"                        # csv | parquet
layout = "wide"                       # wide | long
timestamp_column = "timestamp"
timestamp_format = "%Y-%m-%d %H:%M:%S"
timezone = "Europe/Berlin"            # zone the timestamps are written in; converted to UTC
ambiguous = "infer"                   # repeated hour at DST end: infer | earliest | latest | quarantine
equipment_type = "pump"
equipment_id_column = "equipment_id"  # or: equipment_id = "P-101" (one fixed equipment per source)
grid = "1m"                           # regular grid period (polars duration string)
max_ffill = 5                         # bounded forward fill, in grid steps
sentinels = [-9999.0]                 # values meaning "no reading"
stuck_steps = 60                      # constant for more than this many observations -> reported as stuck
delimiter = ","
decimal_comma = false
# quality_suffix = "_quality"         # wide logs with value/quality column pairs: flow, flow_quality

[[sources]]
name = "pumps-historian"
path = "raw/historian/*.csv"
format = "csv"
layout = "long"
timestamp_column = "timestamp"
timestamp_format = "%Y-%m-%dT%H:%M:%S%.f%:z"   # offsets in the text: the time zone below is not used
timezone = "UTC"
equipment_type = "pump"
grid = "1m"
max_ffill = 5
tag_column = "tag"                    # tag = "<equipment_id>.<sensor>"
value_column = "value"
quality_column = "quality"            # optional; Good / Uncertain / Bad (OPC UA words)
keep_uncertain = false

[model]                               # rmamba model hyperparameters (passed through to the model package)
d_model = 64
n_layers = 2
num_experts = 8
top_k = 1
'''
