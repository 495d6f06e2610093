"""Guest lifecycle on one node: QEMU daemonized with a pid file and a QMP socket per guest.

QEMU runs with `-daemonize` in its own session, so restarting the node daemon (or this
CLI exiting) never touches a running guest; everything we need to find it again lives
under the run dir: `<vmid>.pid`, `<vmid>.qmp`, `<vmid>.serialN`, `<vmid>.log`, and for
status polling a second QMP monitor `<vmid>.qmp-status` (the reference's separate event
monitor), so a poll never waits behind, or blocks, the CLI's or a migration's QMP
connection; `<vmid>.cpu` keeps the last CPU sample (recent usage, not the average since
start) and `<vmid>.taps` the tap names of bridged NICs (see netdev.py).
Configs live in the tree at `nodes/<node>/qemu-server/<vmid>.conf`, storages in
`storage.cfg` at the tree root. Every lifecycle operation is a task (see tasks.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from corral.guests import netdev
from corral.guests import storage as storage_mod
from corral.guests.config import (
    ConfigError,
    VmConfig,
    is_disk_key,
    is_valid_vmid,
    parse_config,
    parse_property_string,
    write_config,
)
from corral.guests.qmp import QmpClient, QmpError
from corral.guests.tasks import TaskLog, TaskStore, Upid

DEFAULT_RUN_DIR = "/run/corral/qemu-server"
DEFAULT_TASK_DIR = "/var/log/corral/tasks"
DEFAULT_TEST_GUEST_DIR = "/var/cache/corral/test-guest"
QEMU_BINARY = "qemu-system-x86_64"
# QEMU before 9.0 can lose guest writes while live-migrating a TCG guest whose RAM block
# is a multiple of 256 KiB (every size in MiB): its 64-page fast path of the dirty-bitmap
# sync clears dirty bits without re-arming TCG's write tracking, so a later store through
# a cached TLB entry is never sent and the target runs with a stale page (upstream fix
# "physmem: Fix migration dirty bitmap coherency with TCG memory access", QEMU 9.0).
# TCG guests therefore get 8 KiB more RAM, which takes QEMU's exact per-page path.
# Measured (tests/guests/plain_qemu_pingpong.py --verify-ram): 23 of 84 moves with
# differing pages at 48 MiB/s before, 0 of 245 after. See docs/guests.md.
TCG_RAM_PAD_KIB = 8
TCG_DIRTY_SYNC_FIXED_IN = (9, 0)
QEMU_START_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 10.0
KVM_PROBE_TIMEOUT_S = 10.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 60.0
GUEST_LOCK_TIMEOUT_S = 10.0          # as the reference's per-guest config lock
MIN_CPU_SAMPLE_NS = 500_000_000     # shorter intervals repeat the last fraction
RUN_FILES = ("qmp", "qmp-status", "pid", "log", "serial0", "cpu", "taps")
NET_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139",
               "vmxnet3": "vmxnet3"}


class GuestError(RuntimeError):
    """A lifecycle operation cannot be done (message is meant for the operator)."""


def _read_int_file(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (FileNotFoundError, ValueError):
        return None


class GuestManager:
    """The guests of one node, for a tree rooted at `root`."""

    def __init__(self, root: str, node: str, run_dir: str = DEFAULT_RUN_DIR,
                 task_dir: str = DEFAULT_TASK_DIR, test_guest_dir: str | None = None) -> None:
        self.root = root
        self.node = node
        self.run_dir = run_dir
        self.tasks = TaskStore(task_dir, node)
        self.tasks.publish_to(root)  # nodes/<node>/tasks.json: the cluster-wide task list
        self.state_dir: str | None = None    # corrald's (migration); None: the default
        self.test_guest_dir = test_guest_dir or os.environ.get(
            "CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
        os.makedirs(run_dir, exist_ok=True)

    # --- configs ----------------------------------------------------------------------

    def config_dir(self) -> str:
        return os.path.join(self.root, "nodes", self.node, "qemu-server")

    def config_path(self, vmid: int) -> str:
        return os.path.join(self.config_dir(), f"{vmid}.conf")

    def load_config(self, vmid: int) -> VmConfig:
        if not is_valid_vmid(vmid):
            raise GuestError(f"invalid vmid {vmid} (100..999999999)")
        try:
            with open(self.config_path(vmid), encoding="utf-8") as handle:
                return parse_config(handle.read())
        except FileNotFoundError:
            raise GuestError(f"Configuration file 'nodes/{self.node}/qemu-server/{vmid}.conf' "
                             "does not exist") from None

    def save_config(self, vmid: int, config: VmConfig) -> None:
        path = self.config_path(vmid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(write_config(config))
        os.replace(path + ".tmp", path)

    def list_vmids(self) -> list[int]:
        try:
            names = os.listdir(self.config_dir())
        except FileNotFoundError:
            return []
        return sorted(int(name[:-5]) for name in names
                      if name.endswith(".conf") and name[:-5].isdigit())

    @contextmanager
    def guest_lock(self, vmid: int) -> Iterator[None]:
        """Serialises operations on one guest on this node (a flock, released on exit)."""
        path = os.path.join(self.run_dir, f"lock-{vmid}")
        with open(path, "a") as lock:
            deadline = time.monotonic() + GUEST_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise GuestError(f"can't lock file '{path}' - got timeout") from None
                    time.sleep(0.05)
            yield

    def storages(self) -> storage_mod.StorageConfig:
        return storage_mod.load_storage_cfg(self.root)

    def allocate_disks(self, vmid: int, config: VmConfig, keys: list[str], log: TaskLog) -> None:
        """Turn `storage:SIZE` disk values (SIZE in GiB, as the reference) into volumes."""
        for key in keys:
            props = parse_property_string(key, config.entries[key], "file")
            match = re.match(r"^([A-Za-z][A-Za-z0-9_.-]*):(\d+(\.\d+)?)$", props["file"])
            if not match:
                continue
            size = f"{match.group(2)}G"
            fmt = props.pop("format", "qcow2")
            volume = storage_mod.create_volume(self.storages(), match.group(1), vmid, size, fmt)
            log.log(f"{key}: allocated volume {volume} ({size})")
            rest = {name: value for name, value in props.items() if name != "file"}
            rest["size"] = size
            config.set(key, ",".join([volume, *(f"{n}={v}" for n, v in rest.items())]))

    # --- process discovery ------------------------------------------------------------

    def _path(self, vmid: int, suffix: str) -> str:
        return os.path.join(self.run_dir, f"{vmid}.{suffix}")

    def qmp_path(self, vmid: int) -> str:
        return self._path(vmid, "qmp")

    def status_qmp_path(self, vmid: int) -> str:
        """The second monitor, for status polls (absent for guests started before it)."""
        return self._path(vmid, "qmp-status")

    def run_path(self, vmid: int, suffix: str) -> str:
        """`<run dir>/<vmid>.<suffix>` (pid, qmp, log, serialN, ...)."""
        return self._path(vmid, suffix)

    async def spawn(self, vmid: int, command: list[str]) -> None:
        """Start a daemonizing QEMU command line (removes a stale pid/qmp first)."""
        self._remove_stale(vmid)
        await asyncio.to_thread(self._spawn, vmid, command)
        if self.pid(vmid) is None:
            raise GuestError(f"VM {vmid} did not stay running (see {self._path(vmid, 'log')})")

    def _remove_stale(self, vmid: int) -> None:
        for stale in ("qmp", "qmp-status", "pid", "cpu"):
            if os.path.exists(self._path(vmid, stale)):
                os.unlink(self._path(vmid, stale))

    async def hard_stop(self, vmid: int, log: TaskLog) -> None:
        """Stop QEMU without the guest lock or config checks (migration cleanup)."""
        await self._stop(vmid, log)

    def serial_path(self, vmid: int, index: int = 0) -> str:
        return self._path(vmid, f"serial{index}")

    def pid(self, vmid: int) -> int | None:
        """The QEMU pid if it runs (checked against its command line, not just the pid)."""
        pid = _read_int_file(self._path(vmid, "pid"))
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return None
        if self._path(vmid, "pid").encode() not in cmdline:
            return None          # the pid was reused by another process
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return None
        except FileNotFoundError:
            return None
        return pid

    # --- command line -----------------------------------------------------------------

    def build_command(self, vmid: int, config: VmConfig, accel: str) -> list[str]:
        cores, sockets = config.int_value("cores", 1), config.int_value("sockets", 1)
        cpu = parse_property_string("cpu", config.get("cpu") or "qemu64", "cputype")
        cpu_arg = ",".join([cpu["cputype"], *[f for f in cpu.get("flags", "").split(";") if f]])
        command = [
            QEMU_BINARY, "-name", f"{config.get('name') or f'vm{vmid}'},debug-threads=on",
            "-machine", f"{config.get('machine') or 'pc'},accel={accel}",
            "-cpu", cpu_arg, "-smp", f"{cores * sockets},sockets={sockets},cores={cores}",
            "-m", memory_arg(config.int_value("memory", 512), accel, qemu_version()),
            "-nodefaults", "-display", "none",
            "-chardev", f"socket,id=qmp,path={self.qmp_path(vmid)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qmp-status,path={self.status_qmp_path(vmid)},server=on,wait=off",
            "-mon", "chardev=qmp-status,mode=control",
            "-pidfile", self._path(vmid, "pid"), "-daemonize",
        ]
        boot_order = self._boot_order(config)
        command += self._disk_args(vmid, config, boot_order)
        command += self._net_args(vmid, config, boot_order)
        for key, value in config.entries.items():
            if key.startswith("serial") and value == "socket":
                path = self.serial_path(vmid, int(key[6:]))
                command += ["-chardev", f"socket,id={key},path={path},server=on,wait=off",
                            "-device", f"isa-serial,chardev={key}"]
            elif key.startswith("serial"):
                command += ["-chardev", f"serial,id={key},path={value}",
                            "-device", f"isa-serial,chardev={key}"]
        command += shlex.split(config.get("args") or "")
        return command

    @staticmethod
    def _boot_order(config: VmConfig) -> list[str]:
        boot = config.get("boot")
        if not boot:
            return []
        props = parse_property_string("boot", boot, "legacy")
        return props.get("order", "").split(";") if "order" in props else []

    def _disk_args(self, vmid: int, config: VmConfig, boot_order: list[str]) -> list[str]:
        args: list[str] = []
        storages: storage_mod.StorageConfig | None = None
        controllers: set[str] = set()
        for key, props in config.disks():
            bus, index = re.match(r"^([a-z]+)(\d+)$", key).groups()  # type: ignore[union-attr]
            drive = [f"if=none,id=drive-{key}"]
            cdrom = props.get("media") == "cdrom"
            if props["file"] != "none":
                storages = storages or self.storages()
                path = storage_mod.volume_path(storages, props["file"])
                fmt = props.get("format") or storage_mod.volume_format(props["file"])
                drive.append(f"file={path},format={'raw' if cdrom else fmt}")
                drive.append(f"cache={props.get('cache', 'writeback')}")
            drive.append(f"media={'cdrom' if cdrom else 'disk'}")   # an empty drive takes no cache=
            args += ["-drive", ",".join(drive)]
            device = self._disk_device(bus, int(index), key, cdrom, controllers, args)
            if key in boot_order:
                device += f",bootindex={100 + boot_order.index(key)}"
            args += ["-device", device]
        return args

    @staticmethod
    def _disk_device(bus: str, index: int, key: str, cdrom: bool, controllers: set[str],
                     args: list[str]) -> str:
        if bus == "virtio":
            return f"virtio-blk-pci,drive=drive-{key},id={key}"
        if bus == "scsi":
            if "scsi" not in controllers:
                controllers.add("scsi")
                args += ["-device", "virtio-scsi-pci,id=scsihw0"]
            kind = "scsi-cd" if cdrom else "scsi-hd"
            return f"{kind},bus=scsihw0.0,scsi-id={index},drive=drive-{key},id={key}"
        if bus == "sata":
            if "sata" not in controllers:
                controllers.add("sata")
                args += ["-device", "ahci,id=ahci0"]
            return f"{'ide-cd' if cdrom else 'ide-hd'},bus=ahci0.{index},drive=drive-{key},id={key}"
        kind = "ide-cd" if cdrom else "ide-hd"
        return f"{kind},bus=ide.{index // 2},unit={index % 2},drive=drive-{key},id={key}"

    def _net_args(self, vmid: int, config: VmConfig, boot_order: list[str]) -> list[str]:
        """-netdev/-device per NIC; a bridged NIC gets a QEMU-created tap (see netdev.py):
        the bridge is checked, the tap name chosen and recorded in the run dir."""
        args: list[str] = []
        taps: dict[str, str] = {}
        for key, value in config.entries.items():
            if not key.startswith("net"):
                continue
            props = parse_property_string(key, value, None)
            model = next(name for name in props if name in NET_DEVICES)
            if "bridge" in props:
                args += ["-netdev", self._tap_netdev(vmid, key, props["bridge"], taps)]
            else:
                args += ["-netdev", f"user,id={key},restrict=on"]
            device = f"{NET_DEVICES[model]},mac={props[model]},netdev={key},id={key}"
            if key in boot_order:
                device += f",bootindex={100 + boot_order.index(key)}"
            args += ["-device", device]
        netdev.record_taps(self.run_dir, vmid, taps)
        return args

    def _tap_netdev(self, vmid: int, key: str, bridge: str, taps: dict[str, str]) -> str:
        try:
            problems = netdev.bridge_problems([(key, bridge)], self.node)
            if problems:
                raise GuestError(problems[0])
            ifname = netdev.choose_tap(vmid, int(key[3:]))
            script = netdev.write_ifup_script(self.run_dir, vmid, key, bridge)
        except netdev.NetdevError as exc:
            raise GuestError(f"{key}: {exc}") from None
        taps[key] = ifname
        return f"tap,id={key},ifname={ifname},script={script},downscript=no"

    # --- accelerator probe ------------------------------------------------------------

    def accelerator(self) -> str:
        """kvm or tcg: the probe result cached in the run dir (CORRAL_ACCEL overrides)."""
        forced = os.environ.get("CORRAL_ACCEL")
        if forced in ("kvm", "tcg"):
            return forced
        cache = os.path.join(self.run_dir, "accel")
        try:
            with open(cache, encoding="ascii") as handle:
                cached = handle.read().split()
            if cached and cached[0] in ("kvm", "tcg"):
                return cached[0]
        except FileNotFoundError:
            pass
        accel, reason = probe_kvm(self.test_guest_dir, self.run_dir)
        with open(cache, "w", encoding="ascii") as handle:
            handle.write(f"{accel} {reason}\n")
        return accel

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, vmid: int, skiplock: bool = False) -> Upid:
        return (await self.tasks.run_async("qmstart", str(vmid),
                                           lambda log: self._start(vmid, log, skiplock)))[0]

    async def _start(self, vmid: int, log: TaskLog, skiplock: bool) -> None:
        with self.guest_lock(vmid):
            config = self.load_config(vmid)
            if config.get("lock") and not skiplock:
                raise GuestError(f"VM is locked ({config.get('lock')})")
            if self.pid(vmid) is not None:
                raise GuestError(f"VM {vmid} already running")
            accel = self.accelerator()
            command = self.build_command(vmid, config, accel)
            log.log(f"starting VM {vmid} with accel={accel}")
            self._remove_stale(vmid)
            await asyncio.to_thread(self._spawn, vmid, command)
            if self.pid(vmid) is None:
                raise GuestError(f"VM {vmid} did not stay running (see {self._path(vmid, 'log')})")

    def _spawn(self, vmid: int, command: list[str]) -> None:
        with open(self._path(vmid, "log"), "w", encoding="utf-8") as log_file:
            try:
                result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=log_file, start_new_session=True,
                                        timeout=QEMU_START_TIMEOUT_S, check=False)
            except FileNotFoundError:
                raise GuestError(f"{QEMU_BINARY} is not installed (apt-get install qemu-system-x86)") from None
            except subprocess.TimeoutExpired:
                raise GuestError(f"QEMU did not daemonize within {QEMU_START_TIMEOUT_S} s") from None
        if result.returncode != 0:
            with open(self._path(vmid, "log"), encoding="utf-8", errors="replace") as handle:
                detail = handle.read().strip().splitlines()
            raise GuestError(f"start failed: QEMU exited with code {result.returncode}: "
                             f"{detail[-1] if detail else 'no output'}")

    async def qmp(self, vmid: int, command: str, timeout_s: float = 10.0, **arguments: Any) -> Any:
        if self.pid(vmid) is None:
            raise GuestError(f"VM {vmid} not running")
        async with QmpClient(self.qmp_path(vmid)) as client:
            return await client.command(command, timeout_s=timeout_s, **arguments)

    async def _wait_exit(self, vmid: int, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pid(vmid) != pid:
                return True
            await asyncio.sleep(0.01)
        return False

    async def stop(self, vmid: int, skiplock: bool = False) -> Upid:
        return (await self.tasks.run_async("qmstop", str(vmid),
                                           lambda log: self._locked_stop(vmid, log, skiplock)))[0]

    async def _locked_stop(self, vmid: int, log: TaskLog, skiplock: bool) -> None:
        with self.guest_lock(vmid):
            config = self.load_config(vmid)
            if config.get("lock") and not skiplock:
                raise GuestError(f"VM is locked ({config.get('lock')})")
            await self._stop(vmid, log)

    async def _stop(self, vmid: int, log: TaskLog) -> None:
        """quit over QMP; SIGTERM then SIGKILL if QEMU does not go away."""
        pid = self.pid(vmid)
        if pid is None:
            log.log(f"VM {vmid} is not running")
            return
        quit_error: Exception | None = None
        try:
            await self.qmp(vmid, "quit", timeout_s=QUIT_TIMEOUT_S)
        except (QmpError, GuestError) as exc:
            quit_error = exc      # QEMU may close the socket before answering quit
        if await self._wait_exit(vmid, pid, QUIT_TIMEOUT_S):
            return
        if quit_error is not None:
            log.warn(f"quit over QMP failed: {quit_error}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            log.log(f"VM {vmid} still running, sending {sig.name}")
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if await self._wait_exit(vmid, pid, QUIT_TIMEOUT_S):
                return
        raise GuestError(f"VM {vmid} (pid {pid}) does not stop")

    async def shutdown(self, vmid: int, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                       force: bool = False) -> Upid:
        return (await self.tasks.run_async(
            "qmshutdown", str(vmid), lambda log: self._shutdown(vmid, log, timeout_s, force)))[0]

    async def _shutdown(self, vmid: int, log: TaskLog, timeout_s: float, force: bool) -> None:
        with self.guest_lock(vmid):
            pid = self.pid(vmid)
            if pid is None:
                log.log(f"VM {vmid} is not running")
                return
            await self.qmp(vmid, "system_powerdown")
            if await self._wait_exit(vmid, pid, timeout_s):
                return
            if not force:
                raise GuestError("VM quit/powerdown failed - got timeout")
            log.warn(f"guest did not power down within {timeout_s:g} s, stopping it")
            await self._stop(vmid, log)

    async def reboot(self, vmid: int, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                     force: bool = False) -> Upid:
        """Shut down (forced after the timeout if asked) and start again, as the reference."""
        async def work(log: TaskLog) -> None:
            await self._shutdown(vmid, log, timeout_s, force)
            await self._start(vmid, log, skiplock=False)
        return (await self.tasks.run_async("qmreboot", str(vmid), work))[0]

    async def suspend(self, vmid: int) -> Upid:
        async def work(log: TaskLog) -> None:
            await self.qmp(vmid, "stop")
        return (await self.tasks.run_async("qmpause", str(vmid), work))[0]

    async def resume(self, vmid: int) -> Upid:
        async def work(log: TaskLog) -> None:
            await self.qmp(vmid, "cont")
        return (await self.tasks.run_async("qmresume", str(vmid), work))[0]

    async def destroy(self, vmid: int) -> Upid:
        return (await self.tasks.run_async("qmdestroy", str(vmid),
                                           lambda log: self._destroy(vmid, log)))[0]

    async def _destroy(self, vmid: int, log: TaskLog) -> None:
        with self.guest_lock(vmid):
            config = self.load_config(vmid)
            if config.get("lock"):
                raise GuestError(f"VM is locked ({config.get('lock')})")
            await self._stop(vmid, log)
            storages: storage_mod.StorageConfig | None = None
            for key, props in config.disks():
                volume = props["file"]
                if props.get("media") == "cdrom" or volume == "none":
                    continue
                storages = storages or self.storages()
                try:
                    storage_mod.remove_volume(storages, volume)
                    log.log(f"{key}: removed volume {volume}")
                except storage_mod.StorageError as exc:
                    log.warn(str(exc))
            os.unlink(self.config_path(vmid))
            for suffix in (*RUN_FILES, *(f"{key}-ifup" for key in config.entries
                                         if key.startswith("net"))):
                if os.path.exists(self._path(vmid, suffix)):
                    os.unlink(self._path(vmid, suffix))

    # --- create / set -----------------------------------------------------------------

    def create(self, vmid: int, settings: dict[str, str]) -> Upid:
        def work(log: TaskLog) -> None:
            if not is_valid_vmid(vmid):
                raise GuestError(f"invalid vmid {vmid} (100..999999999)")
            with self.guest_lock(vmid):
                if os.path.exists(self.config_path(vmid)):
                    raise GuestError(f"VM {vmid} already exists")
                config = VmConfig()
                for key, value in settings.items():
                    config.set(key, value)
                self.allocate_disks(vmid, config, [k for k in config.entries if is_disk_key(k)], log)
                self.save_config(vmid, config)
        return self.tasks.run("qmcreate", str(vmid), work)[0]

    def set_options(self, vmid: int, settings: dict[str, str], delete: list[str]) -> None:
        """`qm set`: validate everything first, allocate new disks, then write once."""
        with self.guest_lock(vmid):
            config = self.load_config(vmid)
            if config.get("lock") and "lock" not in delete and "lock" not in settings:
                raise GuestError(f"VM is locked ({config.get('lock')})")
            for key in delete:
                config.delete(key)
            for key, value in settings.items():
                config.set(key, value)
            new_disks = [k for k in settings if is_disk_key(k)]
            if new_disks:
                self.tasks.run("qmconfig", str(vmid),
                               lambda log: self.allocate_disks(vmid, config, new_disks, log))
            self.save_config(vmid, config)

    # --- status -----------------------------------------------------------------------

    async def status(self, vmid: int) -> dict[str, Any]:
        """The reference's `qm status --verbose` fields. Stopped guests report zeros."""
        config = self.load_config(vmid)
        cpus = config.int_value("cores", 1) * config.int_value("sockets", 1)
        result: dict[str, Any] = {
            "vmid": vmid, "name": config.get("name") or f"VM {vmid}", "status": "stopped",
            "maxmem": config.int_value("memory", 512) << 20, "cpus": cpus, "cpu": 0.0,
            "mem": 0, "uptime": 0, "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
            **self.disk_sizes(config)}
        for key in ("lock", "tags"):
            if config.get(key):
                result[key] = config.get(key)
        pid = self.pid(vmid)
        if pid is None:
            return result
        try:
            stats = process_stats(pid)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            return result            # it exited between the two reads
        result.update({"status": "running", "pid": pid, **stats, "mem": stats["memhost"]})
        result["cpu"] = self.cpu_fraction(vmid, pid, stats["cputime"], cpus, stats["uptime"])
        result["netin"], result["netout"] = netdev.tap_counters(
            pid, netdev.read_taps(self.run_dir, vmid).values())
        result.update(await self._qmp_status(vmid))
        return result

    async def _qmp_status(self, vmid: int) -> dict[str, Any]:
        socket_path = self.status_qmp_path(vmid)
        if not os.path.exists(socket_path):
            socket_path = self.qmp_path(vmid)    # started before the status monitor existed
        result: dict[str, Any] = {}
        try:
            async with QmpClient(socket_path) as client:
                result["qmpstatus"] = (await client.command("query-status"))["status"]
                kvm = await client.command("query-kvm")
                result["accel"] = "kvm" if kvm.get("enabled") else "tcg"
                result.update(_block_totals(await client.command("query-blockstats")))
        except (QmpError, OSError) as exc:
            result["qmpstatus"] = f"unknown ({exc})"
        return result

    def cpu_fraction(self, vmid: int, pid: int, cputime_s: float, cpus: int,
                     uptime_s: int) -> float:
        """Recent CPU use as a fraction of the guest's vCPUs: the cputime delta since the
        last sample in the run dir (written by whoever asked last: corrald every status
        interval, or the CLI). Without an earlier sample: the average since start."""
        path = self._path(vmid, "cpu")
        now_ns = time.monotonic_ns()
        previous = _read_cpu_sample(path)
        if previous is not None and previous[0] == pid:
            _, last_cputime_s, last_ns, last_fraction = previous
            if now_ns - last_ns < MIN_CPU_SAMPLE_NS:
                return last_fraction
            fraction = max(0.0, cputime_s - last_cputime_s) / ((now_ns - last_ns) / 1e9) / cpus
        else:
            fraction = cputime_s / max(uptime_s, 1) / cpus
        fraction = round(fraction, 4)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="ascii") as handle:
                handle.write(f"{pid} {cputime_s} {now_ns} {fraction}\n")
            os.replace(temporary, path)
        except OSError:
            pass                       # a read-only run dir: the value is still right
        return fraction

    def disk_sizes(self, config: VmConfig) -> dict[str, int]:
        """maxdisk: the sum of the volumes' sizes; disk: the bytes they allocate."""
        total = allocated = 0
        storages: storage_mod.StorageConfig | None = None
        for _key, props in config.disks():
            if props.get("media") == "cdrom" or props["file"] == "none":
                continue
            try:
                storages = storages or self.storages()
                path = storage_mod.volume_path(storages, props["file"])
                info = os.stat(path)
                total += _image_size(path, info.st_size)
                allocated += info.st_blocks * 512
            except (OSError, ValueError):
                continue      # a missing volume or storage: counted as 0, as the reference
        return {"maxdisk": total, "disk": allocated}

    async def list_guests(self) -> list[dict[str, Any]]:
        """Status of every guest; a guest whose config cannot be read is listed as unknown."""
        rows: list[dict[str, Any]] = []
        for vmid in self.list_vmids():
            try:
                rows.append(await self.status(vmid))
            except (ConfigError, GuestError, OSError) as exc:
                rows.append({"vmid": vmid, "name": "", "status": "unknown", "maxmem": 0,
                             "error": str(exc)})
        return rows


