"""`rmamba ingest`: read new plant logs into the store, incrementally, and report what happened.

The application side of the ingest: it owns the database (watermarks, runs) and the terminal (progress
bar, table); the work itself is `pipelines.ingest.ingest_source`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="ingest new plant logs into the parquet store",
                       description="Read the new and changed log files of each source into the store, "
                                   "quarantine bad rows and print a report. Unchanged files are skipped.")
    p.add_argument("--config", type=Path, required=True, help="plant.toml")
    p.add_argument("--source", action="append", metavar="NAME", help="only this source (repeatable)")
    p.add_argument("--full", action="store_true",
                   help="re-read every file (rows already in the store are counted as deduplicated)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run(args: argparse.Namespace) -> int:
    # imported here, as every command does, so that the CLI starts (and its other commands run, e.g. `rmamba
    # evaluate` on a GPU machine) without the database stack installed
    from tqdm import tqdm

    from app.db import upgrade_to_head
    from app.db.ingest_state import finish_run, load_watermark, save_watermark, start_run
    from pipelines.config import load_plant_config
    from pipelines.ingest import IngestReport, format_table, ingest_source, plan_source, write_report

    cfg = load_plant_config(args.config)
    sources = [cfg.source(n) for n in args.source] if args.source else list(cfg.sources)
    engine = upgrade_to_head(cfg.database_url)
    report = IngestReport(started_at=_now())
    start_run(engine, report.run_id, cfg.name, [s.name for s in sources])
    try:
        for src in sources:
            wm = load_watermark(engine, src.name)
            plans = plan_source(src, wm, full=args.full)
            todo = sum(p.to_read for p in plans)
            with tqdm(total=todo, desc=src.name, unit="file", file=sys.stderr,
                      disable=True if args.no_progress else None) as bar:
                result = ingest_source(cfg, src, wm, plans=plans, run_id=report.run_id,
                                       progress=lambda _path: bar.update(1))
            # the store is committed; only now does the watermark move (a crash in between re-reads idempotently)
            save_watermark(engine, result.watermark, report.run_id)
            report.sources.append(result.report)
        report.finished_at = _now()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = write_report(report, cfg.reports / f"ingest-{stamp}-{report.run_id}.json")
    except BaseException as exc:
        finish_run(engine, report.run_id, "failed", report.totals, error=f"{type(exc).__name__}: {exc}")
        raise
    finish_run(engine, report.run_id, "ok", report.totals, report_path=str(path))
    print(format_table(report))
    print(f"report: {path}")
    return 0
