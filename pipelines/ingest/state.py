"""Incremental ingest state: which files a source has seen, and up to which time each equipment is stored.

The application keeps this in its database and hands it in; the pipeline returns the updated state.
A file is skipped when its size and mtime are unchanged, or when its content hash is; a CSV that only
grew (its old bytes hash to the stored hash) is read from the first new line; any other change re-reads
the whole file, and its rows at or before an equipment's watermark are checked against the store.
A file seen for the first time needs no hash to be planned: its plan leaves ``sha256`` empty and the ingest
hashes it (`file_sha256`) while it reads the file.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from pipelines.config import SourceConfig

_CHUNK = 1 << 22


@dataclass(frozen=True)
class FileState:
    """A file as last ingested: ``lines`` counts the data lines consumed after the header; ``sha256`` is empty
    only in the plan of a new file, until the ingest has hashed it."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    lines: int = 0


@dataclass
class SourceWatermark:
    """Per source: the files seen, and the newest ingested timestamp (UTC) per equipment."""

    source: str
    files: dict[str, FileState] = field(default_factory=dict)
    max_ts: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class FilePlan:
    """What to do with one file: status is new | appended | changed | unchanged | touched."""

    path: Path
    status: str
    state: FileState
    skip_rows: int = 0

    @property
    def to_read(self) -> bool:
        return self.status in ("new", "appended", "changed")


def list_files(src: SourceConfig) -> list[Path]:
    """The files matching a source's glob, sorted by name (which is their ingest order)."""
    return sorted(Path(p) for p in glob.glob(src.path, recursive=True) if os.path.isfile(p))


def _hash(path: Path, prefix: int | None = None) -> tuple[str, str | None]:
    """sha256 of the whole file and, when asked, of its first ``prefix`` bytes, in one pass."""
    whole = hashlib.sha256()
    head = None
    done = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            if prefix is not None and head is None and done + len(chunk) >= prefix:
                cut = prefix - done
                whole.update(chunk[:cut])
                head = whole.hexdigest()
                whole.update(chunk[cut:])
            else:
                whole.update(chunk)
            done += len(chunk)
    if prefix is not None and head is None and done == prefix:
        head = whole.hexdigest()
    return whole.hexdigest(), head


def file_sha256(path: Path) -> str:
    return _hash(path)[0]


def _ends_with_newline(path: Path, size: int) -> bool:
    if size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"


def plan_source(src: SourceConfig, watermark: SourceWatermark | None, full: bool = False) -> list[FilePlan]:
    """Compare the files on disk with the watermark; ``full`` re-reads everything."""
    seen = watermark.files if watermark else {}
    plans: list[FilePlan] = []
    for path in list_files(src):
        st = path.stat()
        key = str(path.resolve())
        prev = None if full else seen.get(key)
        if prev and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns:
            plans.append(FilePlan(path, "unchanged", prev))
            continue
        if prev is None:  # nothing to compare with: hashed while it is read
            plans.append(FilePlan(path, "new", FileState(key, st.st_size, st.st_mtime_ns, "")))
            continue
        grew = src.format == "csv" and st.st_size > prev.size
        sha, head = _hash(path, prev.size if grew else None)
        state = FileState(key, st.st_size, st.st_mtime_ns, sha)
        if sha == prev.sha256:
            plans.append(FilePlan(path, "touched", replace(state, lines=prev.lines)))
        elif grew and head == prev.sha256 and prev.lines > 0 and _ends_with_newline(path, prev.size):
            plans.append(FilePlan(path, "appended", state, skip_rows=prev.lines))
        else:
            plans.append(FilePlan(path, "changed", state))
    return plans
