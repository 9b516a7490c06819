"""The settings tree: one place reads NBREDUCE_*, sections nest with ``__``, docs list every setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from runner.config import Settings, reference, variables

REPO = Path(__file__).resolve().parent.parent


def test_sections_lists_paths_and_dicts_from_variables(tmp_path: Path) -> None:
    settings = Settings.from_env({
        "NBREDUCE_HOME": str(tmp_path), "NBREDUCE_DATA_ROOTS": f"{tmp_path}/a:{tmp_path}/b",
        "NBREDUCE_RUNNER__MAX_PARALLEL": "4", "NBREDUCE_RUNNER__ENVIRONMENTS": "diffraction, muon",
        "NBREDUCE_BROKER__KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "NBREDUCE_RETENTION__TOPIC_DAYS__REDUCTION_STATUS": "730", "UNRELATED": "x",
    })
    assert settings.home == tmp_path and settings.archive == tmp_path / "archive"
    assert settings.data_roots == [tmp_path / "a", tmp_path / "b"]
    assert settings.runner.max_parallel == 4 and settings.runner.environments == ["diffraction", "muon"]
    assert settings.broker.kafka == {"sasl.mechanism": "SCRAM-SHA-512"}
    assert settings.retention.topic_days == {"reduction_status": 730}


def test_invalid_values_are_refused_with_the_setting_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="max_parallel"):
        Settings.from_env({"NBREDUCE_HOME": str(tmp_path), "NBREDUCE_RUNNER__MAX_PARALLEL": "0"})


def test_settings_round_trip_through_the_variables_given_to_child_processes(tmp_path: Path) -> None:
    settings = Settings.from_env({"NBREDUCE_HOME": str(tmp_path), "NBREDUCE_RUNNER__ENVIRONMENTS": "sans",
                                  "NBREDUCE_HUB__DEMO_PASSWORD": "a-long-secret",
                                  "NBREDUCE_BROKER__KAFKA__SECURITY_PROTOCOL": "SSL"})
    assert Settings.from_env(settings.to_env()) == settings
    assert set(settings.to_env()) <= {name for name, _, _ in variables()}


def test_only_the_settings_module_reads_nbreduce_variables() -> None:
    readers = []
    for path in (REPO / "runner").rglob("*.py"):
        text = path.read_text()
        if path.name != "config.py" and re.search(r"(os\.environ(\.get)?|os\.getenv)\(?\[?[\"']NBREDUCE_", text):
            readers.append(str(path.relative_to(REPO)))
    assert readers == []


def test_operations_guide_lists_every_setting() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    block = re.search(r"<!-- settings-reference:.*?-->\n(.*?)\n<!-- /settings-reference -->", text, re.S)
    assert block is not None, "docs/operations.md lost its settings reference block"
    assert block.group(1).strip() == reference().strip(), "regenerate it: nbreduce config --reference"
