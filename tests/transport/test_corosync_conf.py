"""corosync.conf parsing (corral.corosync_conf): a PVE-style file becomes the right
ClusterConfig (name, version, timers, encryption, links with priorities, nodes,
quorum and logging dicts); dump/parse round-trips; malformed files fail with a
ConfigError that names the offending line."""

from __future__ import annotations

import pytest

from corral.corosync_conf import ClusterConfig, ConfSyntaxError, dump, parse, render_cluster
from corral.errors import ConfigError

PVE_STYLE = """\
# written by hand
logging {
  debug: off
  to_syslog: yes
}

nodelist {
  node {
    name: pve1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 10.0.0.1
    ring1_addr: 192.168.1.1
  }
  node {
    name: pve2
    nodeid: 2
    quorum_votes: 2
    ring0_addr: 10.0.0.2
    ring1_addr: 192.168.1.2
  }
  node {
    name = pve3
    nodeid = 3
    ring0_addr = 10.0.0.3
    ring1_addr = 192.168.1.3
  }
}

quorum {
  provider: corosync_votequorum
  two_node: 0
}

system {
  state_dir: /var/lib/corral
}

totem {
  cluster_name: prod
  config_version: 7
  interface {
    linknumber: 0
    knet_link_priority: 20
  }
  interface {
    linknumber: 1
    knet_link_priority: 10
    knet_ping_interval: 200
    knet_ping_timeout: 800
    mcastport: 5410
  }
  ip_version: ipv4-6
  link_mode: passive
  secauth: on
  token: 2000
  version: 2
}
"""


def test_pve_style_file() -> None:
    config = ClusterConfig.from_text(PVE_STYLE)
    assert config.cluster_name == "prod"
    assert config.config_version == 7
    assert config.encrypt is True
    assert config.totem.token == 2000
    assert [n.nodeid for n in config.nodes] == [1, 2, 3]
    assert config.node(3).name == "pve3"
    assert config.node(2).quorum_votes == 2
    assert config.node(1).addrs == {0: "10.0.0.1", 1: "192.168.1.1"}
    link0, link1 = config.links
    assert (link0.linknumber, link0.priority, link0.port) == (0, 20, 5405)
    assert (link1.priority, link1.port, link1.ping_interval_ms) == (10, 5410, 200)
    assert config.ping_timing_ms(link1) == (200, 800)
    # default: token-derived (effective token 2000 + 650 for 3 nodes)
    assert config.ping_timing_ms(link0) == (331, 1325)
    assert config.quorum == {"provider": "corosync_votequorum", "two_node": "0"}
    assert config.logging["to_syslog"] == "yes"
    assert config.system == {"state_dir": "/var/lib/corral"}


def test_round_trip() -> None:
    tree = parse(PVE_STYLE)
    assert parse(dump(tree)) == tree
    assert ClusterConfig.from_text(dump(tree)) == ClusterConfig.from_text(PVE_STYLE)


def test_render_cluster_parses() -> None:
    text = render_cluster("demo", [(1, "n1", ["127.0.0.1"]), (2, "n2", ["127.0.0.2"])],
                          secauth=False, port=6000, totem_options={"token": "1000"})
    config = ClusterConfig.from_text(text)
    assert config.encrypt is False
    assert config.links[0].port == 6000
    assert config.totem.token == 1000


def test_crypto_cipher_options() -> None:
    base = "totem {\n%s\n}\nnodelist {\nnode {\nnodeid: 1\nring0_addr: ::1\n}\n}\n"
    assert ClusterConfig.from_text(base % "crypto_cipher: aes256").encrypt
    assert not ClusterConfig.from_text(base % "crypto_cipher: none\nsecauth: on").encrypt
    assert not ClusterConfig.from_text(base % "").encrypt
    with pytest.raises(ConfigError, match=r":2.*aes128"):
        ClusterConfig.from_text(base % "crypto_cipher: aes128")


BAD = [
    ("totem {\n  token: 1000\n", 1, "never closed"),
    ("}\n", 1, "without an open section"),
    ("totem {\n  just words\n}\n", 2, "expected"),
    ("totem {\n  token: 1\n  token: 2\n}\n", 3, "set twice"),
    ("totem {\n  bad name {\n  }\n}\n", 2, "section name"),
    ("totem {\n  token: {\n}\n", 2, "bad section name|braces"),
    ("totem {\n}\n", 1, "nodelist"),
    ("nodelist {\n}\n", 1, "totem"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD)
def test_syntax_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfSyntaxError, match=message) as info:
        ClusterConfig.from_text(text)
    assert info.value.line == line
    assert f"corosync.conf:{line}" in str(info.value)


NODELIST = "nodelist {\n  node {\n    nodeid: 1\n    ring0_addr: 10.0.0.1\n  }\n}\n"


@pytest.mark.parametrize(("totem_body", "message"), [
    ("token: fast", "not an integer"),
    ("token: 5", "outside"),
    ("frobnicate: 1", "unknown option"),
    ("secauth: maybe", "secauth"),
    ("link_mode: rr", "passive"),
    ("transport: udp", "udpu"),
    ("config_version: -1", "outside"),
    ("interface {\n linknumber: 3\n }", "linknumber 3"),
    ("interface {\n linknumber: 9\n }", "outside"),
    ("interface {\n colour: red\n }", "unknown interface option"),
])
def test_bad_totem_values(totem_body: str, message: str) -> None:
    text = f"totem {{\n  {totem_body}\n}}\n" + NODELIST
    with pytest.raises(ConfigError, match=message) as info:
        ClusterConfig.from_text(text)
    assert "corosync.conf:2" in str(info.value) or "corosync.conf:3" in str(info.value)


@pytest.mark.parametrize(("nodes", "message"), [
    ("node {\n ring0_addr: 10.0.0.1\n}", "without nodeid"),
    ("node {\n nodeid: 1\n}", "no ringX_addr"),
    ("node {\n nodeid: 1\n ring0_addr: host.example\n}", "not an IP"),
    ("node {\n nodeid: 1\n ring0_addr: 10.0.0.1\n}\nnode {\n nodeid: 1\n ring0_addr: 10.0.0.2\n}",
     "duplicate nodeid"),
    ("node {\n nodeid: 1\n ring0_addr: 10.0.0.1\n}\nnode {\n nodeid: 2\n ring1_addr: 10.0.0.2\n}",
     "every link"),
    ("node {\n nodeid: 0\n ring0_addr: 10.0.0.1\n}", "outside"),
    ("node {\n nodeid: 1\n ring0_addr: 10.0.0.1\n colour: red\n}", "unknown node option"),
    ("", "empty nodelist"),
    ("node {\n nodeid: 1\n ring0_addr: 10.0.0.1\n}\nnode {\n nodeid: 2\n ring0_addr: 10.0.0.1\n}",
     "also node 1"),
])
def test_bad_nodelists(nodes: str, message: str) -> None:
    text = "totem {\n  version: 2\n}\nnodelist {\n" + nodes + "\n}\n"
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_text(text)


def test_missing_file_is_config_error(tmp_path: object) -> None:
    with pytest.raises(ConfigError):
        ClusterConfig.from_file("/nonexistent/corosync.conf")


def test_unknown_node_lookup() -> None:
    config = ClusterConfig.from_text(PVE_STYLE)
    with pytest.raises(ConfigError):
        config.node(42)
