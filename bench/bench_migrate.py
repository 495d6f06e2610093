"""Live migration of the test guest: plain QEMU against Corral, same guest, same run.

Run:  .venv/bin/python -m bench.bench_migrate [--quick] [--repeats N] [--json FILE]
      [--sizes 256,1024] [--workloads idle,dirty] [--storages shared,local]
      [--transports tls,insecure] [--only plain|corral] [--workdir DIR]
      (or `python -m bench migrate ...`)

Baseline ("plain"): two QEMU processes on this machine, started from the command
line Corral builds for the guest (GuestManager.build_command), the target with
`-incoming defer -S`, driven over QMP with the reference's settings (capabilities
xbzrle + auto-converge, max-bandwidth 16 GiB/s, downtime-limit 100 ms doubled when
RAM does not converge, xbzrle cache 10 % of RAM rounded to a power of two). TLS
cases use QEMU's tls-creds-x509 with certificates from a cluster CA minted by
corral.cluster.pki (verify-peer on, mutual); insecure cases use plain TCP. Local
disk cases export an empty target volume over NBD, mirror the source disk to it
(blockdev-mirror, sync=full), wait for `ready`, migrate RAM, then cancel the job
(complete without pivot), as the reference does.

Corral ("corral"): the same guest config on a 2-node demo cluster (real corrald
processes), migrated with `corral qm migrate` through the node's API; figures are
read back from the task log (QEMU's total/downtime/bytes and the orchestration
timings the migration logs). Without a usable migration the column says so: it is
never filled with baseline numbers.

Matrix: guest sizes (256 MiB and 1 GiB) x idle / dirtying x shared storage / local
disk x TLS / insecure. A dirtying guest rewrites a working set of 3/8 of its RAM
(kernel knobs corral.dirty=MIB corral.period=0.01); an idle guest uses corral.dirty=0.
Each (size, workload, storage) boots one guest and migrates it back and forth
between the two sides, `--repeats` times per transport. The box is shared: the
report prints the load average with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.cluster import pki
from corral.daemon.demo import DemoCluster
from corral.guests import storage as storage_mod
from corral.guests.config import parse_config
from corral.guests.mtunnel import FFDHE2048_PEM
from corral.guests.qemu import DEFAULT_TEST_GUEST_DIR, GuestManager
from corral.guests.qmp import QmpClient, QmpError
from corral.guests.tasks import parse_upid

# The reference's migration settings (qemu-migration.md, section 1.5).
MAX_BANDWIDTH_BYTES_PER_S = 16 << 30
DOWNTIME_LIMIT_MS = 100
DOWNTIME_LIMIT_MAX_MS = 2_000_000
GROWING_POLLS_BEFORE_DOUBLING = 5
POLL_INTERVAL_S = 0.02
MIGRATION_TIMEOUT_S = 300.0
MIRROR_READY_TIMEOUT_S = 300.0
BOOT_TIMEOUT_S = 120.0
COUNTER_TIMEOUT_S = 30.0
VMID = 900
DIRTY_FRACTION = 3 / 8          # 96 MiB of 256, 384 MiB of 1 GiB, as the anchor's runs
DIRTY_PERIOD_S = "0.01"
IDLE_PERIOD_S = "0.02"
PLAIN_CONT_DELAY_S = float(os.environ.get("CORRAL_BENCH_PLAIN_CONT_DELAY_MS", "0")) / 1000
TASK_LIST_CHECKED = 10          # recent migration tasks looked up in the cluster task list
DISK_DATA_FRACTION = 0.5        # half of the local disk is random data, half sparse


class BenchError(RuntimeError):
    """A benchmark step failed (the case is recorded as failed, with this message)."""


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty_mib: int
    storage: str                 # "shared" or "local"
    transport: str               # "tls" or "insecure"

    @property
    def label(self) -> str:
        size = f"{self.memory_mib // 1024} GiB" if self.memory_mib >= 1024 else f"{self.memory_mib} MiB"
        work = f"dirty {self.dirty_mib} MiB" if self.dirty_mib else "idle"
        return f"{size}, {work}, {self.storage}, {self.transport}"


@dataclass
class Run:
    """One migration: QEMU's figures plus our wall-clock ones (ms, bytes)."""
    ok: bool
    error: str = ""
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    setup_ms: float = 0.0
    ram_bytes: int = 0
    disk_bytes: int = 0
    mirror_ms: float = 0.0
    syncs: int = 0
    downtime_raised_ms: int = 0
    # QEMU completed (as seen by the poll) -> `cont` done on the target: what the guest's
    # pause lasts beyond QEMU's downtime; downtime + this = the effective downtime.
    resume_ms: float | None = None
    effective_downtime_ms: float | None = None
    pause_ms: float | None = None   # guest-visible pause: serial counter silence around the move
    wall_ms: float = 0.0          # command (or first QMP step) to the guest running on the target
    # Corral: command -> QEMU migration start, and QEMU completed -> hand-over done (config
    # moved, target resumed, source stopped; then TASK OK), from the task log. Plain: the
    # same steps of the plain driver (target QEMU started, TLS, caps, mirror ready ->
    # `migrate`; completed seen -> mirror finished, `cont`, source quit).
    start_overhead_ms: float | None = None
    finish_overhead_ms: float | None = None
    # Corral only, the hand-over's steps (from the resume timing line): QEMU completed ->
    # config renamed into the target's dir, and the `resume` request to the target.
    rename_ms: float | None = None
    request_ms: float | None = None


@dataclass
class CaseResult:
    case: Case
    system: str
    runs: list[Run] = field(default_factory=list)

    def ok_runs(self) -> list[Run]:
        return [run for run in self.runs if run.ok]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- files: tree, storages, certificates ---------------------------------------------


