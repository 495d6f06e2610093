"""Checks the Totem benchmark harness (bench/): its pure parts, and a short real corosync run.

- The corosync.conf the harness writes is one Corral's parser accepts with
  the intended settings (both systems must read the same file).
- The Python client counts gaps, duplicates and END markers like cpgbench.c.
- The report computes Corral/corosync ratios and marks missing figures n/a.
- As root with corosync installed: 3 corosync daemons in fresh namespaces,
  one 1 KiB sender for 2 s; every node must deliver the same nonzero number
  of messages with zero gaps, and afterwards no namespace or process of the
  run may remain.
- As root: the nftables loss rules appear in and vanish from one node's
  namespace, the bridge carries traffic, and destroy() kills a process still
  running inside a namespace before deleting it.
Budget: about 12 s of the 60 s allowed.

No tests/bench/__init__.py on purpose: with one, pytest would import this
directory as the package `bench` and shadow the real one.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.corosync_peer import CorosyncCluster, render_corosync_conf  # noqa: E402
from bench.corral_client import FLAG_END, HEADER, MSG_MAGIC, Stats  # noqa: E402
from bench.netns import Topology, exclusive, list_namespaces  # noqa: E402
from bench.peer import BenchSpec, ClusterSettings  # noqa: E402
from bench.report import all_rows, print_report  # noqa: E402
from bench.totem import summarize_clients  # noqa: E402


def test_generated_conf_is_read_by_corral_parser(tmp_path: Path) -> None:
    from corral.corosync_conf import ClusterConfig

    text = render_corosync_conf({1: "10.213.0.1", 2: "10.213.0.2", 3: "10.213.0.3"},
                                tmp_path / "key", tmp_path / "state", tmp_path / "log",
                                token_ms=1000, sched_rr=False)
    config = ClusterConfig.from_text(text)
    assert [node.nodeid for node in config.nodes] == [1, 2, 3]
    assert config.node(2).addrs[0] == "10.213.0.2"
    assert config.totem.token == 1000
    assert config.encrypt is True
    assert "sched_rr: no" in text and "secauth: on" in text and "transport: knet" in text
    assert "token:" not in render_corosync_conf({1: "10.0.0.1"}, tmp_path, tmp_path, tmp_path,
                                                token_ms=None, sched_rr=True)


def message(nodeid: int, seq: int, flags: int = 0, size: int = 64) -> bytes:
    return HEADER.pack(MSG_MAGIC, flags, nodeid, 0, seq, 1000) + bytes(size - HEADER.size)


def test_client_counts_gaps_duplicates_and_end() -> None:
    stats = Stats(my_nodeid=1)
    for seq in (0, 1, 3, 4, 4):
        stats.deliver(1, message(1, seq), now_ns=5000)
    stats.deliver(2, message(2, 0), now_ns=6000)
    stats.deliver(2, message(3, 0), now_ns=6000)  # header nodeid disagrees with the sender
    stats.deliver(1, message(1, 5, flags=FLAG_END), now_ns=7000)
    assert (stats.msgs, stats.gaps, stats.dups, stats.bad, stats.ends) == (6, 1, 1, 1, 1)
    assert len(stats.latencies_ns) == 5 and stats.latencies_ns[0] == 4000


def test_report_ratio_and_missing_figures() -> None:
    spec = BenchSpec(size=1024, senders=1, duration_ms=1000)
    nodes = [{"msgs_per_s": rate, "mb_per_s": rate / 1000, "msgs": 10, "complete": True,
              "sender": i == 0, "latency_samples": 10, "latency_us_p50": 200.0, "latency_us_p99": 900.0}
             for i, rate in enumerate((900.0, 1000.0, 1100.0))]
    corosync_case = summarize_clients(spec, nodes)
    assert corosync_case["msgs_per_s_per_node"] == pytest.approx(1000.0)
    assert corosync_case["latency_ms_p50"] == pytest.approx(0.2)
    corral_case = {**corosync_case, "msgs_per_s_per_node": 1500.0}
    report = {"corosync": {"throughput": [corosync_case]}, "corral": {"throughput": [corral_case]}}
    row = next(r for r in all_rows(report) if r.unit == "msg/s" and "sender" in r.label)
    assert (row.corral, row.corosync) == (1500.0, 1000.0)
    out = io.StringIO()
    print_report(report, out)
    assert "1.50x" in out.getvalue() and "n/a" in out.getvalue()


def corosync_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("corosync", "gcc", "ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/include/corosync/cpg.h").exists():
        return "libcpg-dev is not installed"
    return None


@pytest.mark.netns
@pytest.mark.realproc
@pytest.mark.timeout(120)
@pytest.mark.skipif(corosync_ready() is not None, reason=corosync_ready() or "")
def test_corosync_peer_smoke() -> None:
    topology = Topology(prefix="crlb-t-", subnet="10.213.9")
    workdir = Path(tempfile.mkdtemp(prefix="crlb-test-"))
    cluster = CorosyncCluster(topology, workdir, ClusterSettings())
    try:
        with exclusive(topology):
            topology.create()
            try:
                cluster.start()
                cluster.wait_ring(3, list(topology.nodes), timeout_s=30, group_counts=True)
                daemon_pids = [cluster.daemon_pid(node) for node in topology.nodes]
                for pid in daemon_pids:
                    assert Path(f"/proc/{pid}/comm").read_text().strip() == "corosync"
                results = cluster.run_clients(BenchSpec(size=1024, senders=1, duration_ms=2000,
                                                        timeout_ms=30_000))
            finally:
                cluster.stop()
                topology.destroy()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert len(results) == 3
    for result in results:
        assert "error" not in result, result
        assert result["complete"] and result["members_ok"], result
        assert result["msgs"] > 0 and result["msgs_per_s"] > 0, result
        assert result["gaps"] == 0 and result["dups"] == 0 and result["bad"] == 0, result
    assert len({result["msgs"] for result in results}) == 1, results
    sender = next(result for result in results if result["sender"])
    assert sender["msgs"] == sender["sent"]
    assert 0 < sender["latency_us_p50"] <= sender["latency_us_p99"]
    assert not set(topology.all_namespaces()) & set(list_namespaces())
    for pid in daemon_pids:
        assert not Path(f"/proc/{pid}").exists(), f"corosync {pid} survived the cleanup"


@pytest.mark.netns
@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                    reason="needs root and nftables")
def test_loss_rules_and_stale_cleanup() -> None:
    """Loss rules appear and vanish in one node's namespace; destroy() kills what runs inside."""
    topology = Topology(prefix="crlb-t2-", subnet="10.213.8", node_count=2)
    with exclusive(topology):
        topology.create()
        stray = subprocess.Popen(topology.in_namespace(2, ["sleep", "300"]))
        try:
            topology.set_loss(2, 5)
            listed = subprocess.run(topology.in_namespace(2, ["nft", "list", "ruleset"]),
                                    capture_output=True, text=True, check=True).stdout
            assert "numgen random mod 100 < 5" in listed and "drop" in listed
            topology.clear_loss(2)
            listed = subprocess.run(topology.in_namespace(2, ["nft", "list", "ruleset"]),
                                    capture_output=True, text=True, check=True).stdout
            assert "crlb_loss" not in listed
            if shutil.which("ping") is not None:
                ping = subprocess.run(topology.in_namespace(1, ["ping", "-c", "1", "-W", "2",
                                                                topology.address(2)]),
                                      capture_output=True, check=False)
                assert ping.returncode == 0, "the bridge does not carry traffic"
        finally:
            topology.destroy()
        assert stray.wait(timeout=5) != 0
    assert not set(topology.all_namespaces()) & set(list_namespaces())
