"""Benchmark: our ingest (polars, streaming) against a straightforward pandas implementation of the same steps.

Data: a ~1 GB wide CSV of pump logs and the same readings as a long (historian) CSV. With the synthetic
plant generator (pipelines.generate) the pump logs are its realistic per-unit files (sentinels, gaps,
duplicated rows, local time with DST) concatenated into one file; without it a simple internal writer
makes comparable data. Every run is a subprocess of its own, so its peak RSS (ru_maxrss) is its own.
Rows/s counts input data lines; CPU s is user + system time of the run (the machine may be shared, so
wall times carry the load of other work: compare CPU s as well).

The pandas reference reads each file whole (C parser, categorical ids), parses timestamps with the
explicit format, localises them (earliest reading in the repeated DST hour, gap -> NaT), quarantines bad
timestamps and conflicting duplicates, drops exact duplicates, nulls state words, text, sentinels and
values outside the limits (counting each), buckets onto the grid (last reading per grid point), pivots
long logs, reindexes each equipment to its full grid, forward fills with a limit, adds the missing masks,
finds stuck runs and gaps, and writes one parquet file per equipment and UTC month (the store layout).
Memory bounds its long run to a prefix of the long file (same size as the wide file); ours runs on that
prefix and on the full file.

    .venv/bin/python benchmarks/ingest.py [--size-gb 1.0] [--data DIR] [--skip-pandas] [--no-write]
    .venv/bin/python benchmarks/ingest.py --render LOAD_BEFORE LOAD_AFTER   # section from the saved results

Writes its table, with the hardware, to BENCHMARKS.md between ``<!-- ingest:start -->`` and
``<!-- ingest:end -->`` (other benchmarks own the rest of the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import write_section  # noqa: E402  (sibling module; benchmarks run as scripts)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "BENCHMARKS.md"
STATE_WORDS = ("Shutdown", "I/O Timeout", "Bad", "Comm Fail", "No Data")


# --- data ------------------------------------------------------------------------------------------------


def make_data(data: Path, size_gb: float) -> dict:
    """The wide CSV, the long CSV and a plant.toml for both; reused when already there for this size."""
    meta_path = data / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("size_gb") == size_gb and all(Path(meta[k]).exists() for k in ("wide", "long", "long_prefix")):
            return meta
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        from pipelines.generate import generate_plant

        maker = "pipelines.generate (synthetic plant generator)"
    except ImportError:
        generate_plant = None
        maker = "benchmarks/ingest.py internal writer"
    wide = data / "wide.csv"
    if generate_plant is not None:
        # 3 pumps per unit of scale, ~3.2 MB of wide log per pump and month
        days = 90.0
        scale = max(1.0, round(size_gb * 1e9 / (3 * 3.2e6 * days / 30)))
        plant = generate_plant(data / "gen", days=days, scale=scale, progress=sys.stderr.isatty())
        config = plant.config_path
        pumps = sorted((data / "gen" / "raw" / "pumps").glob("*.csv"))
        _concat_csv(pumps, wide)
        for folder in (data / "gen" / "raw").iterdir():  # the other generated logs are not needed
            shutil.rmtree(folder)
    else:
        config = _internal_wide(wide, size_gb)
    _wide_to_long(wide, data / "long.csv", config)
    prefix = data / "long_prefix.csv"
    _head_bytes(data / "long.csv", prefix, wide.stat().st_size)
    meta = {"size_gb": size_gb, "maker": maker, "config": str(config), "wide": str(wide),
            "long": str(data / "long.csv"), "long_prefix": str(prefix), "seconds": round(time.perf_counter() - t0)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def _concat_csv(files: list[Path], out: Path) -> None:
    with open(out, "wb") as dst:
        for i, f in enumerate(files):
            with open(f, "rb") as src:
                header = src.readline()
                if i == 0:
                    dst.write(header)
                shutil.copyfileobj(src, dst, 1 << 22)


def _head_bytes(src: Path, dst: Path, n: int) -> None:
    """The first ~n bytes of a text file, cut at a line end."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(fi.read(n))
        fo.write(fi.readline())


