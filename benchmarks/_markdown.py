"""BENCHMARKS.md is shared by every benchmark: each owns one section between its own markers.

Imported by the benchmark scripts as a sibling module (they run as `python benchmarks/<name>.py`, also on the GPU
machine where the project is not installed).
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``name``'s markers in ``path`` (append the section, or create the file)."""
    start, end = markers(name)
    body = body.strip("\n")
    if body.startswith(start):  # a body rendered with its markers
        body = body[len(start):].split(end, 1)[0].strip("\n")
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
