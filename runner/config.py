"""Settings of one nbreduce installation: one tree, read from ``NBREDUCE_*`` environment variables.

This is the only module that reads nbreduce's configuration from the environment; every other module
receives a :class:`Settings` (or a section of it). Paths sit at the top (``NBREDUCE_HOME``,
``NBREDUCE_ARCHIVE`` ...); everything else is grouped in sections whose variables use ``__``:
``NBREDUCE_RUNNER__MAX_PARALLEL=4``, ``NBREDUCE_BROKER__BOOTSTRAP_SERVERS=redpanda:9092``. Every command
started with the same ``NBREDUCE_HOME`` finds the embedded broker and the archive without further
configuration: all local state lives under that folder. ``nbreduce config`` prints the effective tree;
docs/operations.md lists every setting, generated from these models (:func:`reference`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_NOTEBOOKS = PACKAGE_DIR.parent / "notebooks"
BUNDLED_NOTEBOOKS = PACKAGE_DIR / "_bundled" / "notebooks"
SOURCE_ENVIRONMENTS = PACKAGE_DIR.parent / "environments"
BUNDLED_ENVIRONMENTS = PACKAGE_DIR / "_bundled" / "environments"
ENV_PREFIX = "NBREDUCE_"


def _packaged(source: Path, bundled: Path) -> Path:
    """A source checkout's folder wins; an installed wheel carries its own copy."""
    return source if source.is_dir() else bundled


def _split_paths(value: Any) -> Any:
    """``a:b`` (os.pathsep-separated, as PATH) or a list."""
    if isinstance(value, str):
        return [part for part in value.split(os.pathsep) if part.strip()]
    return value


def _split_names(value: Any) -> Any:
    """``a,b`` (comma-separated) or a list; blank means none given."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
        return names or None
    return value


PathList = Annotated[list[Path], NoDecode]
NameList = Annotated[list[str] | None, NoDecode]


class BrokerSettings(BaseModel):
    """The Kafka-API broker (Redpanda in production; the embedded Tansu broker by default)."""

    #: ``host:port,...`` of the broker; unset: the embedded broker of this home (``nbreduce broker start``).
    bootstrap_servers: str | None = None
    #: librdkafka properties for every client, e.g. TLS/SASL: ``NBREDUCE_BROKER__KAFKA__SECURITY_PROTOCOL=SASL_SSL``
    #: (underscores in the property name become dots: ``security.protocol``).
    kafka: dict[str, str] = Field(default_factory=dict)
    #: Replication factor of the topics nbreduce creates (3 on a production cluster).
    replication_factor: int = Field(1, ge=1)
    #: Preferred port of the embedded broker (kept across restarts when free).
    port: int | None = Field(None, ge=1, le=65535)
    #: How long a command-line client waits for the broker before it gives up with one clear line.
    timeout_seconds: float = Field(5.0, gt=0)
    #: Longest wait of a consumer's fetch for new data (ms); unset: 10 on the embedded broker with memory
    #: storage, 100 otherwise (Tansu on S3 answers shorter waits with no data; Redpanda answers at once anyway).
    fetch_wait_ms: int | None = Field(None, ge=1, le=500)
    #: Idempotent producers (the broker drops a record a retry wrote twice); unset: on, except with the embedded
    #: broker. Tansu hands one producer id to every producer that asks at the same moment (measured: 3 producers
    #: started together all got id 1, on memory and S3 storage), and producers sharing an id fence each other and
    #: lose records; so set ``false`` wherever the broker is Tansu. Without it, one request is in flight per
    #: connection (order kept on retry) and a retried record may be written twice: readers are idempotent (records
    #: are keyed by message or job id and folded, a job's id comes from its message, so a duplicate changes nothing).
    idempotence: bool | None = None

    @field_validator("kafka", mode="before")
    @classmethod
    def _property_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, Mapping):
            return {str(k).lower().replace("_", "."): str(v) for k, v in value.items()}
        return value


class RetentionSettings(BaseModel):
    """How long state is kept: topics (docs/operations.md gives the reasons) and archived versions."""

    #: Retention in days per topic, by short name (``reduction_status`` for ``nbreduce.reduction-status``);
    #: -1 keeps forever. Unset topics keep their documented default.
    topic_days: dict[str, int] = Field(default_factory=dict)
    #: ``nbreduce prune`` never removes versions younger than this; default: the status topic's retention,
    #: so the portal never links to a removed version.
    archive_min_age_days: int | None = Field(None, ge=0)


class RunnerSettings(BaseModel):
    """A runner: one member of a consumer group that executes templates."""

    #: Consumer group; runners of other environments use a group of their own.
    group: str = "nbreduce-runners"
    #: Reductions run at once by one runner.
    max_parallel: int = Field(2, ge=1)
    #: Longest wait for a run's data file to appear and be readable.
    file_wait_seconds: float = Field(120.0, ge=0)
    #: Processing environments this runner serves (comma-separated; unset: all).
    environments: NameList = None
    #: Seconds between two health heartbeats (``nbreduce runners``).
    heartbeat_seconds: float = Field(5.0, gt=0)

    _split = field_validator("environments", mode="before")(_split_names)


class KernelSettings(BaseModel):
    """Kernels that run the templates."""

    #: Warm kernels per kernel name, e.g. ``nbreduce-diffraction=2,python3=1``; ``auto``: every enabled
    #: template's kernel, as many as run in parallel; ``0``: always cold-start.
    warm: str = "auto"
    #: Start kernels of uv environments by forking a per-environment server that did the preload once.
    fork_servers: bool = True
    #: Longest wait for a kernel to start and answer.
    start_timeout_seconds: float = Field(60.0, gt=0)
    #: Conda front end for conda environments (default: the first of micromamba, mamba, conda on PATH).
    conda: str | None = None
    #: Interpreter that uv environments are built on (default: the version environment.toml asks for). Kernels of
    #: unprivileged accounts need one every account may run, e.g. ``/usr/bin/python3`` (a venv's interpreter is
    #: its base interpreter: one under /root cannot run as another user).
    python: str | None = None


class TriggerSettings(BaseModel):
    """Triggers: what turns a facility's signals into run completions."""

    #: Seconds between two polls of ``lastrun.txt``.
    lastrun_interval_seconds: float = Field(10.0, gt=0)
    #: Larger gaps since the last run seen are reported, not published.
    max_backfill: int = Field(1000, ge=1)
    #: Seconds between two health heartbeats of a trigger.
    heartbeat_seconds: float = Field(30.0, gt=0)
    #: Topic of the legacy ``data_ready`` messages.
    legacy_topic: str = "data_ready"
    #: Run-control topics (comma-separated); unset: ``<INST>_runInfo`` of every instrument with a template.
    runinfo_topics: NameList = None

    _split = field_validator("runinfo_topics", mode="before")(_split_names)


