"""Ingest: plant logs (csv | parquet, wide | long) -> a clean, gridded parquet store, a quarantine and a report.

Stages are functions over paths and frames; they never touch the application database. The caller
(app/commands/ingest.py) loads each source's watermark, calls `ingest_source`, and persists the returned
watermark and report. Modules: readers (stage A, streaming per file), quality (cleaning expressions),
align (stage B, per equipment), store (the parquet layout), state (watermarks), report, run.
"""

from pipelines.ingest.report import FileReport, IngestReport, SourceReport, format_table, write_report
from pipelines.ingest.run import QUARANTINE_SCHEMA, SourceResult, ingest_source
from pipelines.ingest.state import FilePlan, FileState, SourceWatermark, list_files, plan_source
from pipelines.ingest.store import scan_store, store_schema

__all__ = [
    "QUARANTINE_SCHEMA", "FilePlan", "FileReport", "FileState", "IngestReport", "SourceReport", "SourceResult",
    "SourceWatermark", "format_table", "ingest_source", "list_files", "plan_source", "scan_store",
    "store_schema", "write_report",
]
