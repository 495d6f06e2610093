"""Startup catch-up: fetch a newer cluster config from the other nodes' APIs.

A node that was down while another node joined starts with a nodelist that
lacks the newcomer: its transport drops the newcomer's packets while the
others accept them, and Totem cannot form one ring until the stale node learns
the new config (in the reference, corosync flaps the same way until pmxcfs
syncs the tree and reloads corosync). So before starting Totem the daemon asks
every other configured node, in parallel and briefly, for its config:

    GET /api2/json/cluster/config/corosync
    Authorization: CorralNode=<nodeid>:<unix s>:<hex HMAC-SHA256(key, "corral-node:<nodeid>:<s>")>

over TLS verified against the cluster CA. The reply is the text and its
config_version; the daemon adopts the highest one above its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time

from corral.corosync_conf import ClusterConfig

log = logging.getLogger("corral.daemon")

CATCHUP_TIMEOUT_S = 1.5
MAX_SKEW_S = 300
MAX_REPLY_BYTES = 1 << 20


def node_auth_header(key: bytes, nodeid: int, now_s: float) -> str:
    stamp = int(now_s)
    mac = hmac.new(key, f"corral-node:{nodeid}:{stamp}".encode(), hashlib.sha256).hexdigest()
    return f"CorralNode={nodeid}:{stamp}:{mac}"


def check_node_auth(key: bytes, header: str, now_s: float, known: frozenset[int]) -> int | None:
    """The nodeid of a valid node header, else None."""
    try:
        nodeid_text, stamp_text, mac = header.removeprefix("CorralNode=").split(":")
        nodeid, stamp = int(nodeid_text), int(stamp_text)
    except ValueError:
        return None
    if nodeid not in known or abs(now_s - stamp) > MAX_SKEW_S:
        return None
    expected = hmac.new(key, f"corral-node:{nodeid}:{stamp}".encode(), hashlib.sha256).hexdigest()
    return nodeid if hmac.compare_digest(mac, expected) else None


async def fetch_newest(config: ClusterConfig, nodeid: int, api_port: int, key: bytes,
                       ca_cert_path: str) -> str | None:
    """The newest config text any reachable peer has, if newer than `config`."""
    context = ssl.create_default_context(cafile=ca_cert_path)
    context.check_hostname = False
    header = node_auth_header(key, nodeid, time.time())
    peers = [n for n in config.nodes if n.nodeid != nodeid]
    if not peers:
        return None
    results = await asyncio.gather(*(
        _fetch(n.addrs[min(n.addrs)], api_port, context, header) for n in peers))
    best: tuple[int, str] | None = None
    for text in results:
        if text is None:
            continue
        try:
            candidate = ClusterConfig.from_text(text, "config from a peer")
        except Exception as error:
            log.warning("catch-up: a peer's config is invalid: %s", error)
            continue
        if candidate.cluster_name != config.cluster_name:
            continue
        if candidate.config_version > config.config_version and \
                (best is None or candidate.config_version > best[0]):
            best = (candidate.config_version, text)
    return best[1] if best else None


async def _fetch(host: str, port: int, context: ssl.SSLContext, header: str) -> str | None:
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context), CATCHUP_TIMEOUT_S)
        writer.write((f"GET /api2/json/cluster/config/corosync HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: {header}\r\nConnection: close\r\n\r\n").encode())
        raw = await asyncio.wait_for(reader.read(MAX_REPLY_BYTES), CATCHUP_TIMEOUT_S)
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            log.debug("catch-up: %s answered %r", host, head[:60])
            return None
        return str(json.loads(body)["data"]["corosync_conf"])
    except (TimeoutError, OSError, ValueError, KeyError, ssl.SSLError) as error:
        log.debug("catch-up: %s:%d: %r", host, port, error)
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)
