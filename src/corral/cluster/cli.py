"""The cluster verbs of `corral`: create, add, join-token, delnode, expected, status,
nodes, updatecerts. Each takes argv and returns an exit status; errors print
`corral <verb>: <message>` to stderr and return 2 (bad input, refused) or 1
(the daemon is unreachable or failed).

Every verb takes `--state-dir` (default $CORRAL_STATE_DIR or /var/lib/corral).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from corral.cluster import confedit, pki
from corral.cluster.credentials import ADMIN_USER, hash_password, new_password
from corral.cluster.joinclient import (
    JoinError,
    PeerClient,
    local_address_towards,
    split_host,
)
from corral.cluster.layout import (
    DEFAULT_API_PORT,
    DEFAULT_MOUNT,
    Layout,
    NodeIdentity,
    default_state_dir,
    write_file,
)
from corral.cluster.status import format_nodes, format_status
from corral.corosync_conf import DEFAULT_PORT, ClusterConfig
from corral.daemon.control import ControlError, ControlRefused, request
from corral.errors import CorralError
from corral.totem import auth

START_TIMEOUT_S = 30.0
GUEST_DIRS = ("qemu-server", "lxc")


class CliError(CorralError):
    """A refused command (exit 2): nothing was changed."""


def _parser(verb: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"corral {verb}", description=description)
    parser.add_argument("--state-dir", default=None,
                        help="state directory (default $CORRAL_STATE_DIR or /var/lib/corral)")
    return parser


def _links(parser: argparse.ArgumentParser) -> None:
    for number in range(8):
        parser.add_argument(f"--link{number}", metavar="[address=]IP[,priority=N]",
                            help=argparse.SUPPRESS if number else "address of link 0 (and "
                            "--link1 .. --link7 for more links)")


def _link_args(args: argparse.Namespace) -> list[confedit.LinkArg]:
    return [confedit.parse_link(n, getattr(args, f"link{n}")) for n in range(8)
            if getattr(args, f"link{n}") is not None]


def _run_verb(verb: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except (CliError, JoinError, confedit.JoinRefused, pki.CertError, ControlRefused) as error:
        print(f"corral {verb}: {error}", file=sys.stderr)
        return 2
    except ControlError as error:
        print(f"corral {verb}: {error}", file=sys.stderr)
        return 1
    except CorralError as error:
        print(f"corral {verb}: {error}", file=sys.stderr)
        return 2


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(args.state_dir or default_state_dir())


def _control(layout: Layout, cmd: str, timeout_s: float = 10.0, **params: Any) -> Any:
    if not layout.is_clustered():
        raise CliError(f"corosync config '{layout.conf}' does not exist - is this node part "
                       "of a cluster?")
    return request(str(layout.control_socket), cmd, timeout_s=timeout_s, **params)


# ---- create -----------------------------------------------------------------------


def create(argv: Sequence[str]) -> int:
    parser = _parser("create", "create a new cluster with this node")
    parser.add_argument("clustername")
    _links(parser)
    parser.add_argument("--nodeid", type=int, default=1)
    parser.add_argument("--votes", type=int, default=1)
    parser.add_argument("--name", default=None, help="this node's name (default: hostname)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Totem UDP port")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    parser.add_argument("--mount", default=DEFAULT_MOUNT, help="where corrald mounts the tree")
    parser.add_argument("--password-file", default=None,
                        help="file with the administrator (root@pam) password; default: "
                        "generate one and print it")
    parser.add_argument("--no-start", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    return _run_verb("create", lambda: _create(args))


def _default_name() -> str:
    return socket.gethostname().split(".")[0]


def _default_link0() -> confedit.LinkArg:
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        raise CliError("cannot resolve this host's name to an address: give --link0") from None
    return confedit.LinkArg(0, address)


def _create(args: argparse.Namespace) -> int:
    layout = _layout(args)
    if layout.is_clustered():
        raise CliError(f"this node is already in a cluster ({layout.conf} exists)")
    name = args.name or _default_name()
    links = _link_args(args) or [_default_link0()]
    text = confedit.new_cluster_text(args.clustername, name, args.nodeid, links, args.votes,
                                     args.port)
    password, generated = _read_password_file(args.password_file)
    written: list[Path] = []
    try:
        layout.make_dirs()
        ca_cert, ca_key = pki.new_ca(args.clustername)
        node_cert, node_key = pki.issue_node_cert(name, [link.address for link in links],
                                                  ca_cert, ca_key)
        _write_all(layout, written, {
            layout.authkey: (auth.generate_key(), 0o600),
            layout.ca_key: (ca_key, 0o600), layout.ca_cert: (ca_cert, 0o644),
            layout.node_key: (node_key, 0o600), layout.node_cert: (node_cert, 0o644),
            layout.admin_password: (hash_password(password) + "\n", 0o600),
        })
        layout.write_identity(NodeIdentity(name, args.nodeid, args.api_port, args.mount))
        written.append(layout.identity)
        write_file(layout.conf, text, 0o644)  # last: its presence means "clustered"
        written.append(layout.conf)
    except BaseException:
        _remove(written)
        raise
    print(f"cluster {args.clustername!r} created: node {name} (nodeid {args.nodeid}), "
          f"config in {layout.conf}")
    print(f"API fingerprint: {pki.fingerprint_pem(node_cert)}")
    if generated:
        print(f"administrator {ADMIN_USER} password: {password}")
    if args.no_start:
        print(f"start the node with: corrald --state-dir {layout.root}")
        return 0
    return _start_and_wait(layout)


def _read_password_file(path: str | None) -> tuple[str, bool]:
    if path is None:
        return new_password(), True
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\n")
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    if len(password) < 8:
        raise CliError("the administrator password needs at least 8 characters")
    return password, False


def _write_all(layout: Layout, written: list[Path],
               files: dict[Path, tuple[bytes | str, int]]) -> None:
    for path, (data, mode) in files.items():
        if path.exists():
            raise CliError(f"{path} already exists; remove the old cluster files first")
        write_file(path, data, mode)
        written.append(path)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _running_pid(layout: Layout) -> int | None:
    """The pid of a corrald already running for this state directory (e.g. started
    with --wait-for-cluster by the service manager), else None."""
    try:
        pid = int(layout.pidfile.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (OSError, ValueError):
        return None
    return pid if b"corral" in cmdline else None


class _Running:
    """A corrald this command did not start: looks like a Popen for _start_and_wait."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            self.returncode = -1
        return self.returncode


