"""Instrument templates: ``notebooks/<INSTRUMENT>/instrument.toml`` plus the template notebook it runs.

The folder is the unit an instrument scientist owns: the TOML says whether the instrument is enabled,
which environment/kernel runs it, its time limit, its constants and default parameters. The notebook is
the instrument's own ``reduce.ipynb`` when the folder has one, else its technique family's
(``notebooks/techniques/<family>/reduce.ipynb``, named by ``family``), so adding an instrument of a known
family is a configuration file, not a new notebook. Constants (flight paths, banks, analyser energy...)
are injected like the run's identity and are never editable in a rerun.
Parameters are read with papermill's own inspection, so what the runner injects, what the rerun
form offers and what a scientist sees in the parameters cell are one and the same.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import papermill
from pydantic import BaseModel, Field, ValidationError

from runner.kernels.environments import kernel_name
from runner.templates.params import ParamSpec, specs

DEFAULT_TEMPLATE = "reduce"
#: Folder of the technique families' shared templates, under the notebooks root.
TECHNIQUES_DIR = "techniques"
TEMPLATE_NAME = f"{DEFAULT_TEMPLATE}.ipynb"
CONFIG_NAME = "instrument.toml"
_INSTRUMENT_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
_TEMPLATE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class TemplateError(LookupError):
    """The instrument has no usable template; the message is the skip reason shown to users."""


class MultiRunSpec(BaseModel):
    """A multi-run job declared in ``instrument.toml``: fires once every listed run has completed."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    #: Template notebook of the instrument that receives ``run_numbers``/``data_files`` (e.g. ``sum``).
    template: str = Field("reduce", pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    runs: list[int] = Field(default_factory=list)
    #: Inclusive ``[first, last]``; combined with ``runs``.
    range: tuple[int, int] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    def run_numbers(self) -> list[int]:
        span = list(range(self.range[0], self.range[1] + 1)) if self.range else []
        numbers = sorted(set(self.runs) | set(span))
        if not numbers or numbers[0] <= 0:
            raise ValueError(f"multi-run {self.name}: no valid runs")
        return numbers


class InstrumentConfig(BaseModel):
    """Contents of ``instrument.toml``."""

    name: str
    description: str = ""
    technique: str = ""
    #: Technique family whose shared template runs when the folder has no notebook of its own.
    family: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{0,63}$")
    enabled: bool = True
    #: Processing environment (``environments/<name>``); its kernel is ``nbreduce-<name>``.
    environment: str | None = None
    #: Explicit kernel name; wins over ``environment``.
    kernel: str | None = None
    #: Whole-run time limit in seconds (the kernel is killed when it is exceeded).
    timeout: float = Field(1800, gt=0)
    #: ISIS file naming: ``<file_prefix><run zero-padded to run_digits>.nxs``.
    file_prefix: str | None = None
    run_digits: int = Field(8, ge=1, le=12)
    #: Defaults injected on every run; they override the template's own defaults.
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: The instrument's constants, injected on every run and never overridden (rerun forms show them fixed).
    constants: dict[str, Any] = Field(default_factory=dict)
    #: Settings of the simulated instrument only (``nbreduce simulate``: first run, sample, rates...);
    #: constants of the same name as a simulation model's fields set those too.
    simulation: dict[str, Any] = Field(default_factory=dict)
    #: Multi-run jobs (sum, stitch) that fire when all their runs have completed.
    multi_run: list[MultiRunSpec] = Field(default_factory=list)

    def data_file_name(self, run: int) -> str:
        return f"{self.file_prefix or self.name}{run:0{self.run_digits}d}.nxs"


class Template(BaseModel):
    """A resolved, enabled template ready to run."""

    instrument: str
    name: str = "reduce"
    path: Path
    #: The technique family whose shared template this is (None: the instrument's own notebook).
    family: str | None = None
    config: InstrumentConfig
    content_hash: str

    def parameters(self) -> dict[str, dict[str, Any]]:
        """Declared parameters as papermill inspects them: name -> {inferred_type_name, default, help}."""
        return _inspect(str(self.path), self.content_hash)

    @property
    def kernel_name(self) -> str | None:
        if self.config.kernel:
            return self.config.kernel
        return kernel_name(self.config.environment) if self.config.environment else None

    def specs(self) -> list[ParamSpec]:
        """The rerun form's fields: the template's parameters, the instrument's constants fixed."""
        return specs(self.parameters(), fixed=self.config.constants)


@lru_cache(maxsize=64)
def _inspect(path: str, content_hash: str) -> dict[str, dict[str, Any]]:
    # keyed by content hash so an edited template is re-inspected without restarting the runner
    return {name: dict(info) for name, info in papermill.inspect_notebook(path).items()}


def file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class TemplateRegistry:
    """Finds instrument templates under one notebooks folder; re-reads files when they change."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def instruments(self) -> list[str]:
        """Instrument folders: an instrument name holding its own template or an ``instrument.toml``."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _INSTRUMENT_RE.match(p.name)
                      and ((p / TEMPLATE_NAME).is_file() or (p / CONFIG_NAME).is_file()))

    def families(self) -> list[str]:
        """Technique families with a shared template."""
        folder = self.root / TECHNIQUES_DIR
        return sorted(p.name for p in folder.iterdir() if (p / TEMPLATE_NAME).is_file()) if folder.is_dir() else []

    def config(self, instrument: str) -> InstrumentConfig:
        if not _INSTRUMENT_RE.match(instrument):
            raise TemplateError(f"invalid instrument name {instrument!r}")
        folder = self.root / instrument
        config_path = folder / CONFIG_NAME
        if not folder.is_dir():
            raise TemplateError(f"no template for instrument {instrument} (expected {folder}/{TEMPLATE_NAME})")
        try:
            raw = tomllib.loads(config_path.read_text()) if config_path.is_file() else {}
            return InstrumentConfig(**{"name": instrument, **raw})
        except (tomllib.TOMLDecodeError, ValidationError, OSError) as exc:
            raise TemplateError(f"{config_path} is invalid: {exc}") from exc

    def resolve(self, instrument: str, name: str | None = None) -> Template:
        """The enabled template ``name`` (default ``reduce``) of ``instrument``, or :class:`TemplateError`."""
        config = self.config(instrument)
        name = name or DEFAULT_TEMPLATE
        if not _TEMPLATE_RE.match(name):
            raise TemplateError(f"invalid template name {name!r}")
        own = self.root / instrument / f"{name}.ipynb"
        family = None if own.is_file() else config.family
        path = own if family is None else self.root / TECHNIQUES_DIR / family / f"{name}.ipynb"
        if not path.is_file():
            where = f"{own}" + (f" or {path} (family {family})" if family else "")
            raise TemplateError(f"no template {name!r} for instrument {instrument} (expected {where})")
        if not config.enabled:
            raise TemplateError(f"instrument {instrument} is disabled in {CONFIG_NAME}")
        template = Template(instrument=instrument, name=name, path=path, family=family, config=config,
                            content_hash=file_hash(path))
        undeclared = sorted(set(config.constants) - set(template.parameters()))
        if undeclared:
            raise TemplateError(f"{instrument}: constants {', '.join(undeclared)} in {CONFIG_NAME} are not "
                                f"parameters of {path.name}")
        return template
