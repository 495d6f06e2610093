"""Per-component random generators derived from one master seed.

A stable hash (blake2b) turns (seed, label) into a component seed, so adding a
component or drawing more numbers in one component never shifts another's
stream, and nothing depends on Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(seed: int, label: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def derive_rng(seed: int, label: str) -> random.Random:
    return random.Random(derive_seed(seed, label))
