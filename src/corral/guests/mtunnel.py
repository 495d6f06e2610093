"""The target side of a migration: what the target node's corrald does for the source.

The source drives a migration through a small command set that the target's corrald
serves on its HTTPS API (`POST /api2/json/nodes/{node}/qemu/{vmid}/mtunnel`, see
corral.daemon.guestapi), so the target QEMU runs under the target's daemon (in its
network namespace, with its run dir) exactly like any other guest of that node:

    precheck        can this node take the guest? (quorate, not here yet, storages, CPU model,
                    the bridges of its NICs)
    start-incoming  QEMU with `-incoming defer -S` (and the machine version the source
                    runs), capabilities, TLS credentials, the
                    listening migration URI and, for local disks, fresh volumes exported
                    over NBD; answers the URIs the source connects to
    disk-import     offline: a fresh volume exported with qemu-nbd for `qemu-img convert`
    resume          after the source moved the config here: stop the NBD server, `cont`
    stop            failure/cancel: stop what was started here and remove the new volumes
                    (refused once the config lives on this node: the guest is ours then)
    status          what this node holds for the guest (also the source's keep-alive: an
                    incoming migration not heard of for INCOMING_SILENCE_S is stopped here)

Every field of a request is validated here; `IncomingMigrations` keeps one record per
guest so `stop` knows exactly what to remove. The guest's config is read from the
source's directory in the replicated tree (the config has not moved yet, as the
reference's `--migratedfrom`); the request carries its SHA-256 so a target whose tree
lags behind waits for the right text instead of starting a different guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from corral.guests import netdev
from corral.guests import storage as storage_mod
from corral.guests.config import ConfigError, VmConfig, is_valid_vmid, parse_config
from corral.guests.qemu import QEMU_BINARY, RUN_FILES, GuestError, GuestManager
from corral.guests.qmp import QmpClient, QmpError
from corral.guests.tasks import TaskLog

KEEPALIVE_S = 10.0                   # the source's `status` interval during a migration
INCOMING_SILENCE_S = 120             # then the target gives up on it
SILENCE_ENV = "CORRAL_INCOMING_SILENCE_S"   # override (tests), 5..3600 s
CONFIG_WAIT_S = 5.0                  # how long a lagging tree may take to show the config
MAX_DISKS = 32
MAX_VOLUME_BYTES = 1 << 50
QEMU_NBD_START_S = 10.0
TLS_OBJECT_ID = "corral-mig-tls"
MAX_RESUMED_REMEMBERED = 64
HOLD_CONNECT_TIMEOUT_S = 2.0


def migration_capabilities(accel: str) -> dict[str, bool]:
    """The reference's set, for every accelerator: xbzrle and auto-converge on, no
    postcopy or multifd. (Under TCG, QEMU 7.2 on this kind of host crashes a guest after
    a move now and then with or without them, also in plain QEMU migrations without
    Corral: see docs/guests.md; the tests detect such a guest oops.)"""
    del accel      # the same set for KVM and TCG, as the reference
    return {"xbzrle": True, "auto-converge": True, "postcopy-ram": False, "multifd": False}


_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_DISK_KEY_RE = re.compile(r"^(scsi|virtio|ide|sata)\d{1,2}$")
_STORAGE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_CPU_MODELS: set[str] = set()
# RFC 7919's ffdhe2048 group (a published constant). Without dh-params.pem a QEMU server
# endpoint generates DH parameters when the credentials are created: ~0.6 s per start.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class MtunnelError(ValueError):
    """A request is malformed or cannot be served (message for the source's task log)."""


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_tls_dir(state_dir: str, run_dir: str) -> str:
    """QEMU's x509 credential directory built from the node's cluster certificate.

    The node certificate (signed by the cluster CA, server and client usage, SANs with
    the node name and its addresses) serves both ends, so either side verifies the
    other against the cluster CA (verify-peer on).
    """
    directory = os.path.join(run_dir, "migration-tls")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    sources = {"ca-cert.pem": "ca.pem", "server-cert.pem": "node.pem",
               "client-cert.pem": "node.pem", "server-key.pem": "priv/node.key",
               "client-key.pem": "priv/node.key"}
    for name, source in [*sources.items(), ("dh-params.pem", None)]:
        if source is None:
            data = FFDHE2048_PEM.encode()
        else:
            with open(os.path.join(state_dir, source), "rb") as handle:
                data = handle.read()
        path = os.path.join(directory, name)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(path + ".tmp", path)
    return directory


def free_tcp_port(address: str) -> int:
    """A port free right now on `address` (the caller binds it at once; retries on a race)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def local_addresses() -> list[str]:
    """IPv4/IPv6 addresses configured on this host's (or namespace's) interfaces."""
    try:
        result = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                                timeout=5, check=False)
        entries = json.loads(result.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    return [info["local"] for entry in entries for info in entry.get("addr_info", [])
            if "local" in info]


def pick_address(network: str | None, link_addresses: list[str]) -> str:
    """The address to listen on: one in `network` if given, else the first link address."""
    if not network:
        if not link_addresses:
            raise MtunnelError("this node has no link address")
        return link_addresses[0]
    try:
        subnet = ipaddress.ip_network(network, strict=False)
    except ValueError:
        raise MtunnelError(f"invalid migration network '{network}'") from None
    for address in [*link_addresses, *local_addresses()]:
        try:
            if ipaddress.ip_address(address) in subnet:
                return address
        except ValueError:
            continue
    raise MtunnelError(f"this node has no address in the migration network {network}")


def cpu_models(cache_dir: str | None = None) -> set[str]:
    """CPU model names this node's QEMU knows (`-cpu help`), cached in memory and in
    `<cache_dir>/cpu-models` (keyed by the QEMU binary's size and mtime: the first
    migration after a daemon restart would otherwise pay for a QEMU start)."""
    if _CPU_MODELS:
        return _CPU_MODELS
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        return set()
    stat = os.stat(binary)
    key = f"{binary} {stat.st_size} {stat.st_mtime_ns}"
    cache = os.path.join(cache_dir, "cpu-models") if cache_dir else None
    if cache is not None:
        try:
            with open(cache, encoding="utf-8") as handle:
                first, *names = handle.read().splitlines()
            if first == key and names:
                _CPU_MODELS.update(names)
                return _CPU_MODELS
        except (OSError, ValueError):
            pass
    try:
        output = subprocess.run([binary, "-cpu", "help"], capture_output=True,
                                text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            _CPU_MODELS.add(parts[1])
    _CPU_MODELS.update({"host", "max"})
    if cache is not None:
        with open(cache + ".tmp", "w", encoding="utf-8") as handle:
            handle.write("\n".join([key, *sorted(_CPU_MODELS)]) + "\n")
        os.replace(cache + ".tmp", cache)
    return _CPU_MODELS


async def qmp_call(path: str, command: str, /, **arguments: Any) -> Any:
    """One QMP command on a short connection (the monitor takes one client at a time,
    so nothing may hold it for the whole migration: `qm status` must keep working)."""
    async with QmpClient(path) as client:
        return await client.command(command, **arguments)


def silence_from_env(text: str | None) -> float:
    """INCOMING_SILENCE_S, or the value of CORRAL_INCOMING_SILENCE_S if it is 5..3600."""
    try:
        value = float(text) if text else INCOMING_SILENCE_S
    except ValueError:
        return INCOMING_SILENCE_S
    return value if 5 <= value <= 3600 else INCOMING_SILENCE_S


# --- request validation ---------------------------------------------------------------


def _field(params: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    value = params.get(name)
    if value is None:
        if required:
            raise MtunnelError(f"missing parameter '{name}'")
        return None
    if kind is int and isinstance(value, str) and value.isdigit():
        value = int(value)
    if kind is bool and value in ("0", "1", 0, 1):
        value = value in ("1", 1)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MtunnelError(f"parameter '{name}' must be {kind.__name__}")
    return value


@dataclass(frozen=True)
class DiskRequest:
    """A local disk to allocate on a target storage (and export over NBD)."""

    key: str
    storage: str
    size_bytes: int
    fmt: str


def parse_disks(raw: Any) -> list[DiskRequest]:
    if raw is None:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise MtunnelError("parameter 'disks' is not JSON") from None
    if not isinstance(raw, list) or len(raw) > MAX_DISKS:
        raise MtunnelError(f"parameter 'disks' must be a list of at most {MAX_DISKS} disks")
    disks: list[DiskRequest] = []
    for item in raw:
        if not isinstance(item, dict):
            raise MtunnelError("every disk must be an object")
        key, store = _field(item, "key", str), _field(item, "storage", str)
        size, fmt = _field(item, "size", int), _field(item, "format", str)
        if not _DISK_KEY_RE.match(key) or not _STORAGE_RE.match(store):
            raise MtunnelError(f"invalid disk key/storage '{key}'/'{store}'")
        if not 0 < size <= MAX_VOLUME_BYTES or fmt not in storage_mod.VOLUME_FORMATS:
            raise MtunnelError(f"invalid size/format for disk '{key}'")
        if any(d.key == key for d in disks):
            raise MtunnelError(f"disk '{key}' given twice")
        disks.append(DiskRequest(key, store, size, fmt))
    return disks


@dataclass(frozen=True)
class IncomingRequest:
    vmid: int
    source: str
    digest: str
    secure: bool
    network: str | None
    accel: str
    disks: list[DiskRequest]
    machine: str | None = None

    @classmethod
    def parse(cls, vmid: int, params: dict[str, Any]) -> IncomingRequest:
        source = _field(params, "source", str)
        digest = _field(params, "digest", str)
        kind = _field(params, "migration_type", str, required=False) or "secure"
        network = _field(params, "migration_network", str, required=False) or None
        accel = _field(params, "accel", str, required=False) or "tcg"
        if not _NODE_RE.match(source):
            raise MtunnelError(f"invalid source node '{source}'")
        if not re.match(r"^[0-9a-f]{64}$", digest):
            raise MtunnelError("parameter 'digest' must be a SHA-256 hex digest")
        if kind not in ("secure", "insecure"):
            raise MtunnelError("migration_type must be secure or insecure")
        if accel not in ("kvm", "tcg"):
            raise MtunnelError("accel must be kvm or tcg")
        if network is not None and len(network) > 64:
            raise MtunnelError("migration_network too long")
        machine = _field(params, "machine", str, required=False) or None
        if machine is not None:
            try:
                VmConfig().set("machine", machine)
            except ConfigError as exc:
                raise MtunnelError(str(exc)) from None
        return cls(vmid, source, digest, kind == "secure", network, accel,
                   parse_disks(params.get("disks")), machine)


# --- the target's records -------------------------------------------------------------


class IncomingState(enum.Enum):
    STARTING = "starting"        # QEMU being started; not expired (the request is running)
    LISTENING = "listening"      # QEMU waits for the RAM stream (and NBD writes)
    IMPORTING = "importing"      # offline: volumes being copied through qemu-nbd
    RESUMED = "resumed"          # handed over: the guest runs here, record dropped


@dataclass
class Incoming:
    vmid: int
    source: str
    state: IncomingState
    started_ns: int
    volumes: list[str] = field(default_factory=list)
    nbd_server: bool = False
    nbd_pids: list[int] = field(default_factory=list)
    qemu: bool = False
    contact_ns: int = 0                 # last request of the source about this guest
    monitor: QmpClient | None = None    # held for `resume` (see hold_monitor)
    monitor_loop: asyncio.AbstractEventLoop | None = None   # the loop it belongs to
    resuming: bool = False              # `resume` runs: a late hold_monitor lets go


class IncomingMigrations:
    """The target node's side; one record per guest being migrated here."""

    def __init__(self, manager: GuestManager, state_dir: str, link_addresses: list[str],
                 quorate: Any = None) -> None:
        self.manager = manager
        self.state_dir = state_dir
        self.link_addresses = link_addresses
        self.quorate = quorate or (lambda: True)
        self.records: dict[int, Incoming] = {}
        self.resumed: dict[int, int] = {}     # vmid -> when (monotonic ns), newest last
        self.silence_s = silence_from_env(os.environ.get(SILENCE_ENV))
        self.config_wait_s = CONFIG_WAIT_S      # resume: for the source's rename to arrive

    async def handle(self, vmid: int, params: dict[str, Any]) -> Any:
        if not is_valid_vmid(vmid):
            raise MtunnelError(f"invalid vmid {vmid}")
        command = _field(params, "cmd", str)
        handlers = {"precheck": self.precheck, "start-incoming": self.start_incoming,
                    "disk-import": self.disk_import, "resume": self.resume,
                    "stop": self.stop, "status": self.status}
        handler = handlers.get(command)
        if handler is None:
            raise MtunnelError(f"unknown mtunnel command '{command}'")
        record = self.records.get(vmid)
        if record is not None:
            record.contact_ns = time.monotonic_ns()
        try:
            return await handler(vmid, params)
        except (GuestError, ConfigError, storage_mod.StorageError, QmpError, OSError) as exc:
            raise MtunnelError(str(exc)) from None

    # --- checks -----------------------------------------------------------------------

    def _here(self, vmid: int) -> str:
        return self.manager.config_path(vmid)

    def _check_free(self, vmid: int) -> None:
        if os.path.exists(self._here(vmid)):
            raise MtunnelError(f"VM {vmid} already has a config on node '{self.manager.node}'")
        if self.manager.pid(vmid) is not None:
            raise MtunnelError(f"VM {vmid} is already running on node '{self.manager.node}'")
        if vmid in self.records:
            raise MtunnelError(f"a migration of VM {vmid} to this node is already in progress")

    async def _source_config(self, vmid: int, source: str, digest: str) -> VmConfig:
        path = os.path.join(self.manager.root, "nodes", source, "qemu-server", f"{vmid}.conf")
        deadline = time.monotonic() + CONFIG_WAIT_S
        while True:
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
                if config_digest(text) == digest:
                    return parse_config(text)
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise MtunnelError(f"the config of VM {vmid} on node '{source}' is not (yet) the "
                                   "one the source sent (tree not in sync?)")
            await asyncio.sleep(0.05)

    def _check_storages(self, config: VmConfig, local: set[str]) -> None:
        storages = self.manager.storages()
        for key, props in config.disks():
            if props["file"] == "none" or key in local:
                continue
            storage_id, _ = storage_mod.split_volume_id(props["file"])
            storage = storages.get(storage_id)
            if storage.nodes and self.manager.node not in storage.nodes:
                raise MtunnelError(f"storage '{storage_id}' is not available on node "
                                   f"'{self.manager.node}'")
            if not os.path.exists(storage_mod.volume_path(storages, props["file"])):
                raise MtunnelError(f"{key}: volume '{props['file']}' is not visible on node "
                                   f"'{self.manager.node}' (storage not shared?)")

    def _check_target_storage(self, storage_id: str) -> storage_mod.Storage:
        storage = self.manager.storages().get(storage_id)
        if storage.nodes and self.manager.node not in storage.nodes:
            raise MtunnelError(f"storage '{storage_id}' is not available on node "
                               f"'{self.manager.node}'")
        if "images" not in storage.content:
            raise MtunnelError(f"storage '{storage_id}' does not allow content type 'images'")
        os.makedirs(storage.path, exist_ok=True)     # as a dir storage's default `mkdir 1`
        return storage

    def _check_cpu(self, config: VmConfig) -> None:
        model = (config.get("cpu") or "qemu64").split(",")[0]
        if model.startswith("cputype="):
            model = model.removeprefix("cputype=")
        known = cpu_models(self.manager.run_dir)
        if known and model not in known:
            raise MtunnelError(f"CPU model '{model}' is not supported on node "
                               f"'{self.manager.node}'")

    # --- commands ---------------------------------------------------------------------

    async def precheck(self, vmid: int, params: dict[str, Any]) -> dict[str, Any]:
        request = IncomingRequest.parse(vmid, params)
        if not self.quorate():
            raise MtunnelError(f"node '{self.manager.node}' is not quorate")
        self._check_free(vmid)
        config = await self._source_config(vmid, request.source, request.digest)
        local = {d.key for d in request.disks}
        self._check_storages(config, local)
        for disk in request.disks:
            storage = self._check_target_storage(disk.storage)
            if storage.free_space()["avail"] < disk.size_bytes and disk.fmt == "raw":
                raise MtunnelError(f"storage '{disk.storage}' has not enough free space")
        await asyncio.to_thread(self._check_cpu, config)
        problems = netdev.bridge_problems(netdev.config_bridges(config.entries),
                                          self.manager.node)
        if problems:
            raise MtunnelError("; ".join(problems))
        return {"node": self.manager.node}

    async def start_incoming(self, vmid: int, params: dict[str, Any]) -> dict[str, Any]:
        started_ns = time.monotonic_ns()
        request = IncomingRequest.parse(vmid, params)
        self._check_free(vmid)
        self.resumed.pop(vmid, None)     # a `resume` now is for this migration, not a repeat
        record = Incoming(vmid, request.source, IncomingState.STARTING, started_ns)
        self.records[vmid] = record
        try:
            config = await self._source_config(vmid, request.source, request.digest)
            address = pick_address(request.network, self.link_addresses)
        except BaseException:
            self.records.pop(vmid, None)
            raise
        upid, log = self.manager.tasks.begin("qmstart", str(vmid))
        log.log(f"config of node '{request.source}' read after "
                f"{(time.monotonic_ns() - started_ns) / 1e6:.0f} ms")
        try:
            result = await self._start_incoming(record, request, config, address, log)
        except BaseException as exc:
            self.manager.tasks.end(upid, log, str(exc) or type(exc).__name__)
            await self._cleanup(record, None)
            raise
        self.manager.tasks.end(upid, log, None)
        result["upid"] = str(upid)
        return result

    async def _start_incoming(self, record: Incoming, request: IncomingRequest,
                              config: VmConfig, address: str, log: TaskLog) -> dict[str, Any]:
        vmid = record.vmid
        self._check_storages(config, {d.key for d in request.disks})
        new_volumes = self._allocate(record, request.disks, log)
        for key, volid in new_volumes.items():
            props = dict(next(p for k, p in config.disks() if k == key))
            props.pop("file")
            config.entries[key] = ",".join([volid, *(f"{n}={v}" for n, v in props.items())])
        if request.machine is not None:
            config.entries["machine"] = request.machine   # the version the source runs
        command = self.manager.build_command(vmid, config, request.accel)
        command += ["-incoming", "defer", "-S"]
        log.log(f"starting VM {vmid} for incoming migration from node '{request.source}' "
                f"(accel={request.accel}) after {_ms_since(record.started_ns)} ms")
        record.qemu = True
        await self.manager.spawn(vmid, command)
        log.log(f"QEMU started after {_ms_since(record.started_ns)} ms")
        qmp = self.manager.qmp_path(vmid)
        await qmp_call(qmp, "migrate-set-capabilities", capabilities=[
            {"capability": name, "state": state}
            for name, state in migration_capabilities(request.accel).items()])
        tls_dir = None
        if request.secure:
            tls_dir = prepare_tls_dir(self.state_dir, self.manager.run_dir)
            await qmp_call(qmp, "object-add", **{"qom-type": "tls-creds-x509",
                                                 "id": TLS_OBJECT_ID, "dir": tls_dir,
                                                 "endpoint": "server", "verify-peer": True})
            await qmp_call(qmp, "migrate-set-parameters", **{"tls-creds": TLS_OBJECT_ID})
        host = f"[{address}]" if ":" in address else address
        await qmp_call(qmp, "migrate-incoming", uri=f"tcp:{host}:0")
        info = await qmp_call(qmp, "query-migrate")
        ports = [int(a["port"]) for a in info.get("socket-address", []) if "port" in a]
        if not ports:
            raise MtunnelError("QEMU did not report its migration port")
        uri = f"tcp:{host}:{ports[0]}"
        log.log(f"migration listens on {uri}")
        nbd = await self._export_disks(record, new_volumes, address, tls_dir, log) \
            if new_volumes else {}
        record.state = IncomingState.LISTENING
        log.log(f"incoming migration ready after {_ms_since(record.started_ns)} ms")
        return {"uri": uri, "nbd": nbd, "tls_hostname": self.manager.node,
                "address": address}

    def _allocate(self, record: Incoming, disks: list[DiskRequest],
                  log: TaskLog) -> dict[str, str]:
        volumes: dict[str, str] = {}
        for disk in disks:
            self._check_target_storage(disk.storage)
            volid = storage_mod.create_volume(self.manager.storages(), disk.storage,
                                              record.vmid, str(disk.size_bytes), disk.fmt)
            record.volumes.append(volid)
            volumes[disk.key] = volid
            log.log(f"{disk.key}: allocated volume {volid} ({disk.size_bytes} bytes)")
        return volumes

    async def _export_disks(self, record: Incoming, volumes: dict[str, str], address: str,
                            tls_dir: str | None, log: TaskLog) -> dict[str, Any]:
        qmp = self.manager.qmp_path(record.vmid)
        port = free_tcp_port(address)
        server: dict[str, Any] = {"addr": {"type": "inet",
                                           "data": {"host": address, "port": str(port)}}}
        if tls_dir is not None:
            server["tls-creds"] = TLS_OBJECT_ID
        await qmp_call(qmp, "nbd-server-start", **server)
        record.nbd_server = True
        nodes = {}
        for entry in await qmp_call(qmp, "query-block"):
            inserted = entry.get("inserted")
            if inserted:
                nodes[entry["device"]] = inserted["node-name"]
        exports: dict[str, Any] = {}
        for key, volid in volumes.items():
            name = f"drive-{key}"
            await qmp_call(qmp, "block-export-add", type="nbd", id=name,
                           **{"node-name": nodes[name]}, name=name, writable=True)
            exports[key] = {"host": address, "port": port, "export": name, "volid": volid}
            log.log(f"storage migration listens on nbd:{address}:{port}:exportname={name} "
                    f"volume:{volid}")
        return exports

    async def disk_import(self, vmid: int, params: dict[str, Any]) -> dict[str, Any]:
        """Offline copy of one volume: a fresh volume exported by qemu-nbd (exits after
        the source's qemu-img disconnects)."""
        source = _field(params, "source", str)
        secure = (_field(params, "migration_type", str, required=False) or "secure") == "secure"
        network = _field(params, "migration_network", str, required=False) or None
        disks = parse_disks(params.get("disks"))
        if len(disks) != 1 or not _NODE_RE.match(source):
            raise MtunnelError("disk-import takes a source node and exactly one disk")
        if os.path.exists(self._here(vmid)):
            raise MtunnelError(f"VM {vmid} already has a config on node '{self.manager.node}'")
        record = self.records.get(vmid)
        if record is None:
            record = Incoming(vmid, source, IncomingState.IMPORTING, time.monotonic_ns())
            self.records[vmid] = record
        elif record.state != IncomingState.IMPORTING or record.source != source:
            raise MtunnelError(f"a migration of VM {vmid} to this node is already in progress")
        self._reap_nbd(record)
        address = pick_address(network, self.link_addresses)
        disk = disks[0]
        volid = self._allocate(record, [disk], _NullLog())[disk.key]
        path = storage_mod.volume_path(self.manager.storages(), volid)
        pid_file = self.manager.run_path(vmid, f"nbd-{disk.key}.pid")
        command = ["qemu-nbd", "-f", disk.fmt, "-x", f"drive-{disk.key}", "--cache=writeback",
                   "--fork", "--pid-file", pid_file]
        if secure:
            tls_dir = prepare_tls_dir(self.state_dir, self.manager.run_dir)
            command += ["--object", f"tls-creds-x509,id={TLS_OBJECT_ID},endpoint=server,"
                        f"dir={tls_dir},verify-peer=on", "--tls-creds", TLS_OBJECT_ID]
        port = await asyncio.to_thread(_start_qemu_nbd, command, path, address)
        pid = _read_pid(pid_file)
        if pid is not None:
            record.nbd_pids.append(pid)
        return {"host": address, "port": port, "export": f"drive-{disk.key}", "volid": volid,
                "tls_hostname": self.manager.node}

    async def resume(self, vmid: int, params: dict[str, Any]) -> dict[str, Any]:
        """`cont` the incoming QEMU, only once the config is in this node's directory (the
        source renames it there first: a guest must never run where its config is not).
        One QMP connection for the NBD stop and `cont`. A repeated `resume` (the source
        lost the reply and asked again on a new connection) answers without acting."""
        started_ns = time.monotonic_ns()
        record = self.records.get(vmid)
        if record is None and vmid in self.resumed and os.path.exists(self._here(vmid)):
            return {"status": "running", "repeated": True}
        if record is None or record.state not in (IncomingState.LISTENING,
                                                  IncomingState.IMPORTING):
            raise MtunnelError(f"no incoming migration of VM {vmid} on this node")
        if not await self._config_arrives(vmid):
            raise MtunnelError(f"the config of VM {vmid} is not on node '{self.manager.node}' "
                               "yet; not resuming")
        if record.state == IncomingState.IMPORTING:
            self._reap_nbd(record)
            del self.records[vmid]
            return {"status": "stopped"}
        config_ns = time.monotonic_ns()
        record.resuming = True
        held = record.monitor if record.monitor_loop is asyncio.get_running_loop() else None
        try:
            if held is not None:
                await self._continue(record, held)
        except QmpError:
            held = None                  # the held connection broke: a fresh one below
        finally:
            await _release_monitor(record)
        if held is None:
            async with QmpClient(self.manager.qmp_path(vmid)) as client:
                await self._continue(record, client)
        record.state = IncomingState.RESUMED
        del self.records[vmid]
        self.resumed[vmid] = time.monotonic_ns()
        while len(self.resumed) > MAX_RESUMED_REMEMBERED:
            del self.resumed[next(iter(self.resumed))]
        return {"status": "running", "config_wait_ms": (config_ns - started_ns) / 1e6,
                "cont_ms": (time.monotonic_ns() - config_ns) / 1e6,
                "held_monitor": held is not None}

    async def _continue(self, record: Incoming, client: QmpClient) -> None:
        if record.nbd_server:
            await client.command("nbd-server-stop")
            record.nbd_server = False
        await client.command("cont")

    async def hold_monitor(self, vmid: int) -> None:
        """Open the QMP connection `resume` will use, ahead of time (call it on the loop
        that serves `resume`), so the hand-over needs no QMP connect. Nothing else uses
        the incoming QEMU's main monitor until then; the cleanup releases it first. A
        failure only means `resume` connects itself."""
        record = self.records.get(vmid)
        if record is None or record.state != IncomingState.LISTENING or record.monitor:
            return
        client = QmpClient(self.manager.qmp_path(vmid))
        try:
            await client.connect(timeout_s=HOLD_CONNECT_TIMEOUT_S)
        except QmpError:
            await client.close()
            return
        if self.records.get(vmid) is not record or record.resuming or \
                record.state != IncomingState.LISTENING:
            await client.close()          # (a `resume` waiting behind it connects then)
            return
        record.monitor, record.monitor_loop = client, asyncio.get_running_loop()

    async def _config_arrives(self, vmid: int) -> bool:
        """The source renamed the config before asking, but this node's tree may apply
        that rename a moment after the request arrives (it comes over an open
        connection, faster than a new TLS handshake): wait up to `config_wait_s`."""
        deadline = time.monotonic() + self.config_wait_s
        pause_s = 0.001
        while not os.path.exists(self._here(vmid)):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.05)
        return True

    async def stop(self, vmid: int, params: dict[str, Any]) -> dict[str, Any]:
        if os.path.exists(self._here(vmid)):
            raise MtunnelError(f"VM {vmid} belongs to node '{self.manager.node}' now; "
                               "refusing to stop it as a failed migration")
        record = self.records.pop(vmid, None)
        if record is None:
            return {"removed": []}
        upid, log = self.manager.tasks.begin("qmstop", str(vmid))
        removed = await self._cleanup(record, log)
        self.manager.tasks.end(upid, log, None)
        return {"removed": removed, "upid": str(upid)}

    async def status(self, vmid: int, params: dict[str, Any]) -> dict[str, Any]:
        record = self.records.get(vmid)
        return {"state": record.state.value if record else "none",
                "running": self.manager.pid(vmid) is not None,
                "config_here": os.path.exists(self._here(vmid)),
                "volumes": list(record.volumes) if record else []}

    # --- cleanup ----------------------------------------------------------------------

    async def expire(self, now_ns: int) -> list[int]:
        """Stop incoming migrations whose source went silent for `silence_s` (it
        sends `status` every KEEPALIVE_S): a source that crashed must not leave a paused
        QEMU and new volumes here forever."""
        expired = []
        for record in list(self.records.values()):
            last = max(record.contact_ns, record.started_ns)
            copying = any(_is_qemu_nbd(pid) for pid in record.nbd_pids)
            if record.state != IncomingState.STARTING and not copying and \
                    now_ns - last > self.silence_s * 1e9 and \
                    not os.path.exists(self._here(record.vmid)):
                upid, log = self.manager.tasks.begin("qmstop", str(record.vmid))
                log.log(f"no word from node '{record.source}' for {self.silence_s:g} s: "
                        "stopping the incoming migration")
                await self._cleanup(record, log)
                self.manager.tasks.end(upid, log, None)
                expired.append(record.vmid)
        return expired

    def _reap_nbd(self, record: Incoming) -> None:
        """qemu-nbd exits by itself once the copy disconnects; kill a leftover one."""
        for pid in record.nbd_pids:
            if _is_qemu_nbd(pid):
                os.kill(pid, signal.SIGKILL)
        record.nbd_pids.clear()

    async def _cleanup(self, record: Incoming, log: TaskLog | None) -> list[str]:
        """Stop the incoming QEMU / qemu-nbd and remove the volumes allocated for it."""
        self.records.pop(record.vmid, None)
        out = log or _NullLog()
        await _release_monitor(record)         # hard_stop needs the monitor
        self._reap_nbd(record)
        if record.qemu and not os.path.exists(self._here(record.vmid)):
            await self.manager.hard_stop(record.vmid, out)
            for suffix in (*(name for name in RUN_FILES if name != "log"),
                           "serial1", "serial2", "serial3"):
                with _suppress_missing():
                    os.unlink(self.manager.run_path(record.vmid, suffix))
        removed = []
        storages = self.manager.storages() if record.volumes else None
        for volid in record.volumes:
            assert storages is not None
            try:
                storage_mod.remove_volume(storages, volid)
                removed.append(volid)
                out.log(f"removed volume {volid} allocated for the migration")
            except storage_mod.StorageError as exc:
                out.warn(str(exc))
        if record.volumes:
            _remove_empty_dir(storages, record.volumes[0])
        return removed


