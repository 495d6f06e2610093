"""Pure parts of the cluster layer: corosync.conf edits (add/remove nodes and every
refusal), link property strings, passwords, join tokens (expiry, one use), tickets,
certificates (CA signing, fingerprints) and the status table's flags."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from corral.cluster import confedit, pki
from corral.cluster.credentials import (
    JoinTokens,
    Tickets,
    TokenError,
    check_password,
    hash_password,
)
from corral.cluster.status import format_node_table
from corral.corosync_conf import ClusterConfig


def _cluster() -> str:
    return confedit.new_cluster_text("prod", "pve1", 1, [confedit.LinkArg(0, "10.0.0.1", 20)],
                                     1, 5405)


def test_new_cluster_and_add_remove() -> None:
    text = _cluster()
    config = ClusterConfig.from_text(text)
    assert config.config_version == 1 and config.links[0].priority == 20
    text, nodeid = confedit.add_node(text, "pve2", ["10.0.0.2"], None, 1)
    assert nodeid == 2 and ClusterConfig.from_text(text).config_version == 2
    text, nodeid = confedit.add_node(text, "pve3", ["10.0.0.3"], 7, 2)
    config = ClusterConfig.from_text(text)
    assert nodeid == 7 and config.node(7).quorum_votes == 2 and config.config_version == 3
    text, removed = confedit.remove_node(text, "pve2", frozenset({1, 7}), 1)
    assert removed == 2 and [n.name for n in ClusterConfig.from_text(text).nodes] == \
        ["pve1", "pve3"]
    text, nodeid = confedit.add_node(text, "pve9", ["10.0.0.9"], None, 1)
    assert nodeid == 2  # the lowest free id
    # --force replaces an offline node of the same name, keeping its id
    text, nodeid = confedit.add_node(text, "pve3", ["10.0.0.33"], None, 1, force=True,
                                     online=frozenset({1}))
    assert nodeid == 7 and ClusterConfig.from_text(text).node(7).addrs[0] == "10.0.0.33"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "pve1"}, "already in the cluster"),
    ({"nodeid": 1}, "nodeid 1 is already used"),
    ({"addresses": ["10.0.0.1"]}, "already used by node 'pve1'"),
    ({"addresses": ["10.0.0.2", "10.1.0.2"]}, "1 link(s)"),
    ({"name": "bad_name"}, "invalid node name"),
    ({"votes": 5000}, "votes must be"),
    ({"name": "pve1", "force": True, "online": frozenset({1})}, "online"),
])
def test_add_refusals(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "pve2", "addresses": ["10.0.0.2"], "nodeid": None,
                               "votes": 1}
    args.update(kwargs)
    with pytest.raises(confedit.JoinRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
        confedit.add_node(_cluster(), **args)  # type: ignore[arg-type]


def test_remove_refusals() -> None:
    text, _ = confedit.add_node(_cluster(), "pve2", ["10.0.0.2"], None, 1)
    with pytest.raises(confedit.JoinRefused, match="online"):
        confedit.remove_node(text, "pve2", frozenset({1, 2}), 1)
    with pytest.raises(confedit.JoinRefused, match="local node"):
        confedit.remove_node(text, "pve1", frozenset({1}), 1)
    with pytest.raises(confedit.JoinRefused, match="no node"):
        confedit.remove_node(text, "pve5", frozenset({1}), 1)


def test_parse_link() -> None:
    assert confedit.parse_link(0, "10.0.0.1") == confedit.LinkArg(0, "10.0.0.1")
    assert confedit.parse_link(1, "address=fe80::1,priority=5") == \
        confedit.LinkArg(1, "fe80::1", 5)
    for bad in ("", "priority=3", "10.0.0.1,priority=x", "10.0.0.1,weight=1", "host.name"):
        with pytest.raises(confedit.JoinRefused):
            confedit.parse_link(0, bad)


def test_password_hash() -> None:
    stored = hash_password("s3cret pass")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert check_password("s3cret pass", stored)
    assert not check_password("s3cret pasS", stored)
    assert not check_password("x", "garbage")


def test_join_tokens_expire_and_are_used_once() -> None:
    tokens = JoinTokens()
    token = tokens.issue(now_s=1000.0, lifetime_s=60)
    assert not token.startswith("-")
    digest = tokens.check(token, 1030.0)
    with pytest.raises(TokenError, match="expired"):
        tokens.check(token, 1061.0)
    tokens.consume(digest, 1031.0)
    with pytest.raises(TokenError, match="already used"):
        tokens.check(token, 1032.0)
    tokens.restore(digest)  # the join failed: usable again
    assert tokens.check(token, 1032.0) == digest
    tokens.consume(digest, 1033.0)
    with pytest.raises(TokenError, match="bad join token"):
        tokens.check("cjt_forged", 1032.0)


def test_join_tokens_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "priv" / "join-tokens.json"
    path.parent.mkdir()
    first = JoinTokens.load(path)
    valid = first.issue(now_s=1000.0, lifetime_s=600)
    spent = first.issue(now_s=1000.0, lifetime_s=600)
    first.consume(first.check(spent, 1001.0), 1001.0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert valid not in path.read_text()  # only digests are kept
    second = JoinTokens.load(path)  # the daemon restarted
    assert second.check(valid, 1002.0)
    with pytest.raises(TokenError, match="already used"):
        second.check(spent, 1002.0)


def test_damaged_join_token_file_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "join-tokens.json"
    path.write_text('{"valid": {"short": 1}, "used": {}}')
    tokens = JoinTokens.load(path)
    assert tokens.expiry_s == {} and tokens.used == {}
    token = tokens.issue(now_s=1.0, lifetime_s=60)  # and the file is rewritten whole
    assert JoinTokens.load(path).check(token, 2.0)


def test_tickets() -> None:
    tickets = Tickets()
    ticket, csrf = tickets.issue("root@pam", 5000.0)
    assert ticket.startswith("PVE:root@pam:")
    assert tickets.verify(ticket, csrf, 5001.0, need_csrf=True) == "root@pam"
    assert tickets.verify(ticket, None, 5001.0, need_csrf=False) == "root@pam"
    assert tickets.verify(ticket, None, 5001.0, need_csrf=True) is None
    assert tickets.verify(ticket, csrf, 5000.0 + 7201, need_csrf=True) is None
    assert Tickets().verify(ticket, csrf, 5001.0, need_csrf=True) is None
    assert tickets.verify(ticket.replace("root@pam", "evil@pam"), csrf, 5001.0, True) is None


def test_certificates() -> None:
    ca_cert, ca_key = pki.new_ca("prod")
    cert, _key = pki.issue_node_cert("pve1", ["10.0.0.1"], ca_cert, ca_key)
    assert pki.verify_signed_by(cert, ca_cert)
    other_ca, _ = pki.new_ca("other")
    assert not pki.verify_signed_by(cert, other_ca)
    fingerprint = pki.fingerprint_pem(cert)
    assert len(fingerprint) == 95 and fingerprint.count(":") == 31
    assert pki.normalize_fingerprint(fingerprint.lower().replace(":", "")) == fingerprint
    with pytest.raises(pki.CertError):
        pki.normalize_fingerprint("AB:CD")
    with pytest.raises(pki.CertError):
        pki.sign_csr(b"not a csr", "pve2", [], ca_cert, ca_key)


def test_status_table_flags_version_and_clock() -> None:
    status = {
        "software_version": "0.1.0", "clock_offset_warn_ms": 500,
        "nodes": [
            {"nodeid": 1, "name": "a", "local": True, "online": True, "votes": 1,
             "links": {"0": "local"}, "version": "0.1.0", "clock_offset_ms": 0.0},
            {"nodeid": 2, "name": "b", "local": False, "online": True, "votes": 1,
             "links": {"0": "up", "1": "down"}, "version": "0.0.9", "clock_offset_ms": 812.5},
            {"nodeid": 3, "name": "c", "local": False, "online": False, "votes": 1,
             "links": {"0": "down"}, "version": None, "clock_offset_ms": None},
        ],
    }
    text = format_node_table(status)
    assert "0.0.9 MISMATCH" in text and "+812.5 ms TOO LARGE" in text
    assert "0:up 1:down" in text
    assert "WARNING: node b runs corral 0.0.9" in text
    assert "WARNING: node b's clock is +812 ms off" in text
    assert "0x00000003 c" in text and " no " in text
