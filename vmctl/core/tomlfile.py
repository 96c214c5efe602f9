"""Reading the TOML files a user writes (a sandbox config, a fleet spec): errors that name the
file, relative paths taken from the file's directory, and the default guest filled in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmctl.core.pathprobe import expand_path
from vmctl.errors import ConfigError, Problem


def fill_defaults(table: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` with the default guest (``defaults``: its ``kernel`` and ``initrd``) when it names
    no kernel. The default initrd comes only with the default kernel (vmctl's initramfs goes with
    its kernel, an image or not)."""
    out = dict(table)
    if "kernel" in defaults and "kernel" not in out:
        out["kernel"] = str(defaults["kernel"])
        if "initrd" in defaults and "initrd" not in out:
            out["initrd"] = str(defaults["initrd"])
    return out


def read_toml_text(path: Path) -> str:
    """A TOML file's text; :class:`ConfigError` naming the file if it cannot be read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read the file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError([Problem(repr(str(path)), f"cannot read the file: {exc}")]) from None


def relative_to(device: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A device table with its relative ``path``/``socket`` taken from ``base_dir`` (the TOML file's)."""
    out = dict(device)
    for key in ("path", "socket", "host_path"):
        if isinstance(out.get(key), str) and out[key] and not expand_path(out[key]).is_absolute():
            out[key] = str(base_dir / out[key])
    return out
