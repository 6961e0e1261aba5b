"""Write the synthetic plant as a folder: raw logs, labels.csv, plant.toml and README.txt."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from pipelines.generate.anomalies import ANOMALY_KINDS
from pipelines.generate.equipment import EQUIPMENT_TYPES
from pipelines.generate.logs import SENTINEL, LogSource, format_timestamps, log_sources, write_long, write_wide
from pipelines.generate.plant import (
    DEFAULT_START,
    PlantSpec,
    PlantTruth,
    concat_labels,
    iter_units,
    plant_calendar,
)
from pipelines.generate.signals import MINUTES_PER_DAY

LABELS_FILE = "labels.csv"
CONFIG_FILE = "plant.toml"
README_FILE = "README.txt"
ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"
MODEL_DEFAULTS = {"d_model": 32, "n_layers": 2, "num_experts": 8, "top_k": 1}
# Demo-sized training (a few minutes on 2 CPU cores); train_until is added per plant (end of the clean period).
TRAIN_DEFAULTS = {"window": 2048, "batch_size": 2, "steps": 300}


@dataclass(frozen=True)
class GeneratedPlant:
    """What generate_plant wrote. files: relative path -> bytes; rows: data rows per log file.

    defects: every log defect written (equipment, sensor or "*" for a whole row, UTC minute, kind).
    truth: the in-memory ground truth, when asked for (keep_truth=True).
    """

    out_dir: Path
    config_path: Path
    spec: PlantSpec
    labels: pl.DataFrame
    defects: pl.DataFrame
    files: dict[str, int]
    rows: dict[str, int]
    train_end: datetime
    truth: PlantTruth | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _owned_paths(out: Path, sources: tuple[LogSource, ...]) -> list[Path]:
    paths = [out / name for name in (CONFIG_FILE, LABELS_FILE, README_FILE)]
    for src in sources:
        paths.extend(sorted((out / src.folder).glob("*.csv")))
    return [p for p in paths if p.exists()]


def generate_plant(
    out_dir: str | Path,
    days: float = 30.0,
    scale: float = 1.0,
    seed: int = 0,
    *,
    start: datetime = DEFAULT_START,
    clean_fraction: float = 0.4,
    anomalies_per_unit: int = 3,
    overwrite: bool = False,
    keep_truth: bool = False,
    progress: bool = False,
) -> GeneratedPlant:
    """Simulate the plant and write it to `out_dir`, one unit at a time (memory: one unit).

    Same arguments -> byte-identical files. The units per type are base counts (3 pumps, 2 compressors,
    2 conveyors) times `scale`; the first `clean_fraction` of the `days` is anomaly-free. An existing
    generated plant in `out_dir` is an error unless `overwrite`, which deletes only files this function
    writes (plant.toml, labels.csv, README.txt, the log CSVs), not an ingested store next to them.
    """
    spec = PlantSpec(days, scale, seed, start, clean_fraction, anomalies_per_unit)
    out = Path(out_dir)
    sources = log_sources(spec.timezone)
    stale = _owned_paths(out, sources) if out.exists() else []
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds a generated plant ({stale[0].name}, ...); overwrite=True replaces it"
        )
    for p in stale:
        p.unlink()
    by_type = {src.equipment_type: src for src in sources}
    for src in sources:
        (out / src.folder).mkdir(parents=True, exist_ok=True)

    files: dict[str, int] = {}
    rows: dict[str, int] = {}
    labels, defects, units = [], [], []
    stamps: dict[str, pl.Series] = {}
    calendar = plant_calendar(spec)
    with tqdm(total=len(spec.units()), unit="unit", desc="generate", disable=not progress) as bar:
        for unit in iter_units(spec, calendar):
            etype = EQUIPMENT_TYPES[unit.equipment_type]
            src = by_type[etype.name]
            rel = f"{src.folder}/{unit.equipment_id}.csv"
            # log defects get their own stream, so the signals do not depend on the log layout
            rng = np.random.default_rng([spec.seed, 7777, zlib.crc32(unit.equipment_id.encode())])
            if src.layout == "wide":
                if src.name not in stamps:
                    stamps[src.name] = format_timestamps(calendar, src)
                n_rows, unit_defects = write_wide(out / rel, unit, etype, src, stamps[src.name], calendar, rng)
            else:
                n_rows, unit_defects = write_long(out / rel, unit, etype, src, calendar, rng)
            files[rel] = (out / rel).stat().st_size
            rows[rel] = n_rows
            labels.append(unit.labels)
            defects.append(unit_defects)
            if keep_truth:
                units.append(unit)
            bar.set_postfix_str(unit.equipment_id, refresh=False)
            bar.update(1)

    label_frame = concat_labels(labels)
    label_frame.with_columns(pl.col("start", "end").dt.strftime(ISO_UTC)).write_csv(out / LABELS_FILE)
    files[LABELS_FILE] = (out / LABELS_FILE).stat().st_size
    train_end = calendar.timestamps[min(int(round(spec.clean_fraction * calendar.n)), calendar.n - 1)]
    config_path = out / CONFIG_FILE
    config_path.write_text(render_plant_toml(spec, sources, train_end))
    files[CONFIG_FILE] = config_path.stat().st_size
    (out / README_FILE).write_text(render_readme(spec, sources, files, rows, label_frame, train_end))
    files[README_FILE] = (out / README_FILE).stat().st_size

    truth = PlantTruth(spec, calendar, units) if keep_truth else None
    return GeneratedPlant(out, config_path, spec, label_frame, pl.concat(defects), files, rows, train_end, truth)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _table(header: str, items: dict[str, object]) -> list[str]:
    return [header, *(f"{k} = {_toml_value(v)}" for k, v in items.items()), ""]


def render_plant_toml(spec: PlantSpec, sources: tuple[LogSource, ...], train_end: datetime) -> str:
    """plant.toml for the generated folder, following docs/plant_config.md."""
    lines = [
        "# Synthetic demo plant written by `rmamba generate` "
        f"(seed {spec.seed}, {spec.days:g} days from {spec.start.strftime(ISO_UTC)}, scale {spec.scale:g}).",
        f"# Anomaly-free training period: up to {train_end.strftime(ISO_UTC)}; labels.csv lists the anomalies.",
        "",
        *_table(
            "[plant]",
            {
                "name": "synthetic-plant",
                "store": "store",
                "database_url": "sqlite:///rmamba.db",
                "mlflow_tracking_uri": "sqlite:///mlflow.db",
            },
        ),
    ]
    for name, etype in EQUIPMENT_TYPES.items():
        lines += [f"# {etype.description}", f"[equipment_types.{name}]", ""]
        for s in etype.sensors:
            lines += _table(
                f"[[equipment_types.{name}.sensors]]",
                {"name": s.name, "unit": s.unit, "min": s.min, "max": s.max, "required": s.required},
            )
    for src in sources:
        items: dict[str, object] = {
            "name": src.name,
            "path": src.glob,
            "format": "csv",
            "layout": src.layout,
            "timestamp_column": src.timestamp_column,
            "timestamp_format": src.timestamp_format,
            "timezone": src.timezone,
            "equipment_type": src.equipment_type,
        }
        if src.layout == "wide":
            items["equipment_id_column"] = "equipment_id"
        items.update({"grid": "1m", "max_ffill": src.max_ffill, "sentinels": [SENTINEL]})
        if src.layout == "long":
            items.update({"tag_column": "tag", "value_column": "value", "quality_column": "quality"})
        lines += _table("[[sources]]", items)
    lines += _table("[model]", dict(MODEL_DEFAULTS))
    lines += [f"# Train on the anomaly-free period only (labels start after {train_end.strftime(ISO_UTC)})."]
    lines += _table("[train]", {**TRAIN_DEFAULTS, "train_until": train_end.strftime(ISO_UTC)})
    return "\n".join(lines).rstrip("\n") + "\n"


def _size(b: int) -> str:
    return f"{b / 1e6:.1f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def render_readme(
    spec: PlantSpec,
    sources: tuple[LogSource, ...],
    files: dict[str, int],
    rows: dict[str, int],
    labels: pl.DataFrame,
    train_end: datetime,
) -> str:
    """README.txt of the folder: what is there and how it was made (deterministic: no run time)."""
    counts = spec.unit_counts()
    n = int(round(spec.days * MINUTES_PER_DAY))
    out = [
        "Synthetic plant (written by `rmamba generate`)",
        "=" * 46,
        "",
        f"Seed {spec.seed}, {spec.days:g} days of one-minute data from {spec.start.strftime(ISO_UTC)} "
        f"({n} minutes), scale {spec.scale:g}.",
        "Regenerate byte-identically with:",
        f"  rmamba generate --out DIR --days {spec.days:g} --scale {spec.scale:g} --seed {spec.seed} "
        f"--start {spec.start.strftime('%Y-%m-%d')} --clean-fraction {spec.clean_fraction:g}",
        f"Ingest with:  rmamba ingest --config DIR/{CONFIG_FILE}",
        "",
        "Equipment",
    ]
    for name, etype in EQUIPMENT_TYPES.items():
        ids = etype.unit_ids(counts[name])
        shown = ", ".join(ids) if len(ids) <= 6 else f"{ids[0]} .. {ids[-1]}"
        out.append(f"  {name} ({etype.description}): {len(ids)} units ({shown}), {len(etype.sensors)} sensors")
        described = (f"{s.name} [{s.unit}]{'' if s.required else ' (optional)'}" for s in etype.sensors)
        out.append("    " + ", ".join(described))
    out += ["", "Files"]
    for src in sources:
        sel = [k for k in files if k.startswith(src.folder + "/")]
        size = sum(files[k] for k in sel)
        nrows = sum(rows[k] for k in sel)
        kind = "wide CSV, one column per sensor, equipment_id column" if src.layout == "wide" else (
            "historian long CSV: tag '<equipment>.<sensor>', timestamp, value, quality (Good/Uncertain/Bad)"
        )
        out.append(f"  {src.glob}: {len(sel)} files, {nrows} rows, {_size(size)}; source '{src.name}'")
        out.append(f"    {kind}")
        out.append(f"    {src.timestamp_column!r} written as {src.timestamp_format!r} in {src.timezone}")
    out += [
        f"  {LABELS_FILE}: {labels.height} labelled anomalies",
        f"  {CONFIG_FILE}: plant configuration (sources, equipment types, sensor limits, [model])",
        "",
        "Labels",
        "  Columns: equipment, equipment_type, start, end (UTC, ISO 8601; end is the last anomalous minute,",
        "  inclusive), kind, sensors (';'-separated; the first is the one modified, the others are involved).",
        f"  Anomaly-free training period: up to {train_end.strftime(ISO_UTC)} "
        f"(first {spec.clean_fraction:.0%} of the range).",
        "  Kinds and counts: "
        + ", ".join(f"{k} {labels.filter(pl.col('kind') == k).height}" for k in ANOMALY_KINDS),
        "  A degradation ends in a failure at its end time; the unit then stays down for repair (not labelled).",
        "",
        "Log defects (not labelled; the ingest handles them)",
        f"  Wide files: sentinel {SENTINEL:g} in some cells, empty cells, logger outages (missing rows),",
        "  a few exactly repeated rows. Local wall-clock time: around daylight-saving changes an hour is",
        "  skipped (spring) or repeated (autumn).",
        "  Historian files: deadband compression (irregular timestamps up to 30 s before the minute a reading",
        "  stands for, a value at least every 10 minutes),",
        "  'Shutdown' markers, state words ('I/O Timeout', 'Comm Fail') in the value column, Bad and",
        f"  Uncertain quality, sentinel {SENTINEL:g}, exact duplicates and a couple of conflicting duplicates.",
        "",
    ]
    return "\n".join(out)
