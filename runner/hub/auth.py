"""JupyterHub authenticator of the demo: users of a membership source, groups from their experiments.

Groups ``rb-*``/``instrument-*``/``admin`` are set at every login and refresh (``manage_groups``), so
membership changes need no hub restart. Only the hub process imports this module.
"""

from __future__ import annotations

from pathlib import Path
from secrets import compare_digest
from typing import Any

from jupyterhub.auth import Authenticator
from traitlets import Any as AnyTrait
from traitlets import Unicode, default

from runner.hub.access import MembershipSource, YamlMembership, groups_for
from runner.hub.launch import hub_config_dir

DEMO_PASSWORD = "nbreduce-demo"


class MembershipAuthenticator(Authenticator):
    """Demo login: the shared password, for users listed by the membership source only."""

    membership_file = Unicode("", config=True, help="YAML membership file (runner.hub.access.Membership schema)")
    demo_password = Unicode(DEMO_PASSWORD, config=True, help="Shared demo password (>= 8 characters)")
    membership = AnyTrait(help="A runner.hub.access.MembershipSource; default: YamlMembership(membership_file)")

    @default("membership")
    def _default_membership(self) -> MembershipSource:
        return YamlMembership(Path(self.membership_file or hub_config_dir() / "membership.yaml"))

    @default("manage_groups")
    def _manage_groups(self) -> bool:
        return True

    @default("refresh_pre_spawn")
    def _refresh_pre_spawn(self) -> bool:
        return True

    @default("auth_refresh_age")
    def _auth_refresh_age(self) -> int:
        return 60

    def check_allow_config(self) -> None:
        if len(self.demo_password) < 8:
            raise ValueError("MembershipAuthenticator.demo_password must have at least 8 characters")
        self.log.warning("MembershipAuthenticator: demo login with a shared password; see docs/hub.md "
                         "and hub_config/production_example.py for a real identity provider")

    def check_allowed(self, username: str, authentication: dict | None = None) -> bool:
        return self.membership.lookup(username) is not None

    def _model(self, username: str) -> dict[str, Any] | None:
        entry = self.membership.lookup(username)
        if entry is None:
            return None
        return {"name": username, "admin": entry.admin, "groups": groups_for(entry)}

    async def authenticate(self, handler, data: dict) -> dict[str, Any] | None:
        username = self.normalize_username(data.get("username", ""))
        if not compare_digest(str(data.get("password", "")).encode(), self.demo_password.encode()):
            return None
        return self._model(username)

    async def refresh_user(self, user, handler=None) -> dict[str, Any] | bool:
        """Re-read membership: groups follow the file, a removed user must log in again (and fails)."""
        return self._model(user.name) or False
