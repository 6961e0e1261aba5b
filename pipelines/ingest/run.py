"""One source's ingest: plan -> stage A per file (streaming) -> stage B per equipment -> commit.

Nothing reaches the store before every file of the batch has been read and checked: outputs are written
under ``<store>/.staging/`` and renamed into place at the end (each store file atomically), so a failing
file leaves the store, the quarantine and (since the caller persists it only on success) the watermark
as they were. Re-running a batch that was committed but not recorded rewrites identical files.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.config import EquipmentType, PlantConfig, SourceConfig
from pipelines.ingest.align import EquipmentOutcome, process_equipment
from pipelines.ingest.quality import RowReason
from pipelines.ingest.readers import REJECTED, STAGED, StagedFile, fetch_lines, fetch_parquet_rows, stage_file
from pipelines.ingest.report import FileReport, SourceReport
from pipelines.ingest.state import FilePlan, SourceWatermark, file_sha256, plan_source
from pipelines.ingest.store import partition_file, write_months

QUARANTINE_SCHEMA = {"source": pl.String, "file": pl.String, "line": pl.Int64, "reason": pl.String,
                     "raw": pl.String}


@dataclass
class SourceResult:
    """A source's report and its updated watermark (for the caller to persist)."""

    report: SourceReport
    watermark: SourceWatermark


def ingest_source(cfg: PlantConfig, src: SourceConfig, watermark: SourceWatermark | None = None, *,
                  plans: list[FilePlan] | None = None, run_id: str = "run",
                  progress: Callable[[Path], None] | None = None, full: bool = False,
                  workers: int | None = None) -> SourceResult:
    """Ingest the new and changed files of one source into the store; return report and new watermark.

    ``workers``: processes for stage B (default: one per core for batches of 64 MB staged or more).
    """
    etype = cfg.equipment_types[src.equipment_type]
    wm = watermark or SourceWatermark(src.name)
    plans = plans if plans is not None else plan_source(src, wm, full=full)
    report = SourceReport(source=src.name, pattern=src.path, files_seen=len(plans))
    files = dict(wm.files)
    max_ts = dict(wm.max_ts)
    to_read = [p for p in plans if p.to_read]
    for p in plans:
        if p.status == "touched":
            files[p.state.path] = p.state
    report.files_read = len(to_read)
    if not to_read:
        report.files = [FileReport(str(p.path), p.status) for p in plans]
        return SourceResult(report, SourceWatermark(src.name, files, max_ts))

    staging = cfg.store / ".staging" / f"{run_id}-{src.name}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "out").mkdir(parents=True)
    # new files are hashed in a thread while stage A reads them (hashlib releases the GIL; polars works without it)
    hasher = ThreadPoolExecutor(1)
    hashes = {p.path: hasher.submit(file_sha256, p.path) for p in to_read if not p.state.sha256}
    # a big batch will want stage-B workers: they start (and import) while stage A reads, not after it
    pool = _start_pool(_workers(workers, sum(_size(p.path) for p in to_read)))
    try:
        staged = []
        for i, plan in enumerate(to_read):
            try:
                staged.append(stage_file(plan.path, i, src, etype, staging / "in" / f"f{i}", plan.skip_rows))
            except pl.exceptions.PolarsError as exc:  # anything the readers did not foresee: still name the file
                raise ValueError(f"{plan.path}: could not be read ({str(exc).splitlines()[0]})") from exc
            if progress:
                progress(plan.path)
        _check_batch(src, etype.sensor_names, [s for s, p in zip(staged, to_read) if p.skip_rows == 0],
                     [s.name for s in etype.sensors if s.required])

        chunks: dict[str, list[Path]] = {}  # equipment -> staged folders (one per file)
        rejected: list[Path] = []
        for info in staged:
            for eq, d in info.partitions().items():
                if eq == REJECTED:
                    rejected.append(d)
                else:
                    chunks.setdefault(eq, []).append(d)
        quarantine = [
            pl.scan_ipc([str(f) for d in rejected for f in sorted(d.glob(STAGED))]).select("_file", "_line", "_reason")
            .filter(pl.col("_reason") != "blank").collect()
        ] if rejected else []

        # stage B: per equipment, a few periods at a time in time order (each chunk's output is the next one's
        # context); equipment are independent, so big batches spread them over worker processes
        jobs = [_EquipmentJob(eq, i, _chunks(chunks[eq]), wm.max_ts.get(eq), src, etype, cfg.store,
                              staging / "out")
                for i, eq in enumerate(sorted(chunks))]
        n_workers = _workers(workers, sum(c.bytes for job in jobs for c in job.chunks), len(jobs))
        if n_workers > 1:
            pool = pool or _start_pool(n_workers)
            done = pool.map(_run_equipment, jobs)
        else:
            done = (_run_equipment(job) for job in jobs)
        outputs: dict[Path, tuple[Path, int]] = {}  # final store file -> (staged file, rows)
        per_file: list[pl.DataFrame] = []
        for job, res in zip(jobs, done):
            _drop_staged(job)  # while the workers go on: the staging's removal at the end then has little to do
            outputs.update(res.outputs)
            for outcome in res.outcomes:
                _add_outcome(report, outcome)
                quarantine.append(outcome.quarantined)
                per_file.append(outcome.per_file)
            if res.unobserved:
                report.unobserved_sensors[job.equipment] = [s for s in etype.sensor_names if s in res.unobserved]
            if res.mark is not None:
                max_ts[job.equipment] = res.mark
        report.equipment = [job.equipment for job in jobs]
        report.grid_rows_written = sum(rows for _, rows in outputs.values())

        q = _quarantine_frame(src, to_read, quarantine)
        _file_reports(report, plans, to_read, staged, per_file, q)
        report.partitions_written = len(outputs)
        q_tmp = staging / "quarantine.parquet"
        if q.height:
            q.write_parquet(q_tmp, compression="zstd")
        report.check()

        shas = {path: h.result() for path, h in hashes.items()}
        # commit: store files first, then the quarantine file (each rename is atomic)
        for final, (tmp, _) in outputs.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        if q.height:
            q_final = cfg.quarantine / f"source={src.name}" / f"{run_id}.parquet"
            q_final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(q_tmp, q_final)
            report.quarantine_file = str(q_final)
    finally:
        hasher.shutdown(cancel_futures=True)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (cfg.store / ".staging").rmdir()  # only when no other run is staging
        except OSError:
            pass

    for info, plan in zip(staged, to_read):
        sha = shas.get(plan.path, plan.state.sha256)
        files[plan.state.path] = replace(plan.state, lines=info.lines_read, sha256=sha)
    return SourceResult(report, SourceWatermark(src.name, files, max_ts))


