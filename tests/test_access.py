"""Membership -> hub groups -> access decisions, the demo authenticator and the spawn hook (unit level)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError
from test_portal_support import MEMBERSHIP

from runner.hub.access import (
    ACCESS_ENV,
    Access,
    Membership,
    StaticMembership,
    UserMembership,
    YamlMembership,
    groups_for,
)
from runner.hub.auth import MembershipAuthenticator
from runner.hub.launch import hub_config_dir
from runner.hub.spawn import pre_spawn_hook


def test_groups_round_trip_to_access() -> None:
    entry = UserMembership(rbs=["1920001", "1920002"], instruments=["MARI"], admin=False)
    groups = groups_for(entry)
    assert groups == ["rb-1920001", "rb-1920002", "instrument-MARI"]
    access = Access.from_groups([*groups, "unrelated"])
    assert access.can_see("MARI", "1111111") and access.can_see("WISH", "1920002")
    assert not access.can_see("WISH", "1111111") and not access.can_see(None, None)
    assert access.manages("MARI") and not access.manages("WISH")
    admin = Access.from_groups(["admin"])
    assert admin.can_see(None, None) and admin.manages("ANY")
    assert Access.from_env(access.to_env()) == access
    assert Access.from_env("not json") == Access() and not Access().anything


def test_membership_file_is_validated() -> None:
    with pytest.raises(ValidationError):
        Membership.model_validate({"users": {"alice": {"rbs": ["../../etc"]}}})
    with pytest.raises(ValidationError):
        Membership.model_validate({"users": {"alice": {"rb": ["1"]}}})  # typo: unknown key
    with pytest.raises(ValidationError):
        Membership.model_validate({"users": {"../root": {}}})


def test_demo_membership_file_parses() -> None:
    table = YamlMembership(hub_config_dir() / "membership.yaml").table()
    assert {"alice", "bob", "carol", "dave"} <= set(table.users) and table.users["dave"].admin


def test_yaml_membership_follows_edits(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"users": {"alice": {"rbs": ["1"]}}}))
    source = YamlMembership(path)
    assert source.groups("Alice") == ["rb-1"] and source.groups("bob") is None
    path.write_text(yaml.safe_dump({"users": {"alice": {"rbs": ["1", "2"]}, "bob": {}}}))
    assert source.groups("alice") == ["rb-1", "rb-2"] and source.groups("bob") == []


def test_authenticator_checks_password_and_membership() -> None:
    auth = MembershipAuthenticator(membership=StaticMembership(MEMBERSHIP), demo_password="correct-horse")
    login = lambda user, password: asyncio.run(auth.authenticate(None, {"username": user, "password": password}))  # noqa: E731
    assert login("alice", "correct-horse") == {"name": "alice", "admin": False, "groups": ["rb-1920001"]}
    assert login("dave", "correct-horse")["admin"] is True
    assert login("alice", "wrong") is None and login("mallory", "correct-horse") is None
    assert auth.check_allowed("carol") and not auth.check_allowed("mallory")
    assert auth.manage_groups
    refreshed = asyncio.run(auth.refresh_user(SimpleNamespace(name="carol")))
    assert refreshed["groups"] == ["instrument-MARI"]
    assert asyncio.run(auth.refresh_user(SimpleNamespace(name="mallory"))) is False  # removed: log in again
    with pytest.raises(ValueError):
        MembershipAuthenticator(membership=StaticMembership(MEMBERSHIP), demo_password="short").check_allow_config()


def test_pre_spawn_hook_hands_access_to_the_server(settings, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBREDUCE_HUB__SYSTEM_USERS", "false")  # accounts: tests/test_isolation.py, test_hub.py
    user = SimpleNamespace(name="alice", admin=False,
                           groups=[SimpleNamespace(name="rb-1920001"), SimpleNamespace(name="instrument-WISH")])
    spawner = SimpleNamespace(user=user, environment={"KEEP": "1"}, home_dir=str(tmp_path / "users" / "alice"))
    pre_spawn_hook(spawner)
    env = spawner.environment
    assert json.loads(env[ACCESS_ENV]) == {"rbs": ["1920001"], "instruments": ["WISH"], "admin": False}
    assert env["KEEP"] == "1" and env["NBREDUCE_ARCHIVE"] == str(settings.archive)
    assert env["JUPYTER_PATH"].split(":")[0] == str(settings.jupyter_dir)
    home = Path(spawner.home_dir)
    assert (home / "work").is_dir() and (home / "reductions" / "WISH").resolve() == settings.archive / "WISH"
    assert (home / "reductions" / "MARI" / "RB1920001").is_symlink()  # an experiment on another instrument
