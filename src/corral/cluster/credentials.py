"""Administrator password hashes, one-time join tokens, and API tickets.

- The admin password (root@pam) is stored as `scrypt$<n>$<salt hex>$<hash hex>`.
- A join token is 32 random bytes (URL-safe base64); the issuing node keeps only
  its SHA-256 with an expiry, and marks it used when a join consumes it. With a
  `path` the table is kept on disk (written atomically, mode 0600, under priv/),
  so a token stays valid, and a used token stays used, across daemon restarts.
- A ticket (after `POST /access/ticket`) is `PVE:root@pam:<hex epoch>::<b64 HMAC>`
  with a per-process secret: it is only used during a join, on the node that
  issued it, within TICKET_LIFETIME_S.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("corral.cluster")

ADMIN_USER = "root@pam"
SCRYPT_N = 1 << 14
TICKET_LIFETIME_S = 7200
MAX_TOKENS = 256
MAX_TOKEN_LIFETIME_S = 7 * 86400
DEFAULT_TOKEN_LIFETIME_S = 3600
TOKEN_PREFIX = "cjt_"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=8, p=1)
    return f"scrypt${SCRYPT_N}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n_text, salt_hex, digest_hex = stored.strip().split("$")
        n, salt, expected = int(n_text), bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        return False
    if kind != "scrypt" or not 2 <= n <= 1 << 20:
        return False
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1)
    return hmac.compare_digest(digest, expected)


def new_password() -> str:
    return secrets.token_urlsafe(15)


class TokenError(Exception):
    """Why a join token was refused (the message is shown to the joining operator)."""


@dataclass
class JoinTokens:
    """One-time join tokens issued by this node: SHA-256 -> expiry (wall-clock s)."""

    expiry_s: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> JoinTokens:
        """The table saved at `path`; an empty one if there is none. A damaged
        file is logged and replaced (tokens in it must be issued again)."""
        tokens = cls(path=path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            tokens.expiry_s = _digest_table(data["valid"])
            tokens.used = _digest_table(data["used"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("join tokens in %s unreadable (%s): starting with none", path, error)
        return tokens

    def save(self) -> None:
        if self.path is None:
            return
        data = json.dumps({"valid": self.expiry_s, "used": self.used}, sort_keys=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)

    def issue(self, now_s: float, lifetime_s: float) -> str:
        self._forget_old(now_s)
        if len(self.expiry_s) >= MAX_TOKENS:
            oldest = min(self.expiry_s, key=self.expiry_s.__getitem__)
            del self.expiry_s[oldest]
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # never starts with "-"
        self.expiry_s[_digest(token)] = now_s + lifetime_s
        self.save()
        return token

    def check(self, token: str, now_s: float) -> str:
        """The token's digest if it is valid now; raises TokenError otherwise."""
        digest = _digest(token)
        if digest in self.used:
            raise TokenError("join token already used")
        expiry = self.expiry_s.get(digest)
        if expiry is None:
            raise TokenError("bad join token (not issued by this node)")
        if now_s > expiry:
            raise TokenError("join token expired")
        return digest

    def consume(self, digest: str, now_s: float) -> None:
        expiry = self.expiry_s.pop(digest, now_s)
        self.used[digest] = expiry
        self.save()

    def restore(self, digest: str) -> None:
        """Give a consumed token back (the join it was used for failed)."""
        expiry = self.used.pop(digest, None)
        if expiry is not None:
            self.expiry_s[digest] = expiry
            self.save()

    def _forget_old(self, now_s: float) -> None:
        # Expired tokens are kept a while so that their use says "expired", not "bad".
        horizon = now_s - MAX_TOKEN_LIFETIME_S
        self.expiry_s = {d: e for d, e in self.expiry_s.items() if e > horizon}
        self.used = {d: e for d, e in self.used.items() if e > horizon}
        while len(self.used) > MAX_TOKENS:
            self.used.pop(next(iter(self.used)))


def _digest_table(raw: object) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ValueError("not a table")
    table = {}
    for digest, expiry in list(raw.items())[:MAX_TOKENS * 2]:
        if not isinstance(digest, str) or len(digest) != 64 or \
                not isinstance(expiry, (int, float)):
            raise ValueError(f"bad entry {digest!r}")
        table[digest] = float(expiry)
    return table


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tickets:
    """PVE-shaped tickets and CSRF tokens, HMAC-signed with a per-process secret."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def issue(self, user: str, now_s: float) -> tuple[str, str]:
        stamp = f"{int(now_s):08X}"
        ticket = f"PVE:{user}:{stamp}::{self._sign('ticket', user, stamp)}"
        csrf = f"{stamp}:{self._sign('csrf', user, stamp)}"
        return ticket, csrf

    def verify(self, ticket: str, csrf: str | None, now_s: float, need_csrf: bool) -> str | None:
        """The user of a valid ticket (with a valid CSRF token if `need_csrf`), else None."""
        parts = ticket.split(":")
        if len(parts) != 5 or parts[0] != "PVE" or parts[3] != "":
            return None
        user, stamp, signature = parts[1], parts[2], parts[4]
        if not hmac.compare_digest(signature, self._sign("ticket", user, stamp)):
            return None
        try:
            issued = int(stamp, 16)
        except ValueError:
            return None
        if not issued - 300 <= now_s <= issued + TICKET_LIFETIME_S:
            return None
        if need_csrf:
            expected = f"{stamp}:{self._sign('csrf', user, stamp)}"
            if csrf is None or not hmac.compare_digest(csrf, expected):
                return None
        return user

    def _sign(self, kind: str, user: str, stamp: str) -> str:
        mac = hmac.new(self._secret, f"{kind}:{stamp}:{user}".encode(), hashlib.sha256)
        return base64.b64encode(mac.digest()).decode().rstrip("=")