def _read_cpu_sample(path: str) -> tuple[int, float, int, float] | None:
    try:
        with open(path, encoding="ascii") as handle:
            pid, cputime, when_ns, fraction = handle.read().split()
        return int(pid), float(cputime), int(when_ns), float(fraction)
    except (FileNotFoundError, ValueError):
        return None


def _image_size(path: str, file_size: int) -> int:
    """The guest-visible size: a qcow2's virtual size from its header, else the file's."""
    with open(path, "rb") as handle:
        header = handle.read(32)
    if len(header) == 32 and header[:4] == b"QFI\xfb":
        return int.from_bytes(header[24:32], "big")
    return file_size


def memory_arg(memory_mib: int, accel: str, version: tuple[int, int]) -> str:
    """QEMU's -m for a guest of `memory_mib`: padded for TCG on QEMU < 9.0 (see
    TCG_RAM_PAD_KIB). Source and target of a migration compute the same value."""
    if accel == "tcg" and version < TCG_DIRTY_SYNC_FIXED_IN:
        return f"{memory_mib * 1024 + TCG_RAM_PAD_KIB}K"
    return str(memory_mib)


@functools.cache
def qemu_version() -> tuple[int, int]:
    """(major, minor) of the QEMU binary; (0, 0) when it cannot be told (then the TCG
    padding applies, which is harmless)."""
    try:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _block_totals(stats: list[dict[str, Any]]) -> dict[str, int]:
    read = sum(int(entry.get("stats", {}).get("rd_bytes", 0)) for entry in stats)
    written = sum(int(entry.get("stats", {}).get("wr_bytes", 0)) for entry in stats)
    return {"diskread": read, "diskwrite": written}


