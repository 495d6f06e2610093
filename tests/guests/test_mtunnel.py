"""The target side of a migration without a cluster: request parsing (every field
checked), the listening address chosen in a migration network, the QEMU TLS credential
directory built from a node's state dir, and the expiry that stops an incoming migration
whose source went silent (its new volume removed, a config already on this node never
touched)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import time
from pathlib import Path

import pytest

from corral.guests import mtunnel
from corral.guests.mtunnel import (
    Incoming,
    IncomingMigrations,
    IncomingRequest,
    IncomingState,
    MtunnelError,
    parse_disks,
    pick_address,
    prepare_tls_dir,
)
from corral.guests.qemu import GuestManager

DIGEST = "ab" * 32


def test_request_parsing() -> None:
    request = IncomingRequest.parse(100, {
        "source": "node1", "digest": DIGEST, "migration_type": "insecure",
        "migration_network": "10.0.0.0/24", "accel": "tcg",
        "disks": '[{"key": "scsi0", "storage": "local2", "size": 1048576, "format": "raw"}]'})
    assert request.secure is False and request.network == "10.0.0.0/24"
    assert request.disks[0].key == "scsi0" and request.disks[0].size_bytes == 1 << 20
    assert IncomingRequest.parse(100, {"source": "n", "digest": DIGEST}).secure is True
    assert IncomingRequest.parse(100, {"source": "n", "digest": DIGEST,
                                       "machine": "pc-i440fx-7.2"}).machine == "pc-i440fx-7.2"
    bad = [({"digest": DIGEST}, "missing parameter 'source'"),
           ({"source": "n", "digest": DIGEST, "accel": "xen"}, "accel must be kvm or tcg"),
           ({"source": "n", "digest": DIGEST, "source_extra": 1, "migration_network": "x" * 65},
            "migration_network too long"),
           ({"source": 5, "digest": DIGEST}, "'source' must be str"),
           ({"source": "n", "digest": DIGEST, "machine": "pc -x"}, "machine: ")]
    for params, message in bad:
        with pytest.raises(MtunnelError, match=message):
            IncomingRequest.parse(100, params)


@pytest.mark.parametrize(("disks", "message"), [
    ({"key": "scsi0"}, "must be a list"),
    ([{"key": "net0", "storage": "s", "size": 1, "format": "raw"}], "invalid disk key"),
    ([{"key": "scsi0", "storage": "s", "size": 1, "format": "vmdk"}], "invalid size/format"),
    ([{"key": "scsi0", "storage": "s", "size": True, "format": "raw"}], "'size' must be int"),
    ([{"key": "scsi0", "storage": "s", "size": 1, "format": "raw"}] * 2, "given twice"),
    ([{"key": "scsi0", "storage": "s", "size": 1, "format": "raw"}] * 33, "at most 32"),
])
def test_bad_disks(disks: object, message: str) -> None:
    with pytest.raises(MtunnelError, match=message):
        parse_disks(disks)


def test_pick_address() -> None:
    assert pick_address(None, ["10.1.0.5", "10.2.0.5"]) == "10.1.0.5"
    assert pick_address("10.2.0.0/16", ["10.1.0.5", "10.2.0.5"]) == "10.2.0.5"
    assert pick_address("127.0.0.0/8", ["10.1.0.5"]) == "127.0.0.1"     # from the interfaces
    local = [ipaddress.ip_address(a) for a in mtunnel.local_addresses()]
    unused = next(net for net in (f"198.18.{i}.0/24" for i in range(256))
                  if not any(a in ipaddress.ip_network(net) for a in local))
    with pytest.raises(MtunnelError, match="no address in the migration network"):
        pick_address(unused, ["10.1.0.5"])
    with pytest.raises(MtunnelError, match="invalid migration network"):
        pick_address("not-a-net", ["10.1.0.5"])


def test_tls_dir_from_state_dir(tmp_path: Path) -> None:
    (tmp_path / "state/priv").mkdir(parents=True)
    for name, text in (("ca.pem", "CA"), ("node.pem", "CERT"), ("priv/node.key", "KEY")):
        (tmp_path / "state" / name).write_text(text)
    directory = prepare_tls_dir(str(tmp_path / "state"), str(tmp_path / "run"))
    files = {name: Path(directory, name).read_text() for name in os.listdir(directory)}
    assert files.pop("dh-params.pem").startswith("-----BEGIN DH PARAMETERS-----")
    assert files == {"ca-cert.pem": "CA", "server-cert.pem": "CERT", "client-cert.pem": "CERT",
                     "server-key.pem": "KEY", "client-key.pem": "KEY"}
    assert os.stat(Path(directory, "server-key.pem")).st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
def test_silent_source_expires(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/storage.cfg").write_text(
        f"dir: local2\n\tpath {tmp_path}/store\n\tcontent images\n")
    manager = GuestManager(str(tmp_path / "tree"), "node2", str(tmp_path / "run"),
                           str(tmp_path / "tasks"))
    incoming = IncomingMigrations(manager, str(tmp_path / "state"), ["127.0.0.1"])
    record = Incoming(100, "node1", IncomingState.LISTENING, time.monotonic_ns())
    incoming.records[100] = record
    disk = parse_disks([{"key": "scsi0", "storage": "local2", "size": 1 << 20, "format": "raw"}])
    volid = incoming._allocate(record, disk, mtunnel._NullLog())["scsi0"]
    assert (tmp_path / "store/images/100/vm-100-disk-0.raw").exists()
    now = time.monotonic_ns()
    assert asyncio.run(incoming.expire(now)) == []              # heard of recently
    late = now + int((mtunnel.INCOMING_SILENCE_S + 1) * 1e9)
    assert asyncio.run(incoming.expire(late)) == [100]
    assert incoming.records == {} and volid.startswith("local2:100/")
    assert not (tmp_path / "store/images/100/vm-100-disk-0.raw").exists()
    stop_task = manager.tasks.list_tasks(1)[0]
    assert stop_task["type"] == "qmstop" and stop_task["status"] == "OK"

    kept = Incoming(101, "node1", IncomingState.LISTENING, 0)       # config already here: never expired
    incoming.records[101] = kept
    os.makedirs(manager.config_dir())
    Path(manager.config_path(101)).write_text("memory: 64\n")
    assert asyncio.run(incoming.expire(late)) == [] and 101 in incoming.records


# --- the hand-over order: config first, then `cont` ---------------------------------------


def _incoming(tmp_path: Path) -> tuple[GuestManager, IncomingMigrations]:
    (tmp_path / "tree").mkdir(exist_ok=True)
    manager = GuestManager(str(tmp_path / "tree"), "node2", str(tmp_path / "run"),
                           str(tmp_path / "tasks"))
    return manager, IncomingMigrations(manager, str(tmp_path / "state"), ["127.0.0.1"])


def test_target_refuses_resume_before_the_config_is_here(tmp_path: Path) -> None:
    """No QMP socket exists: were `cont` tried before the config check, the error would
    be QMP's, not the refusal (and a real QEMU would run without its config here)."""
    manager, incoming = _incoming(tmp_path)
    incoming.config_wait_s = 0.05          # how long it waits for a lagging tree
    incoming.records[100] = Incoming(100, "node1", IncomingState.LISTENING, time.monotonic_ns())
    with pytest.raises(MtunnelError, match="not on node 'node2' yet; not resuming"):
        asyncio.run(incoming.handle(100, {"cmd": "resume"}))
    assert incoming.records[100].state == IncomingState.LISTENING      # still waiting
    with pytest.raises(MtunnelError, match="no incoming migration of VM 101"):
        asyncio.run(incoming.handle(101, {"cmd": "resume"}))
    os.makedirs(manager.config_dir())
    Path(manager.config_path(101)).write_text("memory: 64\n")
    with pytest.raises(MtunnelError, match="no incoming migration of VM 101"):
        asyncio.run(incoming.handle(101, {"cmd": "resume"}))          # never resumed here
    incoming.resumed[101] = time.monotonic_ns()                        # a repeated request
    assert asyncio.run(incoming.handle(101, {"cmd": "resume"})) == {
        "status": "running", "repeated": True}