def xbzrle_cache_bytes(memory_mib: int) -> int:
    """10 % of guest RAM rounded up to a power of two (the reference's choice)."""
    wanted = max(1, memory_mib * (1 << 20) // 10)
    return 1 << (wanted - 1).bit_length()


def write_tls_dirs(workdir: Path, sides: tuple[str, str]) -> dict[str, Path]:
    """A cluster CA and one cert per side, laid out as QEMU's tls-creds-x509 `dir` wants."""
    ca_cert, ca_key = pki.new_ca("bench-migrate")
    dirs: dict[str, Path] = {}
    for side in sides:
        cert, key = pki.issue_node_cert(side, ["127.0.0.1"], ca_cert, ca_key)
        directory = workdir / f"tls-{side}"
        directory.mkdir(parents=True)
        (directory / "ca-cert.pem").write_bytes(ca_cert)
        # As Corral's target: fixed DH parameters, else QEMU generates them per start.
        (directory / "dh-params.pem").write_text(FFDHE2048_PEM)
        for role in ("server", "client"):
            (directory / f"{role}-cert.pem").write_bytes(cert)
            (directory / f"{role}-key.pem").write_bytes(key)
            os.chmod(directory / f"{role}-key.pem", 0o600)
        dirs[side] = directory
    return dirs


def guest_append(memory_mib: int, dirty: bool) -> str:
    if not dirty:   # still prints its counter often, so the pause is measured finely
        return f"console=ttyS0 quiet panic=-1 corral.dirty=0 corral.period={IDLE_PERIOD_S}"
    return (f"console=ttyS0 quiet panic=-1 corral.dirty={dirty_mib(memory_mib)} "
            f"corral.period={DIRTY_PERIOD_S}")


def dirty_mib(memory_mib: int) -> int:
    return int(memory_mib * DIRTY_FRACTION)


def guest_args(guest_dir: str, memory_mib: int, dirty: bool) -> str:
    return (f"-kernel {guest_dir}/vmlinuz -initrd {guest_dir}/initrd.img "
            f"-append '{guest_append(memory_mib, dirty)}'")


def disk_mib(quick: bool) -> int:
    return 256 if quick else 1024


def fill_disk(path: str, size_mib: int) -> None:
    """Random data in the first half, sparse second half (as the anchor's disk)."""
    data_mib = int(size_mib * DISK_DATA_FRACTION)
    with open(path, "r+b") as handle:
        for _ in range(data_mib):
            handle.write(os.urandom(1 << 20))


def checksum(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def check_disk(path: str, expected: str) -> None:
    """The migrated disk holds exactly the source's bytes (the guest never writes it)."""
    if await asyncio.to_thread(checksum, path) != expected:
        raise BenchError(f"disk content differs after the migration: {path}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# --- serial counter ------------------------------------------------------------------


async def probe_serial(path: str, timeout_s: float = 5.0) -> str:
    """The first line read on a new connection to a serial socket (diagnostics)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout_s)
    except (OSError, TimeoutError) as exc:
        return f"no connection: {exc}"
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        return line.decode(errors="replace").strip() or "EOF"
    except (OSError, TimeoutError):
        return f"nothing within {timeout_s} s"
    finally:
        writer.close()


async def cpu_share(pid: int | None, interval_s: float = 1.0) -> str:
    """CPU used by a process over one second (a spinning guest vs an idle one)."""
    def ticks() -> int:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    if pid is None:
        return "no process"
    try:
        before = ticks()
        await asyncio.sleep(interval_s)
        used = (ticks() - before) / os.sysconf("SC_CLK_TCK")
    except OSError as exc:
        return f"unknown ({exc})"
    return f"{100 * used / interval_s:.0f}% of a core"


async def silence_length(path: str, limit_s: float = 60.0) -> str:
    """How long a silent guest stays silent (a stall that ends, or a hang)."""
    started = time.monotonic()
    line = await probe_serial(path, limit_s)
    if line.startswith(("nothing within", "no connection", "EOF")):
        return f"still silent after {limit_s:.0f} more s ({line})"
    return f"printed {line!r} after {time.monotonic() - started:.1f} more s"


class CounterWatch:
    """Reads `corral-counter N` lines from the guest's serial socket on every side
    (reconnecting whenever a QEMU appears there) and records (monotonic s, side, N).

    The guest prints a line every period; the longest silence between the last line
    from the source and the first from the target is the pause the guest saw
    (QEMU's downtime plus the hand-over until the target runs), to within one period.
    It is the only reader: a QEMU serial socket serves one client at a time.
    """

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.samples: list[tuple[float, str, int]] = []
        self.connects: dict[str, int] = {}
        self._tasks = [asyncio.create_task(self._watch(side, path)) for side, path in paths.items()]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, side: str, path: str) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            self.connects[side] = self.connects.get(side, 0) + 1
            try:
                while line := await reader.readline():
                    if not line.endswith(b"\n"):
                        break              # cut off by a QEMU exiting: not a whole value
                    words = line.decode(errors="replace").split()
                    if len(words) == 2 and words[0] == "corral-counter" and words[1].isdigit():
                        self.samples.append((time.monotonic(), side, int(words[1])))
            except OSError:
                pass
            finally:
                writer.close()

    def latest(self, side: str, since_s: float = 0.0) -> int | None:
        values = [v for t, s, v in self.samples if s == side and t >= since_s]
        return max(values) if values else None

    async def wait(self, side: str, above: int, timeout_s: float, since_s: float = 0.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.latest(side, since_s)
            if value is not None and value > above:
                return value
            await asyncio.sleep(0.02)
        raise BenchError(f"guest counter on {side} not above {above} within {timeout_s} s")

    def pause_ms(self, source: str, target: str, since_s: float) -> float | None:
        """Silence between the source's last line and the target's first one after since_s."""
        firsts = [t for t, s, _ in self.samples if s == target and t >= since_s]
        if not firsts:
            return None
        lasts = [t for t, s, _ in self.samples if s == source and since_s <= t <= min(firsts)]
        return (min(firsts) - max(lasts)) * 1000 if lasts else None

    def check_single_runner(self) -> None:
        """Each value is printed once by the one running guest; a guest running on both
        sides at once would print the same values on both. (Order across sides is not
        checked: two sockets read by one loop under load can deliver the source's last
        line after the target's first.)"""
        sides: dict[int, set[str]] = {}
        for _, side, value in self.samples:
            sides.setdefault(value, set()).add(side)
        twice = sorted(value for value, where in sides.items() if len(where) > 1)
        if twice:
            raise BenchError(f"guest counter values {twice[:5]} printed on two sides: "
                             f"the guest ran twice; lines around them: {self.around(twice[0])}")

    def around(self, value: int, width: int = 4) -> str:
        """The lines (ms since the first, side, value) near `value`, in arrival order."""
        ordered = sorted(self.samples)
        start = ordered[0][0] if ordered else 0.0
        near = [f"{(t - start) * 1000:.0f}:{s}:{v}" for t, s, v in ordered
                if abs(v - value) <= width]
        return " ".join(near)


# --- plain QEMU side ------------------------------------------------------------------


class Side:
    """One QEMU 'host' of the baseline: a run dir and a storage of its own."""

    def __init__(self, name: str, root: Path, workdir: Path, tls_dir: Path) -> None:
        self.name = name
        self.manager = GuestManager(str(root), name, str(workdir / f"run-{name}"),
                                    str(workdir / f"tasks-{name}"))
        self.tls_dir = tls_dir
        self.qmp: QmpClient | None = None

    def command(self, config_text: str, incoming: bool) -> list[str]:
        command = self.manager.build_command(VMID, parse_config(config_text), "tcg")
        return [*command, "-incoming", "defer", "-S"] if incoming else command

    async def spawn(self, config_text: str, incoming: bool) -> None:
        for suffix in ("qmp", "pid", "serial0"):
            path = os.path.join(self.manager.run_dir, f"{VMID}.{suffix}")
            if os.path.exists(path):
                os.unlink(path)
        log_path = os.path.join(self.manager.run_dir, f"{VMID}.log")
        with open(log_path, "w", encoding="utf-8") as log_file:
            result = await asyncio.to_thread(
                subprocess.run, self.command(config_text, incoming), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=log_file, start_new_session=True, timeout=60, check=False)
        if result.returncode != 0:
            raise BenchError(f"QEMU on {self.name} failed: {Path(log_path).read_text()[-400:]}")
        self.qmp = QmpClient(self.manager.qmp_path(VMID))
        await self.qmp.connect()

    async def cmd(self, command: str, /, **arguments: Any) -> Any:
        if self.qmp is None:
            raise BenchError(f"no QEMU on {self.name}")
        return await self.qmp.command(command, **arguments)

    async def kill(self) -> None:
        if self.qmp is not None:
            try:
                await self.qmp.command("quit", timeout_s=5)
            except QmpError:
                pass
            await self.qmp.close()
            self.qmp = None
        pid = self.manager.pid(VMID)
        if pid is not None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for _ in range(100):
            if self.manager.pid(VMID) is None:
                return
            await asyncio.sleep(0.05)


async def set_migration_settings(source: Side, target: Side, memory_mib: int,
                                 tls_id: str | None) -> None:
    """Caps and params as the reference; the source may be a former target, so every
    parameter is set explicitly (TLS off again for an insecure run)."""
    caps = [{"capability": "xbzrle", "state": True},
            {"capability": "auto-converge", "state": True}]
    for side in (source, target):
        await side.cmd("migrate-set-capabilities", capabilities=caps)
    await source.cmd("migrate-set-parameters", **{
        "max-bandwidth": MAX_BANDWIDTH_BYTES_PER_S, "downtime-limit": DOWNTIME_LIMIT_MS,
        "xbzrle-cache-size": xbzrle_cache_bytes(memory_mib)})
    if tls_id is None:
        for side in (source, target):
            await side.cmd("migrate-set-parameters", **{"tls-creds": "", "tls-hostname": ""})
        return
    for side, endpoint in ((target, "server"), (source, "client")):
        await side.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": tls_id,
                                        "dir": str(side.tls_dir), "endpoint": endpoint,
                                        "verify-peer": True})
    await target.cmd("migrate-set-parameters", **{"tls-creds": tls_id})
    await source.cmd("migrate-set-parameters", **{"tls-creds": tls_id,
                                                  "tls-hostname": target.name})


async def mirror_disk(source: Side, target: Side, tls_id: str | None) -> tuple[float, int]:
    """NBD export on the target, blockdev-mirror from the source, until `ready`."""
    port = free_port()
    address = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
    server: dict[str, Any] = {"addr": address}
    if tls_id:
        server["tls-creds"] = tls_id
    await target.cmd("nbd-server-start", **server)
    # -drive names the BlockBackend, not the node: export the node it holds. The
    # export is named like the drive via nbd-server-add's default (QmpClient.command
    # has its own `name` parameter, so block-export-add's cannot be passed).
    blocks = {block["device"]: block for block in await target.cmd("query-block")}
    node = blocks["drive-virtio0"]["inserted"]["node-name"]
    await target.cmd("block-export-add", type="nbd", id="drive-virtio0",
                     **{"node-name": node}, writable=True)
    nbd: dict[str, Any] = {"driver": "nbd", "node-name": "mirror-virtio0",
                           "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)},
                           "export": node}
    if tls_id:
        nbd["tls-creds"] = tls_id
        nbd["tls-hostname"] = target.name
    await source.cmd("blockdev-add", **nbd)
    started = time.monotonic()
    await source.cmd("blockdev-mirror", **{"job-id": "mirror-virtio0", "device": "drive-virtio0",
                                           "target": "mirror-virtio0", "sync": "full",
                                           "auto-dismiss": False})
    while True:
        jobs = {job["device"]: job for job in await source.cmd("query-block-jobs")}
        job = jobs.get("mirror-virtio0")
        if job is None:
            raise BenchError("mirror job vanished before ready")
        if job.get("ready"):
            return (time.monotonic() - started) * 1000, int(job.get("offset", 0))
        if time.monotonic() - started > MIRROR_READY_TIMEOUT_S:
            raise BenchError("mirror did not become ready")
        await asyncio.sleep(POLL_INTERVAL_S)


async def finish_mirror(source: Side, target: Side) -> int:
    """block-job-cancel on a ready mirror = complete without pivot; then stop NBD."""
    jobs = {job["device"]: job for job in await source.cmd("query-block-jobs")}
    written = int(jobs.get("mirror-virtio0", {}).get("offset", 0))
    await source.cmd("block-job-cancel", device="mirror-virtio0")
    for _ in range(500):
        jobs = {job["device"]: job for job in await source.cmd("query-block-jobs")}
        job = jobs.get("mirror-virtio0")
        if job is None or job.get("status") == "concluded":
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    await source.cmd("job-dismiss", id="mirror-virtio0")
    await target.cmd("nbd-server-stop")
    return written


async def poll_migration(source: Side) -> tuple[dict[str, Any], int]:
    """query-migrate until completed, with the reference's downtime doubling."""
    downtime_ms, growing, last_remaining = DOWNTIME_LIMIT_MS, 0, -1
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await source.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info, (downtime_ms if downtime_ms != DOWNTIME_LIMIT_MS else 0)
        if status in ("failed", "cancelled"):
            raise BenchError(f"migration {status}: {info.get('error-desc', '')}")
        remaining = int(info.get("ram", {}).get("remaining", -1))
        if status == "active" and last_remaining >= 0 and (remaining >= last_remaining or remaining == 0):
            growing += 1
            if growing > GROWING_POLLS_BEFORE_DOUBLING and downtime_ms < DOWNTIME_LIMIT_MAX_MS:
                downtime_ms = min(downtime_ms * 2, DOWNTIME_LIMIT_MAX_MS)
                growing = 0
                await source.cmd("migrate-set-parameters", **{"downtime-limit": downtime_ms})
        last_remaining = remaining
        await asyncio.sleep(POLL_INTERVAL_S)
    await source.cmd("migrate_cancel")
    raise BenchError(f"migration did not complete within {MIGRATION_TIMEOUT_S} s")


async def plain_migrate(source: Side, target: Side, target_config: str, case: Case) -> Run:
    """One plain-QEMU migration source -> target; the guest then runs on the target."""
    # A fresh object id per migration: the source may hold the previous one as a server.
    tls_id = f"tls-{time.monotonic_ns()}" if case.transport == "tls" else None
    started = time.monotonic()
    await target.spawn(target_config, incoming=True)
    await set_migration_settings(source, target, case.memory_mib, tls_id)
    mirror_ms, disk_bytes = 0.0, 0
    if case.storage == "local":
        mirror_ms, disk_bytes = await mirror_disk(source, target, tls_id)
    port = free_port()
    await target.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    migrate_at = time.monotonic()
    await source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info, raised_ms = await poll_migration(source)
    completed_at = time.monotonic()
    if case.storage == "local":
        disk_bytes = max(disk_bytes, await finish_mirror(source, target))
    if PLAIN_CONT_DELAY_S:        # experiments: a hand-over as slow as Corral's
        await asyncio.sleep(PLAIN_CONT_DELAY_S)
    await target.cmd("cont")
    resumed_at = time.monotonic()
    status = (await target.cmd("query-status")).get("status")
    if status != "running":
        raise BenchError(f"target is {status} after cont")
    await source.kill()     # as Corral's hand-over, which ends with the source stopped
    done_at = time.monotonic()
    ram = info.get("ram", {})
    return Run(ok=True, total_ms=float(info.get("total-time", 0)),
               downtime_ms=float(info.get("downtime", 0)),
               setup_ms=float(info.get("setup-time", 0)), ram_bytes=int(ram.get("transferred", 0)),
               disk_bytes=disk_bytes, mirror_ms=mirror_ms,
               syncs=int(ram.get("dirty-sync-count", 0)), downtime_raised_ms=raised_ms,
               wall_ms=(done_at - started) * 1000,
               start_overhead_ms=(migrate_at - started) * 1000,
               finish_overhead_ms=(done_at - completed_at) * 1000,
               resume_ms=(resumed_at - completed_at) * 1000,
               effective_downtime_ms=float(info.get("downtime", 0)) + (resumed_at - completed_at) * 1000)


# --- plain QEMU: one guest, migrated back and forth ------------------------------------


class PlainBench:
    def __init__(self, workdir: Path, guest_dir: str, quick: bool) -> None:
        self.workdir = workdir
        self.guest_dir = guest_dir
        self.quick = quick
        root = workdir / "tree"
        (root / "nodes").mkdir(parents=True)
        for name in ("shared", "a", "b"):
            (workdir / f"images-{name}").mkdir()
        (root / "storage.cfg").write_text("".join(
            f"dir: {name}\n\tpath {workdir / f'images-{name}'}\n\tcontent images\n"
            f"{chr(9) + 'shared 1' + chr(10) if name == 'shared' else ''}\n"
            for name in ("shared", "a", "b")))
        tls = write_tls_dirs(workdir, ("a", "b"))
        self.sides = {name: Side(name, root, workdir, tls[name]) for name in ("a", "b")}
        self.storages = storage_mod.load_storage_cfg(str(root))
        self.disk_sum = ""

    def volume(self, storage: str, name: str, size_mib: int, fill: bool) -> str:
        volid = f"{storage}:{VMID}/vm-{VMID}-disk-{name}.raw"
        path = storage_mod.volume_path(self.storages, volid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, f"{size_mib}M"], check=True)
        if fill:
            fill_disk(path, size_mib)
        return volid

    def configs(self, memory_mib: int, dirty: bool, storage: str) -> dict[str, str]:
        size = disk_mib(self.quick)
        base = (f"memory: {memory_mib}\nserial0: socket\n"
                f"args: {guest_args(self.guest_dir, memory_mib, dirty)}\n")
        if storage == "shared":
            volid = self.volume("shared", "0", size, fill=True)
            return {name: base + f"virtio0: {volid},size={size}M\n" for name in self.sides}
        source_volid = self.volume("a", "0", size, True)
        self.disk_sum = checksum(storage_mod.volume_path(self.storages, source_volid))
        return {"a": base + f"virtio0: {source_volid},size={size}M\n",
                "b": base + f"virtio0: {self.volume('b', '0', size, False)},size={size}M\n"}

    async def boot(self, side: Side, config: str, memory_mib: int, dirty: bool,
                   watch: CounterWatch) -> int:
        await side.spawn(config, incoming=False)
        # A dirtying guest has rewritten its whole working set after dirty_mib steps.
        wanted = dirty_mib(memory_mib) + 2 if dirty else 1
        return await watch.wait(side.name, wanted, BOOT_TIMEOUT_S)

    async def run_group(self, memory_mib: int, dirty: bool, storage: str,
                        transports: list[str], repeats: int) -> list[CaseResult]:
        configs = self.configs(memory_mib, dirty, storage)
        results = {t: CaseResult(Case(memory_mib, dirty_mib(memory_mib) if dirty else 0,
                                      storage, t), "plain") for t in transports}
        source, target = self.sides["a"], self.sides["b"]
        watch = CounterWatch({name: side.manager.serial_path(VMID)
                              for name, side in self.sides.items()})
        try:
            await self.boot(source, configs["a"], memory_mib, dirty, watch)
            for _ in range(repeats):
                for transport in transports:
                    run = await self._one(source, target, configs[target.name],
                                          results[transport].case, watch)
                    results[transport].runs.append(run)
                    if not run.ok:
                        return list(results.values())
                    source, target = target, source
            check_single_runner(watch, results[transports[0]], "plain")
        finally:
            await watch.close()
            for side in self.sides.values():
                await side.kill()
        return list(results.values())

    async def _one(self, source: Side, target: Side, target_config: str, case: Case,
                   watch: CounterWatch) -> Run:
        before = watch.latest(source.name) or 0
        since_s = time.monotonic()
        try:
            run = await plain_migrate(source, target, target_config, case)
        except (BenchError, QmpError, OSError) as exc:
            await target.kill()
            print(f"  plain  {case.label:<36} FAILED: {exc}", flush=True)
            return Run(ok=False, error=str(exc))
        try:
            after = await watch.wait(target.name, before, COUNTER_TIMEOUT_S, since_s)
            if case.storage == "local":
                volid = parse_config(target_config).get("virtio0") or ""
                await check_disk(storage_mod.volume_path(self.storages, volid.split(",")[0]),
                                 self.disk_sum)
        except BenchError as exc:
            print(f"  plain  {case.label:<36} FAILED: {exc}", flush=True)
            print(await self._diagnose(target, watch), flush=True)
            return Run(ok=False, error=str(exc))
        run.pause_ms = watch.pause_ms(source.name, target.name, since_s)
        print_run("plain", case, run, f"steps {run.start_overhead_ms:.0f}+"
                  f"{run.finish_overhead_ms:.0f} ms  counter {before}->{after}")
        return run


    async def _diagnose(self, target: Side, watch: CounterWatch) -> str:
        """The target's state after a failed run (the source has quit already)."""
        await watch.close()
        path = target.manager.serial_path(VMID)
        try:
            status = (await target.cmd("query-status")).get("status")
        except (BenchError, QmpError) as exc:
            status = f"unknown ({exc})"
        fresh = await probe_serial(path)
        line = f"    target {target.name}: {status}, QEMU CPU " \
               f"{await cpu_share(target.manager.pid(VMID))}, last counter " \
               f"{watch.latest(target.name)}, fresh read {fresh!r}"
        if "nothing within" in fresh:
            line += f", silent guest {await silence_length(path)}"
        return line


def check_single_runner(watch: CounterWatch, result: CaseResult, system: str) -> None:
    """A guest that ran twice fails the group (recorded on its first case)."""
    try:
        watch.check_single_runner()
    except BenchError as exc:
        print(f"  {system:<6} {result.case.label:<40} FAILED: {exc}", flush=True)
        result.runs.append(Run(ok=False, error=str(exc)))


def print_run(system: str, case: Case, run: Run, extra: str = "") -> None:
    print(f"  {system:<6} {case.label:<40} total {run.total_ms:6.0f} ms  downtime "
          f"{run.downtime_ms:4.0f}+{_fmt(run.resume_ms)} ms  pause {_fmt(run.pause_ms)} ms  RAM "
          f"{run.ram_bytes / 2**20:6.1f} MiB  disk {run.disk_bytes / 2**20:5.0f} MiB  "
          f"wall {run.wall_ms:6.0f} ms  {extra}", flush=True)


# --- Corral: the same guest on a 2-node demo cluster -------------------------------------


@dataclass(frozen=True)
class TaskFigures:
    """What a migration task's log says about it (QEMU's figures and M1's timings)."""
    downtime_ms: float
    ram_bytes: int
    total_ms: float
    start_overhead_ms: float
    finish_overhead_ms: float
    resume_ms: float | None
    rename_ms: float | None = None
    request_ms: float | None = None


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _bytes(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def parse_task_log(lines: list[str]) -> TaskFigures:
    """The figures from the reference-style lines the migration task logs. QEMU's
    total time is not logged as such: it is transferred / average speed (both printed
    with 4 significant digits, so good to about 0.1 %)."""
    found: dict[str, float] = {}
    patterns = {
        "speed": r"average migration speed: ([\d.]+) (\w+)/s - downtime (\d+) ms",
        "ram": r"migration completed, transferred ([\d.]+) (\w+) VM-state",
        "start": r"timing: command to QEMU migration start (\d+) ms",
        "finish": r"timing: QEMU completion to hand-over done (\d+) ms",
        "resume": r"timing: QEMU completion to target resumed (\d+) ms",
        "rename": r"timing: QEMU completion to target resumed .*config renamed after "
                  r"([\d.]+) ms",
        "request": r"timing: QEMU completion to target resumed .*resume request ([\d.]+) ms",
    }
    for line in lines:
        for name, pattern in patterns.items():
            match = re.search(pattern, line)
            if not match:
                continue
            if name == "speed":
                found["speed"] = _bytes(match.group(1), match.group(2))
                found["downtime"] = float(match.group(3))
            elif name == "ram":
                found["ram"] = _bytes(match.group(1), match.group(2))
            else:
                found[name] = float(match.group(1))
    missing = {"speed", "ram", "start", "finish"} - set(found)
    if missing or lines[-1:] != ["TASK OK"]:
        raise BenchError(f"task log lacks {sorted(missing) or 'TASK OK'}: {lines[-3:]}")
    return TaskFigures(downtime_ms=found["downtime"], ram_bytes=int(found["ram"]),
                       total_ms=found["ram"] / max(found["speed"], 1.0) * 1000,
                       start_overhead_ms=found["start"], finish_overhead_ms=found["finish"],
                       resume_ms=found.get("resume"), rename_ms=found.get("rename"),
                       request_ms=found.get("request"))


class CorralBench:
    """The same guests as PlainBench, migrated by Corral between the demo cluster's nodes."""

    def __init__(self, cluster: DemoCluster, guest_dir: str, quick: bool) -> None:
        self.cluster = cluster
        self.guest_dir = guest_dir
        self.quick = quick
        self.managers = {n: cluster.guest_manager(n, guest_dir) for n in cluster.nodeids}
        for nodeid, manager in self.managers.items():     # the cluster-wide task list
            manager.tasks.publish_to(str(cluster.mount(nodeid)))
        self.state_dirs = {n: str(cluster.state_dir(n)) for n in cluster.nodeids}
        self.upids: list[str] = []
        self.disk_sum = ""

    def _create(self, memory_mib: int, dirty: bool, storage: str) -> None:
        size_gib = disk_mib(self.quick) / 1024
        manager = self.managers[1]
        manager.create(VMID, {"memory": str(memory_mib), "serial0": "socket",
                              "args": guest_args(self.guest_dir, memory_mib, dirty),
                              "virtio0": f"{'shared' if storage == 'shared' else 'local1'}:"
                                         f"{size_gib:g},format=raw"})
        path = self._disk_path(1)
        fill_disk(path, disk_mib(self.quick))
        self.disk_sum = checksum(path)

    def _disk_path(self, nodeid: int) -> str:
        manager = self.managers[nodeid]
        volid = (manager.load_config(VMID).get("virtio0") or "").split(",")[0]
        return storage_mod.volume_path(manager.storages(), volid)

    async def run_group(self, memory_mib: int, dirty: bool, storage: str,
                        transports: list[str], repeats: int) -> list[CaseResult]:
        results = {t: CaseResult(Case(memory_mib, dirty_mib(memory_mib) if dirty else 0,
                                      storage, t), "corral") for t in transports}
        watch = CounterWatch({str(n): m.serial_path(VMID) for n, m in self.managers.items()})
        source, target = 1, 2
        try:
            await asyncio.to_thread(self._create, memory_mib, dirty, storage)
            await self.managers[source].start(VMID)
            wanted = dirty_mib(memory_mib) + 2 if dirty else 1
            await watch.wait(str(source), wanted, BOOT_TIMEOUT_S)
            for _ in range(repeats):
                for transport in transports:
                    run = await self._one(source, target, results[transport].case, watch)
                    results[transport].runs.append(run)
                    if not run.ok:
                        return list(results.values())
                    source, target = target, source
            check_single_runner(watch, results[transports[0]], "corral")
        finally:
            await watch.close()
            await self._remove_guest()
        return list(results.values())

    async def _one(self, source: int, target: int, case: Case, watch: CounterWatch) -> Run:
        from corral.guests.migrate import MigrateOptions, MigrationError, migrate

        local = case.storage == "local"
        options = MigrateOptions(online=True, with_local_disks=local,
                                 targetstorage=f"local{target}" if local else None,
                                 migration_type="secure" if case.transport == "tls" else "insecure")
        before = watch.latest(str(source)) or 0
        since_s = time.monotonic()
        try:
            upid = await migrate(self.managers[source], VMID, self.cluster.name(target), options,
                                 state_dir=self.state_dirs[source])
            self.upids.append(str(upid))
            wall_ms = (time.monotonic() - since_s) * 1000
            figures = parse_task_log(self.managers[source].tasks.read_log(upid))
            after = await watch.wait(str(target), before, COUNTER_TIMEOUT_S, since_s)
            await self._check_config_on(target)
            if local:
                await check_disk(self._disk_path(target), self.disk_sum)
        except (MigrationError, BenchError, OSError) as exc:
            print(f"  corral {case.label:<40} FAILED: {exc}", flush=True)
            print(await self._diagnose(source, target, watch), flush=True)
            return Run(ok=False, error=str(exc))
        run = Run(ok=True, total_ms=figures.total_ms, downtime_ms=figures.downtime_ms,
                  ram_bytes=figures.ram_bytes,
                  disk_bytes=disk_mib(self.quick) << 20 if local else 0,
                  pause_ms=watch.pause_ms(str(source), str(target), since_s), wall_ms=wall_ms,
                  start_overhead_ms=figures.start_overhead_ms,
                  finish_overhead_ms=figures.finish_overhead_ms, resume_ms=figures.resume_ms,
                  effective_downtime_ms=None if figures.resume_ms is None
                  else figures.downtime_ms + figures.resume_ms,
                  rename_ms=figures.rename_ms, request_ms=figures.request_ms)
        print_run("corral", case, run, f"overhead {figures.start_overhead_ms:.0f}+"
                  f"{figures.finish_overhead_ms:.0f} ms  hand-over rename "
                  f"{_fmt(figures.rename_ms)} + request {_fmt(figures.request_ms)} ms  "
                  f"counter {before}->{after}")
        return run

    async def _diagnose(self, source: int, target: int, watch: CounterWatch) -> str:
        """What each side holds after a failed run (printed, for the report). The watch
        is closed first, so a fresh connection can tell a silent guest from a reader
        that missed its socket."""
        await watch.close()
        lines = []
        for nodeid in (source, target):
            manager = self.managers[nodeid]
            try:
                status = await asyncio.wait_for(manager.status(VMID), 15)
                state = {k: status.get(k) for k in ("status", "qmpstatus", "pid", "lock")}
            except Exception as exc:      # a diagnostic must not raise
                state = {"error": str(exc)}
            log = Path(manager.run_path(VMID, "log"))
            tail = log.read_text(errors="replace").strip().splitlines()[-2:] if log.exists() else []
            fresh = await probe_serial(manager.serial_path(VMID))
            busy = await cpu_share(manager.pid(VMID))
            lines.append(f"    node {nodeid}: {state}, QEMU CPU {busy}, serial socket "
                         f"{os.path.exists(manager.serial_path(VMID))}, last counter "
                         f"{watch.latest(str(nodeid))}, fresh read {fresh!r}, "
                         f"watch connects {watch.connects.get(str(nodeid))}, QEMU log tail {tail}")
            if nodeid == target and "nothing within" in fresh:
                lines.append(f"    node {nodeid}: silent guest "
                             f"{await silence_length(manager.serial_path(VMID))}")
        if self.upids:
            task_log = self.managers[source].tasks.read_log(parse_upid(self.upids[-1]))
            lines.append("    task log tail: " + " | ".join(task_log[-6:]))
        return "\n".join(lines)

    async def _check_config_on(self, target: int, timeout_s: float = 5.0) -> None:
        """The config lives on the target only, unlocked, seen through both nodes' trees
        (the other tree may lag the rename by a few milliseconds)."""
        deadline = time.monotonic() + timeout_s
        for via in self.managers:
            root = self.cluster.mount(via) / "nodes"
            while True:
                where = [n for n in self.managers if (root / self.cluster.name(n) / "qemu-server"
                                                      / f"{VMID}.conf").exists()]
                if where == [target]:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"config on nodes {where} (via node {via}), "
                                     f"expected [{target}]")
                await asyncio.sleep(0.02)
        if self.managers[target].load_config(VMID).get("lock"):
            raise BenchError("the config is still locked after the migration")

    async def _remove_guest(self) -> None:
        """Stop the guest wherever it runs and remove its config and volumes."""
        for nodeid, manager in self.managers.items():
            if not os.path.exists(manager.config_path(VMID)):
                continue
            try:
                manager.set_options(VMID, {}, ["lock"] if manager.load_config(VMID).get("lock")
                                    else [])
                await manager.destroy(VMID)
            except Exception as exc:      # keep tearing down; say what was left
                print(f"  corral cleanup on node {nodeid}: {exc}", file=sys.stderr)
        for manager in self.managers.values():
            pid = manager.pid(VMID)
            if pid is not None:
                os.kill(pid, 9)


    async def check_task_list(self, timeout_s: float = 10.0) -> str:
        """Every migration task, finished OK, in the cluster-wide list read on every node
        (published by the source into its tree, replicated to the other)."""
        from corral.guests.clustertasks import cluster_tasks

        # Both nodes' stores also hold the target side's tasks of every migration, so only
        # the most recent migrations are sure to be within a node's published window.
        wanted = set(self.upids[-TASK_LIST_CHECKED:])
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {n: {e["upid"] for e in cluster_tasks(str(self.cluster.mount(n)), 1000).tasks
                        if e.get("status") == "OK"} for n in self.managers}
            complete = all(wanted <= upids for upids in seen.values())
            if complete or time.monotonic() > deadline:
                listed = min(len(wanted & upids) for upids in seen.values())
                return (f"cluster task list: {listed} of {len(wanted)} migration tasks listed "
                        f"OK on every node")
            await asyncio.sleep(0.2)


async def run_corral_groups(args: argparse.Namespace, cluster: DemoCluster) -> list[CaseResult]:
    bench = CorralBench(cluster, args.guest_dir, args.quick)
    results: list[CaseResult] = []
    for size in args.sizes:
        for workload in args.workloads:
            for storage in args.storages:
                results += await bench.run_group(size, workload == "dirty", storage,
                                                 args.transports, args.repeats)
    print(await bench.check_task_list(), flush=True)
    return results


def run_corral(args: argparse.Namespace, workdir: Path) -> list[CaseResult]:
    """Build a 2-node cluster, run every group through Corral, tear the cluster down."""
    try:
        import corral.guests.migrate  # noqa: F401
    except ImportError:
        print("corral: corral.guests.migrate is missing: no Corral column", flush=True)
        return []
    # The baseline runs TCG (KVM does not boot a guest on this host); so do both nodes,
    # which inherit this (the probe would otherwise take 10 s and could differ).
    os.environ["CORRAL_ACCEL"] = "tcg"
    cluster = DemoCluster(2, str(workdir / "cluster"), prefix="crl-mig", use_netns=False,
                           stats_interval_s=60)
    try:
        cluster.setup_network()
        cluster.build()
        cluster.write_storage_cfg()
        return asyncio.run(run_corral_groups(args, cluster))
    finally:
        cluster.close()


# --- report -----------------------------------------------------------------------------


def summarize(result: CaseResult) -> dict[str, Any]:
    runs = result.ok_runs()

    def med(name: str) -> float | None:
        values = [float(getattr(run, name)) for run in runs if getattr(run, name) is not None]
        return median(values)

    return {"system": result.system, "case": asdict(result.case), "label": result.case.label,
            "runs": len(result.runs), "failed": len(result.runs) - len(runs),
            "errors": sorted({run.error for run in result.runs if not run.ok}),
            "total_ms": med("total_ms"), "downtime_ms": med("downtime_ms"),
            "pause_ms": med("pause_ms"), "resume_ms": med("resume_ms"),
            "effective_downtime_ms": med("effective_downtime_ms"),
            "downtime_ms_max": max((run.downtime_ms for run in runs), default=None),
            "ram_mib": (med("ram_bytes") or 0) / 2**20, "disk_mib": (med("disk_bytes") or 0) / 2**20,
            "mirror_ms": med("mirror_ms"), "wall_ms": med("wall_ms"),
            "start_overhead_ms": med("start_overhead_ms"),
            "finish_overhead_ms": med("finish_overhead_ms"),
            "rename_ms": med("rename_ms"), "request_ms": med("request_ms")}


def totals(results: list[CaseResult]) -> str:
    """Failed migrations and the orchestration overhead (start + finish) over all cases."""
    lines = []
    for system in ("plain", "corral"):
        mine = [r for r in results if r.system == system]
        runs = [run for r in mine for run in r.runs]
        if not runs:
            lines.append(f"{system}: no runs")
            continue
        ok = [run for run in runs if run.ok]
        overhead = [float(run.start_overhead_ms or 0) + float(run.finish_overhead_ms or 0)
                    for run in ok]
        lines.append(f"{system}: {len(runs) - len(ok)} failed of {len(runs)} migrations; "
                     f"command-to-migrate + completed-to-done median {_fmt(median(overhead))} ms "
                     f"(min {_fmt(min(overhead, default=None))}, max "
                     f"{_fmt(max(overhead, default=None))})")
    extra = _extra_overhead(results)
    if extra:
        lines.append(f"corral - plain, same case (medians): median {_fmt(median(extra))} ms "
                     f"(min {_fmt(min(extra))}, max {_fmt(max(extra))}, {len(extra)} cases)")
    return "\n".join(lines)


def _extra_overhead(results: list[CaseResult]) -> list[float]:
    """Per case: Corral's median start + finish minus the plain driver's."""
    def overhead(result: CaseResult) -> float | None:
        return median([float(run.start_overhead_ms or 0) + float(run.finish_overhead_ms or 0)
                       for run in result.ok_runs()])

    plain = {r.case: overhead(r) for r in results if r.system == "plain"}
    extra = []
    for result in results:
        ours, theirs = overhead(result), plain.get(result.case)
        if result.system == "corral" and ours is not None and theirs is not None:
            extra.append(ours - theirs)
    return extra


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}"


def _pair(plain: dict[str, Any], corral: dict[str, Any], name: str, digits: int = 0,
          ratio: bool = True) -> str:
    text = f"{_fmt(plain.get(name), digits)} / {_fmt(corral.get(name), digits)}"
    return f"{text} ({_ratio(corral.get(name), plain.get(name))})" if ratio else text


def table(summaries: list[dict[str, Any]]) -> str:
    """Markdown: one row per case, plain / Corral (ratio Corral/plain) in each cell."""
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for summary in summaries:
        by_label.setdefault(summary["label"], {})[summary["system"]] = summary
    lines = ["| Case | total ms | QEMU downtime ms | downtime + resume ms | guest pause ms | "
             "RAM sent MiB | disk mirrored MiB | command to migrate ms | completed to done ms | "
             "wall ms | runs (failed) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, systems in by_label.items():
        plain, corral = systems.get("plain", {}), systems.get("corral", {})
        lines.append(
            f"| {label} | {_pair(plain, corral, 'total_ms')} | "
            f"{_pair(plain, corral, 'downtime_ms')} | "
            f"{_pair(plain, corral, 'effective_downtime_ms')} | {_pair(plain, corral, 'pause_ms')} | "
            f"{_pair(plain, corral, 'ram_mib', 1, ratio=False)} | "
            f"{_pair(plain, corral, 'disk_mib', 0, ratio=False)} | "
            f"{_pair(plain, corral, 'start_overhead_ms')} | "
            f"{_pair(plain, corral, 'finish_overhead_ms')} | {_pair(plain, corral, 'wall_ms')} | "
            f"{plain.get('runs', 0)} ({plain.get('failed', 0)}) / "
            f"{corral.get('runs', 0)} ({corral.get('failed', 0)}) |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB guests only, 256 MiB disk, 1 repeat unless --repeats")
    parser.add_argument("--repeats", type=int, default=None, help="migrations per case (default 3, quick 1)")
    parser.add_argument("--sizes", default=None, help="guest sizes in MiB, e.g. 256,1024")
    parser.add_argument("--workloads", default="idle,dirty")
    parser.add_argument("--storages", default="shared,local")
    parser.add_argument("--transports", default="tls,insecure")
    parser.add_argument("--only", choices=("plain", "corral"), default=None,
                        help="run one system only (the other column reads n/a)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--guest-dir", default=os.environ.get("CORRAL_TEST_GUEST_DIR",
                                                              DEFAULT_TEST_GUEST_DIR))
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.sizes = [int(s) for s in (args.sizes or ("256" if args.quick else "256,1024")).split(",")]
    for name, allowed in (("workloads", {"idle", "dirty"}), ("storages", {"shared", "local"}),
                          ("transports", {"tls", "insecure"})):
        values = [v for v in getattr(args, name).split(",") if v]
        if not values or set(values) - allowed:
            parser.error(f"--{name}: choose from {','.join(sorted(allowed))}")
        setattr(args, name, values)
    if args.repeats < 1 or any(size < 64 for size in args.sizes):
        parser.error("--repeats must be >= 1 and sizes >= 64 MiB")
    return args


@contextmanager
def workdir_for(args: argparse.Namespace) -> Iterator[Path]:
    if args.workdir:
        path = Path(args.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="crl-mig-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def run_plain(args: argparse.Namespace, workdir: Path) -> list[CaseResult]:
    results: list[CaseResult] = []
    for size in args.sizes:
        for workload in args.workloads:
            for storage in args.storages:
                group_dir = workdir / f"p{size}-{workload}-{storage}"   # short: socket paths
                group_dir.mkdir()
                bench = PlainBench(group_dir, args.guest_dir, args.quick)
                results += await bench.run_group(size, workload == "dirty", storage,
                                                 args.transports, args.repeats)
                shutil.rmtree(group_dir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # The build script is idempotent: it installs what it needs and builds once.
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "build-test-guest.sh")
    if subprocess.run([script, args.guest_dir], check=False).returncode != 0:
        print(f"cannot build the test guest in {args.guest_dir} ({script})", file=sys.stderr)
        return 2
    load_before = load_average()
    started = time.monotonic()
    with workdir_for(args) as workdir:
        results = asyncio.run(run_plain(args, workdir)) if args.only != "corral" else []
        if args.only != "plain":
            results += run_corral(args, workdir)
    summaries = [summarize(result) for result in results]
    print()
    print(table(summaries))
    print()
    print(totals(results))
    print(f"\nload average before {load_before}, after {load_average()}; "
          f"{time.monotonic() - started:.0f} s")
    if args.json:
        report = {"argv": sys.argv[1:] if argv is None else argv, "load_before": load_before,
                  "load_after": load_average(), "summaries": summaries,
                  "runs": [{"system": r.system, "label": r.case.label,
                            "runs": [asdict(run) for run in r.runs]} for r in results]}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    failed = sum(len(result.runs) - len(result.ok_runs()) for result in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
