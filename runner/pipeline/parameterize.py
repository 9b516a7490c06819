"""The parameters injected into a template for one run.

Values are checked like the rerun form checks them (type, ``one of``, ``range``), whatever their
source, because requests also arrive straight from Kafka. Precedence, lowest first: the template's
own defaults, ``instrument.toml`` defaults, defaults set by instrument scientists for the instrument
/ RB, the request's overrides; the run's identity (data
files, run and RB numbers, output folder) is set by nbreduce and cannot be overridden. Only
parameters the template declares are injected: papermill would merely warn about unknown names, so
a typo in an override would silently do nothing — here it is an error the user sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.bus.models import RunCompletion
from runner.templates.params import RUN_PARAMETERS, check_values
from runner.templates.registry import Template


class ParameterError(ValueError):
    """An override names a parameter the template does not declare, or tries to change the run's identity."""


def build_parameters(template: Template, request: RunCompletion, rb_number: str, data_files: list[Path],
                     output_dir: Path, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    declared = template.parameters()
    identity: dict[str, Any] = {
        "data_file": str(data_files[0]),
        "data_files": [str(p) for p in data_files],
        "run_number": request.runs[0],
        "run_numbers": request.runs,
        "rb_number": rb_number,
        "instrument": request.instrument,
        "run_title": request.run_title,
        "output_dir": str(output_dir),
        # the template's own folder: the kernel runs in output_dir, so files beside the template need its path
        "template_dir": str(template.path.parent),
    }
    overrides = dict(request.reduction_arguments)
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(unknown)}; {template.instrument} template declares: "
            f"{', '.join(sorted(declared)) or 'none'}"
        )
    fixed = sorted(set(overrides) & set(RUN_PARAMETERS))
    if fixed:
        names = ", ".join(fixed)
        raise ParameterError(f"parameter(s) {names} are set by nbreduce from the run and cannot be overridden")
    constants = sorted(set(overrides) & set(template.config.constants))
    if constants:
        raise ParameterError(f"parameter(s) {', '.join(constants)} are constants of {template.instrument} "
                             f"(instrument.toml) and cannot be overridden")
    parameters: dict[str, Any] = {}
    for source in (template.config.parameters, defaults or {}, overrides):
        parameters.update({k: v for k, v in source.items() if k in declared})
    # the same strict check as the rerun form: types, choices and ranges the template declares
    _, errors = check_values(template.specs(), parameters)
    if errors:
        raise ParameterError("invalid parameter value(s): " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    parameters.update(template.config.constants)
    parameters.update({k: v for k, v in identity.items() if k in declared})
    return parameters
