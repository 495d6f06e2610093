"""One corrald: transport + Totem + CPG + quorum + config sync + control socket + join API.

Startup follows the reference: the daemon reads the node-local copy of the
cluster config (`<state_dir>/corosync.conf`) and the key (`priv/authkey`)
before any replicated tree exists; newer configs reach it through the
`corral-config` CPG group (see configsync.py) and are validated, written back
to the local copy and applied where that needs no restart (nodes added to or
removed from the transport and the quorum's node votes).

Shutdown (SIGTERM/SIGINT or the control request `stop`): STOPPING=1, the
quorum service announces a clean leave, the config group is left, the servers
close, Totem leaves the ring (peers see a leave, not a failure).
SIGHUP (or `reload`): the node certificate is reloaded and the local config
file re-read (applied like a config from a peer if its version is higher).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from corral import __version__
from corral.cluster import confedit, pki
from corral.cluster.credentials import (
    DEFAULT_TOKEN_LIFETIME_S,
    MAX_TOKEN_LIFETIME_S,
    JoinTokens,
)
from corral.cluster.layout import Layout, NodeIdentity, write_file
from corral.corosync_conf import ClusterConfig, parse
from corral.cpg.service import CpgService
from corral.daemon import catchup, nodelist
from corral.daemon.api import ApiServer, Router
from corral.daemon.configsync import ConfigSync
from corral.daemon.control import ControlServer
from corral.daemon.guestapi import GuestApi
from corral.daemon.notify import Notifier
from corral.daemon.statusapi import StatusApi
from corral.daemon.statusbus import StatusBus
from corral.daemon.tree import Tree, TreeUnavailable
from corral.engine import next_incarnation, ring_text
from corral.errors import ConfigError, CorralError
from corral.quorum.config import QuorumConfig
from corral.quorum.service import QuorumService
from corral.totem import _core, auth
from corral.totem.node import TotemNode
from corral.totem.transport import UdpTransport

log = logging.getLogger("corral.daemon")

QUORUM_LEAVE_TIMEOUT_S = 2.0
CLOCK_OFFSET_WARN_MS = 500
HEARTBEAT_STALE_S = 10.0
TREE_POLL_S = 1.0


@dataclass
class DaemonOptions:
    state_dir: str
    api: bool = True
    stats_interval_s: float = 30.0
    fs: bool = True      # run the replicated configuration filesystem
    mount: bool = True   # and mount it (identity.mount, default /etc/corral)
    guest_run_dir: str = "/run/corral/qemu-server"    # as `corral qm --run-dir`
    guest_task_dir: str = "/var/log/corral/tasks"     # as `corral qm --task-dir`


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.layout = Layout(options.state_dir)
        if not self.layout.conf.exists():
            raise ConfigError(str(self.layout.conf), "this node is not in a cluster (no "
                              "corosync.conf); run `corral create` or `corral add`")
        self.identity: NodeIdentity = self.layout.read_identity()
        self.nodeid = self.identity.nodeid
        self.conf_text = self.layout.conf.read_text(encoding="utf-8")
        self.config = ClusterConfig.from_text(self.conf_text, str(self.layout.conf))
        self.config.node(self.nodeid)
        self.key = auth.read_key_file(str(self.layout.authkey))
        self.tokens = JoinTokens.load(self.layout.join_tokens)
        self.notifier = Notifier()
        self.stop_requested = asyncio.Event()
        self.members: tuple[int, ...] = ()
        self.delivered = 0
        self.restart_reasons: list[str] = []
        self._change_lock = asyncio.Lock()
        engine_dir = str(self.layout.engine_dir)
        os.makedirs(engine_dir, exist_ok=True)
        incarnation = next_incarnation(engine_dir, self.nodeid)
        self.auth = auth.PacketAuthenticator(
            self.key, self.config.cluster_name, self.nodeid, incarnation,
            [n.nodeid for n in self.config.nodes], encrypt=self.config.encrypt)
        self.transport = UdpTransport(self.config, self.nodeid, self.auth)
        self.transport.on_link_change = lambda peer: log.info(
            "link %d to node %d is %s", peer.linknumber, peer.nodeid, peer.state.value)
        timers = self.config.totem.timers(len(self.config.nodes))
        self.node = TotemNode(self.nodeid, timers, self.transport, engine_dir)
        self.node.add_listener(self._on_totem_event)
        self.cpg = CpgService(self.node)
        self.quorum = QuorumService(self.cpg, QuorumConfig.from_conf_text(self.conf_text),
                                    engine_dir)
        self.sync = ConfigSync(self.cpg, __version__, self.identity.name,
                               lambda: (self.config.config_version, self.conf_text), self.adopt)
        self.control = ControlServer(str(self.layout.control_socket))
        self._register_control()
        self.api: ApiServer | None = None
        self.guest_api = GuestApi(options.state_dir, self.identity.mount, self.identity.name,
                                  lambda: list(self.config.node(self.nodeid).addrs.values()),
                                  lambda: bool(self.quorum.quorate), options.guest_run_dir,
                                  options.guest_task_dir)
        self.status_bus = StatusBus(self.cpg, self.identity.name, options.state_dir,
                                    self.identity.mount, options.guest_run_dir,
                                    options.guest_task_dir)
        self.status_api = StatusApi(self.status_bus, lambda: [n.name for n in self.config.nodes],
                                    self._member_names, self._guest_list)
        self.ipc: Any = None
        self.tree: Tree | None = None
        self.fs_note: str | None = "the configuration filesystem is not started yet"
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = False

    # ---- Totem events ------------------------------------------------------------

    def _on_totem_event(self, event: tuple[Any, ...]) -> None:
        if event[0] == _core.EV_DELIVER:
            self.delivered += 1
            return
        if event[0] != _core.EV_CONFIG or event[1] != _core.CONF_REGULAR:
            return
        _kind, _conf, ring_id, members, joined, left = event[:6]
        text = f"A new membership ({ring_text(ring_id)}) was formed."
        if joined:
            text += " Members joined: " + " ".join(map(str, joined))
        if left:
            text += " Members left: " + " ".join(map(str, left))
        log.info(text)
        log.info("Members[%d]: %s", len(members), " ".join(map(str, members)))
        self.members = tuple(members)

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        self.layout.pidfile.write_text(f"{os.getpid()}\n", encoding="ascii")
        await self.control.start()
        await self._catch_up()
        try:
            await self.node.start()
            await self._start_services()
        except BaseException:
            await self._stop_services()
            with contextlib.suppress(FileNotFoundError):
                self.layout.pidfile.unlink()
            raise
        log.info("node %d (%s) started: cluster %s, config_version %d, %d node(s), %d link(s)",
                 self.nodeid, self.identity.name, self.config.cluster_name,
                 self.config.config_version, len(self.config.nodes), len(self.config.links))
        if self.fs_note:
            log.warning("%s", self.fs_note)
        self.ready = True
        self.notifier.send("READY=1", f"STATUS=cluster {self.config.cluster_name}")
        tasks = [loop.create_task(self._report())]
        if self.notifier.watchdog_interval_s() is not None:
            tasks.append(loop.create_task(self._watchdog()))
        stopped = loop.create_task(self.node.wait_stopped())
        requested = loop.create_task(self.stop_requested.wait())
        await asyncio.wait([stopped, requested], return_when=asyncio.FIRST_COMPLETED)
        self.notifier.send("STOPPING=1")
        for task in tasks:
            task.cancel()
        failure = stopped.exception() if stopped.done() else None
        await self._stop_services()
        status = 0
        if failure is not None:
            log.error("Totem node failed: %r", failure)
            status = 1
        else:
            log.info("leaving the ring")
            try:
                await self.node.stop()
            except Exception as error:
                log.error("node failed while leaving: %r", error)
                status = 1
        requested.cancel()
        if not stopped.done():
            stopped.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.layout.pidfile.unlink()
        log.info("corrald stopped")
        return status

    async def _catch_up(self) -> None:
        """Adopt a newer config from a reachable peer before Totem starts."""
        try:
            text = await catchup.fetch_newest(self.config, self.nodeid, self.identity.api_port,
                                              self.key, str(self.layout.ca_cert))
        except (OSError, ValueError) as error:
            log.warning("catch-up: %s", error)
            return
        if text is not None:
            log.info("catch-up: a peer has a newer config")
            try:
                self.adopt(text)
            except CorralError as error:
                log.error("catch-up: refusing the peer's config: %s", error)

    async def _start_services(self) -> None:
        from corral.cpg.ipc import CpgIpcServer

        self.ipc = CpgIpcServer(self.cpg, str(self.layout.cpg_socket))
        await self.ipc.start()
        await self.quorum.start()
        await self.sync.start()
        await self._start_tree()
        await self.status_bus.start()
        if self.tree is not None and self.tree.backend is not None:
            self.tree.backend.guest_runtime = self.status_bus.guest_runtime
            self.tree.backend.rrd_lines = self.status_bus.rrd_lines
        if self.options.api:
            addresses = list(self.config.node(self.nodeid).addrs.values())
            self.api = ApiServer(self, addresses, self.identity.api_port,
                                 str(self.layout.node_cert), str(self.layout.node_key))
            await self.api.start()

    async def _start_tree(self) -> None:
        if not self.options.fs:
            self.fs_note = "the configuration filesystem is disabled (--no-fs)"
            return
        self.tree = Tree(self.layout.root / "cfs", self.identity.mount, self.cpg, self.quorum,
                         self.identity.name, self.config)
        try:
            await self.tree.start(mount=self.options.mount)
        except TreeUnavailable as error:
            self.fs_note = str(error)
            log.error("%s", error)
        except Exception as error:  # a broken store must not keep the node off the ring
            self.fs_note = f"the configuration filesystem failed to start: {error!r}"
            log.exception("tree: start failed")
        else:
            self.fs_note = None if self.tree.mounted or not self.options.mount else \
                "the configuration filesystem is not mounted"
            if self.tree.mounted:
                log.info("configuration tree mounted at %s", self.identity.mount)
        if self.tree.backend is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch_tree()))

    async def _watch_tree(self) -> None:
        """Keep the tree's corosync.conf and the node-local copy in step."""
        assert self.tree is not None
        while True:
            await asyncio.sleep(TREE_POLL_S)
            try:
                await self._sync_tree_once(self.tree)
            except Exception:
                log.exception("tree: corosync.conf sync failed")

    async def _sync_tree_once(self, tree: Tree) -> None:
        if not self.quorum.quorate:
            return
        await tree.ensure_node_dirs()
        text = tree.read_conf()
        version = -1
        if text is not None:
            try:
                version = ClusterConfig.from_text(text, "corosync.conf in the tree").config_version
            except CorralError as error:
                log.error("tree: corosync.conf in the tree is invalid: %s", error)
        if version > self.config.config_version and text is not None:
            log.info("tree: corosync.conf in the tree has config_version %d: adopting", version)
            self.adopt(text)
        elif version < self.config.config_version:
            await tree.write_conf(self.conf_text)

    async def _stop_services(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.guest_api.close()
        with contextlib.suppress(Exception):
            await self.status_bus.stop()
        if self.tree is not None:
            await self.tree.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.quorum.stop(), QUORUM_LEAVE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await self.sync.stop()
        if self.api is not None:
            await self.api.close()
        await self.control.close()
        if self.ipc is not None:
            with contextlib.suppress(Exception):
                await self.ipc.close()
        with contextlib.suppress(Exception):
            await self.cpg.close()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s() or 1.0
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _report(self) -> None:
        interval = self.options.stats_interval_s
        last_s, last_delivered = time.monotonic(), 0
        while True:
            await asyncio.sleep(interval)
            now_s = time.monotonic()
            rate = (self.delivered - last_delivered) / max(now_s - last_s, 1e-3)
            last_s, last_delivered = now_s, self.delivered
            quorum = self.quorum.status()
            log.info("rates: delivered %.0f msg/s, members %s, quorate %s", rate,
                     " ".join(map(str, self.members)) or "-", "yes" if quorum.quorate else "no")

    async def reload(self) -> dict[str, Any]:
        """SIGHUP: reload the node certificate and the local config file."""
        log.info("reloading")
        done: dict[str, Any] = {"certificate": False, "config": "unchanged"}
        if self.api is not None:
            try:
                self.api.reload_certificate()
                done["certificate"] = True
            except (OSError, ValueError) as error:
                log.error("reload: cannot load the node certificate: %s", error)
        try:
            text = self.layout.conf.read_text(encoding="utf-8")
            version = ClusterConfig.from_text(text).config_version
        except (OSError, CorralError) as error:
            log.error("reload: %s", error)
            done["config"] = f"error: {error}"
            return done
        if version > self.config.config_version:
            self.adopt(text)
            done["config"] = f"applied config_version {version}"
            with contextlib.suppress(Exception):
                await self.sync.publish(text, version)
        elif text != self.conf_text:
            done["config"] = "ignored: the file changed without a higher config_version"
            log.warning("reload: %s", done["config"])
        return done

    # ---- config changes ------------------------------------------------------------

    def adopt(self, text: str) -> None:
        """Take a config with a higher config_version: validate, write, apply."""
        new = ClusterConfig.from_text(text, "config from the cluster")
        if new.cluster_name != self.config.cluster_name:
            raise ConfigError("totem.cluster_name", f"{new.cluster_name!r} is not our cluster "
                              f"{self.config.cluster_name!r}")
        if new.config_version <= self.config.config_version:
            return
        if not any(n.nodeid == self.nodeid for n in new.nodes):
            log.error("config_version %d no longer lists this node (%d): it was removed "
                      "from the cluster; keeping the old local config", new.config_version,
                      self.nodeid)
            return
        quorum_config = QuorumConfig.from_conf_text(text)
        write_file(self.layout.conf, text, 0o644)
        reasons = nodelist.restart_needed(self.config, new, self.nodeid)
        self.config, self.conf_text = new, text
        nodelist.apply_nodelist(self.transport, new)
        if self.tree is not None:
            self.tree.update(new)
        self._apply_quorum_config(quorum_config)
        self.restart_reasons = reasons
        log.info("config_version %d applied (%d nodes)%s", new.config_version, len(new.nodes),
                 "; restart needed for: " + ", ".join(reasons) if reasons else "")

    def _apply_quorum_config(self, config: QuorumConfig) -> None:
        # Votes and expected votes of the new nodelist take effect now (votequorum reload).
        self.quorum.reconfigure(config)

    def online(self) -> frozenset[int]:
        return frozenset(self.members)

    async def add_node(self, node: str, params: dict[str, str], peer_ip: str) -> dict[str, Any]:
        """The member's side of a join (POST /cluster/config/nodes/{node})."""
        async with self._change_lock:
            self._require_quorum()
            addresses = self._join_addresses(params, peer_ip)
            nodeid = _int_param(params, "nodeid")
            votes = _int_param(params, "votes")
            force = params.get("force", "0") in ("1", "true")
            new_text, assigned = confedit.add_node(
                self.conf_text, node, addresses, nodeid, 1 if votes is None else votes,
                force=force, online=self.online())
            cert = ""
            csr = params.get("csr")
            if csr:
                cert = pki.sign_csr(csr.encode(), node, addresses,
                                    self.layout.ca_cert.read_bytes(),
                                    self.layout.ca_key.read_bytes()).decode()
            version = ClusterConfig.from_text(new_text).config_version
            await self.sync.publish(new_text, version)
            await self._write_tree(new_text)
            if self.config.config_version < version:
                raise CorralError("the new config was not applied here; see the corrald log")
            log.info("node %s (nodeid %d) added: config_version %d", node, assigned, version)
            return {
                "corosync_conf": new_text,
                "corosync_authkey": base64.b64encode(self.key).decode(),
                "nodeid": assigned,
                "warnings": [],
                "node_cert": cert,
                "ca_cert": self.layout.ca_cert.read_text(),
                "ca_key": self.layout.ca_key.read_text(),
                "admin_hash": self.admin_hash() or "",
            }

    async def _write_tree(self, text: str) -> None:
        if self.tree is not None and self.tree.backend is not None:
            code = await self.tree.write_conf(text)
            if code:
                log.warning("tree: corosync.conf not written (errno %d); the watcher retries",
                            code)

    def _join_addresses(self, params: dict[str, str], peer_ip: str) -> list[str]:
        links = [confedit.parse_link(n, params[f"link{n}"]) for n in range(8)
                 if f"link{n}" in params]
        if links:
            if [link.number for link in links] != list(range(len(links))):
                raise confedit.JoinRefused("links must be link0, link1, ... without gaps")
            return [link.address for link in links]
        address = params.get("new_node_ip") or peer_ip
        if len(self.config.links) != 1:
            raise confedit.JoinRefused(f"the cluster has {len(self.config.links)} links: give "
                                       "--link0 ... for each")
        return [confedit.parse_link(0, address).address]

    def _require_quorum(self) -> None:
        if not self.quorum.quorate:
            raise confedit.JoinRefused("the cluster is not quorate: cluster config changes "
                                       "need quorum")

    async def delete_node(self, node: str) -> None:
        async with self._change_lock:
            self._require_quorum()
            new_text, removed = confedit.remove_node(self.conf_text, node, self.online(),
                                                     self.nodeid)
            version = ClusterConfig.from_text(new_text).config_version
            await self.sync.publish(new_text, version)
            await self._write_tree(new_text)
            log.info("node %s (nodeid %d) removed: config_version %d", node, removed, version)

    # ---- API backend -----------------------------------------------------------------

    def admin_hash(self) -> str | None:
        try:
            return self.layout.admin_password.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None

    def check_join_token(self, token: str) -> str:
        return self.tokens.check(token, time.time())

    def consume_join_token(self, digest: str) -> None:
        self.tokens.consume(digest, time.time())

    def restore_join_token(self, digest: str) -> None:
        self.tokens.restore(digest)

    def node_auth(self, header: str) -> int | None:
        known = frozenset(n.nodeid for n in self.config.nodes)
        return catchup.check_node_auth(self.key, header, time.time(), known)

    def api_routers(self) -> list[Router]:
        return [self.guest_api, self.status_api]

    def _member_names(self) -> set[str]:
        members = set(self.members)
        return {n.name for n in self.config.nodes if n.nodeid in members}

    def _guest_list(self) -> list[tuple[int, str, str, int]]:
        """Guests registered in this node's copy of the tree (in memory, not the mount)."""
        store = self.tree.store if self.tree is not None else None
        if store is None:
            return []
        return list(store.state.guest_list())

    def corosync_conf(self) -> dict[str, Any]:
        return {"config_version": self.config.config_version, "corosync_conf": self.conf_text}

    def config_nodes(self) -> list[dict[str, Any]]:
        rows = []
        for spec in self.config.nodes:
            row: dict[str, Any] = {"node": spec.name, "name": spec.name, "nodeid": spec.nodeid,
                                   "quorum_votes": spec.quorum_votes}
            row.update({f"ring{link}_addr": address for link, address in spec.addrs.items()})
            rows.append(row)
        return rows

    def join_info(self) -> dict[str, Any]:
        fingerprint = pki.fingerprint_pem(self.layout.node_cert.read_bytes())
        nodes = []
        for row in self.config_nodes():
            if row["nodeid"] == self.nodeid:
                row.update(pve_addr=row["ring0_addr"], pve_fp=fingerprint)
            nodes.append(row)
        totem = parse(self.conf_text).section("totem")
        return {"nodelist": nodes, "preferred_node": self.identity.name,
                "totem": dict(totem.options) if totem else {},
                "config_digest": _digest(self.conf_text)}

    # ---- control socket ----------------------------------------------------------------

    def _register_control(self) -> None:
        self.control.register("status", self._ctl_status)
        self.control.register("quorum", self._ctl_quorum)
        self.control.register("expected", self._ctl_expected)
        self.control.register("join_token", self._ctl_join_token)
        self.control.register("delnode", self._ctl_delnode)
        self.control.register("reload", self._ctl_reload)
        self.control.register("stop", self._ctl_stop)
        self.control.register("resources", self._ctl_resources)
        self.control.register("node_status", self._ctl_node_status)

    async def _ctl_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _ctl_quorum(self, request: dict[str, Any]) -> dict[str, Any]:
        data = self.quorum.status().to_dict()
        data["ready"] = self.ready  # every service is up (READY=1 was sent)
        return data

    async def _ctl_expected(self, request: dict[str, Any]) -> dict[str, Any]:
        votes = request.get("votes")
        if isinstance(votes, bool) or not isinstance(votes, int):
            raise CorralError(f"expected votes must be an integer, got {votes!r}")
        await self.quorum.set_expected(votes)
        return {"expected": votes}

    async def _ctl_join_token(self, request: dict[str, Any]) -> dict[str, Any]:
        lifetime = request.get("expire_s", DEFAULT_TOKEN_LIFETIME_S)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or \
                not 0 < lifetime <= MAX_TOKEN_LIFETIME_S:
            raise CorralError(f"--expire must be 1..{MAX_TOKEN_LIFETIME_S} seconds")
        token = self.tokens.issue(time.time(), float(lifetime))
        address = self.config.node(self.nodeid).addrs[min(self.config.node(self.nodeid).addrs)]
        return {"token": token, "expire_s": lifetime, "host": address,
                "port": self.identity.api_port,
                "fingerprint": pki.fingerprint_pem(self.layout.node_cert.read_bytes())}

    async def _ctl_delnode(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.delete_node(str(request.get("name", "")))
        return {"config_version": self.config.config_version}

    async def _ctl_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.reload()

    async def _ctl_resources(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        kind = request.get("type")
        return self.status_api.resources(None if kind is None else str(kind))

    async def _ctl_node_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.status_api.node_status(str(request.get("node") or self.identity.name))

    async def _ctl_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_later(0.05, self.stop_requested.set)
        return {"stopping": True}

    def _fs_status(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mounted": False}
        if self.tree is not None:
            data = {k: v for k, v in self.tree.status().items() if k != "counters"}
        data.update(mountpoint=self.identity.mount, note=self.fs_note)
        return data

    def status(self) -> dict[str, Any]:
        links = nodelist.link_states(self.transport)
        now_ns = time.monotonic_ns()
        quorum = self.quorum.status()
        members = set(self.members)
        rows = []
        for spec in self.config.nodes:
            peer = self.sync.peers.get(spec.nodeid)
            fresh = peer is not None and now_ns - peer.seen_monotonic_ns < HEARTBEAT_STALE_S * 1e9
            local = spec.nodeid == self.nodeid
            rows.append({
                "nodeid": spec.nodeid, "name": spec.name, "votes": spec.quorum_votes,
                "local": local, "online": spec.nodeid in members,
                "addresses": {str(k): v for k, v in spec.addrs.items()},
                "links": {str(k): v for k, v in sorted(links.get(spec.nodeid, {}).items())},
                "version": __version__ if local else (peer.software_version if peer else None),
                "clock_offset_ms": 0.0 if local else (
                    round(peer.clock_offset_ns / 1e6, 1) if peer and fresh else None),
            })
        totem = parse(self.conf_text).section("totem")
        return {
            "cluster_name": self.config.cluster_name,
            "config_version": self.config.config_version,
            "transport": (totem.options.get("transport", "knet") if totem else "knet"),
            "secure_auth": self.config.encrypt,
            "nodeid": self.nodeid, "name": self.identity.name,
            "software_version": __version__,
            "ring_id": list(self.node.core.ring_id), "members": list(self.members),
            "state": self.node.status()["state"],
            "quorum": quorum.to_dict(),
            "nodes": rows,
            "clock_offset_warn_ms": CLOCK_OFFSET_WARN_MS,
            "restart_needed": self.restart_reasons,
            "filesystem": self._fs_status(),
            "status_broadcast": self.status_bus.status(),
            "engine": {k: v for k, v in self.node.status().items()
                       if k in ("core_stats", "transport_stats", "node_stats", "lag")},
            "pid": os.getpid(),
            "ready": self.ready,
        }


def _int_param(params: dict[str, str], key: str) -> int | None:
    raw = params.get(key)
    if raw in (None, ""):
        return None
    try:
        return int(str(raw))
    except ValueError:
        raise confedit.JoinRefused(f"{key} must be an integer, got {raw!r}") from None


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()
