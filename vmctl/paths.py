"""Where vmctl keeps things: a user cache for built assets, private run directories for sandboxes.

Every directory vmctl creates is mode 0700: sockets and logs inside are reachable only by the user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


def cache_dir() -> Path:
    """``$VMCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vmctl``, else ``~/.cache/vmctl``."""
    env = os.environ.get("VMCTL_CACHE_DIR")
    if env:
        return _private_dir(Path(env).expanduser())
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return _private_dir(Path(base) / "vmctl")


def runtime_dir() -> Path:
    """Parent of the sandboxes' run directories: short, so socket paths stay under 108 bytes."""
    env = os.environ.get("VMCTL_RUNTIME_DIR")
    if env:
        return _private_dir(Path(env).expanduser())
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return _private_dir(Path(xdg) / "vmctl")
    return _private_dir(Path(tempfile.gettempdir()) / f"vmctl-{os.getuid()}")


def make_run_dir() -> Path:
    """A fresh private directory for one sandbox's sockets, logs and pid file."""
    return Path(tempfile.mkdtemp(prefix="sb-", dir=runtime_dir()))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