async def _release_monitor(record: Incoming) -> None:
    """Close a held monitor on the loop it belongs to (the cleanup may run elsewhere)."""
    client, loop = record.monitor, record.monitor_loop
    record.monitor = record.monitor_loop = None
    if client is None or loop is None:
        return
    if loop is asyncio.get_running_loop():
        await client.close()
    elif loop.is_running():
        future = asyncio.run_coroutine_threadsafe(client.close(), loop)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(future), HOLD_CONNECT_TIMEOUT_S)


class _NullLog(TaskLog):
    """A task log for cleanups outside a task."""

    def __init__(self) -> None:
        self.warnings = 0

    def log(self, line: str) -> None:
        pass

    def warn(self, line: str) -> None:
        pass


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, trace: object) -> bool:
        return kind is FileNotFoundError


def _remove_empty_dir(storages: storage_mod.StorageConfig | None, volid: str) -> None:
    if storages is None:
        return
    directory = os.path.dirname(storage_mod.volume_path(storages, volid))
    try:
        os.rmdir(directory)
    except OSError:
        pass


def _ms_since(start_ns: int) -> int:
    return (time.monotonic_ns() - start_ns) // 1_000_000


def _start_qemu_nbd(command: list[str], path: str, address: str) -> int:
    """Run `qemu-nbd --fork` (returns once it listens) on a free port; retry a lost race."""
    error = ""
    for _attempt in range(5):
        port = free_tcp_port(address)
        try:
            result = subprocess.run([*command, "-b", address, "-p", str(port), path],
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=QEMU_NBD_START_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MtunnelError(f"qemu-nbd failed: {exc}") from None
        if result.returncode == 0:
            return port
        error = result.stderr.strip()
        if "in use" not in error:
            break
    raise MtunnelError(f"qemu-nbd failed: {error}")


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _is_qemu_nbd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")[0].endswith(b"qemu-nbd")
    except OSError:
        return False


__all__ = ["IncomingMigrations", "MtunnelError", "config_digest", "prepare_tls_dir",
           "qmp_call"]
