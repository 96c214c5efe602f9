"""Path checks that validation can call on anything a user typed: a name the OS refuses is
reported as missing, never raised."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal


def probe(path: Path, kind: Literal["exists", "file", "dir"] = "exists") -> bool:
    """``path.exists()`` / ``is_file()`` / ``is_dir()``, but False for a name the OS refuses (too
    long, a NUL byte) instead of raising: validation reports such a path as missing."""
    if not isinstance(path, Path):
        return False
    try:
        return {"exists": path.exists, "file": path.is_file, "dir": path.is_dir}[kind]()
    except (OSError, ValueError):
        return False


def expand_path(value: str | os.PathLike[str]) -> Path:
    """``Path(value)`` with ``~`` expanded; a ``~user`` that does not exist stays as written
    (and is then reported as a missing file) instead of raising ``RuntimeError``."""
    path = Path(value)
    try:
        return path.expanduser()
    except RuntimeError:
        return path