PARALLEL_MIN_BYTES = 64 << 20  # staged data below this is processed in this process (workers cost ~1 s)
CHUNK_BYTES = 32 << 20  # stage B takes an equipment's consecutive periods together up to this much staged data


@dataclass
class _Chunk:
    """Staged rows of one equipment that stage B takes together: row ranges of staged files (file, first row,
    rows or None for all) and, when the chunk is a part of them, the periods it keeps (first, last)."""

    slices: list[tuple[str, int, int | None]]
    bytes: int
    periods: tuple[int, int] | None = None

    def read(self) -> pl.DataFrame:
        lf = pl.concat([pl.scan_ipc(f).slice(lo, n) for f, lo, n in self.slices], how="vertical")
        if self.periods is not None:
            lf = lf.filter(pl.col("_period").is_between(*self.periods))
        return lf.drop("_period").collect()


def _chunks(folders: list[Path]) -> list[_Chunk]:
    """An equipment's staged files (one folder per log file) as chunks of whole consecutive periods, each of at
    most CHUNK_BYTES unless one period alone is bigger (the memory bound of stage B), in time order. Usually one
    chunk. Otherwise each chunk reads, of every file, the rows from the first to the last of its periods: a log
    roughly in time order keeps a period's rows together, so each staged row is read about once."""
    files = [str(f) for d in folders for f in sorted(d.glob(STAGED))]
    sizes = [os.path.getsize(f) for f in files]
    if sum(sizes) <= CHUNK_BYTES:
        return [_Chunk([(f, 0, None) for f in files], sum(sizes))]
    periods = [pl.scan_ipc(f).select("_period").collect().to_series().to_numpy() for f in files]
    per_period: dict[int, float] = {}  # period -> staged bytes (rows x the file's bytes per row)
    for size, p in zip(sizes, periods):
        values, counts = np.unique(p, return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist()):
            per_period[v] = per_period.get(v, 0.0) + n * size / max(len(p), 1)
    groups: list[tuple[int, int, float]] = []  # (first period, last period, bytes)
    for v in sorted(per_period):
        if groups and groups[-1][2] + per_period[v] <= CHUNK_BYTES:
            groups[-1] = (groups[-1][0], v, groups[-1][2] + per_period[v])
        else:
            groups.append((v, v, per_period[v]))
    out = []
    for lo, hi, b in groups:
        slices = []
        for f, p in zip(files, periods):
            idx = np.flatnonzero((p >= lo) & (p <= hi))
            if idx.size:
                slices.append((f, int(idx[0]), int(idx[-1] - idx[0] + 1)))
        out.append(_Chunk(slices, int(b), (lo, hi)))
    return out