def process_stats(pid: int) -> dict[str, Any]:
    """uptime (s), cputime (s) and resident memory (bytes) of a process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime", encoding="ascii") as handle:
        host_uptime_s = float(handle.read().split()[0])
    rss_pages = 0
    with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
        rss_pages = int(handle.read().split()[1])
    start_s = int(fields[19]) / ticks
    return {"uptime": int(host_uptime_s - start_s),
            "cputime": (int(fields[11]) + int(fields[12])) / ticks,
            "memhost": rss_pages * os.sysconf("SC_PAGE_SIZE")}


def probe_kvm(test_guest_dir: str, run_dir: str,
              timeout_s: float = KVM_PROBE_TIMEOUT_S) -> tuple[str, str]:
    """Boot the test guest under KVM and see it reach userspace; else TCG.

    /dev/kvm existing is not enough: on some nested hosts a real kernel hangs early
    under KVM, so only a guest that prints its first userspace line counts.
    """
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    kernel = os.path.join(test_guest_dir, "vmlinuz")
    initrd = os.path.join(test_guest_dir, "initrd.img")
    if not (os.path.exists(kernel) and os.path.exists(initrd)):
        return "tcg", f"no probe guest in {test_guest_dir} (scripts/build-test-guest.sh)"
    serial = os.path.join(run_dir, "kvm-probe.serial")
    command = [QEMU_BINARY, "-machine", "pc,accel=kvm", "-cpu", "qemu64", "-m", "64",
               "-nodefaults", "-display", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
               "-append", "console=ttyS0 quiet panic=-1 corral.dirty=0",
               "-serial", f"file:{serial}"]
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return "tcg", f"{QEMU_BINARY} missing"
    deadline = time.monotonic() + timeout_s
    reached = False
    try:
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            with open(serial, "rb") if os.path.exists(serial) else open(os.devnull, "rb") as handle:
                if b"corral-guest up" in handle.read():
                    reached = True
                    break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if os.path.exists(serial):
            os.unlink(serial)
    if reached:
        return "kvm", "probe guest reached userspace under KVM"
    return "tcg", f"probe guest did not reach userspace under KVM within {timeout_s:g} s"


def check_config_value(key: str, value: str) -> None:
    """Re-exported for the CLI: validate one key without a config."""
    VmConfig().set(key, value)


__all__ = ["ConfigError", "GuestError", "GuestManager", "check_config_value", "probe_kvm"]