def _start_and_wait(layout: Layout, timeout_s: float = START_TIMEOUT_S) -> int:
    pid = _running_pid(layout)
    process: Any = _Running(pid) if pid is not None else start_daemon(layout)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"corral: corrald exited with status {process.returncode}; last log lines:\n"
                  + _tail(layout.logfile), file=sys.stderr)
            return 1
        with contextlib.suppress(ControlError):
            quorum = request(str(layout.control_socket), "quorum", timeout_s=2.0)
            if quorum.get("quorate") and quorum.get("ready"):
                where = "its own log" if pid is not None else str(layout.logfile)
                print(f"corrald running (pid {process.pid}), cluster quorate; log: {where}")
                return 0
        time.sleep(0.05)
    print(f"corral: corrald (pid {process.pid}) is running but not quorate after "
          f"{timeout_s:.0f} s; see {layout.logfile}", file=sys.stderr)
    return 1


def start_daemon(layout: Layout) -> subprocess.Popen[bytes]:
    """Start corrald detached (own session), logging to <state_dir>/corrald.log."""
    with open(layout.logfile, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "corral.daemon.main", "--state-dir", str(layout.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- add ----------------------------------------------------------------------------


def add(argv: Sequence[str]) -> int:
    parser = _parser("add", "join this node to an existing cluster")
    parser.add_argument("hostname", help="an existing member: HOST or HOST:PORT")
    parser.add_argument("--fingerprint", default=None,
                        help="SHA-256 fingerprint of the member's API certificate")
    _links(parser)
    parser.add_argument("--nodeid", type=int, default=None)
    parser.add_argument("--votes", type=int, default=None)
    parser.add_argument("--force", action="store_true",
                        help="replace an offline node of the same name; join despite guest "
                        "configs on this node")
    parser.add_argument("--token", default=None, help="one-time join token from "
                        "`corral join-token` on the member")
    parser.add_argument("--password", action="store_true",
                        help="authenticate as root@pam with a password (read from stdin, "
                        "or prompted on a terminal)")
    parser.add_argument("--name", default=None, help="this node's name (default: hostname)")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT,
                        help="this node's own API port")
    parser.add_argument("--mount", default=DEFAULT_MOUNT)
    parser.add_argument("--no-start", action="store_true")
    args = parser.parse_args(argv)
    return _run_verb("add", lambda: _add(args))


def _check_can_join(layout: Layout, name: str, mount: str, force: bool) -> None:
    if layout.is_clustered():
        raise CliError(f"this node is already in a cluster ({layout.conf} exists)")
    if force:
        return
    for kind in GUEST_DIRS:
        for base in (Path(mount) / "nodes" / name / kind, layout.root / "guests" / kind):
            try:
                found = base.is_dir() and any(base.glob("*.conf"))
            except OSError as error:  # e.g. a dead mount of a crashed daemon (ENOTCONN)
                print(f"corral add: cannot check {base} for guest configs: {error.strerror}",
                      file=sys.stderr)
                continue
            if found:
                raise CliError(f"this node holds guest configs ({base}); a joining node "
                               "must have none (move them away, or --force)")


def _add(args: argparse.Namespace) -> int:
    layout = _layout(args)
    name = args.name or _default_name()
    confedit.check_node_name(name)
    _check_can_join(layout, name, args.mount, args.force)
    if (args.token is None) == (not args.password):
        raise CliError("give exactly one of --token T and --password")
    host, port = split_host(args.hostname, DEFAULT_API_PORT)
    pinned = pki.normalize_fingerprint(args.fingerprint) if args.fingerprint else None
    client = PeerClient(host, port, pinned)
    if pinned is None:
        client.fingerprint = _confirm_fingerprint(client)
    version = client.call("GET", "/cluster/config/apiversion")
    if version != 1:
        raise JoinError(f"{client.where} speaks join API version {version}; this node speaks 1")
    if args.token is not None:
        client.token = args.token
    else:
        client.login(ADMIN_USER, _read_password(host))
    links = _link_args(args)
    key = pki.new_key()
    params: dict[str, Any] = {"apiversion": 1, "votes": args.votes, "nodeid": args.nodeid,
                              "force": 1 if args.force else None,
                              "csr": pki.new_csr(name, key).decode()}
    if links:
        params.update({f"link{link.number}": link.address for link in links})
    else:
        params["new_node_ip"] = local_address_towards(host, port)
    started = time.monotonic()
    reply = client.call("POST", f"/cluster/config/nodes/{name}", params)
    _write_join_result(layout, reply, key, name, args)
    print(f"node {name} joined as nodeid {reply['nodeid']} (config_version "
          f"{ClusterConfig.from_text(reply['corosync_conf']).config_version}) in "
          f"{time.monotonic() - started:.2f} s")
    if args.no_start:
        print(f"start the node with: corrald --state-dir {layout.root}")
        return 0
    return _start_and_wait(layout)


def _confirm_fingerprint(client: PeerClient) -> str:
    actual = client.peer_fingerprint()
    if not sys.stdin.isatty():
        raise CliError(f"no --fingerprint given; {client.where} presents {actual}. Check it "
                       "on the member (`corral join-token` prints it) and pass --fingerprint")
    answer = input(f"{client.where} presents the certificate fingerprint\n  {actual}\n"
                   "Is this the member you want to join? (yes/no) ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CliError("fingerprint not accepted")
    return actual


def _read_password(host: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(f"Please enter superuser (root) password for '{host}': ")
    return sys.stdin.readline().rstrip("\n")


def _write_join_result(layout: Layout, reply: dict[str, Any], key: Any, name: str,
                       args: argparse.Namespace) -> None:
    text = str(reply["corosync_conf"])
    config = ClusterConfig.from_text(text, "corosync.conf from the member")
    nodeid = int(reply["nodeid"])
    config.node(nodeid)
    cert = str(reply.get("node_cert") or "").encode()
    ca_cert = str(reply["ca_cert"]).encode()
    if not cert or not pki.verify_signed_by(cert, ca_cert):
        raise JoinError("the member's reply holds no certificate signed by the cluster CA")
    written: list[Path] = []
    try:
        layout.make_dirs()
        _write_all(layout, written, {
            layout.authkey: (base64.b64decode(reply["corosync_authkey"]), 0o600),
            layout.ca_key: (str(reply["ca_key"]), 0o600), layout.ca_cert: (ca_cert, 0o644),
            layout.node_key: (pki.key_pem(key), 0o600), layout.node_cert: (cert, 0o644),
        })
        if reply.get("admin_hash"):
            _write_all(layout, written, {layout.admin_password: (reply["admin_hash"] + "\n",
                                                                 0o600)})
        layout.write_identity(NodeIdentity(name, nodeid, args.api_port, args.mount))
        written.append(layout.identity)
        write_file(layout.conf, text, 0o644)
        written.append(layout.conf)
    except BaseException:
        _remove(written)
        raise


# ---- the other verbs -------------------------------------------------------------------


def join_token(argv: Sequence[str]) -> int:
    parser = _parser("join-token", "print a one-time join token")
    parser.add_argument("--expire", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument("--quiet", action="store_true", help="print the token only")
    args = parser.parse_args(argv)

    def body() -> int:
        data = _control(_layout(args), "join_token", expire_s=args.expire)
        if args.quiet:
            print(data["token"])
            return 0
        print(f"join token (valid {args.expire:.0f} s, once): {data['token']}")
        print(f"fingerprint: {data['fingerprint']}")
        print(f"on the joining node: corral add {data['host']}:{data['port']} --fingerprint "
              f"{data['fingerprint']} --token {data['token']}")
        return 0

    return _run_verb("join-token", body)


def delnode(argv: Sequence[str]) -> int:
    parser = _parser("delnode", "remove a node from the cluster (it must be offline)")
    parser.add_argument("node")
    args = parser.parse_args(argv)

    def body() -> int:
        data = _control(_layout(args), "delnode", name=args.node)
        print(f"node {args.node} removed (config_version {data['config_version']})")
        return 0

    return _run_verb("delnode", body)


def expected(argv: Sequence[str]) -> int:
    parser = _parser("expected", "set the expected votes")
    parser.add_argument("votes")
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            votes = int(args.votes)
        except ValueError:
            raise CliError(f"expected votes must be a number, got {args.votes!r}") from None
        _control(_layout(args), "expected", votes=votes)
        return 0

    return _run_verb("expected", body)


def status(argv: Sequence[str]) -> int:
    parser = _parser("status", "cluster, quorum and membership status")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    def body() -> int:
        data = _control(_layout(args), "status")
        if args.json:
            import json

            print(json.dumps(data, indent=1))
        else:
            print(format_status(data), end="")
        return 0

    return _run_verb("status", body)


def nodes(argv: Sequence[str]) -> int:
    parser = _parser("nodes", "list cluster nodes")
    args = parser.parse_args(argv)

    def body() -> int:
        print(format_nodes(_control(_layout(args), "status")), end="")
        return 0

    return _run_verb("nodes", body)


def updatecerts(argv: Sequence[str]) -> int:
    parser = _parser("updatecerts", "renew this node's certificate (signed by the cluster CA)")
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args(argv)

    def body() -> int:
        layout = _layout(args)
        if not layout.is_clustered():
            raise CliError("this node is not in a cluster")
        identity = layout.read_identity()
        config = ClusterConfig.from_file(str(layout.conf))
        addresses = list(config.node(identity.nodeid).addrs.values())
        try:
            cert, key = pki.issue_node_cert(identity.name, addresses, layout.ca_cert.read_bytes(),
                                            layout.ca_key.read_bytes())
        except FileNotFoundError as error:
            raise CliError(f"cannot renew: {error.filename} is missing") from None
        write_file(layout.node_key, key, 0o600)
        write_file(layout.node_cert, cert, 0o644)
        with contextlib.suppress(ControlError):
            request(str(layout.control_socket), "reload")
        if not args.silent:
            print(f"new certificate for {identity.name}: {pki.fingerprint_pem(cert)}")
        return 0

    return _run_verb("updatecerts", body)

