"""`python -m bench SUITE [ARGS]`: run one benchmark suite (`./run bench SUITE ARGS`).

Suites:
  totem   Corral's Totem engine against corosync 3.1.x on 3 network namespaces
          (bench/totem.py; see docs/bench.md)
Any other SUITE name runs `bench/bench_<SUITE>.py`'s main(argv) if that module has one.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    suite, rest = argv[0], argv[1:]
    if suite == "totem":
        from bench.totem import main as totem_main

        return totem_main(rest)
    module_name = f"bench.bench_{suite.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"unknown benchmark suite {suite!r}\n{__doc__}", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"{module_name} has no main(argv)", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