@dataclass
class _EquipmentJob:
    equipment: str
    index: int
    chunks: list[_Chunk]  # in time order
    mark: datetime | None  # the equipment's watermark
    src: SourceConfig
    etype: EquipmentType
    store: Path
    out_dir: Path


@dataclass
class _EquipmentResult:
    outputs: dict[Path, tuple[Path, int]]  # final store file -> (staged file, rows)
    outcomes: list[EquipmentOutcome]
    mark: datetime | None
    unobserved: set[str]


def _run_equipment(job: _EquipmentJob) -> _EquipmentResult:
    """Stage B for one equipment, chunk by chunk; writes its store files (one per month) under ``job.out_dir``."""
    pending: dict = {}
    outputs: dict[Path, tuple[Path, int]] = {}
    outcomes: list[EquipmentOutcome] = []
    unobserved: set[str] | None = None
    mark = job.mark
    serial = itertools.count()
    for chunk in job.chunks:
        df = chunk.read()
        try:
            outcome = process_equipment(df, job.src, job.etype, job.equipment, mark, job.store, pending)
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"source {job.src.name!r}, equipment {job.equipment!r}: "
                             f"{str(exc).splitlines()[0]}") from exc
        del df
        if outcome.result is not None and outcome.result.height:
            # flat under out_dir (folders are costly to create and remove); a later chunk may rewrite its month
            prefix = f"{job.index}-{next(serial)}"
            written = write_months(outcome.result, lambda m, p=prefix: job.out_dir / f"{p}-{m:%Y-%m}.parquet")
            for month, (tmp, rows) in written.items():
                outputs[partition_file(job.store, job.etype.name, job.equipment, month)] = (tmp, rows)
                pending[(job.equipment, month)] = tmp
        outcome.result = None
        outcomes.append(outcome)
        unobserved = set(outcome.unobserved_sensors) if unobserved is None else unobserved & set(
            outcome.unobserved_sensors)
        if outcome.max_ts is not None:
            mark = outcome.max_ts if mark is None else max(mark, outcome.max_ts)
    return _EquipmentResult(outputs, outcomes, mark, unobserved or set())


def _drop_staged(job: _EquipmentJob) -> None:
    for f in {f for chunk in job.chunks for f, _, _ in chunk.slices}:
        os.remove(f)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _workers(requested: int | None, size: int, n_jobs: int | None = None) -> int:
    """Stage-B processes for ``size`` bytes of data in ``n_jobs`` equipment jobs (None before stage A, when only
    the input files' size is known)."""
    if n_jobs is not None and n_jobs < 2:
        return 1
    if requested is None:
        if size < PARALLEL_MIN_BYTES:
            return 1
        requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested, n_jobs or requested))


def _start_pool(n_workers: int) -> ProcessPoolExecutor | None:
    """``n_workers`` fresh processes for stage B (spawned: a fork would copy polars' thread pool state), each
    with one polars thread, as the processes already share the cores; started now, each importing the stage-B
    code (~0.5 s) while the caller goes on. None for one worker. (Threads in this process were measured too:
    stage B on 1 GB took ~8.4 s on two threads, ~6.7 s in two processes, ~10 s serial.)"""
    if n_workers < 2:
        return None
    saved = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = "1"  # read by the children when they import polars
    try:
        pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(n_workers):  # each submit while none is idle starts a process (with this environment)
            pool.submit(_warm_up)
        return pool
    finally:
        if saved is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
        else:
            os.environ["POLARS_MAX_THREADS"] = saved


