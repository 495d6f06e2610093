"""HTTPS client of a member's join API, pinning the member's certificate fingerprint.

Each call opens a new TLS connection, checks the peer certificate's SHA-256
against the pinned fingerprint *before* sending anything (credentials
included), then sends one request. Errors are `JoinError` with a message
that names what went wrong (unreachable, not TLS, fingerprint mismatch, the
member's refusal).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from typing import Any

from corral.cluster.pki import fingerprint_der
from corral.errors import CorralError

TIMEOUT_S = 15.0
MAX_REPLY_BYTES = 1 << 20


class JoinError(CorralError):
    """A join step failed; nothing was changed on this node."""


def split_host(text: str, default_port: int) -> tuple[str, int]:
    """HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        try:
            return host, int(port)
        except ValueError:
            raise JoinError(f"bad port in {text!r}") from None
    return text, default_port


class PeerClient:
    def __init__(self, host: str, port: int, fingerprint: str | None,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s
        self.ticket: str | None = None
        self.csrf: str | None = None
        self.token: str | None = None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # Trust comes from the pinned fingerprint, not from a CA chain.
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self) -> http.client.HTTPSConnection:
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                 timeout=self.timeout_s)
        try:
            connection.connect()
        except socket.gaierror as error:
            raise JoinError(f"cannot resolve {self.host}: {error.strerror}") from None
        except ssl.SSLError as error:
            raise JoinError(f"{self.where} does not speak TLS (is it a Corral node's API "
                            f"port?): {error.reason or error}") from None
        except TimeoutError:
            raise JoinError(f"cannot reach {self.where}: timed out") from None
        except OSError as error:
            raise JoinError(f"cannot reach {self.where}: {error.strerror or error}") from None
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
        actual = fingerprint_der(der or b"")
        if self.fingerprint is not None and actual != self.fingerprint:
            connection.close()
            raise JoinError(f"fingerprint mismatch: {self.where} presents {actual}, expected "
                            f"{self.fingerprint}; not sending credentials")
        self.seen_fingerprint = actual
        return connection

    def peer_fingerprint(self) -> str:
        self._connect().close()
        return self.seen_fingerprint

    def call(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        connection = self._connect()
        headers = {"Accept": "application/json"}
        if self.ticket is not None:
            headers["Cookie"] = "PVEAuthCookie=" + urllib.parse.quote(self.ticket)
            if method != "GET" and self.csrf:
                headers["CSRFPreventionToken"] = self.csrf
        elif self.token is not None:
            headers["Authorization"] = "CorralJoinToken=" + self.token
        body = None
        url = "/api2/json" + path
        clean = {k: str(v) for k, v in (params or {}).items() if v is not None}
        if method in ("GET", "DELETE") and clean:
            url += "?" + urllib.parse.urlencode(clean)
        elif clean:
            body = urllib.parse.urlencode(clean)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            connection.request(method, url, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise JoinError(f"{self.where}: no reply in {self.timeout_s:.0f} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise JoinError(f"{self.where}: connection failed: {error}") from None
        finally:
            connection.close()
        try:
            reply = json.loads(raw)
        except ValueError:
            raise JoinError(f"{self.where} did not answer with JSON (HTTP {response.status}); "
                            "is it a Corral node's API port?") from None
        if response.status != 200:
            message = str(reply.get("message") or response.reason).strip()
            errors = reply.get("errors")
            if errors:
                message += " " + "; ".join(f"{k}: {v}" for k, v in errors.items())
            raise JoinError(f"{self.where} refused: {message}")
        return reply.get("data")

    def login(self, user: str, password: str) -> None:
        data = self.call("POST", "/access/ticket", {"username": user, "password": password})
        self.ticket, self.csrf = data["ticket"], data["CSRFPreventionToken"]


def local_address_towards(host: str, port: int) -> str:
    """The source address this host would use to reach `host` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(probe.getsockname()[0])