class HubSettings(BaseModel):
    """JupyterHub of the embedded platform (``nbreduce hub``, ``nbreduce demo``)."""

    #: Public address of the hub (the proxy's).
    ip: str = "127.0.0.1"
    #: Public port (the proxy's).
    port: int = Field(8000, ge=1, le=65535)
    #: Internal port of the hub's API; unset: a free one is picked at start.
    api_port: int | None = None
    #: Internal port of the proxy's API; unset: a free one is picked at start.
    proxy_api_port: int | None = None
    #: configurable-http-proxy command (JSON list); unset: the one npm installed into the checkout.
    proxy_command: list[str] | None = None
    #: Membership YAML of the demo authenticator; unset: hub_config/membership.yaml.
    membership: Path | None = None
    #: Shared password of the demo authenticator (at least 8 characters).
    demo_password: SecretStr = SecretStr("nbreduce-demo")
    #: Seconds the hub waits for a single-user server or the portal to start.
    start_timeout_seconds: float = Field(120.0, gt=0)
    #: What one user may see, handed to their single-user server by the spawner (JSON of runner.hub.access.Access).
    access: str | None = None
    #: Start each user's server as an unprivileged system account of their name (JupyterHub's LocalProcessSpawner),
    #: with the experiment groups of their membership; unset: when the hub runs as root.
    system_users: bool | None = None
    #: Interpreter of the single-user servers; unset: the hub's own, or with system users a JupyterLab
    #: environment built on ``kernels.python`` (or /usr/bin/python3) under ``<home>/lab``.
    lab_python: Path | None = None


class PortalSettings(BaseModel):
    """The reductions portal (a JupyterHub service)."""

    #: Port of the portal behind the hub's proxy; unset: a free one is picked at start.
    port: int | None = None
    #: Seconds the portal caches a user's groups (membership changes reach it within this time).
    auth_cache_seconds: int = Field(60, ge=0)