def _wide_to_long(wide: Path, out: Path, config: Path) -> None:
    """The same readings as a historian export: tag = "<equipment>.<sensor>", every non-empty cell a row."""
    import polars as pl

    from pipelines.config import load_plant_config

    cfg = load_plant_config(config)
    src = next(s for s in cfg.sources if s.layout == "wide" and s.equipment_type == "pump")
    sensors = cfg.equipment_types["pump"].sensor_names
    lf = pl.scan_csv(wide, infer_schema=False)
    parts = [
        lf.select(pl.concat_str(pl.col(src.equipment_id_column), pl.lit(f".{s}")).alias("tag"),
                  pl.col(src.timestamp_column).alias("timestamp"), pl.col(s).alias("value"),
                  pl.lit("Good").alias("quality")).filter(pl.col("value").is_not_null())
        for s in sensors
    ]
    # interleave the sensors of each row as a historian would (sorted by time per unit)
    pl.concat([p.with_row_index("_r").with_columns(pl.lit(i, pl.UInt8).alias("_s")) for i, p in enumerate(parts)]) \
        .sort("_r", "_s").drop("_r", "_s").sink_csv(out)


def _internal_wide(path: Path, size_gb: float) -> Path:
    """Fallback data: random-walk pump signals at 1 min, local time, a few defects per unit."""
    import numpy as np
    import polars as pl

    sensors = [("speed_rpm", 0, 1800), ("flow_m3h", 0, 400), ("suction_pressure_bar", -1, 6),
               ("discharge_pressure_bar", -1, 25), ("motor_current_a", 0, 200), ("motor_temp_c", -20, 160),
               ("bearing_temp_c", -20, 140), ("vibration_mm_s", 0, 50)]
    minutes = 90 * 1440
    units = max(1, round(size_gb * 1e9 / (minutes * 95)))
    rng = np.random.default_rng(0)
    stamps = pl.datetime_range(pl.datetime(2026, 3, 2, time_zone="UTC"), pl.datetime(2026, 3, 2, time_zone="UTC")
                               + pl.duration(minutes=minutes - 1), "1m", eager=True)
    text = stamps.dt.convert_time_zone("Europe/Berlin").dt.strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "wb") as fh:
        for u in range(units):
            cols = {"timestamp": text, "equipment_id": [f"P-{u:03d}"] * minutes}
            for name, lo, hi in sensors:
                x = (lo + hi) / 2 + np.cumsum(rng.normal(0, (hi - lo) / 2000, minutes))
                x[rng.integers(0, minutes, 20)] = -9999.0
                cols[name] = np.round(np.clip(x, lo, hi), 3)
            df = pl.DataFrame(cols)
            df = pl.concat([df, df.sample(5, seed=u)]).sort("timestamp", maintain_order=True)
            df.write_csv(fh, include_header=(u == 0))
    toml = ['[plant]\nname = "bench"\n[equipment_types.pump]']
    for name, lo, hi in sensors:
        toml.append(f'[[equipment_types.pump.sensors]]\nname = "{name}"\nmin = {float(lo)}\nmax = {float(hi)}')
    toml.append('[[sources]]\nname = "pumps-wide"\npath = "wide.csv"\ntimestamp_format = "%Y-%m-%d %H:%M:%S"\n'
                'timezone = "Europe/Berlin"\nequipment_type = "pump"\nequipment_id_column = "equipment_id"\n'
                'grid = "1m"\nmax_ffill = 5\nsentinels = [-9999.0]')
    config = path.parent / "plant.toml"
    config.write_text("\n".join(toml) + "\n")
    return config


# --- workers (each runs in its own process) -------------------------------------------------------------


