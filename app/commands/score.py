"""`rmamba score`: score the ingested store with the champion model; alerts, display series and states to the
database (`app.scoring.score_plant`)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path


def parse_since(text: str) -> datetime:
    """ISO 8601 date or date-time; naive values are UTC."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected an ISO 8601 time such as 2026-03-01 or 2026-03-01T06:00:00Z, "
                         f"got {text!r}") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score the ingested store with the champion model and store alerts",
        description="Load the registered model's 'champion' version and score, for every equipment in the store, "
                    "the rows after the state saved by the last run (streaming: the model's state is carried "
                    "across runs). Alerts, the downsampled score series, expert usage per day and the new state "
                    "are committed per equipment and window; an equipment that fails is recorded in the run with "
                    "its reason and the others are still scored. Settings: the [score] table of plant.toml. "
                    "Exit code 1 when some equipment failed.")
    p.add_argument("--config", type=Path, required=True, help="plant.toml")
    p.add_argument("--since", type=str, default=None, metavar="TIME",
                   help="rescore from this time (ISO 8601, UTC when no offset) with a fresh model state warmed up "
                        "on the steps before it")
    p.add_argument("--equipment", default=None, metavar="ID", help="score only this equipment")
    p.add_argument("--name", default=None, help="registered model name (default: <plant name>-detector)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.alerts import format_alerts, list_alerts
    from app.db import upgrade_to_head
    from app.scoring import score_plant
    from pipelines.config import load_plant_config

    plant = load_plant_config(args.config)
    since = parse_since(args.since) if args.since else None
    engine = upgrade_to_head(plant.database_url)
    report = score_plant(plant, since=since, equipment=args.equipment, engine=engine, model_name=args.name,
                         progress=not args.no_progress)
    print(format_outcomes(report))
    alerts = list_alerts(engine, scoring_run_id=report.run_id)
    print(f"\nalerts written by this run: {len(alerts)}"
          + (f" ({', '.join(f'{n} {s}' for s, n in _severity_counts(alerts))})" if alerts else ""))
    if alerts:
        print(format_alerts(alerts))
    if report.failed:
        print(f"{len(report.failed)} equipment failed (see above; run {report.run_id})", file=sys.stderr)
        return 1
    return 0


def _severity_counts(alerts: list) -> list[tuple[str, int]]:
    from app.alerts import SEVERITIES

    return [(s, n) for s in reversed(SEVERITIES) if (n := sum(a.severity == s for a in alerts))]


def format_outcomes(report) -> str:  # noqa: ANN001 (app.scoring.ScoringRunReport)
    """Per-equipment table of a scoring run."""
    lines = [f"scoring run {report.run_id}: model {report.model_name} version {report.model_version}, "
             f"status {report.status}"]
    head = ("equipment", "type", "status", "start", "new rows", "reported", "alerts", "scored until / reason")
    rows = []
    for o in report.outcomes:
        last = o.error if o.status == "failed" else (o.scored_until or "")
        rows.append((o.equipment, o.equipment_type, o.status, o.start or "", str(o.rows_new), str(o.steps_reported),
                     str(o.alerts), last))
    if not rows:
        return lines[0] + "\nno equipment in the store"
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    return "\n".join(lines)
