"""Atomic writes: a reader sees either the old file or the complete new one, never a partial one."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StudioError


def _read_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back; done once, at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def user_path(path: str | os.PathLike, key: str) -> Path:
    """`path` with environment variables ($NAME, ${NAME}) and a leading `~` expanded, as a shell would; a variable
    that is not set is a StudioError naming the config `key` (never a folder literally named `$NAME` or `~`)."""
    text = os.path.expanduser(os.path.expandvars(os.fspath(path)))
    unset = UNSET_VARIABLE.search(text)
    if unset:
        raise StudioError(f"{key}={os.fspath(path)} uses the environment variable {unset.group(1).strip('{}')}, "
                          "which is not set; set it or write the path out")
    if text.startswith("~"):
        raise StudioError(f"{key}={os.fspath(path)}: cannot expand '{text.split('/')[0]}' (no such user); "
                          "write the path out")
    return Path(text)


def make_directory(path: Path, key: str, exist_ok: bool = True) -> None:
    """Create `path` with its parents; a file in the way or a missing permission is a one-line StudioError that
    names the config `key` to point elsewhere."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as exc:
        raise StudioError(f"cannot create {path}: {exc.strerror}; set {key} to a writable folder") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path` with the permissions
    of a plain new file (mkstemp's are 0600, which would hide runs and caches from others on a shared machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        move_into_place(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def move_into_place(source: Path, target: Path) -> None:
    """Rename a finished temporary file over `target` with the permissions of a plain new file (temporary files
    are often 0600: mkstemp's, safetensors')."""
    os.chmod(source, 0o666 & ~_UMASK)
    os.replace(source, target)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write a JSON file atomically, indented for people to read."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")