def test_silence_from_env() -> None:
    assert mtunnel.silence_from_env(None) == mtunnel.INCOMING_SILENCE_S
    assert mtunnel.silence_from_env("20") == 20.0
    for bad in ("x", "1", "99999"):
        assert mtunnel.silence_from_env(bad) == mtunnel.INCOMING_SILENCE_S


class _RecordingPeer:
    """Stands in for the target: records whether the config was in the target's
    directory when `resume` came."""

    def __init__(self, target_path: str) -> None:
        self.target_path = target_path
        self.seen: list[tuple[str, bool]] = []

    async def call(self, vmid: int, cmd: str, **fields: object) -> dict[str, str]:
        self.seen.append((cmd, os.path.exists(self.target_path)))
        return {"status": "running"}

    def close(self) -> None:
        pass


class _PausedMonitor:
    open_now = True
    vcpus_stopped = False          # no STOP event seen: _phase3 asks query-status

    async def command(self, name: str, /, **arguments: object) -> object:
        return {"status": "postmigrate"} if name == "query-status" else {}

    def close(self) -> None:
        pass


def test_source_renames_before_it_asks_for_resume(tmp_path: Path) -> None:
    """_phase3 on a running guest: the config is renamed into the target's directory
    before `resume` is sent (fails if the order is swapped), the lock is cleared there,
    the source's copy is gone."""
    from corral.guests import migrate as migrate_mod

    (tmp_path / "tree").mkdir()
    manager = GuestManager(str(tmp_path / "tree"), "node1", str(tmp_path / "run"),
                           str(tmp_path / "tasks"))
    os.makedirs(manager.config_dir())
    Path(manager.config_path(100)).write_text("memory: 64\nlock: migrate\n")
    target_path = str(tmp_path / "tree/nodes/node2/qemu-server/100.conf")
    upid, log = manager.tasks.begin("qmigrate", "100")
    run = migrate_mod.Run(manager, 100, "node2", migrate_mod.MigrateOptions(online=True),
                          str(tmp_path / "state"), log, None)
    peer = _RecordingPeer(target_path)
    run.peer = peer  # type: ignore[assignment]
    run.monitor = _PausedMonitor()  # type: ignore[assignment]
    run.running = True
    run.timings_ms.update(completed_at=1.0, command_to_migration_start=0.5)
    asyncio.run(migrate_mod._phase3(run, manager.load_config(100)))
    manager.tasks.end(upid, log, None)
    assert peer.seen == [("resume", True)]
    assert not os.path.exists(manager.config_path(100))
    assert Path(target_path).read_text() == "memory: 64\n"
    text = "\n".join(manager.tasks.read_log(upid))
    assert "timing: QEMU completion to target resumed" in text
    assert text.index("config moved to node 'node2'") < text.index("resumed on node 'node2'")


