"""Load-time checks of the `quorum { }` options: defaults, implied options, and every
interlock (errors for what corosync refuses, warnings for what it turns off).

Each test builds a `QuorumConfig` from plain option dicts and a nodelist of votes
and checks the effective values exactly.
"""

import pytest

from corral.corosync_conf import ClusterConfig
from corral.errors import ConfigError
from corral.quorum.config import LMS_WINDOW_MS_DEFAULT, QuorumConfig


def nodes(count: int, votes: int = 1) -> dict[int, int]:
    return {n: votes for n in range(1, count + 1)}


def test_defaults_and_expected_from_nodelist() -> None:
    config = QuorumConfig.from_options({"provider": "corosync_votequorum"}, {1: 1, 2: 2, 3: 1})
    assert config.expected_votes == 4
    assert not (config.two_node or config.wait_for_all or config.last_man_standing)
    assert not (config.auto_tie_breaker or config.allow_downscale)
    assert config.last_man_standing_window_ms == LMS_WINDOW_MS_DEFAULT == 10_000
    assert config.auto_tie_breaker_mode == "lowest"
    assert config.warnings == ()


def test_expected_votes_option_overrides_the_sum() -> None:
    assert QuorumConfig.from_options({"expected_votes": "7"}, nodes(3)).expected_votes == 7


def test_no_expected_votes_at_all_is_refused() -> None:
    with pytest.raises(ConfigError, match="no expected votes"):
        QuorumConfig.from_options({}, {1: 0, 2: 0})
    with pytest.raises(ConfigError, match="at least one node"):
        QuorumConfig.from_options({}, {})


def test_two_node_implies_wait_for_all_unless_set() -> None:
    implied = QuorumConfig.from_options({"two_node": "1"}, nodes(2))
    assert implied.two_node and implied.wait_for_all
    explicit = QuorumConfig.from_options({"two_node": "1", "wait_for_all": "0"}, nodes(2))
    assert explicit.two_node and not explicit.wait_for_all


def test_two_node_cleared_with_more_than_two_nodes() -> None:
    config = QuorumConfig.from_options({"two_node": "1"}, nodes(3))
    assert not config.two_node and not config.wait_for_all
    assert "two_node is disabled" in config.warnings[0]


def test_two_node_and_auto_tie_breaker_disables_two_node() -> None:
    config = QuorumConfig.from_options({"two_node": "1", "auto_tie_breaker": "1"}, nodes(2))
    assert not config.two_node and config.auto_tie_breaker and not config.wait_for_all
    assert any("auto_tie_breaker" in w for w in config.warnings)


def test_last_man_standing_needs_one_vote_per_node() -> None:
    config = QuorumConfig.from_options({"last_man_standing": "1"}, {1: 1, 2: 2, 3: 1})
    assert not config.last_man_standing
    assert "1 vote per node" in config.warnings[0]
    window = QuorumConfig.from_options(
        {"last_man_standing": "1", "last_man_standing_window": "2500"}, nodes(3)
    )
    assert window.last_man_standing and window.last_man_standing_window_ms == 2500


def test_auto_tie_breaker_odd_count_needs_wait_for_all() -> None:
    disabled = QuorumConfig.from_options({"auto_tie_breaker": "1"}, nodes(3))
    assert not disabled.auto_tie_breaker
    assert "odd number of nodes" in disabled.warnings[0]
    kept = QuorumConfig.from_options({"auto_tie_breaker": "1", "wait_for_all": "1"}, nodes(3))
    assert kept.auto_tie_breaker
    even = QuorumConfig.from_options({"auto_tie_breaker": "1"}, nodes(4))
    assert even.auto_tie_breaker and not even.wait_for_all


def test_auto_tie_breaker_odd_count_with_lms_and_no_wfa_fails_startup() -> None:
    with pytest.raises(ConfigError, match="need wait_for_all"):
        QuorumConfig.from_options({"auto_tie_breaker": "1", "last_man_standing": "1"}, nodes(5))
    ok = QuorumConfig.from_options(
        {"auto_tie_breaker": "1", "last_man_standing": "1", "wait_for_all": "1"}, nodes(5)
    )
    assert ok.auto_tie_breaker and ok.last_man_standing


def test_allow_downscale_implies_tracking() -> None:
    config = QuorumConfig.from_options({"allow_downscale": "1"}, nodes(3))
    assert config.allow_downscale and config.expected_votes_tracking


def test_tie_breaker_node_forms() -> None:
    assert QuorumConfig.from_options(
        {"auto_tie_breaker": "1", "auto_tie_breaker_node": "highest"}, nodes(4)
    ).auto_tie_breaker_mode == "highest"
    listed = QuorumConfig.from_options(
        {"auto_tie_breaker": "1", "auto_tie_breaker_node": "3 1"}, nodes(4)
    )
    assert (listed.auto_tie_breaker_mode, listed.auto_tie_breaker_nodes) == ("list", (3, 1))
    with pytest.raises(ConfigError, match="not in the nodelist"):
        QuorumConfig.from_options({"auto_tie_breaker_node": "9"}, nodes(4))
    with pytest.raises(ConfigError, match="lowest, highest or a list"):
        QuorumConfig.from_options({"auto_tie_breaker_node": "middle"}, nodes(4))
    with pytest.raises(ConfigError, match="listed twice"):
        QuorumConfig.from_options({"auto_tie_breaker_node": "1 1"}, nodes(4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device.model": "net"}, "not supported yet"),
        ({"provider": "corosync_quorum_other"}, "not supported"),
        ({"votes": "2"}, "deprecated"),
        ({"bogus": "1"}, "unknown option"),
        ({"two_node": "maybe"}, "expected 0 or 1"),
        ({"expected_votes": "x"}, "not an integer"),
        ({"expected_votes": "0"}, "outside"),
        ({"last_man_standing_window": "0"}, "outside"),
    ],
)
def test_refused_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuorumConfig.from_options(options, nodes(3))


def test_device_section_refused() -> None:
    with pytest.raises(ConfigError, match="qdevice\\) is not supported yet"):
        QuorumConfig.from_options({}, nodes(3), has_device=True)


def test_node_votes_bounds() -> None:
    with pytest.raises(ConfigError, match="quorum_votes"):
        QuorumConfig.from_options({}, {1: 5000})


def test_from_cluster_config() -> None:
    text = """
totem {
    version: 2
    cluster_name: c1
}
nodelist {
    node {
        nodeid: 1
        name: n1
        quorum_votes: 2
        ring0_addr: 127.0.0.1
    }
    node {
        nodeid: 2
        name: n2
        ring0_addr: 127.0.0.2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
"""
    config = QuorumConfig.from_cluster(ClusterConfig.from_text(text))
    assert config.node_votes == ((1, 2), (2, 1))
    assert config.expected_votes == 3 and config.two_node and config.wait_for_all
    assert QuorumConfig.from_conf_text(text) == config
    with_device = text.replace("two_node: 1", "device {\n        model: net\n    }")
    with pytest.raises(ConfigError, match=r"quorum\.device: a quorum device"):
        QuorumConfig.from_conf_text(with_device)
