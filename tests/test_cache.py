"""`ads cache`: what the cache holds (kind, dataset, size, last use) and removing chosen entries."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from analytic_diffusion.cache import cache_entries, select_entries
from analytic_diffusion.cli import main
from analytic_diffusion.data.store import StoreRequest, load_or_build_store
from analytic_diffusion.denoisers.wiener import Wiener

DAY = 86400


def _fill(root, tmp_path):
    """Two datasets' stores, the statistics of one, and a file of a kind the listing does not know yet."""
    stores = {}
    for name, count in (("a", 30), ("b", 12)):
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(0).integers(0, 256, (count, 4, 4), dtype=np.uint8))
        stores[name], _ = load_or_build_store(StoreRequest("array", path=str(tmp_path / f"{name}.npy")),
                                              root / "datasets", root / "cache")
    wiener = Wiener()
    wiener.cache_dir = root / "cache"
    wiener.fit(stores["a"])
    (root / "cache" / "indexes").mkdir()
    (root / "cache" / "indexes" / "array-0123456789abcdef-ivf.faiss").write_bytes(b"x" * 10)
    return stores


def test_cache_lists_every_entry_with_its_kind_dataset_size_and_last_use(fresh_root, tmp_path, capsys):
    stores = _fill(fresh_root, tmp_path)
    entries = cache_entries(fresh_root / "cache")
    assert sorted((e.kind, e.dataset) for e in entries) == [
        ("index", "array"), ("statistics", "array"), ("store", "array"), ("store", "array")]
    store_a = next(e for e in entries if e.path.name == f"array-{stores['a'].fingerprint}")
    assert store_a.bytes == (fresh_root / "cache" / "stores" / store_a.path.name / "images.npy").stat().st_size \
        + (store_a.path / "meta.json").stat().st_size
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "statistics" in out and "today" in out and out.strip().splitlines()[-1].startswith("4 entries, ")

    # using an entry refreshes its last use: an old store read again is recent again
    os.utime(store_a.path, (time.time() - 40 * DAY,) * 2)
    load_or_build_store(StoreRequest("array", path=str(tmp_path / "a.npy")), fresh_root / "datasets", fresh_root / "cache")
    assert store_a.path.stat().st_mtime > time.time() - 60


def test_cache_clear_removes_old_entries_or_one_datasets(fresh_root, tmp_path, capsys):
    _fill(fresh_root, tmp_path)
    entries = cache_entries(fresh_root / "cache")
    old = [e for e in entries if e.kind != "store"]
    for entry in old:
        os.utime(entry.path, (time.time() - 40 * DAY,) * 2)
    assert main(["cache", "clear", "--older-than", "30d"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert sorted(e.kind for e in cache_entries(fresh_root / "cache")) == ["store", "store"]
    assert main(["cache", "clear", "--dataset", "mnist5k"]) == 0
    assert "nothing to remove" in capsys.readouterr().out and len(cache_entries(fresh_root / "cache")) == 2
    assert main(["cache", "clear", "--dataset", "array"]) == 0
    assert cache_entries(fresh_root / "cache") == []


@pytest.mark.parametrize(("args", "message"), [
    (["cache", "clear"], "say what to remove"),
    (["cache", "clear", "--older-than", "30 days"], "--older-than takes a number and a unit"),
])
def test_cache_clear_needs_a_valid_choice(fresh_root, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_select_entries_by_age_and_dataset(fresh_root, tmp_path):
    _fill(fresh_root, tmp_path)
    entries = cache_entries(fresh_root / "cache")
    now = time.time()
    assert select_entries(entries, "1h", now=now) == []
    assert len(select_entries(entries, "1h", now=now + 2 * 3600)) == 4
    assert select_entries(entries, dataset="b") == []  # names are of the dataset (array), not the file


def test_cache_never_lists_or_removes_files_the_studio_did_not_write(tmp_path, capsys):
    """A paths.cache that points at a folder of the user's files (a typo, ~) shows no entries and clear --all
    deletes nothing; inside a real cache, a stray file without a fingerprint is left alone too."""
    user = tmp_path / "home"
    for relative in ("Documents/thesis.tex", "photos/a.jpg", "stores/notes.txt", "statistics/readme-v1.pt"):
        (user / relative).parent.mkdir(parents=True, exist_ok=True)
        (user / relative).write_text("mine")
        os.utime(user / relative, (time.time() - 400 * DAY,) * 2)
    assert cache_entries(user) == []
    assert main(["cache", "clear", "--all", f"paths.cache={user}"]) == 0
    assert main(["cache", "clear", "--older-than", "30d", f"paths.cache={user}"]) == 0
    assert all((user / r).is_file() for r in ("Documents/thesis.tex", "photos/a.jpg", "stores/notes.txt",
                                               "statistics/readme-v1.pt"))
