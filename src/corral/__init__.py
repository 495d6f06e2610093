"""Corral: a cluster manager for virtualization hosts."""

__version__ = "0.1.0"
