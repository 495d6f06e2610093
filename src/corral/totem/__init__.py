"""Totem single-ring protocol: the sans-I/O core (Cython) and its asyncio shell."""