class NotifySettings(BaseModel):
    """Notifications of finished runs (``nbreduce notify``): e-mail through SMTP and webhooks."""

    #: SMTP server that delivers the e-mails.
    smtp_host: str = "localhost"
    #: Its port (25 plain, 587 with STARTTLS, 465 with TLS).
    smtp_port: int = Field(25, ge=1, le=65535)
    #: Sender address of the e-mails.
    smtp_from: str = "nbreduce@localhost"
    #: ``none``, ``starttls`` or ``tls`` (SMTP over TLS, port 465).
    smtp_security: str = Field("none", pattern="^(none|starttls|tls)$")
    #: SMTP login (unset: no authentication).
    smtp_user: str | None = None
    #: SMTP password of ``smtp_user``.
    smtp_password: SecretStr | None = None
    #: Seconds one SMTP conversation or one webhook request may take.
    timeout_seconds: float = Field(10.0, gt=0)
    #: Further attempts of a webhook after a failure (connection error or HTTP 429/5xx), with backoff.
    webhook_retries: int = Field(3, ge=0)
    #: First pause between webhook attempts, doubled for each further one.
    webhook_backoff_seconds: float = Field(1.0, ge=0)
    #: Hosts webhooks may be sent to (comma-separated; a leading dot allows subdomains); unset: any.
    webhook_hosts: NameList = None
    #: Public address of the portal, for the links in notifications; unset: from the hub's ip and port.
    portal_url: str | None = None
    #: Notifications sent at once (each waits for its SMTP server or webhook).
    max_parallel: int = Field(4, ge=1)

    _split = field_validator("webhook_hosts", mode="before")(_split_names)


class Settings(BaseSettings):
    """Resolved configuration: ``Settings()`` reads the environment, :meth:`from_env` a given mapping."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore",
                                      case_sensitive=False, validate_default=True)

    #: Where all local state lives (broker, archive, environment builds, hub).
    home: Path = Path("~/.nbreduce")
    #: The archive of executed notebooks and outputs (default ``<home>/archive``).
    archive: Path | None = None
    #: Who may read the archive, enforced by the operating system: ``open`` (the umask; mounts decide, as with
    #: KubeSpawner) or ``experiment-groups`` (one Unix group per experiment and instrument, ACLs; needs root),
    #: or ``module:Class`` (runner.archive.permissions).
    archive_permissions: str = "open"
    #: Folders run data may be read from (``os.pathsep``-separated; default ``<home>/data``).
    data_roots: PathList = Field(default_factory=list)
    #: Instrument templates (default: the checkout's ``notebooks/``).
    notebooks: Path = Field(default_factory=lambda: _packaged(SOURCE_NOTEBOOKS, BUNDLED_NOTEBOOKS))
    #: Processing environment specs (default: the checkout's ``environments/``).
    environments: Path = Field(default_factory=lambda: _packaged(SOURCE_ENVIRONMENTS, BUNDLED_ENVIRONMENTS))
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    kernels: KernelSettings = Field(default_factory=KernelSettings)
    triggers: TriggerSettings = Field(default_factory=TriggerSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    portal: PortalSettings = Field(default_factory=PortalSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    _split = field_validator("data_roots", mode="before")(_split_paths)

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        """Absolute paths, and the defaults that live under ``home``."""
        self.home = self.home.expanduser().resolve()
        self.archive = (self.archive or self.home / "archive").expanduser().resolve()
        self.data_roots = [p.expanduser().resolve() for p in self.data_roots] or [self.home / "data"]
        self.notebooks = self.notebooks.expanduser().resolve()
        self.environments = self.environments.expanduser().resolve()
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = _ENVIRON.get()
        if given is not None:  # from_env(mapping): that mapping instead of the process environment
            env_settings = _MappingSource(settings_cls, given)
        return init_settings, env_settings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default: the process environment), e.g. for a component started with its own."""
        if env is None:
            return cls()
        with _environ(env):
            return cls()

    # -- places under home --------------------------------------------------------------------------
    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def broker_state_file(self) -> Path:
        return self.broker_dir / "broker.json"

    @property
    def jupyter_dir(self) -> Path:
        """The project's own Jupyter data dir (kernelspecs of built environments live in ``kernels/``)."""
        return self.home / "jupyter"

    @property
    def envs_dir(self) -> Path:
        """Built processing environments, one folder per environment name and lock hash."""
        return self.home / "envs"

    @property
    def run_dir(self) -> Path:
        """Runtime files of this home's processes (kernel connection files, sockets)."""
        return self.home / "run"

    def idempotent_producers(self) -> bool:
        """``broker.idempotence``, or whether the broker is not the embedded one (see there)."""
        if self.broker.idempotence is not None:
            return self.broker.idempotence
        return bool(self.broker.bootstrap_servers)

    def bootstrap(self) -> str:
        """The broker to talk to: explicit setting first, else the embedded broker of this home."""
        if self.broker.bootstrap_servers:
            return self.broker.bootstrap_servers
        try:
            state = json.loads(self.broker_state_file.read_text())
            return str(state["bootstrap"])
        except (OSError, ValueError, KeyError):
            raise BrokerNotConfigured(
                f"no broker: set NBREDUCE_BROKER__BOOTSTRAP_SERVERS or run `nbreduce broker start` "
                f"(NBREDUCE_HOME={self.home})"
            ) from None

    def to_env(self) -> dict[str, str]:
        """These settings as ``NBREDUCE_*`` variables, for the processes nbreduce starts (hub, portal, servers)."""
        env: dict[str, str] = {}

        def walk(prefix: str, model: BaseModel) -> None:
            for name in type(model).model_fields:
                value = getattr(model, name)
                key = f"{prefix}{name.upper()}"
                if isinstance(value, BaseModel):
                    walk(f"{key}__", value)
                elif value is None:
                    continue
                elif isinstance(value, SecretStr):
                    env[key] = value.get_secret_value()
                elif isinstance(value, Path):
                    env[key] = str(value)
                elif isinstance(value, list) and all(isinstance(v, Path) for v in value):
                    env[key] = os.pathsep.join(str(v) for v in value)
                elif isinstance(value, list) and name in ("environments", "runinfo_topics", "webhook_hosts"):
                    env[key] = ",".join(value)
                elif isinstance(value, (dict, list)):
                    env[key] = json.dumps(value)
                elif isinstance(value, bool):
                    env[key] = "true" if value else "false"
                else:
                    env[key] = str(value)

        walk(ENV_PREFIX, self)
        return env


