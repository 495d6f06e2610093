"""Deterministic simulator: N Totem cores in one process, one seed, simulated time.

`Simulation` (cluster.py) drives the cores over `SimNetwork` (network.py) with
faults chosen per seed (`FaultPlan`, faults.py); `EvsChecker` (checkers.py)
checks total order, integrity and extended virtual synchrony after every step.
Run one seed with `python -m corral.sim --seed S`; see docs/sim.md.
"""

from corral.sim.checkers import EvsChecker, Violation
from corral.sim.cluster import RunResult, SimOptions, Simulation, run_seed
from corral.sim.faults import FAULT_NAMES, FaultPlan

__all__ = [
    "FAULT_NAMES",
    "EvsChecker",
    "FaultPlan",
    "RunResult",
    "SimOptions",
    "Simulation",
    "Violation",
    "run_seed",
]
