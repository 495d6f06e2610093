"""Child process of test_store's kill -9 test: applies a deterministic stream
of operations to a store and prints each operation's number after `apply`
returned (that is, after it was acknowledged). The parent kills it at a random
moment. Usage: kill_child.py <store dir> <fsync|process>"""

from __future__ import annotations

import sys

from corral.cfs.ops import Op
from corral.cfs.store import Durability, Store


def op_for(number: int) -> Op:
    """Operation `number` of the stream: multi-chunk writes and renames, so a
    half-applied operation would show as wrong content."""
    if number == 0:
        return Op.mkdir("d", 1)
    index, phase = divmod(number - 1, 4)
    name = f"d/f{index}"
    if phase == 0:
        return Op.create(name, index, excl=True)
    if phase == 1:
        return Op.write(name, 0, bytes([index % 251]) * 20_000, index)
    if phase == 2:
        return Op.write(name, 5_000, bytes([(index + 1) % 251]) * 10_000, index)
    return Op.rename(name, f"d/g{index % 50}", index)


def main() -> None:
    store = Store(sys.argv[1], durability=Durability(sys.argv[2]))
    number = 0
    while True:
        outcome = store.apply(op_for(number), writer=1, quorate=True)
        if outcome.errno:
            raise SystemExit(f"op {number} failed: {outcome.errno}")
        sys.stdout.write(f"{number}\n")
        sys.stdout.flush()
        number += 1


if __name__ == "__main__":
    main()
