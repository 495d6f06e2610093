"""Plain QEMU ping-pong migrations of the test guest, without Corral (no corrald, no
tree, no tasks): two QEMUs on 127.0.0.1 started the same way as guests, the same QMP
sequence as the reference, and a check of the guest's serial output after each move.
Shows whether a guest crash seen in the migration tests is QEMU's (TCG) or Corral's, and
measures guest/QEMU variants against the post-migration guest crash (issue 6). Not a
pytest module.

    .venv/bin/python -m tests.guests.plain_qemu_pingpong [ROUNDS] [--no-caps | --caps LIST]
        [--disk] [--append 'KERNEL ARGS'] [--base-append 'ARGS'] [--qemu 'QEMU ARGS']
        [--cpu MODEL] [--machine M] [--cores N] [--keep-going] [--verify-ram]
        [--bandwidth-mib N] [--label NAME] [--log FILE]

A move fails when the guest prints a kernel crash line (CRASH_MARKERS, or an RCU stall)
or its counter does not go on within SETTLE_S on the target. On a failure the serial
lines around it, QMP query-status, `info registers`/`info lapic`/`info irq` go to the
log, the guest gets RESUME_WAIT_S to come back, then a QMP stop/cont is tried; then (with
--keep-going) both QEMUs are killed, a fresh guest boots and the moves continue.
--verify-ram dumps the guest RAM of the stopped source and of the loaded, not yet running
target (pmemsave) and counts the pages that differ: a correct migration has none, so this
sees a lost guest write even when the guest does not crash. A lower --bandwidth-mib
makes more dirty-sync rounds per move, which makes lost writes much more frequent. The
last line printed is a one-line summary: variant, moves, failures, failure kinds.

Finding (issue 6): QEMU 7.2's TCG loses guest writes during live migration when the RAM
size is a multiple of 256 KiB (every `-m N` in MiB): the 64-pages-at-a-time fast path of
the dirty-bitmap sync clears dirty bits without re-arming TCG's TLB dirty tracking
(fixed upstream for QEMU 9.0: "physmem: Fix migration dirty bitmap coherency with TCG
memory access"). A RAM size that is not such a multiple (e.g. `--qemu '-m 131080K'`,
128 MiB + 8 KiB) takes the per-page path and showed no lost page and no crash.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from tests.guests.migration_env import CRASH_MARKERS

from corral.guests.config import VmConfig
from corral.guests.mtunnel import qmp_call
from corral.guests.qemu import DEFAULT_TEST_GUEST_DIR, GuestManager
from corral.guests.qmp import QmpError

VMID = 100
BASE_APPEND = "console=ttyS0 quiet panic=-1 corral.dirty=32 corral.period=0.1"
BOOT_TIMEOUT_S = 90.0        # TCG boot to the first counter line on a loaded box
SETTLE_S = 20.0              # the counter must go on within this after `cont`
LINGER_S = 2.5               # then watch this long for a late crash line
RESUME_WAIT_S = 30.0         # after a failure: does the guest come back by itself?
STOP_CONT_WAIT_S = 15.0      # and after a QMP stop/cont?
STALL_MARKERS = (*CRASH_MARKERS, "rcu_sched detected stall", "rcu: INFO:",
                 "self-detected stall", "hung_task", "watchdog: BUG")
PAGE_BYTES = 4096
ALL_CAPS = ("xbzrle", "auto-converge")    # what Corral (and the reference) turn on
COUNTER_RE = re.compile(r"corral-counter (\d+)")


class Serial:
    """Lines of each QEMU's serial socket (reconnecting as QEMUs come and go), each with
    its arrival time; input can be written to the current connection."""

    def __init__(self, paths: list[str]) -> None:
        self.lines: list[list[tuple[float, str]]] = [[] for _ in paths]
        self.sockets: list[socket.socket | None] = [None for _ in paths]
        self.stop = threading.Event()
        for index, path in enumerate(paths):
            threading.Thread(target=self._watch, args=(index, path), daemon=True).start()

    def _watch(self, index: int, path: str) -> None:
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(1.0)
                    sock.connect(path)
                    sock.settimeout(0.2)
                    self.sockets[index] = sock
                    self._read(index, sock)
            except OSError:
                time.sleep(0.05)
            finally:
                self.sockets[index] = None

    def _read(self, index: int, sock: socket.socket) -> None:
        buffer = b""
        while not self.stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return
            *lines, buffer = (buffer + data).split(b"\n")
            now = time.monotonic()
            self.lines[index] += [(now, line.decode(errors="replace").strip())
                                  for line in lines]

    def send(self, index: int, data: bytes) -> bool:
        sock = self.sockets[index]
        if sock is None:
            return False
        try:
            sock.sendall(data)
        except OSError:
            return False
        return True

    def last_counter(self, index: int, since: int = 0) -> int | None:
        for _, text in reversed(self.lines[index][since:]):
            if (match := COUNTER_RE.search(text)) is not None:
                return int(match.group(1))
        return None


@dataclass
class Variant:
    """What is measured: the guest kernel command line and QEMU options on top of the
    shared test guest's."""

    label: str
    base_append: str
    append: str
    qemu_args: list[str]
    cpu: str | None
    machine: str | None
    cores: int
    capabilities: tuple[str, ...]     # migration capabilities turned on
    disk: bool

    def describe(self) -> str:
        parts = [f"append='{self.append}'" if self.append else "",
                 f"qemu='{shlex.join(self.qemu_args)}'" if self.qemu_args else "",
                 f"cpu={self.cpu}" if self.cpu else "", f"machine={self.machine}"
                 if self.machine else "", f"cores={self.cores}" if self.cores != 1 else "",
                 "" if self.capabilities == ALL_CAPS else
                 f"caps={','.join(self.capabilities) or 'off'}", "disk" if self.disk else ""]
        return " ".join(p for p in parts if p) or "baseline"


