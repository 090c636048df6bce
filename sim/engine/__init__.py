"""The simulation engine: pure, in virtual time, over the very same core the service runs.

Nothing here reads a clock or does I/O (`tests/test_wall.py` checks): scenarios come in as
values (`sim.engine.model`), results go out as values (`sim.engine.results`).
"""

from sim.engine.loop import ProgressFn, Simulation, simulate
from sim.engine.results import SimResult, TierResult

__all__ = ["ProgressFn", "SimResult", "Simulation", "TierResult", "simulate"]
