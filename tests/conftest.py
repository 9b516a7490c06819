"""Shared fixtures: a real embedded broker per test (memory storage starts in ~0.3 s), isolated homes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.bus.embedded import EmbeddedBroker
from runner.config import Settings

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh NBREDUCE_HOME; every nbreduce component started in this test finds its state here."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("NBREDUCE_HOME", str(path))
    monkeypatch.delenv("NBREDUCE_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("NBREDUCE_DATA_ROOTS", str(path / "data"))
    # a private copy of the templates: tests may edit them, the repository's stay untouched
    notebooks = tmp_path / "templates-copy"
    shutil.copytree(REPO / "notebooks", notebooks, ignore=shutil.ignore_patterns("sample_data", "conftest.py"))
    monkeypatch.setenv("NBREDUCE_NOTEBOOKS", str(notebooks))
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings.from_env()


@pytest.fixture
def broker(settings: Settings) -> Iterator[Settings]:
    """A real Tansu broker (memory storage) with all nbreduce topics, stopped after the test."""
    embedded = EmbeddedBroker(settings)
    embedded.start(memory=True)
    try:
        yield settings
    finally:
        embedded.stop()


@pytest.fixture
def durable_broker(settings: Settings) -> Iterator[EmbeddedBroker]:
    """A real Tansu broker on localbucket S3 storage; tests may stop and restart it."""
    embedded = EmbeddedBroker(settings)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One shared home with the ``minimal`` environment built from the repository's spec (once a session)."""
    from runner.kernels import environments

    settings = Settings.from_env({"NBREDUCE_HOME": str(tmp_path_factory.getbasetemp() / "nbreduce-minimal-home")})
    [result] = environments.build(settings, ["minimal"], root=REPO / "environments")
    assert result.status in ("built", "unchanged"), result.message
    return settings


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
