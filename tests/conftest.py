"""Shared fixtures: every test runs against the repository's configs and a private studio root."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_studio(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Configs from this checkout; datasets, caches and runs under one temporary root shared by the session."""
    monkeypatch.setenv("ADS_CONFIGS", str(REPO / "configs"))
    monkeypatch.setenv("ADS_ROOT", str(tmp_path_factory.getbasetemp() / "studio"))


@pytest.fixture
def fresh_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A studio root of the test's own, for tests that count cache builds."""
    monkeypatch.setenv("ADS_ROOT", str(tmp_path / "studio"))
    return tmp_path / "studio"
