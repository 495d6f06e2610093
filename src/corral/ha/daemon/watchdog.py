"""Watchdog for self-fencing: a small watchdog-mux-like process and its client.

The HA daemons (CRM and LRM) are clients. Each connects to the mux's Unix socket (open),
sends b"p" to feed and b"V" before closing on purpose (magic close). A client that is not
fed for `timeout_s`, or that disconnects without the magic byte (daemon killed), expires
the watchdog. The mux runs detached from the HA daemon so it survives the daemon's death.

Backends, chosen at mux start (`--device`):
- `kernel`: /dev/watchdog (softdog or hardware). The mux pings the device every second while
  no client has expired; once one expires it kills the guests and stops pinging, and the
  device resets the machine. Never used by the tests.
- `fallback` (supervised, no device): when a client expires the mux SIGKILLs every guest of
  this node (the pids in `<guest_dir>/*.pid` that really are guests). That gives the safety
  property the HA logic needs - a node that stopped feeding has no running guests
  `timeout_s` later - but it does not reset the node. `auto` picks kernel if
  /dev/watchdog exists, else fallback.

    python -m corral.ha.daemon.watchdog --socket S --guest-dir D --timeout-s 6 [--device auto]
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from corral.ha.daemon.agent import pid_is_guest, read_pid

log = logging.getLogger("corral.ha.watchdog")

WDIOC_SETTIMEOUT = 0xC0045706
KERNEL_DEVICE = "/dev/watchdog"
DEVICE_PING_S = 1.0
TICK_S = 0.2
MAX_CLIENTS = 64
CONNECT_TIMEOUT_S = 10.0


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "kernel" if os.path.exists(KERNEL_DEVICE) else "fallback"
    return requested


def kill_guests(guest_dir: Path) -> list[int]:
    killed = []
    for pid_file in sorted(guest_dir.glob("*.pid")):
        pid = read_pid(pid_file)
        if pid is not None and pid_is_guest(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


class Mux:
    def __init__(self, socket_path: str, guest_dir: Path, timeout_s: float, device: str,
                 device_timeout_s: int) -> None:
        self.socket_path = socket_path
        self.guest_dir = guest_dir
        self.timeout_ns = int(timeout_s * 1e9)
        self.device = device
        self.device_timeout_s = device_timeout_s
        self.deadlines: dict[int, int] = {}  # client key -> monotonic deadline (ns)
        self.magic: set[int] = set()
        self.orphans: list[int] = []          # deadlines of clients gone without magic close
        self.expired = False
        self.device_fd: int | None = None
        self.last_ping_s = 0.0
        self.running = True

    def _open_device(self) -> None:
        if self.device != "kernel":
            return
        self.device_fd = os.open(KERNEL_DEVICE, os.O_WRONLY | os.O_CLOEXEC)
        fcntl.ioctl(self.device_fd, WDIOC_SETTIMEOUT, struct.pack("I", self.device_timeout_s))
        log.info("watchdog device %s opened, timeout %d s", KERNEL_DEVICE, self.device_timeout_s)

    def _ping_device(self) -> None:
        now = time.monotonic()
        if self.device_fd is not None and not self.expired and now - self.last_ping_s >= DEVICE_PING_S:
            os.write(self.device_fd, b"\0")
            self.last_ping_s = now

    def _close_device(self) -> None:
        if self.device_fd is not None and not self.expired:
            os.write(self.device_fd, b"V")  # magic close: the device stops without a reset
            os.close(self.device_fd)
            self.device_fd = None

    def _expire(self, reason: str) -> None:
        killed = kill_guests(self.guest_dir)
        log.error("watchdog expired (%s): killed guests %s (%s)", reason, killed,
                  "device stops being pinged" if self.device_fd is not None
                  else "fallback, no node reset")
        if self.device_fd is not None:
            self.expired = True

    def _check(self) -> None:
        now = time.monotonic_ns()
        for key, deadline in list(self.deadlines.items()):
            if now > deadline:
                self._expire(f"client {key} not fed")
                self.deadlines[key] = now + self.timeout_ns  # fires again if still not fed
        for deadline in list(self.orphans):
            if now > deadline:
                self.orphans.remove(deadline)
                self._expire("client closed without magic")

    def _on_data(self, conn: socket.socket, key: int) -> bool:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            deadline = self.deadlines.pop(key, None)
            if key not in self.magic and deadline is not None:
                log.warning("client %d closed without magic close - keeping its deadline", key)
                self.orphans.append(deadline)
            self.magic.discard(key)
            return False
        if b"p" in data:
            self.deadlines[key] = time.monotonic_ns() + self.timeout_ns
            self.magic.discard(key)
        if data.endswith(b"V"):
            self.magic.add(key)
        return True

    def serve(self) -> None:
        self._open_device()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        server.listen(MAX_CLIENTS)
        selector = selectors.DefaultSelector()
        selector.register(server, selectors.EVENT_READ, None)
        log.info("watchdog mux listening on %s (%s, client timeout %.0f s)", self.socket_path,
                 self.device, self.timeout_ns / 1e9)
        next_key = 0
        while self.running:
            for selected, _ in selector.select(TICK_S):
                if selected.data is None:
                    conn, _ = server.accept()
                    next_key += 1
                    self.deadlines[next_key] = time.monotonic_ns() + self.timeout_ns
                    selector.register(conn, selectors.EVENT_READ, next_key)
                else:
                    conn = selected.fileobj  # type: ignore[assignment]
                    if not self._on_data(conn, selected.data):
                        selector.unregister(conn)
                        conn.close()
            self._check()
            self._ping_device()
        if not self.deadlines and not self.orphans:
            self._close_device()
        server.close()
        os.unlink(self.socket_path)


class WatchdogClient:
    """One daemon's connection to the mux (open/update/close as in the HA env)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.sock: socket.socket | None = None

    def open(self) -> None:
        if self.sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(self.socket_path)
        self.sock = sock

    def update(self) -> None:
        if self.sock is None:
            self.open()
        assert self.sock is not None
        self.sock.sendall(b"p")

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendall(b"V")
        finally:
            self.sock.close()
            self.sock = None


