"""Simulated ISIS instruments: files in each instrument's real format drawn from known physics, written into
the archive layout and announced on Kafka (``nbreduce simulate``). One module per technique; ``runs.py``
registers them by family."""

from runner.sim.diffraction import SILICON_A, PowderDiffractometer, diamond_reflections
from runner.sim.engineering import EngineeringDiffractometer
from runner.sim.imaging import ImagingInstrument
from runner.sim.indirect import IndirectSpectrometer
from runner.sim.muon import MuonSpectrometer
from runner.sim.reflectometry import Reflectometer
from runner.sim.runs import (
           DEFAULT_EVENTS,
           FAMILIES,
           MODELS,
           instrument_model,
           random_rb,
           simulate,
           write_run,
           write_run_file,
)
from runner.sim.sans import SansInstrument
from runner.sim.spectroscopy import ChopperSpectrometer

__all__ = ["DEFAULT_EVENTS", "FAMILIES", "MODELS", "SILICON_A", "ChopperSpectrometer", "EngineeringDiffractometer",
           "ImagingInstrument", "IndirectSpectrometer", "MuonSpectrometer", "PowderDiffractometer", "Reflectometer",
           "SansInstrument", "diamond_reflections", "instrument_model", "random_rb", "simulate", "write_run",
           "write_run_file"]
