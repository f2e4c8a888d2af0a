"""What the cache holds and when it was last used: dataset stores, statistics and any other cached entries.

Layout: `<paths.cache>/<kind folder>/<dataset>-<fingerprint>[...]`, one file or folder per entry (stores/,
statistics/, indexes/). Nothing else is listed or removed: a `paths.cache` that points at a folder of other files
(a typo, `~`) shows no entries, and `ads cache clear` never deletes what the studio did not write. Every reader calls `touch` on the entry it uses, so
an entry's modification time is its last use and `ads cache clear --older-than 30d` removes what no run needed
for 30 days.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import StudioError

KINDS = {"stores": "store", "statistics": "statistics", "indexes": "index"}  # folder -> kind
AGE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FINGERPRINT = re.compile(r"^[0-9a-f]{8,}$")  # entries are named <dataset>-<fingerprint>[-...]


def touch(path: Path) -> None:
    """Record that the cache entry at `path` was just used (its modification time); a read-only cache is fine."""
    try:
        os.utime(path)
    except OSError:
        pass


@dataclass(frozen=True)
class CacheEntry:
    """One cached file or folder."""

    kind: str  # store, statistics, index, ...
    dataset: str  # the dataset name the entry was computed from
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch


def _dataset_of(name: str) -> str | None:
    """The name before the fingerprint: `mnist5k-1d201a0f7e` -> mnist5k, `cifar10-abc123def4-v1.pt` -> cifar10;
    None for a name the studio does not write (no fingerprint)."""
    parts = name.split(".")[0].split("-")
    for i, part in enumerate(parts[1:], start=1):
        if _FINGERPRINT.match(part):
            return "-".join(parts[:i])
    return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_entries(cache_root: Path) -> list[CacheEntry]:
    """Every entry the studio wrote under `cache_root` (`<kind folder>/<dataset>-<fingerprint>...` of KINDS), most
    recently used first; hidden names (builds in progress) and anything else are left out."""
    entries = []
    folders = [Path(cache_root) / name for name in sorted(KINDS)]
    for folder in (f for f in folders if f.is_dir()):
        for path in sorted(folder.iterdir()):
            dataset = _dataset_of(path.name)
            if path.name.startswith(".") or dataset is None:
                continue
            try:
                entries.append(CacheEntry(KINDS[folder.name], dataset, path, _size(path), path.stat().st_mtime))
            except FileNotFoundError:  # removed meanwhile by another process
                continue
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def parse_age(text: str) -> float:
    """'30d' -> seconds; units m(inutes), h(ours), d(ays), w(eeks)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text)
    if not match:
        raise StudioError(f"--older-than takes a number and a unit m, h, d or w (e.g. 30d, 12h), not '{text}'")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


def select_entries(entries: list[CacheEntry], older_than: str | None = None, dataset: str | None = None,
                   now: float | None = None) -> list[CacheEntry]:
    """The entries last used more than `older_than` ago (e.g. '30d') and computed from `dataset` (None: any)."""
    cutoff = (now if now is not None else time.time()) - parse_age(older_than) if older_than is not None else None
    return [e for e in entries
            if (cutoff is None or e.last_used < cutoff) and (dataset is None or e.dataset == dataset)]


def remove_entries(entries: list[CacheEntry]) -> int:
    """Delete the entries; returns the bytes freed. An entry already gone is skipped."""
    freed = 0
    for entry in entries:
        try:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StudioError(f"cannot remove {entry.path}: {exc.strerror}; check its permissions") from None
        freed += entry.bytes
    return freed


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def format_entries(entries: list[CacheEntry], cache_root: Path, now: float | None = None) -> str:
    """A table of the entries (kind, dataset, size, last use, name) and a total line."""
    now = now if now is not None else time.time()
    if not entries:
        return f"the cache {cache_root} is empty"
    rows = [("kind", "dataset", "size", "last used", "entry")]
    for e in entries:
        days = (now - e.last_used) / 86400
        ago = "today" if days < 1 else f"{days:.0f} days ago"
        rows.append((e.kind, e.dataset, human_bytes(e.bytes), f"{datetime.fromtimestamp(e.last_used):%Y-%m-%d %H:%M} ({ago})",
                     str(e.path.relative_to(cache_root))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"{len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))} in {cache_root}")
    return "\n".join(lines)
