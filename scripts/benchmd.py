"""Markdown helper shared by the benchmark scripts."""

from pathlib import Path


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the markdown section starting at ``heading`` in ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
