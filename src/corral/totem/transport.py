"""Authenticated UDP unicast transport with up to 8 links per node (knet-like, passive).

- One UDP socket per configured link, bound only to this node's `ringX_addr`
  and the link's port. Every packet is sealed by `PacketAuthenticator`.
- A Totem broadcast (dest `BROADCAST`) is one unicast copy per other configured
  node (udpu style). This node gets no copy: the core already handles its own
  packets in-process when it sends them and would only drop the copy
  (`dropped_own`). A packet to this node itself is handed over in-process; a
  packet to one other node (the token) is one unicast.
- Link health: every link pings every other node each `ping_interval`; a
  (node, link) pair goes UP after `pong_count` pongs in a row and DOWN when no
  pong came for `ping_timeout`. `LinkMonitor` holds that logic without I/O.
- Passive failover: a packet to a node leaves on its UP link with the highest
  priority (lowest link number on ties); it is received on every link. While
  every link to a node is down, packets still go out on its highest-priority
  link (counted): unlike knet, which drops them, so a lossy single link does not
  turn lost pings into lost tokens and membership churn.
- Source addresses not in the nodelist of the receiving link are dropped before
  any cryptography (knet's block_unlisted_ips).
- Bounds: received packets wait in a queue of `MAX_RECEIVE_QUEUE` and are handed
  over in one batch per loop iteration; a socket whose kernel and loop buffers
  hold more than `MAX_SEND_BUFFER_BYTES` drops further sends (UDP is lossy
  anyway and Totem retransmits), so `send()` never blocks the loop.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.corosync_conf import ClusterConfig, LinkSpec
from corral.errors import ConfigError, UsageError
from corral.totem.auth import KIND_PING, KIND_PONG, KIND_TOTEM, PacketAuthenticator

BROADCAST = 0
MAX_RECEIVE_QUEUE = 8192
MAX_SEND_BUFFER_BYTES = 4 << 20
# Requested SO_RCVBUF/SO_SNDBUF (the kernel caps it at net.core.[rw]mem_max).
SOCKET_BUFFER_BYTES = 4 << 20
PING = struct.Struct(">BQ")  # link number, sender's monotonic send time (ns)
NS_PER_MS = 1_000_000

_RX_LINK_COUNTER = [f"rx_link{n}" for n in range(8)]
_TX_TOTEM_LINK_COUNTER = [f"tx_totem_link{n}" for n in range(8)]

Batch = list[tuple[int, bytes]]  # (sender nodeid, totem payload)


class LinkState(enum.Enum):
    DOWN = "down"
    UP = "up"
    LOCAL = "localhost"


@dataclass
class PeerLink:
    """Health of one (remote node, link) pair."""

    nodeid: int
    linknumber: int
    priority: int
    address: tuple[str, int]
    state: LinkState = LinkState.DOWN
    pongs_in_a_row: int = 0
    last_pong_ns: int = -1
    rtt_ns: int = -1
    pings_sent: int = 0
    pongs_received: int = 0
    times_up: int = 0
    times_down: int = 0


class LinkMonitor:
    """Up/down decisions for every (node, link) pair; pure, driven with now_ns."""

    def __init__(self, pong_count: dict[int, int], timeout_ns: dict[int, int]) -> None:
        self.pong_count = pong_count
        self.timeout_ns = timeout_ns
        self.peers: dict[tuple[int, int], PeerLink] = {}

    def add(self, peer: PeerLink) -> None:
        self.peers[(peer.nodeid, peer.linknumber)] = peer

    def on_pong(self, now_ns: int, nodeid: int, linknumber: int, sent_ns: int) -> bool:
        """Record a pong; True when the pair just went UP."""
        peer = self.peers.get((nodeid, linknumber))
        if peer is None or peer.state is LinkState.LOCAL or sent_ns > now_ns:
            return False
        peer.pongs_received += 1
        peer.rtt_ns = now_ns - sent_ns
        if now_ns - sent_ns > self.timeout_ns[linknumber]:
            return False  # a pong older than the timeout proves nothing about now
        peer.last_pong_ns = now_ns
        peer.pongs_in_a_row += 1
        if peer.state is LinkState.DOWN and peer.pongs_in_a_row >= self.pong_count[linknumber]:
            peer.state = LinkState.UP
            peer.times_up += 1
            return True
        return False

    def check(self, now_ns: int) -> list[PeerLink]:
        """Apply timeouts; returns the pairs that just went DOWN."""
        went_down = []
        for peer in self.peers.values():
            if peer.state is LinkState.LOCAL or peer.last_pong_ns < 0:
                continue
            if now_ns - peer.last_pong_ns > self.timeout_ns[peer.linknumber]:
                peer.pongs_in_a_row = 0
                if peer.state is LinkState.UP:
                    peer.state = LinkState.DOWN
                    peer.times_down += 1
                    went_down.append(peer)
        return went_down

    def best_link(self, nodeid: int, links: list[int], up_only: bool = True) -> PeerLink | None:
        """The up link of highest priority (lowest number on ties); with
        up_only=False, the highest-priority link whatever its state."""
        best: PeerLink | None = None
        for linknumber in links:
            peer = self.peers.get((nodeid, linknumber))
            if peer is None or (up_only and peer.state is LinkState.DOWN):
                continue
            if best is None or peer.priority > best.priority:
                best = peer
        return best


def bound_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to exactly (host, port), with large kernel
    buffers so a burst of frames (a full window after a token) is not dropped."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _LinkProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport, linknumber: int) -> None:
        self.owner = owner
        self.linknumber = linknumber

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.owner._datagram(self.linknumber, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner.counters["socket_errors"] += 1


class UdpTransport:
    """Sockets, link health and packet sealing for one node."""

    def __init__(
        self,
        config: ClusterConfig,
        nodeid: int,
        authenticator: PacketAuthenticator,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.config = config
        self.nodeid = nodeid
        self.auth = authenticator
        self.clock_ns = clock_ns
        self.local = config.node(nodeid)
        self.links = sorted(link.linknumber for link in config.links)
        self.other_nodeids = [n.nodeid for n in config.nodes if n.nodeid != nodeid]
        timing = {link.linknumber: config.ping_timing_ms(link) for link in config.links}
        self.ping_interval_ns = {n: t[0] * NS_PER_MS for n, t in timing.items()}
        self.monitor = LinkMonitor(
            {link.linknumber: link.pong_count for link in config.links},
            {n: t[1] * NS_PER_MS for n, t in timing.items()},
        )
        self._address_owner: dict[tuple[int, str], int] = {}
        for link in config.links:
            self._add_link_peers(link)
        self.counters: collections.Counter[str] = collections.Counter()
        self._sockets: dict[int, asyncio.DatagramTransport] = {}
        # nodeid -> (link number, address) of its best UP link; cleared whenever
        # a link goes up or down, so each packet need not choose again.
        self._routes: dict[int, tuple[int, tuple[str, int]]] = {}
        self._received: collections.deque[tuple[int, bytes]] = collections.deque()
        self._batch_scheduled = False
        self._ping_timers: dict[int, asyncio.TimerHandle] = {}
        self._ping_due_ns: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_batch: Callable[[Batch], None] = lambda batch: None
        self.on_link_change: Callable[[PeerLink], None] = lambda peer: None

    def _add_link_peers(self, link: LinkSpec) -> None:
        for node in self.config.nodes:
            address = (node.addrs[link.linknumber], link.port)
            self._address_owner[(link.linknumber, address[0])] = node.nodeid
            peer = PeerLink(node.nodeid, link.linknumber, link.priority, address)
            if node.nodeid == self.nodeid:
                peer.state = LinkState.LOCAL
            self.monitor.add(peer)

    async def start(self) -> None:
        if self._loop is not None:
            raise UsageError("transport already started")
        self._loop = asyncio.get_running_loop()
        try:
            for link in self.config.links:
                host = self.local.addrs[link.linknumber]
                try:
                    sock = bound_socket(host, link.port)
                except OSError as error:
                    raise ConfigError(f"nodelist.node{self.nodeid}.ring{link.linknumber}_addr",
                                      f"cannot bind {host} port {link.port}: "
                                      f"{error.strerror or error}") from None
                transport, _ = await self._loop.create_datagram_endpoint(
                    lambda number=link.linknumber: _LinkProtocol(self, number),  # type: ignore[misc]
                    sock=sock,
                )
                self._sockets[link.linknumber] = transport
        except (OSError, ConfigError):
            self.close()
            self._loop = None
            raise
        for number in self.links:
            self._send_pings(number)

    def close(self) -> None:
        for handle in self._ping_timers.values():
            handle.cancel()
        self._ping_timers.clear()
        for transport in self._sockets.values():
            transport.close()
        self._sockets.clear()

    # ---- sending -------------------------------------------------------------

    def send(self, dest: int, payload: bytes) -> None:
        """Send one Totem packet to `dest` or to every node (BROADCAST). Never blocks."""
        packet = self.auth.seal(KIND_TOTEM, payload)
        if dest == BROADCAST:
            self.counters["tx_broadcast"] += 1
            for nodeid in self.other_nodeids:
                self._send_to_node(nodeid, packet)
        elif dest == self.nodeid:
            self._enqueue_local(payload)
        else:
            self.counters["tx_unicast"] += 1
            self._send_to_node(dest, packet)

    def _send_to_node(self, nodeid: int, packet: bytes) -> None:
        route = self._routes.get(nodeid)
        if route is not None:
            linknumber, address = route
            self.counters[_TX_TOTEM_LINK_COUNTER[linknumber]] += 1
            self._sendto(linknumber, packet, address)
            return
        peer = self.monitor.best_link(nodeid, self.links)
        if peer is not None:
            self._routes[nodeid] = (peer.linknumber, peer.address)
        if peer is None:
            # Every link to this node looks down. Unlike knet we still send, on the
            # best link: the link check only chooses among links, and Totem's own
            # token timeout decides about failures. Dropping here would turn a few
            # lost pings on a lossy single link into a membership change.
            peer = self.monitor.best_link(nodeid, self.links, up_only=False)
            self.counters["tx_no_link_up"] += 1
            if peer is None:
                return
        self.counters[_TX_TOTEM_LINK_COUNTER[peer.linknumber]] += 1
        self._sendto(peer.linknumber, packet, peer.address)

    def _sendto(self, linknumber: int, packet: bytes, address: tuple[str, int]) -> None:
        transport = self._sockets.get(linknumber)
        if transport is None:
            self.counters["tx_dropped_closed"] += 1
            return
        # asyncio and uvloop datagram transports both have it; typeshed omits it.
        if transport.get_write_buffer_size() > MAX_SEND_BUFFER_BYTES:  # type: ignore[attr-defined]
            self.counters["tx_dropped_buffer_full"] += 1
            return
        transport.sendto(packet, address)
        self.counters["tx_packets"] += 1
        self.counters["tx_bytes"] += len(packet)

    def _enqueue_local(self, payload: bytes) -> None:
        self._queue_received(self.nodeid, payload)

    # ---- link health ---------------------------------------------------------

    def _send_pings(self, linknumber: int) -> None:
        if self._loop is None:
            raise UsageError("transport not started")
        now_ns = self.clock_ns()
        late_ns = now_ns - self._ping_due_ns.get(linknumber, now_ns)
        if late_ns > self.ping_interval_ns[linknumber] // 2:
            # This loop stalled: pongs may be waiting unread in the socket (uvloop
            # runs timers before polling), so missing pongs prove nothing this round.
            self.counters["health_checks_skipped_stall"] += 1
        else:
            for peer in self.monitor.check(now_ns):
                self._routes.clear()
                self.on_link_change(peer)
        packet = self.auth.seal(KIND_PING, PING.pack(linknumber, now_ns))
        for nodeid in self.other_nodeids:
            peer = self.monitor.peers[(nodeid, linknumber)]
            peer.pings_sent += 1
            self._sendto(linknumber, packet, peer.address)
        interval_s = self.ping_interval_ns[linknumber] / 1e9
        self._ping_due_ns[linknumber] = now_ns + self.ping_interval_ns[linknumber]
        self._ping_timers[linknumber] = self._loop.call_later(
            interval_s, self._send_pings, linknumber
        )

    def _on_ping(self, linknumber: int, sender: int, payload: bytes, pong: bool) -> None:
        if len(payload) != PING.size:
            self.counters["rx_dropped_bad_ping"] += 1
            return
        number, sent_ns = PING.unpack(payload)
        if number != linknumber:
            self.counters["rx_dropped_bad_ping"] += 1
            return
        if not pong:
            reply = self.auth.seal(KIND_PONG, payload)
            self._sendto(linknumber, reply, self.monitor.peers[(sender, linknumber)].address)
            return
        if self.monitor.on_pong(self.clock_ns(), sender, linknumber, sent_ns):
            self._routes.clear()
            self.on_link_change(self.monitor.peers[(sender, linknumber)])

    # ---- receiving -----------------------------------------------------------

    def _datagram(self, linknumber: int, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.counters["rx_packets"] += 1
        self.counters[_RX_LINK_COUNTER[linknumber]] += 1
        owner = self._address_owner.get((linknumber, str(addr[0])))
        if owner is None:
            self.counters["rx_dropped_unlisted_address"] += 1
            return
        opened = self.auth.open(data)
        if opened is None:
            return  # counted by the authenticator
        if opened.sender_nodeid != owner or owner == self.nodeid:
            self.counters["rx_dropped_address_mismatch"] += 1
            return
        if opened.kind == KIND_TOTEM:
            self._queue_received(owner, opened.payload)
        else:
            self._on_ping(linknumber, owner, opened.payload, opened.kind == KIND_PONG)

    def _queue_received(self, sender: int, payload: bytes) -> None:
        if len(self._received) >= MAX_RECEIVE_QUEUE:
            self.counters["rx_dropped_queue_full"] += 1
            return
        self._received.append((sender, payload))
        if not self._batch_scheduled and self._loop is not None:
            self._batch_scheduled = True
            self._loop.call_soon(self._deliver_batch)

    def _deliver_batch(self) -> None:
        """Hand every packet received so far to the node in one call (catch-up batching)."""
        self._batch_scheduled = False
        batch = list(self._received)
        self._received.clear()
        self.counters["rx_batches"] += 1
        self.on_batch(batch)

    # ---- status --------------------------------------------------------------

    def link_status(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for (nodeid, linknumber), peer in sorted(self.monitor.peers.items()):
            rows.append({
                "nodeid": nodeid, "link": linknumber, "state": peer.state.value,
                "address": f"{peer.address[0]}:{peer.address[1]}", "priority": peer.priority,
                "rtt_ms": round(peer.rtt_ns / NS_PER_MS, 3) if peer.rtt_ns >= 0 else None,
                "pings_sent": peer.pings_sent, "pongs_received": peer.pongs_received,
                "times_up": peer.times_up, "times_down": peer.times_down,
            })
        return rows

    def connected(self, nodeid: int) -> bool:
        return self.monitor.best_link(nodeid, self.links) is not None

    def stats(self) -> dict[str, int]:
        result = dict(self.counters)
        result.update(self.auth.stats())
        result["rx_queue_len"] = len(self._received)
        return result