class BrokerNotConfigured(RuntimeError):
    """Raised when neither an explicit nor an embedded broker is known."""


# -- reading a given mapping instead of the process environment --------------------------------------
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("nbreduce_settings_environ", default=None)


@contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    token = _ENVIRON.set(env)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source, on a mapping (thread-safe: nothing global is touched)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._given = dict(environ)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._given.items()}


# -- the variables, and the reference table of docs/operations.md -----------------------------------------
def variables() -> list[tuple[str, Any, type[BaseModel]]]:
    """Every setting as ``(environment variable, pydantic field, model)``, in the tree's order.

    A dict-valued setting (``NBREDUCE_BROKER__KAFKA``) also takes one variable per key, its name
    followed by ``__KEY``.
    """
    found: list[tuple[str, Any, type[BaseModel]]] = []

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(f"{prefix}{name.upper()}__", annotation)
            else:
                found.append((f"{prefix}{name.upper()}", field, model))

    walk(ENV_PREFIX, Settings)
    return found


def reference() -> str:
    """Markdown table of every setting: variable, default and description, from the models' own comments."""
    import inspect

    def comments(model: type[BaseModel]) -> dict[str, str]:
        """The ``#:`` comment above each field (the attribute docstrings of this module)."""
        found: dict[str, str] = {}
        pending: list[str] = []
        for line in inspect.getsource(model).splitlines():
            text = line.strip()
            if text.startswith("#:"):
                pending.append(text[2:].strip())
            elif ":" in text and not text.startswith(("#", '"', "@", "def ", "class ", "_")) and pending:
                found[text.split(":", 1)[0].strip()] = " ".join(pending)
                pending = []
            else:
                pending = []
        return found

    def default(field: Any) -> str:
        value = field.default_factory() if field.default_factory is not None else field.default
        if isinstance(value, SecretStr):
            return "(set)"
        if isinstance(value, Path) and value.is_relative_to(PACKAGE_DIR.parent):
            return f"the checkout's `{value.relative_to(PACKAGE_DIR.parent)}/`"
        return "—" if value in (None, [], {}) else f"`{value}`"

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    notes: dict[type[BaseModel], dict[str, str]] = {}
    for variable, field, model in variables():
        name = variable.rsplit("__", 1)[-1].removeprefix(ENV_PREFIX).lower()
        meaning = notes.setdefault(model, comments(model)).get(name, "")
        rows.append(f"| `{variable}` | {default(field)} | {meaning} |")
    return "\n".join(rows)
