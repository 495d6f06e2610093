"""Plain QEMU ping-pong migrations of the test guest, without Corral (no corrald, no
tree, no tasks): two QEMUs on 127.0.0.1 started the same way as guests, the same QMP
sequence as the reference, and a check of the guest's serial output after each move for
a kernel oops. Shows whether a guest crash seen in the migration tests is QEMU's (TCG)
or Corral's. Not a pytest module.

    .venv/bin/python -m tests.guests.plain_qemu_pingpong [ROUNDS] [--no-caps] [--disk]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tests.guests.migration_env import CRASH_MARKERS

from corral.guests.config import VmConfig
from corral.guests.mtunnel import qmp_call
from corral.guests.qemu import DEFAULT_TEST_GUEST_DIR, GuestManager
from corral.guests.qmp import QmpError

VMID = 100


class Serial:
    """Lines of each QEMU's serial socket (reconnecting as QEMUs come and go)."""

    def __init__(self, paths: list[str]) -> None:
        self.lines: list[list[str]] = [[] for _ in paths]
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
                    buffer = b""
                    while not self.stop.is_set():
                        try:
                            data = sock.recv(4096)
                        except TimeoutError:
                            continue
                        if not data:
                            break
                        *lines, buffer = (buffer + data).split(b"\n")
                        self.lines[index] += [line.decode(errors="replace").strip()
                                              for line in lines]
            except OSError:
                time.sleep(0.05)


async def move(source: GuestManager, target: GuestManager, config: VmConfig,
               capabilities: bool) -> str:
    await target.spawn(VMID, [*target.build_command(VMID, config, "tcg"),
                              "-incoming", "defer", "-S"])
    source_qmp, target_qmp = source.qmp_path(VMID), target.qmp_path(VMID)
    caps = [{"capability": name, "state": capabilities} for name in ("xbzrle", "auto-converge")]
    for path in (source_qmp, target_qmp):
        await qmp_call(path, "migrate-set-capabilities", capabilities=caps)
    await qmp_call(target_qmp, "migrate-incoming", uri="tcp:127.0.0.1:0")
    port = (await qmp_call(target_qmp, "query-migrate"))["socket-address"][0]["port"]
    await qmp_call(source_qmp, "migrate-set-parameters",
                   **{"downtime-limit": 100, "max-bandwidth": 16 << 30})
    await qmp_call(source_qmp, "migrate", uri=f"tcp:127.0.0.1:{port}")
    while (status := (await qmp_call(source_qmp, "query-migrate"))["status"]) not in (
            "completed", "failed", "cancelled"):
        await asyncio.sleep(0.05)
    await qmp_call(target_qmp, "cont")
    try:
        await qmp_call(source_qmp, "quit")
    except QmpError:
        pass                   # QEMU may close the socket before answering quit
    return str(status)


async def main(rounds: int, capabilities: bool, disk: bool) -> int:
    guest_dir = os.environ.get("CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
    workdir = tempfile.mkdtemp(prefix="crl-mig-plain-")
    with open(os.path.join(workdir, "storage.cfg"), "w", encoding="utf-8") as handle:
        handle.write(f"dir: local\n\tpath {workdir}/store\n\tcontent images\n")
    managers = [GuestManager(workdir, f"n{i}", f"{workdir}/run{i}", f"{workdir}/tasks{i}")
                for i in (0, 1)]
    config = VmConfig()
    config.set("memory", "128")
    config.set("serial0", "socket")
    config.set("args", f"-kernel {guest_dir}/vmlinuz -initrd {guest_dir}/initrd.img -append "
               "'console=ttyS0 quiet panic=-1 corral.dirty=32 corral.period=0.1'")
    if disk:
        os.makedirs(f"{workdir}/store/images/{VMID}")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                        f"{workdir}/store/images/{VMID}/vm-{VMID}-disk-0.raw", "64M"], check=True)
        config.set("scsi0", f"local:{VMID}/vm-{VMID}-disk-0.raw,format=raw")
    serial = Serial([m.serial_path(VMID) for m in managers])
    crashed = 0
    try:
        await managers[0].spawn(VMID, managers[0].build_command(VMID, config, "tcg"))
        await asyncio.sleep(12)                      # boot to the counter loop
        for index in range(rounds):
            source, target = index % 2, 1 - index % 2
            mark = len(serial.lines[target])
            status = await move(managers[source], managers[target], config, capabilities)
            await asyncio.sleep(2.5)
            new = serial.lines[target][mark:]
            oops = [line for line in new if any(m in line for m in CRASH_MARKERS)]
            counters = [line for line in new if line.startswith("corral-counter")]
            print(f"move {index}: {status}, last {counters[-1:]}, oops {oops[:1]}", flush=True)
            if oops:
                crashed += 1
                break
    finally:
        serial.stop.set()
        for manager in managers:
            pid = manager.pid(VMID)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
    return crashed


if __name__ == "__main__":
    arguments = sys.argv[1:]
    count = int(arguments[0]) if arguments and arguments[0].isdigit() else 40
    sys.exit(asyncio.run(main(count, "--no-caps" not in arguments, "--disk" in arguments)))