def _bench_source(meta: dict, layout: str, file: str, out: Path):
    """The plant config with one pump source pointing at ``file``, and the store under ``out``."""
    from pipelines.config import load_plant_config

    cfg = load_plant_config(meta["config"])
    wide = next(s for s in cfg.sources if s.layout == "wide" and s.equipment_type == "pump")
    if layout == "wide":
        src = dataclasses.replace(wide, name="bench-wide", path=file, stuck_steps=60)
    else:
        src = dataclasses.replace(wide, name="bench-long", path=file, layout="long", equipment_id_column=None,
                                  tag_column="tag", value_column="value", quality_column="quality", stuck_steps=60)
    cfg = dataclasses.replace(cfg, store=out / "store", quarantine=out / "quarantine", reports=out / "reports",
                              sources=(src,))
    return cfg, src


def worker_ours(meta: dict, layout: str, file: str, out: Path, workers: int | None = None) -> dict:
    from pipelines.ingest import ingest_source

    cfg, src = _bench_source(meta, layout, file, out)
    result = ingest_source(cfg, src, run_id="bench", workers=workers)
    r = result.report
    r.check()
    return {"rows_in": r.rows_in, "kept": r.kept, "deduplicated": r.deduplicated, "quarantined": r.quarantined,
            "nulled": r.nulled, "gaps": r.gaps, "stuck": r.stuck, "files": r.partitions_written}


