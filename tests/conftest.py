"""Shared fixtures: a real embedded broker per test (memory storage starts in ~0.3 s), isolated homes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
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
    monkeypatch.delenv("NBREDUCE_BROKER__BOOTSTRAP_SERVERS", raising=False)
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
def build_environment(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Settings]:
    """Build a processing environment of the repository (once a session) into one shared home.

    Returns the Settings of that home: its ``jupyter/kernels`` hold every environment built so far, so a
    runner started on it (``NBREDUCE_HOME``) runs templates in their own environments' kernels.
    """
    from runner.kernels import environments

    home = tmp_path_factory.getbasetemp() / "nbreduce-environments-home"
    settings = Settings.from_env({"NBREDUCE_HOME": str(home)})
    done: set[str] = set()

    def build(name: str) -> Settings:
        if name not in done:
            [result] = environments.build(settings, [name], root=REPO / "environments")
            assert result.status in ("built", "unchanged"), result.message
            done.add(name)
        return settings

    return build


@pytest.fixture(scope="session")
def built(build_environment: Callable[[str], Settings]) -> Settings:
    """The shared home with the ``minimal`` environment built from the repository's spec."""
    return build_environment("minimal")


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