@dataclass
class Tally:
    moves: int = 0
    failures: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    boots: int = 0
    migrate_ms: list[int] = field(default_factory=list)
    ram_diff_moves: int = 0       # moves after which the target's RAM differed
    ram_diff_pages: int = 0


def guest_config(variant: Variant, guest_dir: str, workdir: str) -> VmConfig:
    config = VmConfig()
    config.set("memory", "128")
    config.set("serial0", "socket")
    if variant.cpu:
        config.set("cpu", variant.cpu)
    if variant.machine:
        config.set("machine", variant.machine)
    if variant.cores != 1:
        config.set("cores", str(variant.cores))
    append = f"{variant.base_append} {variant.append}".strip()
    config.set("args", f"-kernel {guest_dir}/vmlinuz -initrd {guest_dir}/initrd.img "
               f"-append {shlex.quote(append)}")
    if variant.disk:
        os.makedirs(f"{workdir}/store/images/{VMID}", exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                        f"{workdir}/store/images/{VMID}/vm-{VMID}-disk-0.raw", "64M"], check=True)
        config.set("scsi0", f"local:{VMID}/vm-{VMID}-disk-0.raw,format=raw")
    return config


def qemu_command(manager: GuestManager, config: VmConfig, variant: Variant) -> list[str]:
    """The guest's command line plus the variant's QEMU args (an explicit -accel replaces
    the machine's accel=, which QEMU refuses to combine with it)."""
    command = manager.build_command(VMID, config, "tcg")
    if "-accel" in variant.qemu_args:
        command = [re.sub(r",accel=tcg\b", "", arg) for arg in command]
    return command + variant.qemu_args