def worker_pandas(meta: dict, layout: str, file: str, out: Path) -> dict:
    import numpy as np
    import pandas as pd

    cfg, src = _bench_source(meta, layout, file, out)
    etype = cfg.equipment_types[src.equipment_type]
    sensors = etype.sensor_names
    grid = pd.Timedelta(src.grid_timedelta)
    counts = {"quarantined": 0, "deduplicated": 0, "nulled": 0, "gaps": 0, "stuck": 0, "files": 0}

    def clean(values: pd.Series, sensor) -> pd.Series:
        """Text, state words, NaN/inf, sentinels and out-of-limit values to NaN (counted)."""
        if values.dtype == object:
            num = pd.to_numeric(values, errors="coerce")
            counts["nulled"] += int((num.isna() & values.notna()).sum())  # state words and other text
        else:
            num = values.astype("float64")
        bad = ~np.isfinite(num) & num.notna()
        bad |= num.isin(src.sentinels)
        if sensor is not None:
            if sensor.min is not None:
                bad |= num < sensor.min
            if sensor.max is not None:
                bad |= num > sensor.max
        counts["nulled"] += int(bad.sum())
        return num.mask(bad)

    if layout == "wide":
        df = pd.read_csv(file, dtype={src.timestamp_column: str, src.equipment_id_column: "category"})
        df = df.rename(columns={src.timestamp_column: "ts_local", src.equipment_id_column: "equipment"})
        key = ["equipment", "ts"]
    else:
        df = pd.read_csv(file, dtype={"tag": "category", "timestamp": str, "quality": "category"})
        parts = df["tag"].cat.categories.to_series().str.rsplit(".", n=1, expand=True)
        codes = df["tag"].cat.codes.to_numpy()
        for col, names in (("equipment", parts[0]), ("sensor", parts[1])):  # per tag -> per row, via codes
            cats, per_tag = np.unique(names.to_numpy(dtype=str), return_inverse=True)
            df[col] = pd.Categorical.from_codes(np.where(codes >= 0, per_tag[codes], -1), cats)
        df = df.rename(columns={"timestamp": "ts_local"})
        key = ["equipment", "sensor", "ts"]
    rows_in = len(df)

    naive = pd.to_datetime(df["ts_local"], format=src.timestamp_format.replace("%.3f", ".%f"), errors="coerce")
    local = naive.dt.tz_localize(src.timezone, ambiguous=np.ones(len(naive), dtype=bool), nonexistent="NaT")
    df["ts"] = local.dt.tz_convert("UTC")
    bad_ts = df["ts"].isna()
    counts["quarantined"] += int(bad_ts.sum())
    df = df[~bad_ts].drop(columns="ts_local")

    if layout == "wide":
        for s in etype.sensors:
            if s.name in df:
                df[s.name] = clean(df[s.name], s)
        values = [s for s in sensors if s in df]
    else:
        quality = df["quality"].astype(str).str.lower()
        df["value"] = clean(df["value"], None).mask(~quality.str.startswith("good") & df["quality"].notna())
        lo = df["sensor"].map({s.name: s.min for s in etype.sensors}).astype(float)
        hi = df["sensor"].map({s.name: s.max for s in etype.sensors}).astype(float)
        out_of_range = (df["value"] < lo) | (df["value"] > hi)
        counts["nulled"] += int(out_of_range.sum())
        df.loc[out_of_range, "value"] = np.nan
        values = ["value"]

    df = df.sort_values(key, kind="stable")
    exact = df.duplicated(subset=key + values)
    counts["deduplicated"] += int(exact.sum())
    df = df[~exact]
    conflict = df.duplicated(subset=key, keep=False)
    counts["quarantined"] += int(conflict.sum())
    df = df[~conflict]
    kept = len(df)
    df["bucket"] = df["ts"].dt.ceil(grid)

    if layout == "long":
        df = (df.dropna(subset=["value"]).groupby(["equipment", "bucket", "sensor"], observed=True)["value"].last()
              .unstack("sensor").reset_index())
    for eq, g in df.groupby("equipment", observed=True):
        obs = g.groupby("bucket")[[s for s in sensors if s in g]].last().reindex(columns=sensors)
        obs = obs.dropna(how="all")
        if obs.empty:
            continue
        for s in etype.sensors:  # stuck: more identical consecutive observations than stuck_steps
            x = obs[s.name].dropna()
            run_len = x.groupby((x != x.shift()).cumsum()).transform("size")
            counts["stuck"] += int((run_len[run_len > src.stuck_steps].index.to_series().diff() != grid).sum()) \
                if (run_len > src.stuck_steps).any() else 0
        steps = obs.index.to_series().diff()
        counts["gaps"] += int((steps > grid * (src.max_ffill + 1)).sum())
        full = obs.reindex(pd.date_range(obs.index.min(), obs.index.max(), freq=grid, name="timestamp"))
        mask = full.isna().add_suffix("__missing")
        aligned = pd.concat([full.ffill(limit=src.max_ffill), mask], axis=1)
        for (year, month), part in aligned.groupby([aligned.index.year, aligned.index.month]):
            path = out / "store" / f"equipment_type={etype.name}" / f"equipment={eq}" / f"month={year}-{month:02d}"
            path.mkdir(parents=True, exist_ok=True)
            part.reset_index().to_parquet(path / "part-0.parquet", compression="zstd")
            counts["files"] += 1
    return {"rows_in": rows_in, "kept": kept, **counts}


