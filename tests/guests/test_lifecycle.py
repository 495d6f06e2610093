"""A real test guest (scripts/build-test-guest.sh) under QEMU: the KVM probe decides the
accelerator and status reports it; the guest's serial counter increases while running,
stops while suspended and continues after resume; status fields come from /proc and
QMP (cpu is the recent use, not the average since start; maxdisk, mem, zero network
counters without a NIC); QEMU runs in its own session (a daemon restart does not touch
it); QMP commands, errors and events (a status poll answered by the second monitor while
a client holds the main one; the main one for guests started without it); a guest ignoring the power button makes shutdown time out without
--forceStop and is force-stopped with it; reboot gives a new QEMU; a TCG guest on QEMU < 9.0 gets 8 KiB more RAM (the
dirty-sync workaround); a guest handling the
power button shuts down cleanly; destroy removes volumes and config. One guest boot plus one
reboot and one KVM probe, to stay cheap on a loaded 2-core box."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.guests.qemu import (
    DEFAULT_TEST_GUEST_DIR,
    TCG_DIRTY_SYNC_FIXED_IN,
    TCG_RAM_PAD_KIB,
    GuestError,
    GuestManager,
    memory_arg,
    qemu_version,
)
from corral.guests.qmp import QmpClient, QmpError
from corral.guests.tasks import parse_upid

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = os.environ.get("CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
VMID = 100

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 missing (apt-get install qemu-system-x86)")


def _read_counter(path: str, duration_s: float) -> list[int]:
    """Counter values printed on the guest's serial socket during `duration_s`."""
    values: list[int] = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.settimeout(0.2)
        buffer = b""
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            try:
                buffer += sock.recv(4096)
            except TimeoutError:
                continue
        for line in buffer.decode(errors="replace").split("\n")[:-1]:   # complete lines only
            if line.startswith("corral-counter "):
                values.append(int(line.split()[1]))
    return values