def _answers(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        probe.sendall(b"V")  # magic close: this probe is not a watchdog client
        return True
    except OSError:
        return False
    finally:
        probe.close()


def start_mux(socket_path: str, guest_dir: Path, timeout_s: float, device: str,
              device_timeout_s: int, log_path: str) -> int:
    """Start a detached mux unless one answers on socket_path; returns its pid (0 if it
    was already running)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        probe.sendall(b"V")
        return 0
    except OSError:
        pass
    finally:
        probe.close()
    # Nobody answers: a socket file left by a killed mux is stale (waiting for it to exist
    # would return before the new mux listens).
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    args = [sys.executable, "-m", "corral.ha.daemon.watchdog", "--socket", socket_path,
            "--guest-dir", str(guest_dir), "--timeout-s", str(timeout_s), "--device", device,
            "--device-timeout-s", str(device_timeout_s)]
    with open(log_path, "ab") as log_file:
        import subprocess
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=log_file, start_new_session=True)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while time.monotonic() < deadline:
        if _answers(socket_path):
            return child.pid
        if child.poll() is not None:
            raise RuntimeError(f"watchdog mux exited with {child.returncode}; see {log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"watchdog mux did not come up; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-ha-watchdog")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--guest-dir", required=True, type=Path)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--device", choices=("auto", "kernel", "fallback"), default="auto")
    parser.add_argument("--device-timeout-s", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s watchdog-mux %(levelname)s %(message)s")
    mux = Mux(args.socket, args.guest_dir, args.timeout_s, choose_device(args.device),
              args.device_timeout_s)

    def stop(signum: int, frame: object) -> None:
        mux.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mux.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