def _warm_up() -> None:
    """Runs first in each stage-B worker: unpickling it imports this module and with it stage B's code."""


def _check_batch(src: SourceConfig, sensors: list[str], full_files: list[StagedFile], required: list[str]) -> None:
    """Long layout: a required sensor without a single reading in the files read from the start."""
    if src.layout != "long" or not full_files or not any(f.sensors_seen for f in full_files):
        return
    seen = set().union(*(f.sensors_seen for f in full_files))
    missing = [s for s in required if s not in seen]
    if missing:
        names = ", ".join(str(f.path) for f in full_files[:5])
        raise ValueError(f"{names}: required sensor {missing[0]!r} has no readings (tags seen for sensors: "
                         f"{', '.join(sorted(seen))})")


def _add_outcome(report: SourceReport, o: EquipmentOutcome) -> None:
    report.kept += o.kept
    for k, v in o.deduplicated.items():
        report.deduplicated_by_reason[k] = report.deduplicated_by_reason.get(k, 0) + v
        report.deduplicated += v
    report.add_nulled(o.nulled)
    report.empty_values += o.empty
    report.dst_ambiguous_resolved += o.ambiguous_resolved
    report.gaps += o.gap_count
    report.gap_steps += o.gap_steps
    report.gap_list += o.gaps[: max(0, 50 - len(report.gap_list))]
    report.stuck += o.stuck_count
    report.stuck_list += o.stuck[: max(0, 50 - len(report.stuck_list))]


def _quarantine_frame(src: SourceConfig, to_read: list[FilePlan], parts: list[pl.DataFrame]) -> pl.DataFrame:
    """Every rejected row with its file, line, reason and original text."""
    parts = [p for p in parts if p is not None and p.height]
    if not parts:
        return pl.DataFrame(schema=QUARANTINE_SCHEMA)
    q = pl.concat([p.with_columns(pl.col("_reason").cast(RowReason)) for p in parts]).sort("_file", "_line")
    frames = []
    for (idx,), rows in q.partition_by("_file", as_dict=True).items():
        path = to_read[idx].path
        lines = rows["_line"].to_list()
        raw = fetch_lines(path, lines) if src.format == "csv" else fetch_parquet_rows(path, lines)
        frames.append(rows.select(
            pl.lit(src.name).alias("source"), pl.lit(str(path)).alias("file"), pl.col("_line").alias("line"),
            pl.col("_reason").cast(pl.String).alias("reason"),
            pl.col("_line").replace_strict(raw, default=None, return_dtype=pl.String).alias("raw"),
        ))
    return pl.concat(frames)


def _file_reports(report: SourceReport, plans: list[FilePlan], to_read: list[FilePlan], staged: list[StagedFile],
                  per_file: list[pl.DataFrame], q: pl.DataFrame) -> None:
    counts = {i: {"kept": 0, "deduplicated": 0} for i in range(len(to_read))}
    for pf in per_file:
        for row in pf.iter_rows(named=True):
            counts[row["_file"]]["kept"] += row["kept"]
            counts[row["_file"]]["deduplicated"] += row["deduplicated"]
    q_by_file = {str(f): n for f, n in q.group_by("file").len().iter_rows()} if q.height else {}
    for reason, n in (q.group_by("reason").len().iter_rows() if q.height else []):
        report.quarantined_by_reason[reason] = n
    report.quarantined = q.height
    read_index = {p.path: i for i, p in enumerate(to_read)}
    unknown_cols: set[str] = set()
    unknown_tags: set[str] = set()
    for plan in plans:
        i = read_index.get(plan.path)
        if i is None:
            report.files.append(FileReport(str(plan.path), plan.status))
            continue
        info = staged[i]
        fr = FileReport(str(plan.path), plan.status, rows_in=info.rows, kept=counts[i]["kept"],
                        deduplicated=counts[i]["deduplicated"], quarantined=q_by_file.get(str(plan.path), 0),
                        blank_lines=info.blank, unknown_columns=info.unknown_columns,
                        missing_sensors=info.missing_sensors, not_numeric_first_line=info.not_numeric)
        report.files.append(fr)
        report.rows_in += info.rows
        unknown_cols |= set(info.unknown_columns)
        unknown_tags |= set(info.unknown_tags)
    report.unknown_columns = sorted(unknown_cols)
    report.unknown_sensors = sorted(unknown_tags)