def _wait_counter(path: str, timeout_s: float, above: int = -1) -> list[int]:
    """Counter values from the first read that saw a value above `above` (generous
    timeout: a TCG guest on a loaded box can stall for seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = _read_counter(path, 1.0)
        if values and max(values) > above:
            return values
    raise AssertionError(f"no counter above {above} on {path} within {timeout_s} s")


@pytest.fixture(scope="module")
def guest_image() -> str:
    subprocess.run([str(ROOT / "scripts/build-test-guest.sh"), GUEST_DIR], check=True,
                   capture_output=True, timeout=600)
    return GUEST_DIR


@pytest.fixture
def manager(tmp_path: Path, guest_image: str) -> Iterator[GuestManager]:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/storage.cfg").write_text(
        f"dir: local\n\tpath {tmp_path}/store\n\tcontent images\n")
    guests = GuestManager(str(tmp_path / "tree"), "n1", str(tmp_path / "run"),
                          str(tmp_path / "tasks"), test_guest_dir=guest_image)
    yield guests
    pid = guests.pid(VMID)
    if pid is not None:          # teardown even when the test failed half-way
        os.kill(pid, signal.SIGKILL)


def _args(image: str, acpi: bool) -> str:
    cmdline = "console=ttyS0 quiet panic=-1 corral.dirty=8 corral.period=0.1"
    return (f"-kernel {image}/vmlinuz -initrd {image}/initrd.img "
            f"-append '{cmdline}{'' if acpi else ' corral.noacpi'}'")


def _create(guests: GuestManager, image: str, acpi: bool = True) -> None:
    guests.create(VMID, {"name": "counter", "memory": "96", "serial0": "socket",
                         "virtio0": "local:0.0625,format=raw", "args": _args(image, acpi)})


def test_guest_lifecycle(manager: GuestManager, guest_image: str) -> None:
    os.environ.pop("CORRAL_ACCEL", None)
    _create(manager, guest_image, acpi=False)     # ignores the power button at first
    volume = manager.load_config(VMID).get("virtio0") or ""
    assert volume.startswith("local:100/vm-100-disk-0.raw")
    asyncio.run(manager.start(VMID))
    accel_cache = Path(manager.run_dir, "accel").read_text().split()[0]
    pid = manager.pid(VMID)
    assert pid is not None and os.getsid(pid) != os.getsid(0)
    with pytest.raises(GuestError, match="already running"):
        asyncio.run(manager.start(VMID))
    serial = manager.serial_path(VMID)
    before = _wait_counter(serial, 60.0)
    later = _wait_counter(serial, 30.0, above=max(before))

    status = asyncio.run(manager.status(VMID))
    assert status["status"] == "running" and status["qmpstatus"] == "running"
    assert status["pid"] == pid and status["accel"] == accel_cache
    assert status["maxmem"] == 96 << 20 and 0 < status["memhost"]
    assert status["cputime"] > 0 and status["uptime"] >= 0 and status["diskread"] > 0

    assert status["maxdisk"] == 64 << 20 and status["mem"] == status["memhost"]
    assert status["netin"] == status["netout"] == 0            # no NIC: 0, as the reference
    # TCG on QEMU < 9.0: 8 KiB more RAM than configured (the dirty-sync workaround)
    padded = accel_cache == "tcg" and qemu_version() < TCG_DIRTY_SYNC_FIXED_IN
    sizes = asyncio.run(manager.qmp(VMID, "query-memory-size-summary"))
    assert sizes["base-memory"] == (96 << 20) + (TCG_RAM_PAD_KIB << 10 if padded else 0)

    asyncio.run(manager.suspend(VMID))
    assert asyncio.run(manager.status(VMID))["qmpstatus"] == "paused"
    assert _read_counter(serial, 1.0) == []
    # cpu is the use since the previous sample (1 s of a paused guest), not the average
    # since start (which the busy boot keeps high)
    paused = asyncio.run(manager.status(VMID))
    average = paused["cputime"] / max(paused["uptime"], 1)
    assert paused["cpu"] < 0.3 and (average > 0.3 or paused["cpu"] < average), paused
    asyncio.run(manager.resume(VMID))
    resumed = _wait_counter(serial, 30.0)
    assert min(resumed) > max(later)

    with pytest.raises(GuestError, match="got timeout"):
        asyncio.run(manager.shutdown(VMID, timeout_s=1.0, force=False))
    failed = manager.tasks.list_tasks(1)[0]
    assert failed["type"] == "qmshutdown" and str(failed["status"]).startswith("ERROR: VM quit")
    assert manager.pid(VMID) == pid

    # the new QEMU started by reboot reads the changed config: power button handled
    manager.set_options(VMID, {"args": _args(guest_image, acpi=True)}, [])
    upid = asyncio.run(manager.reboot(VMID, timeout_s=0.5, force=True))
    assert manager.tasks.read_log(upid)[-1] == "TASK WARNINGS: 1"
    new_pid = manager.pid(VMID)
    assert new_pid is not None and new_pid != pid
    assert min(_wait_counter(serial, 60.0)) < max(resumed)    # a fresh boot counts from 1

    upid = asyncio.run(manager.shutdown(VMID, timeout_s=30.0, force=False))   # graceful
    assert manager.tasks.read_log(upid) == ["TASK OK"]
    assert manager.pid(VMID) is None
    assert asyncio.run(manager.status(VMID))["status"] == "stopped"
    assert parse_upid(str(upid)).task_type == "qmshutdown"

    asyncio.run(manager.destroy(VMID))
    assert not os.path.exists(manager.config_path(VMID))
    assert os.listdir(Path(manager.root).parent / "store/images/100") == []


def test_qmp_client_commands_errors_events(manager: GuestManager, guest_image: str) -> None:
    os.environ["CORRAL_ACCEL"] = "tcg"        # the probe already ran in the test above
    try:
        _create(manager, guest_image)
        asyncio.run(manager.start(VMID))
    finally:
        del os.environ["CORRAL_ACCEL"]

    async def exercise() -> None:
        async with QmpClient(manager.qmp_path(VMID)) as client:
            assert (await client.command("query-status"))["status"] == "running"
            with pytest.raises(QmpError, match="no-such-command: CommandNotFound"):
                await client.command("no-such-command")
            await client.command("stop")
            event = await client.wait_event("STOP", timeout_s=5.0)
            assert event["event"] == "STOP"
            await client.command("cont")
            assert (await client.wait_event("RESUME", timeout_s=5.0))["event"] == "RESUME"
            with pytest.raises(QmpError, match="timeout"):
                await client.wait_event("NEVER-HAPPENS", timeout_s=0.3)
            # a status poll while this client holds the main monitor: the second one answers
            status = await asyncio.wait_for(manager.status(VMID), 10.0)
            assert status["qmpstatus"] == "running"
        with pytest.raises(QmpError, match="cannot connect"):
            await QmpClient(manager.qmp_path(VMID) + ".missing").connect(timeout_s=1.0)
        # a guest started before the status monitor existed: polls use the main socket
        os.unlink(manager.status_qmp_path(VMID))
        assert (await manager.status(VMID))["qmpstatus"] == "running"

    asyncio.run(exercise())
    asyncio.run(manager.stop(VMID))
    assert manager.pid(VMID) is None
    with pytest.raises(GuestError, match="not running"):
        asyncio.run(manager.suspend(VMID))


def test_every_device_kind_is_accepted_by_qemu(manager: GuestManager, guest_image: str) -> None:
    """No guest OS: QEMU only has to accept the command line built from the config. The
    guest is started by a CLI process that exits, and found again by a new manager."""
    os.environ["CORRAL_ACCEL"] = "tcg"
    try:
        manager.create(VMID, {
            "memory": "64", "cores": "1", "sockets": "2", "cpu": "qemu64,flags=+aes;-sse4a",
            "scsi0": "local:0.01", "scsi1": "local:0.01,format=raw", "virtio1": "local:0.01",
            "ide0": "local:0.01", "ide2": "none,media=cdrom", "sata0": "local:0.01",
            "net0": "virtio=BC:24:11:00:00:01", "net1": "e1000=BC:24:11:00:00:02",
            "boot": "order=scsi0;net0", "serial0": "socket",
        })
        # started by a separate `corral qm` process that exits: the guest must outlive it
        # and a fresh manager must find it again through the pid file and QMP socket
        subprocess.run([sys.executable, "-m", "corral.guests.cli", "--root", manager.root,
                        "--node", "n1", "--run-dir", manager.run_dir, "--task-dir",
                        manager.tasks.task_dir, "start", str(VMID)], check=True, timeout=60,
                       capture_output=True)
    finally:
        del os.environ["CORRAL_ACCEL"]
    manager = GuestManager(manager.root, "n1", manager.run_dir, manager.tasks.task_dir)
    assert manager.tasks.list_tasks(1)[0]["status"] == "OK"
    devices = {entry["device"] for entry in asyncio.run(manager.qmp(VMID, "query-block"))}
    assert {"drive-scsi0", "drive-scsi1", "drive-virtio1", "drive-ide0", "drive-ide2",
            "drive-sata0"} <= devices
    status = asyncio.run(manager.status(VMID))
    assert status["cpus"] == 2 and status["accel"] == "tcg"
    asyncio.run(manager.destroy(VMID))
    assert manager.pid(VMID) is None and manager.list_vmids() == []


def test_tcg_memory_is_padded_only_where_qemu_needs_it() -> None:
    assert memory_arg(128, "tcg", (7, 2)) == "131080K"          # 128 MiB + 8 KiB
    assert memory_arg(4096, "tcg", (8, 2)) == f"{4096 * 1024 + 8}K"
    assert memory_arg(128, "kvm", (7, 2)) == "128"
    assert memory_arg(128, "tcg", (9, 0)) == "128"
