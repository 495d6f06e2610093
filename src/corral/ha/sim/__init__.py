"""Deterministic scenario simulator for the HA logic (reference test-directory format)."""
