"""The ingest report: counts per file, per source and in total, as JSON and as a printed table.

Invariant (checked by `IngestReport.check` and the tests): rows_in == kept + deduplicated + quarantined,
per file, per source and in total. Blank lines are not rows; nulled values stay in kept rows.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


@dataclass
class FileReport:
    path: str
    status: str  # new | appended | changed | unchanged | touched
    rows_in: int = 0
    kept: int = 0
    deduplicated: int = 0
    quarantined: int = 0
    blank_lines: int = 0
    unknown_columns: list[str] = field(default_factory=list)
    missing_sensors: list[str] = field(default_factory=list)
    not_numeric_first_line: dict[str, int] = field(default_factory=dict)


@dataclass
class SourceReport:
    source: str
    pattern: str = ""  # the source's file glob
    files_seen: int = 0
    files_read: int = 0
    rows_in: int = 0
    kept: int = 0
    deduplicated: int = 0
    deduplicated_by_reason: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    nulled: int = 0
    nulled_by_reason: dict[str, int] = field(default_factory=dict)
    nulled_by_sensor: dict[str, dict[str, int]] = field(default_factory=dict)
    empty_values: int = 0
    dst_ambiguous_resolved: int = 0
    gaps: int = 0
    gap_steps: int = 0
    gap_list: list[dict[str, Any]] = field(default_factory=list)
    stuck: int = 0
    stuck_list: list[dict[str, Any]] = field(default_factory=list)
    unknown_sensors: list[str] = field(default_factory=list)
    unknown_columns: list[str] = field(default_factory=list)
    unobserved_sensors: dict[str, list[str]] = field(default_factory=dict)  # equipment -> sensors
    equipment: list[str] = field(default_factory=list)
    grid_rows_written: int = 0
    partitions_written: int = 0
    quarantine_file: str | None = None
    files: list[FileReport] = field(default_factory=list)

    def add_nulled(self, by_sensor: dict[str, dict[str, int]]) -> None:
        for sensor, reasons in by_sensor.items():
            _add(self.nulled_by_sensor.setdefault(sensor, {}), reasons)
            _add(self.nulled_by_reason, reasons)
            self.nulled += sum(reasons.values())

    def check(self) -> None:
        """Raise AssertionError when a row went unaccounted for."""
        assert self.rows_in == self.kept + self.deduplicated + self.quarantined, (
            f"source {self.source}: rows_in {self.rows_in} != kept {self.kept} + deduplicated "
            f"{self.deduplicated} + quarantined {self.quarantined}")
        assert self.quarantined == sum(self.quarantined_by_reason.values())
        assert self.deduplicated == sum(self.deduplicated_by_reason.values())
        for f in self.files:
            assert f.rows_in == f.kept + f.deduplicated + f.quarantined, f"{f.path}: rows do not add up"


@dataclass
class IngestReport:
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: str = ""
    finished_at: str = ""
    sources: list[SourceReport] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        keys = ("files_seen", "files_read", "rows_in", "kept", "deduplicated", "quarantined", "nulled", "gaps",
                "stuck")
        return {k: sum(getattr(s, k) for s in self.sources) for k in keys}

    def check(self) -> None:
        for s in self.sources:
            s.check()
        t = self.totals
        assert t["rows_in"] == t["kept"] + t["deduplicated"] + t["quarantined"]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started_at": self.started_at, "finished_at": self.finished_at,
                "totals": self.totals, "sources": [asdict(s) for s in self.sources]}


def write_report(report: IngestReport, path: Path) -> Path:
    """Write the report as JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_table(report: IngestReport) -> str:
    """A plain-text table of the report for the terminal."""
    head = ("source", "files", "rows in", "kept", "dedup", "quarantined", "nulled", "gaps", "stuck")
    rows = [(s.source, f"{s.files_read}/{s.files_seen}", s.rows_in, s.kept, s.deduplicated, s.quarantined,
             s.nulled, s.gaps, s.stuck) for s in report.sources]
    t = report.totals
    rows.append(("TOTAL", f"{t['files_read']}/{t['files_seen']}", t["rows_in"], t["kept"], t["deduplicated"],
                 t["quarantined"], t["nulled"], t["gaps"], t["stuck"]))
    cells = [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]

    def line(values: list[str] | tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in cells[:-1]] + [line(["-" * w for w in widths]), line(cells[-1])]
    for s in report.sources:
        details = []
        for title, counts in (("quarantined", s.quarantined_by_reason), ("deduplicated", s.deduplicated_by_reason),
                              ("nulled", s.nulled_by_reason)):
            if counts:
                details.append(f"  {title}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
        if s.unknown_sensors or s.unknown_columns:
            details.append("  unknown (ignored): " + ", ".join(s.unknown_sensors + s.unknown_columns))
        if not s.files_seen:
            details.append(f"  no files match {s.pattern}")
        if s.quarantine_file:
            details.append(f"  quarantine: {s.quarantine_file}")
        if details:
            out.append(f"{s.source}:")
            out += details
    return "\n".join(out)
