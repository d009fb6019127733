"""Input files named by the user: files and directories, expanded by suffix.

The training stages (data), vocab (its corpus) and pipelines/validate (the same expansion, to
name a bad path before a flow starts) share it, so it depends on nothing of theirs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


def data_files(paths: Iterable[str | Path], suffixes: tuple[str, ...], field: str) -> list[Path]:
    """Expand files and directories (sorted, recursive) into data files; clear error when none."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise FileNotFoundError(f"{field}: directory {p} has no {'/'.join(suffixes)} files")
            out += found
        elif p.is_file():
            if p.suffix not in suffixes:
                raise ValueError(f"{field}: {p} has suffix {p.suffix!r}; supported: {suffixes}")
            out.append(p)
        else:
            raise FileNotFoundError(f"{field}: {p} does not exist")
    if not out:
        raise ValueError(f"{field} is empty: give at least one data file or directory")
    return out
