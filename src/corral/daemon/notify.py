"""The sd_notify protocol without systemd: datagrams to $NOTIFY_SOCKET.

`Notifier.send("READY=1")` is a no-op when the daemon is not run by a service
manager. A socket path starting with '@' is in the abstract namespace.
`watchdog_interval_s()` is half of $WATCHDOG_USEC (when it names this pid or
no pid), the interval at which WATCHDOG=1 should be sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("corral.daemon")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_usec = _watchdog_usec(env)
        self.sent: list[str] = []

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; False when it could not be sent."""
        if not self.address:
            return False
        message = "\n".join(lines)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as error:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), error)
            return False
        self.sent.append(message)
        return True

    def watchdog_interval_s(self) -> float | None:
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6


def _watchdog_usec(env: dict[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not raw or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value > 0 else None