class PingPong:
    """Two nodes' QEMUs, the serial watcher and the move loop of one variant."""

    def __init__(self, variant: Variant, log: TextIO) -> None:
        self.variant = variant
        self.log = log
        guest_dir = os.environ.get("CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
        self.workdir = tempfile.mkdtemp(prefix="crl-g3-pingpong-")
        with open(os.path.join(self.workdir, "storage.cfg"), "w", encoding="utf-8") as handle:
            handle.write(f"dir: local\n\tpath {self.workdir}/store\n\tcontent images\n")
        self.managers = [GuestManager(self.workdir, f"n{i}", f"{self.workdir}/run{i}",
                                      f"{self.workdir}/tasks{i}") for i in (0, 1)]
        self.config = guest_config(variant, guest_dir, self.workdir)
        self.serial = Serial([m.serial_path(VMID) for m in self.managers])
        self.marks = [0, 0]           # serial lines already scanned, per node
        self.tally = Tally()
        self.move_mark = 0            # target's serial lines before the current move
        self.verify_ram = False       # compare source and target RAM before `cont`
        self.bandwidth_bytes = 16 << 30   # per second; lower = more dirty-sync rounds

    def note(self, text: str) -> None:
        self.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.log.flush()

    def kill_all(self) -> None:
        for manager in self.managers:
            pid = manager.pid(VMID)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)

    async def boot(self) -> None:
        """A fresh guest on node 0, up to its counter loop."""
        self.kill_all()
        await asyncio.sleep(0.5)
        mark = len(self.serial.lines[0])
        command = qemu_command(self.managers[0], self.config, self.variant)
        if self.tally.boots == 0:
            self.note(f"command: {shlex.join(command)}")
        await self.managers[0].spawn(VMID, command)
        self.tally.boots += 1
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.serial.last_counter(0, mark) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest did not boot in {BOOT_TIMEOUT_S} s: "
                                   f"{self.serial.lines[0][mark:][-20:]}")
            await asyncio.sleep(0.2)
        self.marks = [len(self.serial.lines[0]), len(self.serial.lines[1])]

    async def migrate(self, source: int, target: int) -> tuple[str, dict[str, Any]]:
        src, dst = self.managers[source], self.managers[target]
        await dst.spawn(VMID, [*qemu_command(dst, self.config, self.variant),
                               "-incoming", "defer", "-S"])
        source_qmp, target_qmp = src.qmp_path(VMID), dst.qmp_path(VMID)
        caps = [{"capability": name, "state": name in self.variant.capabilities}
                for name in ALL_CAPS]
        for path in (source_qmp, target_qmp):
            await qmp_call(path, "migrate-set-capabilities", capabilities=caps)
        await qmp_call(target_qmp, "migrate-incoming", uri="tcp:127.0.0.1:0")
        port = (await qmp_call(target_qmp, "query-migrate"))["socket-address"][0]["port"]
        await qmp_call(source_qmp, "migrate-set-parameters",
                       **{"downtime-limit": 100, "max-bandwidth": self.bandwidth_bytes})
        await qmp_call(source_qmp, "migrate", uri=f"tcp:127.0.0.1:{port}")
        while (info := await qmp_call(source_qmp, "query-migrate"))["status"] not in (
                "completed", "failed", "cancelled"):
            await asyncio.sleep(0.05)
        if info["status"] == "completed":
            if self.verify_ram:
                info["ram_diff"] = await self.compare_ram(source_qmp, target_qmp)
            await qmp_call(target_qmp, "cont")
        try:
            await qmp_call(source_qmp, "quit")
        except QmpError:
            pass               # QEMU may close the socket before answering quit
        return str(info["status"]), info

    async def compare_ram(self, source_qmp: str, target_qmp: str) -> list[int]:
        """Guest-physical addresses of the pages that differ between the stopped source
        and the loaded, not yet running target: a correct migration has none."""
        while (await qmp_call(target_qmp, "query-migrate")).get("status") != "completed":
            await asyncio.sleep(0.05)
        size = (await qmp_call(source_qmp, "query-memory-size-summary"))["base-memory"]
        dumps = [f"/dev/shm/crl-g3-ram-{os.getpid()}-{side}.bin" for side in ("src", "dst")]
        try:
            for qmp, path in zip((source_qmp, target_qmp), dumps, strict=True):
                await qmp_call(qmp, "pmemsave", val=0, size=size, filename=path)
            return await asyncio.to_thread(differing_pages, dumps[0], dumps[1])
        finally:
            for path in dumps:
                if os.path.exists(path):
                    os.unlink(path)

    def scan(self) -> list[tuple[int, float, str]]:
        """Non-counter lines printed on either node since the last scan."""
        found = []
        for node in (0, 1):
            lines = self.serial.lines[node]
            found += [(node, stamp, text) for stamp, text in lines[self.marks[node]:]
                      if text and not COUNTER_RE.search(text)]
            self.marks[node] = len(lines)
        return found

    async def wait_progress(self, target: int, above: int, timeout_s: float) -> float | None:
        """Seconds until the target's counter passed `above` by 3, or None."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            value = self.serial.last_counter(target)
            if value is not None and value > above + 3:
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        return None

    async def one_move(self, index: int, source: int) -> str | None:
        """One migration; the failure kind, or None when the guest went on cleanly."""
        target = 1 - source
        self.move_mark = len(self.serial.lines[target])
        before = self.serial.last_counter(source) or 0
        started = time.monotonic()
        status, info = await self.migrate(source, target)
        moved_ms = int((time.monotonic() - started) * 1000)
        self.tally.migrate_ms.append(moved_ms)
        if status != "completed":
            return f"migration {status}"
        diff = info.get("ram_diff", [])
        if diff:
            self.tally.ram_diff_moves += 1
            self.tally.ram_diff_pages += len(diff)
            self.note(f"move {index}: {len(diff)} pages differ source/target: "
                      f"{[hex(a) for a in diff[:20]]}")
        progress = await self.wait_progress(target, before, SETTLE_S)
        await asyncio.sleep(LINGER_S)
        lines = self.scan()
        for node, _, text in lines:
            self.note(f"move {index} node{node}: {text}")
        crash = [text for _, _, text in lines if any(m in text for m in STALL_MARKERS)]
        print(f"move {index}: {status} {moved_ms} ms downtime {info.get('downtime')} ms, "
              f"{f'RAM DIFF {len(diff)} pages, ' if diff else ''}"
              f"counter {self.serial.last_counter(target)}"
              f"{'' if progress is None else f' (+{progress:.1f} s)'}"
              f"{f', crash {crash[0]!r}' if crash else ''}", flush=True)
        if crash:
            return classify(crash[0]) + ("" if progress is not None else ", stuck")
        if progress is None:
            return "silent"
        return None

    async def diagnose(self, index: int, target: int, kind: str) -> str:
        """Log what the failed guest shows; whether it comes back by itself."""
        qmp = self.managers[target].qmp_path(VMID)
        self.note(f"FAILURE move {index}: {kind}")
        for node in (0, 1):
            tail = self.serial.lines[node][-60:]
            self.note(f"last serial lines node{node}:\n" + "\n".join(
                f"  {stamp:.1f} {text}" for stamp, text in tail))
        rips = []
        try:
            self.note(f"query-status: {await qmp_call(qmp, 'query-status')}")
            for _ in range(3):
                regs = await qmp_call(qmp, "human-monitor-command",
                                      **{"command-line": "info registers"})
                rip = re.search(r"RIP=([0-9a-f]+)", regs)
                halted = re.search(r"HLT=(\d)", regs)
                rips.append(f"{rip.group(1) if rip else '?'}"
                            f"{' hlt' if halted and halted.group(1) == '1' else ''}")
                self.note("info registers:\n" + regs)
                await asyncio.sleep(1)
        except (OSError, QmpError) as error:
            self.note(f"QMP failed: {error!r}")
        await self.monitor(qmp, "info lapic", "info pic", "info irq")
        self.serial.send(target, b"\r\n")
        before = self.serial.last_counter(target) or 0
        back = await self.wait_progress(target, before, RESUME_WAIT_S)
        verdict = (f"resumed after {back:.0f} s" if back is not None
                   else f"no progress in {RESUME_WAIT_S:.0f} s")
        outcome = "resumed" if back is not None else "stuck"
        if back is None:
            # Does a stop/cont of the vCPUs (QEMU re-arms its clocks and timers) bring
            # it back? Then the guest's state is fine and a wakeup was lost in QEMU.
            await self.monitor(qmp, "info lapic", "info irq")
            try:
                await qmp_call(qmp, "stop")
                await asyncio.sleep(0.5)
                await qmp_call(qmp, "cont")
            except (OSError, QmpError) as error:
                self.note(f"stop/cont failed: {error!r}")
            again = await self.wait_progress(target, before, STOP_CONT_WAIT_S)
            verdict += ("; stop/cont revived it" if again is not None
                        else f"; stop/cont did not help in {STOP_CONT_WAIT_S:.0f} s")
            outcome = "stuck, stop/cont revives" if again is not None else "stuck"
        for node, _, text in self.scan():
            self.note(f"after move {index} node{node}: {text}")
        if any("corral-guest up" in text for _, text in self.serial.lines[target][self.move_mark:]):
            verdict, outcome = verdict + "; the guest kernel panicked and rebooted", "rebooted"
        self.note(f"RIP samples {rips}; {verdict}")
        print(f"  diagnosis: RIP {rips}, {verdict}", flush=True)
        return outcome

    async def monitor(self, qmp: str, *commands: str) -> None:
        for command in commands:
            try:
                text = await qmp_call(qmp, "human-monitor-command", **{"command-line": command})
                self.note(f"{command}:\n{text}")
            except (OSError, QmpError) as error:
                self.note(f"{command} failed: {error!r}")

    async def run(self, rounds: int, keep_going: bool) -> Tally:
        try:
            await self.boot()
            source = 0
            for index in range(rounds):
                kind = await self.one_move(index, source)
                self.tally.moves += 1
                source = 1 - source
                if kind is not None:
                    self.tally.failures += 1
                    after = await self.diagnose(index, source, kind)
                    self.tally.kinds[f"{kind} ({after})"] += 1
                    if not keep_going:
                        break
                    await self.boot()          # a fresh guest, on node 0
                    source = 0
        finally:
            self.serial.stop.set()
            self.kill_all()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.tally


def differing_pages(first: str, second: str, chunk: int = 1 << 20) -> list[int]:
    """Offsets of the 4 KiB pages that differ between two equally long files."""
    found: list[int] = []
    with open(first, "rb") as one, open(second, "rb") as two:
        offset = 0
        while True:
            a, b = one.read(chunk), two.read(chunk)
            if not a and not b:
                return found
            if a != b:
                found += [offset + page for page in range(0, max(len(a), len(b)), PAGE_BYTES)
                          if a[page:page + PAGE_BYTES] != b[page:page + PAGE_BYTES]]
            offset += chunk


def classify(line: str) -> str:
    lowered = line.lower()
    for needle, kind in (("soft lockup", "soft lockup"), ("stall", "rcu stall"),
                         ("hung_task", "hung task"), ("kernel panic", "panic"),
                         ("general protection", "gpf"), ("oops", "oops")):
        if needle in lowered:
            return kind
    return f"BUG: {line.split('BUG:')[-1].strip()[:40]}" if "BUG:" in line else line[:40]


def parse(arguments: list[str]) -> tuple[int, Variant, bool, str, bool, int]:
    parser = argparse.ArgumentParser(prog="plain_qemu_pingpong")
    parser.add_argument("rounds", nargs="?", type=int, default=40)
    parser.add_argument("--no-caps", action="store_true", help="xbzrle/auto-converge off")
    parser.add_argument("--caps", help="comma-separated capabilities to turn on "
                        "(default: xbzrle,auto-converge)")
    parser.add_argument("--disk", action="store_true")
    parser.add_argument("--append", default="", help="extra guest kernel arguments")
    parser.add_argument("--base-append", default=BASE_APPEND)
    parser.add_argument("--qemu", default="", help="extra QEMU arguments (shell-quoted)")
    parser.add_argument("--cpu")
    parser.add_argument("--machine")
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--keep-going", action="store_true")
    parser.add_argument("--bandwidth-mib", type=int, default=16 << 10,
                        help="migration max-bandwidth in MiB/s (default 16384)")
    parser.add_argument("--verify-ram", action="store_true",
                        help="dump and compare source/target RAM before `cont` (pmemsave)")
    parser.add_argument("--label", default="")
    parser.add_argument("--log", default="", help="full log (default: a temporary file)")
    args = parser.parse_args(arguments)
    caps = () if args.no_caps else ALL_CAPS if args.caps is None else tuple(
        name for name in args.caps.split(",") if name)
    unknown = set(caps) - set(ALL_CAPS)
    if unknown:
        parser.error(f"unknown capabilities {sorted(unknown)}; known: {', '.join(ALL_CAPS)}")
    variant = Variant(args.label, args.base_append, args.append, shlex.split(args.qemu),
                      args.cpu, args.machine, args.cores, caps, args.disk)
    variant.label = args.label or variant.describe()
    log = args.log or tempfile.mkstemp(prefix="crl-g3-pingpong-", suffix=".log")[1]
    return (args.rounds, variant, args.keep_going, log, args.verify_ram,
            args.bandwidth_mib << 20)


async def main(arguments: list[str]) -> int:
    rounds, variant, keep_going, log_path, verify_ram, bandwidth = parse(arguments)
    with open(log_path, "a", encoding="utf-8") as log:
        pingpong = PingPong(variant, log)
        pingpong.verify_ram = verify_ram
        pingpong.bandwidth_bytes = bandwidth
        pingpong.note(f"variant {variant.label}: {variant.describe()}, {rounds} rounds")
        started = time.monotonic()
        tally = await pingpong.run(rounds, keep_going)
        ms = sorted(tally.migrate_ms) or [0]
        summary = (f"SUMMARY variant={variant.label!r} moves={tally.moves} "
                   f"failures={tally.failures} kinds={dict(tally.kinds)} boots={tally.boots} "
                   f"{f'ram_diff_moves={tally.ram_diff_moves} ram_diff_pages={tally.ram_diff_pages} ' if verify_ram else ''}"
                   f"migrate_ms_p50={ms[len(ms) // 2]} minutes={(time.monotonic() - started) / 60:.1f} "
                   f"load={os.getloadavg()[0]:.1f} bw={bandwidth >> 20}MiB/s "
                   f"[{variant.describe()}] log={log_path}")
        pingpong.note(summary)
    print(summary, flush=True)
    return 1 if tally.failures else 0


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)      # so the QEMUs are killed on the way out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(asyncio.run(main(sys.argv[1:])))
