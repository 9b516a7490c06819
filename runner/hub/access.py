"""Who may see which reductions: experiment membership mapped to JupyterHub groups.

Membership comes from a pluggable :class:`MembershipSource` (a YAML file for the demo; a facility
plugs in its user office database). The hub's authenticator turns it into groups — ``rb-<RB>`` for
experiment members, ``instrument-<INST>`` for instrument scientists, ``admin`` — and every other
component (the portal, the single-user ``reductions/`` tree) decides from those groups alone, so the
hub is the one place where membership is resolved.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from runner.bus.models import InstrumentName, RBNumber

RB_PREFIX = "rb-"
INSTRUMENT_PREFIX = "instrument-"
ADMIN_GROUP = "admin"
#: Environment variable carrying a user's :class:`Access` into their single-user server.
ACCESS_ENV = "NBREDUCE_HUB__ACCESS"

#: Hub user names: lower-case, as JupyterHub normalises them; they also become home folder names.
UserName = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]


class UserMembership(BaseModel):
    """One user's entry: experiments, instruments they are scientist for, admin flag."""

    model_config = ConfigDict(extra="forbid")

    rbs: list[RBNumber] = Field(default_factory=list)
    instruments: list[InstrumentName] = Field(default_factory=list)
    admin: bool = False
    #: Shown in the portal; purely informational.
    full_name: str = ""


class Experiment(BaseModel):
    """What the user office knows of an experiment (RB): its instrument and title."""

    model_config = ConfigDict(extra="forbid")

    instrument: InstrumentName
    title: str = ""


class Membership(BaseModel):
    """The whole membership table (the YAML file's schema)."""

    model_config = ConfigDict(extra="forbid")

    users: dict[UserName, UserMembership] = Field(default_factory=dict)
    #: Experiments by RB number (``nbreduce demo`` simulates runs of these, so every demo user has runs).
    experiments: dict[RBNumber, Experiment] = Field(default_factory=dict)


class Access(BaseModel):
    """What one user may see; built from their hub groups, checked on every request."""

    rbs: frozenset[str] = frozenset()
    instruments: frozenset[str] = frozenset()
    admin: bool = False

    @classmethod
    def from_groups(cls, groups: Iterable[str]) -> Access:
        rbs, instruments, admin = set(), set(), False
        for group in groups:
            if group == ADMIN_GROUP:
                admin = True
            elif group.startswith(RB_PREFIX):
                rbs.add(group[len(RB_PREFIX):])
            elif group.startswith(INSTRUMENT_PREFIX):
                instruments.add(group[len(INSTRUMENT_PREFIX):].upper())
        return cls(rbs=frozenset(rbs), instruments=frozenset(instruments), admin=admin)

    @classmethod
    def from_env(cls, value: str | None) -> Access:
        """The access handed to a single-user server; missing or broken means no access at all."""
        if not value:
            return cls()
        try:
            return cls.model_validate_json(value)
        except ValueError:
            return cls()

    def to_env(self) -> str:
        return json.dumps({"rbs": sorted(self.rbs), "instruments": sorted(self.instruments), "admin": self.admin})

    def can_see(self, instrument: str | None, rb_number: str | None) -> bool:
        """A run is visible to its experiment's members, its instrument's scientists and admins."""
        if self.admin:
            return True
        if instrument is not None and instrument.upper() in self.instruments:
            return True
        return rb_number is not None and rb_number in self.rbs

    def manages(self, instrument: str) -> bool:
        """Instrument scientists (and admins) set default parameters for an instrument and its RBs."""
        return self.admin or instrument.upper() in self.instruments

    @property
    def anything(self) -> bool:
        return self.admin or bool(self.rbs) or bool(self.instruments)


def groups_for(entry: UserMembership) -> list[str]:
    """JupyterHub group names of one membership entry."""
    groups = [f"{RB_PREFIX}{rb}" for rb in sorted(set(entry.rbs))]
    groups += [f"{INSTRUMENT_PREFIX}{inst}" for inst in sorted(set(entry.instruments))]
    if entry.admin:
        groups.append(ADMIN_GROUP)
    return groups


class MembershipSource(ABC):
    """Where membership comes from. Implement :meth:`lookup` to plug in a user office database."""

    @abstractmethod
    def lookup(self, username: str) -> UserMembership | None:
        """The user's membership, or None when the user is unknown (and may not log in)."""

    def groups(self, username: str) -> list[str] | None:
        entry = self.lookup(username)
        return None if entry is None else groups_for(entry)


class YamlMembership(MembershipSource):
    """The demo source: a YAML file, re-read when it changes so edits apply at the next login/refresh."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._table = Membership()

    def table(self) -> Membership:
        with self._lock:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._table = Membership.model_validate(yaml.safe_load(self.path.read_text()) or {})
                self._stamp = stamp
            return self._table

    def lookup(self, username: str) -> UserMembership | None:
        return self.table().users.get(username.strip().lower())


class StaticMembership(MembershipSource):
    """In-memory membership, for tests and for embedding nbreduce in another service."""

    def __init__(self, table: Membership | dict):
        self._table = table if isinstance(table, Membership) else Membership.model_validate(table)

    def lookup(self, username: str) -> UserMembership | None:
        return self._table.users.get(username.strip().lower())
