"""High availability: the CRM/LRM logic (sans-I/O, in `logic`) and its scenario simulator (`sim`).

The logic runs against `logic.env.HaEnvironment`; the simulator implements that interface
with a deterministic clock, so the same code runs in the scenario tests and (later) the daemon.
"""
