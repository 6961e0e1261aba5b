"""plant.toml loading: the documented contract, path resolution, and errors that name key, expected, found."""

from __future__ import annotations

import copy
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cli import main
from pipelines.config import EXAMPLE_PLANT_TOML, load_plant_config, parse_duration, parse_plant_config

EXAMPLE = tomllib.loads(EXAMPLE_PLANT_TOML)
DOC = Path(__file__).resolve().parents[1] / "docs" / "plant_config.md"


def _load(tmp_path: Path, raw: dict | None = None, text: str | None = None):
    path = tmp_path / "plant.toml"
    path.write_text(text if text is not None else _dump(raw), encoding="utf-8")
    return load_plant_config(path)


def _dump(raw: dict) -> str:
    """A minimal TOML writer for the shapes used here (tables, arrays of tables, scalars, arrays)."""
    lines: list[str] = []

    def scalar(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return repr(v)

    def table(prefix: str, d: dict, array: bool = False) -> None:
        lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        subs = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append((k, v, False))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                subs.append((k, v, True))
            else:
                lines.append(f"{k} = {scalar(v)}")
        for k, v, is_array in subs:
            for item in v if is_array else [v]:
                table(f"{prefix}.{k}", item, is_array)

    for key, value in raw.items():  # top-level scalars must come before the first table
        if not isinstance(value, dict) and not (isinstance(value, list) and value and isinstance(value[0], dict)):
            lines.append(f"{key} = {scalar(value)}")
    for key, value in raw.items():
        if not isinstance(value, dict) and not (isinstance(value, list) and value and isinstance(value[0], dict)):
            continue
        if isinstance(value, list):
            for item in value:
                table(key, item, array=True)
        elif key == "equipment_types":
            for name, t in value.items():
                for s in t["sensors"]:
                    table(f"equipment_types.{name}.sensors", s, array=True)
                extra = {k: v for k, v in t.items() if k != "sensors"}
                if extra:
                    table(f"equipment_types.{name}", extra)
        else:
            table(key, value)
    return "\n".join(lines) + "\n"


def test_example_loads_and_matches_documented_keys(tmp_path):
    cfg = _load(tmp_path, text=EXAMPLE_PLANT_TOML)
    assert cfg.name == "demo-plant"
    assert [s.name for s in cfg.equipment_types["pump"].sensors] == ["flow", "pressure", "vibration"]
    wide, long = cfg.sources
    assert (wide.format, wide.layout, wide.grid_timedelta, wide.max_ffill) == ("csv", "wide", timedelta(minutes=1), 5)
    assert wide.sentinels == (-9999.0,) and wide.equipment_id_column == "equipment_id"
    assert (long.layout, long.tag_column, long.value_column, long.quality_column) == ("long", "tag", "value", "quality")
    assert cfg.model == {"d_model": 64, "n_layers": 2, "num_experts": 8, "top_k": 1}
    assert cfg.equipment_types["pump"].sensor("vibration").stuck_steps == 240


def test_doc_example_is_valid(tmp_path):
    """The TOML block in docs/plant_config.md (what the generator follows) loads too."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = _load(tmp_path, text=block)
    assert cfg.sources[0].timezone == "Europe/Berlin"


def test_relative_paths_resolve_against_config_folder(tmp_path):
    sub = tmp_path / "plants" / "a"
    sub.mkdir(parents=True)
    cfg = _load(sub, text=EXAMPLE_PLANT_TOML)
    assert cfg.store == sub / "store" and cfg.quarantine == sub / "quarantine" and cfg.reports == sub / "reports"
    assert cfg.sources[0].path == str(sub / "raw/pumps/*.csv")
    assert cfg.database_url == f"sqlite:///{sub.as_posix()}/rmamba.db"
    assert cfg.mlflow_tracking_uri == f"sqlite:///{sub.as_posix()}/mlflow.db"


def test_absolute_paths_and_server_urls_are_kept(tmp_path):
    raw = copy.deepcopy(EXAMPLE)
    raw["plant"].update(store="/data/store", database_url="postgresql+psycopg://u@db:5432/plant",
                        mlflow_tracking_uri="sqlite:////abs/mlflow.db")
    cfg = _load(tmp_path, raw)
    assert cfg.store == Path("/data/store")
    assert cfg.database_url == "postgresql+psycopg://u@db:5432/plant"
    assert cfg.mlflow_tracking_uri == "sqlite:////abs/mlflow.db"


def test_future_tables_pass_through(tmp_path):
    raw = copy.deepcopy(EXAMPLE)
    raw["train"] = {"epochs": 3}
    raw["schedule"] = {"ingest": "*/5 * * * *"}
    cfg = _load(tmp_path, raw)
    assert cfg.train == {"epochs": 3} and cfg.schedule == {"ingest": "*/5 * * * *"} and cfg.score == {}


def _mutate(path: str, value):
    """Set (or with value=... delete) a dotted key such as 'sources.1.format' in a copy of the example."""
    raw = copy.deepcopy(EXAMPLE)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is ...:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return raw


@pytest.mark.parametrize("path,value,message", [
    ("sources.1.format", "xlsx", "sources[1].format: expected 'csv' or 'parquet', got 'xlsx'"),
    ("sources.0.layout", "tall", "sources[0].layout: expected 'wide' or 'long', got 'tall'"),
    ("sources.0.ambiguous", "guess", "sources[0].ambiguous: expected 'infer', 'earliest', 'latest' or 'quarantine'"),
    ("sources.0.timezone", "Mars/Olympus", "sources[0].timezone: expected an IANA time zone"),
    ("sources.0.grid", "1x", "sources[0].grid: expected a duration like '1m'"),
    ("sources.0.grid", 60, "sources[0].grid: expected a duration such as '1m', got 60"),
    ("sources.0.max_ffill", -1, "sources[0].max_ffill: expected an integer >= 0, got -1"),
    ("sources.0.max_ffill", 1.5, "sources[0].max_ffill: expected an integer, got 1.5"),
    ("sources.0.sentinels", ["x"], "sources[0].sentinels[0]: expected a number, got 'x'"),
    ("sources.0.equipment_type", "valve", "sources[0].equipment_type: expected 'pump', got 'valve'"),
    ("sources.0.timestamp_format", ..., "sources[0].timestamp_format: missing"),
    ("sources.0.timestamp_format", "YYYY-MM-DD", "sources[0].timestamp_format: expected a strftime format"),
    ("sources.0.timezone", ..., "sources[0].timezone: missing"),
    ("sources.0.equipment_id_column", ..., "sources[0].equipment_id_column: missing"),
    ("sources.0.equipment_id", "P-1", "sources[0]: expected one of equipment_id_column or equipment_id, got both"),
    ("sources.0.delimiter", ";;", "sources[0].delimiter: expected a single character"),
    ("sources.0.timestamp_fromat", "%Y", "sources[0].timestamp_fromat: unknown key"),
    ("sources.1.quality_suffix", "_q", "sources[1].quality_suffix: applies to layout = 'wide' only"),
    ("sources.1.name", "pumps-wide", "sources[1].name: duplicate source name 'pumps-wide'"),
    ("sources", [], "sources: expected an array of [[sources]] tables, got an array"),
    ("sources", "raw/*.csv", "sources: expected an array of [[sources]] tables, got 'raw/*.csv'"),
    ("sources", ..., "sources: missing"),
    ("plant.name", ..., "plant.name: missing"),
    ("plant.name", 7, "plant.name: expected a string (the plant's name), got 7"),
    ("plant.stroe", "x", "plant.stroe: unknown key"),
    ("equipment_types.pump.sensors.0.min", 500.0, "equipment_types.pump.sensors[0]: expected min <= max"),
    ("equipment_types.pump.sensors.0.required", "yes", "equipment_types.pump.sensors[0].required: expected a boolean"),
    ("equipment_types.pump.sensors.1.name", "flow", "equipment_types.pump.sensors[1].name: duplicate sensor 'flow'"),
    ("equipment_types.pump.sensors.0.name", "flow rate", "equipment_types.pump.sensors[0].name: expected letters"),
    ("equipment_types.pump.sensors.0.name", "a__b", "equipment_types.pump.sensors[0].name: expected letters"),
    ("dashboard", {"x": 1}, "dashboard: unknown top-level table (expected one of: plant, equipment_types"),
    ("model", 3, "model: expected a table, got 3"),
])
def test_errors_name_key_expected_and_found(tmp_path, path, value, message):
    with pytest.raises(ValueError) as err:
        _load(tmp_path, _mutate(path, value))
    assert message in str(err.value)
    assert str(tmp_path / "plant.toml") in str(err.value)  # the file is named too


def test_empty_sensor_list(tmp_path):
    head, rest = EXAMPLE_PLANT_TOML.split("[equipment_types.pump]", 1)
    text = head + "[equipment_types.pump]\nsensors = []\n" + rest[rest.index("\n[[sources]]"):]
    with pytest.raises(ValueError, match=r"equipment_types.pump.sensors: expected at least one sensor"):
        _load(tmp_path, text=text)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"plant.toml: not valid TOML"):
        _load(tmp_path, text="[plant\nname = 'x'\n")
    with pytest.raises(FileNotFoundError, match="plant config not found"):
        load_plant_config(tmp_path / "nope.toml")


def test_format_defaults_from_suffix(tmp_path):
    raw = _mutate("sources.0.format", ...)
    raw["sources"][0]["path"] = "raw/*.parquet"
    raw["sources"][0].pop("delimiter")
    raw["sources"][0].pop("decimal_comma")
    assert _load(tmp_path, raw).sources[0].format == "parquet"


@given(st.lists(st.tuples(st.integers(1, 999), st.sampled_from(["ms", "s", "m", "h", "d"])), min_size=1, max_size=3))
def test_parse_duration_property(parts):
    text = "".join(f"{n}{u}" for n, u in parts)
    seconds = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    assert parse_duration(text) == timedelta(seconds=sum(n * seconds[u] for n, u in parts))


def test_parse_plant_config_needs_no_file():
    cfg = parse_plant_config(copy.deepcopy(EXAMPLE), base=Path("/plants/x"))
    assert cfg.config_path is None and cfg.store == Path("/plants/x/store")


def test_init_command_writes_an_example_that_loads(tmp_path, capsys):
    out = tmp_path / "new" / "plant.toml"
    assert main(["init", "--out", str(out)]) == 0
    cfg = load_plant_config(out)
    assert cfg.name == "demo-plant" and len(cfg.sources) == 2
    assert "#" in out.read_text()  # commented
    # refuses to overwrite without --force, with a clear message and no traceback
    assert main(["init", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    out.write_text("junk")
    assert main(["init", "--out", str(out), "--force"]) == 0
    assert load_plant_config(out).name == "demo-plant"