class _RssSampler:
    """Peak of (this process + its child processes) resident memory, sampled from /proc every 0.2 s: the
    stage-B worker processes are spawned, and ru_maxrss of a fork carries the parent's size over."""

    def __init__(self) -> None:
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_kb(pid: int | str) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _children(self) -> list[str]:
        out = []
        for task in Path("/proc/self/task").glob("*/children"):
            try:
                out += task.read_text().split()
            except OSError:
                pass
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            total = self._rss_kb("self") + sum(self._rss_kb(c) for c in self._children())
            self.peak_kb = max(self.peak_kb, total)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this process image from /proc (a cross-check of ru_maxrss, which Linux carries over
    from the parent's memory at fork; the parent here stays small, so both agree)."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def _worker_main(args: argparse.Namespace) -> None:
    meta = json.loads(Path(args.meta).read_text())
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    r0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with _RssSampler() as sampler:
        if args.worker == "ours":
            result = worker_ours(meta, args.layout, args.file, out, args.stage_b_workers)
        else:
            result = worker_pandas(meta, args.layout, args.file, out)
    r1 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum((b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime) for a, b in zip(r0, r1))
    # ru_maxrss in KiB (Linux): this process; total = sampled peak of this process plus its workers
    result.update(seconds=time.perf_counter() - t0, cpu=cpu, peak_rss_mb=r1[0].ru_maxrss / 1024,
                  total_rss_mb=max(sampler.peak_kb, r1[0].ru_maxrss) / 1024, hwm_mb=_vm_hwm_mb(),
                  stage_b_workers=args.stage_b_workers)
    print("RESULT " + json.dumps(result), flush=True)
    shutil.rmtree(out, ignore_errors=True)


def run_worker(worker: str, layout: str, file: str, meta_path: Path, work: Path, stage_b: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--layout", layout, "--file", file, "--meta", str(meta_path),
           "--out", str(work / f"{worker}-{layout}")] + (["--stage-b-workers", str(stage_b)] if stage_b else [])
    print(f"... {worker} {layout} {Path(file).name}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{worker} {layout} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    name = worker if worker == "pandas" else ("ours, 1 process" if stage_b == 1 else "ours")
    result.update(worker=name, layout=layout, file=file, mb=Path(file).stat().st_size / 1e6)
    print(f"    {result['seconds']:.1f} s (CPU {result['cpu']:.1f} s), {result['rows_in'] / result['seconds']:,.0f} "
          f"rows/s, peak RSS {result['peak_rss_mb']:,.0f} MB (VmHWM {result['hwm_mb'] or 0:,.0f} MB, with "
          f"workers {result['total_rss_mb']:,.0f} MB)", file=sys.stderr, flush=True)
    return result


# --- report ----------------------------------------------------------------------------------------------


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal")).split()[1]) / 1024**2
    except (OSError, StopIteration):
        mem = float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def render(results: list[dict], meta: dict, load: tuple[float, float]) -> str:
    import pandas as pd
    import polars as pl

    lines = [
        "## Ingest: polars streaming pipeline vs pandas (benchmarks/ingest.py)",
        "",
        f"Hardware: {hardware()}; polars {pl.__version__}, pandas {pd.__version__}. Load average (1 min) "
        f"before / after: {load[0]:.1f} / {load[1]:.1f} (a shared machine: wall times include other work).",
        f"Data: {meta['maker']}; pump logs at 1 min, wide = one row per unit and minute, long = one row per "
        "reading. Each run is a fresh process; peak RSS = its ru_maxrss; with workers = the sampled peak of it plus "
        "the stage-B worker processes it spawns (one per core); CPU s includes the workers.",
        "",
        "| run | implementation | layout | file | MB | rows in | wall s | CPU s | rows/s | MB/s | peak RSS MB |"
        " with workers MB |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.get('repeat', 0) + 1} | {r['worker']} | {r['layout']} | {Path(r['file']).name} | "
                     f"{r['mb']:,.0f} | "
                     f"{r['rows_in']:,} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
                     f"{r['rows_in'] / r['seconds']:,.0f} | {r['mb'] / r['seconds']:.1f} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['total_rss_mb']:,.0f} |")
    lines.append("")
    repeats = sorted({r.get("repeat", 0) for r in results})
    if len(repeats) > 1:
        loads = ", ".join(f"{r.get('load_start', float('nan')):.1f}" for r in results if r["worker"] == "ours"
                          and Path(r["file"]).name == "wide.csv")
        lines.append(f"- The wide-file pair (ours, pandas) ran {len(repeats)} times (load average at the "
                     f"start of each of ours: {loads}); the target is judged on the median of the pairs' ratios.")
    for name in ("wide.csv", "long_prefix.csv"):
        speeds, cpus = [], []
        for rep in repeats:
            by = {(r["worker"], Path(r["file"]).name): r for r in results if r.get("repeat", 0) == rep}
            ours, pand = by.get(("ours", name)), by.get(("pandas", name))  # "ours" = a process per core
            if ours and pand:
                speeds.append(pand["seconds"] / ours["seconds"])
                cpus.append(pand["cpu"] / ours["cpu"])
                rss, prss, kept = ours["total_rss_mb"], pand["total_rss_mb"], (ours["kept"], pand["kept"])
        if speeds:
            each = f" (runs: {', '.join(f'{x:.2f}x' for x in speeds)})" if len(speeds) > 1 else ""
            lines.append(f"- {name}: ours {statistics.median(speeds):.2f}x pandas' throughput (wall, median){each}, "
                         f"{statistics.median(cpus):.1f}x less CPU time; peak RSS {rss:,.0f} MB vs {prss:,.0f} MB. "
                         f"Same counts: kept {kept[0]:,} vs {kept[1]:,}.")
            if name == "wide.csv":
                speed = statistics.median(speeds)
                rss_max = max(r["total_rss_mb"] for r in results if r["worker"] == "ours"
                              and Path(r["file"]).name == name)
                below = sum(x < 5 for x in speeds)
                lines.append(f"- Targets on the ~1 GB wide file: >= 5x pandas' throughput: "
                             f"{'met' if speed >= 5 else 'NOT met'} ({speed:.2f}x, median; {below} of {len(speeds)} "
                             f"pairs below 5x); peak RSS under 2 GB: "
                             f"{'met' if rss_max < 2048 else 'NOT met'} ({rss_max:,.0f} MB, largest run).")
    if not any(Path(r["file"]).name == "long.csv" for r in results):
        lines.append("- Not run this time: ours on the full long.csv (`--skip-long-full`).")
    lines.append("- Store layout since this revision: one parquet file per equipment and UTC month (315 files for "
                 "wide.csv) instead of one per day (9,450). The pandas reference writes the same layout, which made "
                 "it faster too (pyarrow spends ~10 ms a file: on the 0.2 GB file it went from 34.8 s with day "
                 "files to 16.2 s, back to back).")
    lines.append("- Where ours spends its time on wide.csv (session 7, this AMD host, phase timers; wall s): stage A "
                 "(parse, clean, stage to Arrow IPC; SHA-256 and the line check on threads alongside) ~3.6, stage B "
                 "on two processes ~2.8, the rest ~0.5 (start, reports, renames). Stage A's CPU: the CSV reader and "
                 "float parsing ~2.4 s, timestamps ~0.4, cleaning ~0.5, the partitioned IPC sink ~1.5. Stage B per "
                 "equipment, one process: 47 ms CPU, of which the three lz4 store files 23 (lz4 ~43% of a file's "
                 "write, polars' discarded dictionary attempt on every float column ~18%), alignment 7, observations "
                 "4, reading the staged rows 3, stuck runs 3, duplicates 2.")
    lines.append("- Changes in session 7 (each measured interleaved against the session's first revision; identical "
                 "store files and reports on wide.csv and long_prefix.csv): rows staged by equipment only, not by "
                 "equipment and 32-day period (stage B reads a big equipment in period chunks as row ranges); local "
                 "time -> UTC by a table of the zone's hours looked up in polars (the Python batch conversion held the "
                 "GIL inside the streaming engine; a time outside the table stages the file again the exact way); "
                 "the report's counts read back from the staged files after the sink instead of beside it (polars "
                 "buffered the staged rows for the slower consumer: 5.6 GB on long.csv); each equipment's staged files "
                 "removed as it finishes. Together, three interleaved pairs on wide.csv: 7.74-8.10 -> 7.28-7.84 s "
                 "wall, 13.6-14.1 -> 12.1-12.8 CPU s, peak RSS with workers 1.75-1.91 -> 0.84-0.91 GB; long.csv "
                 "(5.7 GB, ours only): 225 s / 1.4 GB in session 4 -> 30-35 s / 0.9-1.0 GB here.")
    lines.append("- Long layout (session 6): stage B sorts a historian's rows by (sensor, time) -- each tag's readings "
                 "are in time order, so a stable sort on the sensor replaces the full sort -- and builds the grid "
                 "observations by a numpy merge of the sensors' sorted runs instead of a pivot.")
    lines.append("- Margin, and how much it moves: the ratio depends on the host as much as on the code. This table "
                 "(session 7, AMD EPYC, helpers paused) is four invocations of `--repeat 3` (runs 1-3, 4-6, 7-9, "
                 "10-12, 21:11-21:31 UTC; load average before / after each: 2.1 / 1.8, 1.6 / 1.8, 0.8 / 1.9, "
                 "1.9 / 1.5): medians 4.97x, 5.29x, 5.41x and 5.48x; all twelve pairs 4.93-5.91x, median 5.35x, two "
                 "below 5x (ours 6.4-8.0 s, pandas 37.6-41.7 s). Session 6 on another AMD host, the code before these "
                 "changes: twelve pairs 4.46-6.06x, median 5.04x. Earlier hosts: session 5 (Intel Xeon) 4.0x / 4.1x / "
                 "3.8x with pandas ~20% faster there than on the AMD hosts.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="size of the wide CSV (default 1.0)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "rmamba-bench-ingest",
                   help="folder for the data and the stores (reused between runs)")
    p.add_argument("--skip-pandas", action="store_true")
    p.add_argument("--skip-long-full", action="store_true", help="skip our run on the full long file")
    p.add_argument("--repeat", type=int, default=1,
                   help="repeat the wide-file runs (ours, pandas) N times in all; the ratio is their median")
    p.add_argument("--output", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--worker", choices=["ours", "pandas"], help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--meta", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--stage-b-workers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--render", nargs=2, type=float, metavar=("LOAD_BEFORE", "LOAD_AFTER"),
                   help="rewrite the section from <data>/results.json without running")
    a = p.parse_args(argv)
    if a.render:
        meta = json.loads((a.data / "meta.json").read_text())
        body = render(json.loads((a.data / "results.json").read_text()), meta, tuple(a.render))
        print(body)
        if not a.no_write:
            write_section(a.output, "ingest", body)
        return
    if a.prepare:
        make_data(a.data, a.size_gb)
        return
    if a.worker:
        _worker_main(a)
        return

    load0 = os.getloadavg()[0]
    meta_path = a.data / "meta.json"
    # the data is made in a subprocess: this process stays small, so the workers' ru_maxrss is their own
    subprocess.run([sys.executable, __file__, "--prepare", "--size-gb", str(a.size_gb), "--data", str(a.data)],
                   check=True)
    meta = json.loads(meta_path.read_text())
    work = a.data / "runs"
    runs = [("ours", "wide", meta["wide"], None), ("ours", "wide", meta["wide"], 1),
            ("pandas", "wide", meta["wide"], None),
            ("ours", "long", meta["long_prefix"], None), ("pandas", "long", meta["long_prefix"], None),
            ("ours", "long", meta["long"], None)]
    results = []
    for rep in range(a.repeat):
        for worker, layout, file, stage_b in runs:
            if (a.skip_pandas and worker == "pandas") or (a.skip_long_full and file == meta["long"]):
                continue
            if rep > 0 and (layout != "wide" or stage_b is not None):  # repeats: the target's two runs only
                continue
            load_start = os.getloadavg()[0]
            results.append({**run_worker(worker, layout, file, meta_path, work, stage_b), "repeat": rep,
                            "load_start": load_start})
    (a.data / "results.json").write_text(json.dumps(results, indent=2))
    body = render(results, meta, (load0, os.getloadavg()[0]))
    print(body)
    if not a.no_write:
        write_section(a.output, "ingest", body)
        print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
