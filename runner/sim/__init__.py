"""Simulated ISIS instruments: NeXus files drawn from known physics, in the archive layout, announced on Kafka."""

from runner.sim.diffraction import SILICON_A, PowderDiffractometer, diamond_reflections
from runner.sim.runs import DEFAULT_EVENTS, MODELS, instrument_model, random_rb, simulate, write_run, write_run_file
from runner.sim.spectroscopy import ChopperSpectrometer

__all__ = ["DEFAULT_EVENTS", "MODELS", "SILICON_A", "ChopperSpectrometer", "PowderDiffractometer",
           "diamond_reflections", "instrument_model", "random_rb", "simulate", "write_run",
           "write_run_file"]
