"""Where a node keeps its cluster files, and how they are written.

Everything lives under the state directory (default /var/lib/corral, or
$CORRAL_STATE_DIR, or --state-dir):

    corosync.conf        node-local copy of the cluster config (0644)
    node.json            this node's identity: name, nodeid, API port, mount (0644)
    ca.pem               the cluster CA certificate (0644)
    node.pem             this node's certificate, signed by the cluster CA (0644)
    priv/                (0700)
      authkey            the cluster key (0600)
      ca.key             the cluster CA's private key (0600)
      node.key           this node's private key (0600)
      admin.pw           scrypt hash of the administrator (root@pam) password (0600)
      join-tokens.json   digests and expiry of the join tokens this node issued (0600)
    corrald.sock         control socket of the daemon (0600)
    cpg.sock             CPG IPC socket of the daemon (0600)
    corrald.pid, corrald.log
    engine/              Totem/quorum state (ring sequence, incarnation, ev_tracking)

In the reference, the CA key, the authkey and the password file live in the
replicated tree's priv/; here every node receives a copy when it joins, so any
member can admit the next node.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/corral"
DEFAULT_MOUNT = "/etc/corral"
DEFAULT_API_PORT = 8006
STATE_DIR_ENV = "CORRAL_STATE_DIR"


def default_state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    nodeid: int
    api_port: int = DEFAULT_API_PORT
    mount: str = DEFAULT_MOUNT


class Layout:
    """Paths under one state directory."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)

    @property
    def conf(self) -> Path:
        return self.root / "corosync.conf"

    @property
    def identity(self) -> Path:
        return self.root / "node.json"

    @property
    def priv(self) -> Path:
        return self.root / "priv"

    @property
    def authkey(self) -> Path:
        return self.priv / "authkey"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.priv / "ca.key"

    @property
    def node_cert(self) -> Path:
        return self.root / "node.pem"

    @property
    def node_key(self) -> Path:
        return self.priv / "node.key"

    @property
    def admin_password(self) -> Path:
        return self.priv / "admin.pw"

    @property
    def join_tokens(self) -> Path:
        return self.priv / "join-tokens.json"

    @property
    def control_socket(self) -> Path:
        return self.root / "corrald.sock"

    @property
    def cpg_socket(self) -> Path:
        return self.root / "cpg.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "corrald.pid"

    @property
    def logfile(self) -> Path:
        return self.root / "corrald.log"

    @property
    def engine_dir(self) -> Path:
        return self.root / "engine"

    def is_clustered(self) -> bool:
        return self.conf.exists()

    def make_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.priv.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.priv, 0o700)
        self.engine_dir.mkdir(exist_ok=True)

    def read_identity(self) -> NodeIdentity:
        data = json.loads(self.identity.read_text(encoding="utf-8"))
        return NodeIdentity(str(data["name"]), int(data["nodeid"]),
                            int(data.get("api_port", DEFAULT_API_PORT)),
                            str(data.get("mount", DEFAULT_MOUNT)))

    def write_identity(self, identity: NodeIdentity) -> None:
        write_file(self.identity, json.dumps(asdict(identity), indent=1) + "\n", 0o644)

    def cluster_files(self) -> list[Path]:
        """What `create`/`add` write; removed again when they fail half way."""
        return [self.conf, self.identity, self.authkey, self.ca_cert, self.ca_key,
                self.node_cert, self.node_key, self.admin_password]


def write_file(path: Path, data: str | bytes, mode: int) -> None:
    """Atomically replace `path` with `data`, created with `mode` (never wider first)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(temporary, mode)  # the umask may have narrowed it
    os.replace(temporary, path)

