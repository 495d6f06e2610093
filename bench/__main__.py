"""`python -m bench [SUITE] [ARGS]`: run one benchmark suite (`./run bench SUITE ARGS`).

Suites:
  totem   Corral's Totem engine against corosync 3.1.x on 3 network namespaces
          (bench/totem.py; see docs/bench.md); the default SUITE
Any other SUITE runs `bench/bench_<SUITE>.py`'s main() (or main(argv)), e.g.
  totem_core, cfs_core.
"""

from __future__ import annotations

import importlib
import inspect
import sys


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    # Without a suite name (`./run bench`), or with only options, run the Totem suite.
    if not argv or argv[0].startswith("-"):
        argv = ["totem", *argv]
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
        print(f"{module_name} has no main()", file=sys.stderr)
        return 2
    # Suites written as scripts take no argument and parse sys.argv themselves.
    if not inspect.signature(entry).parameters:
        sys.argv = [f"python -m bench {suite}", *rest]
        return int(entry() or 0)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
