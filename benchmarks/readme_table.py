"""Write a benchmark's table into README.md between its `<!-- name:start/end -->` markers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_table(name: str, lines: list[str]) -> None:
    """Replace the lines between the markers named `name` in README.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    README.write_text(before + "\n".join([start, *lines, end]) + rest.split(end, 1)[1])
