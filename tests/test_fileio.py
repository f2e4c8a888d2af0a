"""Atomic writes leave complete files with ordinary permissions, and nothing behind when the writer fails."""

from __future__ import annotations

import stat

import pytest

from analytic_diffusion.fileio import atomic_write, atomic_write_json


def test_written_files_have_the_permissions_of_a_plain_new_file(tmp_path):
    """Not mkstemp's 0600: runs and caches must stay readable by others on a shared machine (umask allowing)."""
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert (tmp_path / "metrics.json").read_text() == '{\n  "a": 1\n}\n'


def test_a_failing_writer_leaves_neither_the_file_nor_a_temporary(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "grid.png", broken)
    assert list(tmp_path.iterdir()) == []
