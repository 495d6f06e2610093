"""Timing figures of live migrations (docs/guests.md, "Migration figures"): a real 2-node
corrald cluster on 127.0.0.x, one 128 MiB TCG test guest on shared storage moved back
and forth, alternating TLS and insecure in pairs; prints each move's timing lines and
the medians. Not a pytest module (no test_ prefix); the benchmark of record is bench/.

    .venv/bin/python -m tests.guests.measure_migration [ROUNDS]     (as root)
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time

from tests.guests.migration_env import GuestCluster, SerialWatch, guest_settings

from corral.guests.migrate import MigrateOptions, migrate
from corral.guests.qemu import DEFAULT_TEST_GUEST_DIR

PATTERNS = {"start": r"migration start (\d+) ms", "resumed": r"target resumed (\d+) ms",
            "handover": r"hand-over done (\d+) ms", "downtime": r"downtime (\d+) ms"}


def main(rounds: int) -> None:
    guest_dir = os.environ.get("CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
    os.environ["CORRAL_ACCEL"] = "tcg"
    workdir = tempfile.mkdtemp(prefix="crl-mig-")
    cluster = GuestCluster(2, workdir, prefix="crl-migm", use_netns=False, stats_interval_s=60)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        cluster.setup_network()
        cluster.build()
        cluster.write_storage_cfg()
        managers = {n: cluster.guest_manager(n, guest_dir) for n in cluster.nodeids}
        settings = guest_settings(guest_dir)
        settings["scsi0"] = "shared:0.0625,format=raw"
        managers[1].create(100, settings)
        asyncio.run(managers[1].start(100))
        serial = SerialWatch(cluster, 100)
        serial.wait_value(1, 2, 60)
        for index in range(rounds):
            source, target = (1, 2) if index % 2 == 0 else (2, 1)
            mode = "secure" if (index // 2) % 2 == 0 else "insecure"
            started = time.monotonic()
            upid = asyncio.run(migrate(managers[source], 100, cluster.name(target),
                                       MigrateOptions(online=True, migration_type=mode),
                                       state_dir=str(cluster.state_dir(source))))
            row = {"total": (time.monotonic() - started) * 1000}
            log = "\n".join(managers[source].tasks.read_log(upid))
            for name, pattern in PATTERNS.items():
                match = re.search(pattern, log)
                row[name] = float(match.group(1)) if match else float("nan")
            results.setdefault(mode, []).append(row)
            print(mode, {k: round(v) for k, v in row.items()}, flush=True)
            serial.wait_value(target, max(serial.values(source)), 60)
        serial.close()
        for mode, rows in results.items():
            print(f"median {mode} (n={len(rows)}):",
                  {k: round(statistics.median(r[k] for r in rows)) for k in rows[0]})
    finally:
        for nodeid in cluster.nodeids:
            pid = cluster.guest_manager(nodeid, guest_dir).pid(100)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