def test_precheck_names_a_missing_bridge(tmp_path: Path) -> None:
    """A guest whose NIC is on a bridge this node lacks is refused before anything starts
    here (the start would fail after the source had begun)."""
    from corral.guests.mtunnel import config_digest

    manager, incoming = _incoming(tmp_path)
    incoming.quorate = lambda: True
    (tmp_path / "tree/storage.cfg").write_text(f"dir: local\n\tpath {tmp_path}/store\n")
    source = tmp_path / "tree/nodes/node1/qemu-server"
    source.mkdir(parents=True)
    text = ("memory: 64\nnet0: virtio=BC:24:11:00:00:01,bridge=crlnobr0\n"
            "net1: virtio=BC:24:11:00:00:02,bridge=lo\nnet2: e1000=BC:24:11:00:00:03\n")
    (source / "100.conf").write_text(text)
    with pytest.raises(MtunnelError) as refused:
        asyncio.run(incoming.handle(100, {"cmd": "precheck", "source": "node1",
                                          "digest": config_digest(text)}))
    assert str(refused.value) == ("net0: bridge 'crlnobr0' does not exist on node 'node2'; "
                                  "net1: 'lo' on node 'node2' is not a bridge (plain device)")
    assert not os.path.exists(manager.config_path(100)) and incoming.records == {}
