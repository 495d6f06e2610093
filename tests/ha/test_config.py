"""Config parsing and writing: section config (resources.cfg, groups.cfg, rules.cfg),
datacenter.cfg HA keys and crm_commands lines. Checks round trips, defaults and that every
malformed input fails with a ConfigError naming file, line and key.
"""

from __future__ import annotations

import pytest

from corral.errors import ConfigError
from corral.ha.logic.config import (
    ResourceConfig,
    datacenter_from_mapping,
    format_resources,
    parse_crm_command,
    parse_datacenter,
    parse_groups,
    parse_resources,
)
from corral.ha.logic.rules import format_rules, parse_rules
from corral.ha.logic.types import CrsMode, RequestedState, ShutdownPolicy

RESOURCES = """\
vm: 501
\tstate started
\tmax_relocate 2

ct: 102
\tstate enabled
\tfailback 0
\tcomment web frontend

vm: 7
\tstate ignored
"""


def test_resources_parse_defaults_and_alias() -> None:
    resources = parse_resources(RESOURCES)
    assert sorted(resources) == ["ct:102", "vm:501", "vm:7"]
    assert resources["vm:501"].max_relocate == 2 and resources["vm:501"].max_restart == 1
    assert resources["ct:102"].state == RequestedState.STARTED  # 'enabled' alias
    assert resources["ct:102"].failback is False
    assert resources["ct:102"].comment == "web frontend"
    assert resources["vm:7"].state == RequestedState.IGNORED


def test_resources_round_trip() -> None:
    resources = parse_resources(RESOURCES)
    again = parse_resources(format_resources(resources))
    assert again == resources


def test_resources_format_omits_defaults() -> None:
    text = format_resources({"vm:1": ResourceConfig("vm:1")})
    assert text == "vm: 1\n"


@pytest.mark.parametrize("text, fragment", [
    ("vm: 1\n\tstate running\n", "invalid state 'running'"),
    ("vm: 1\n\tmax_restart -1\n", "between 0 and 10"),
    ("vm: 1\n\tmax_relocate x\n", "expected an integer"),
    ("vm: 1\n\tfailback maybe\n", "expected a boolean"),
    ("vm: 1\n\tcolour red\n", "unknown resource property"),
    ("qemu: 1\n", "unknown section type 'qemu'"),
    ("vm: 1\nvm: 1\n", "duplicate section"),
    ("\tstate started\n", "outside of a section"),
    ("vm 1\n", "section header"),
    ("vm: 1\n\tstate started\n\tstate stopped\n", "duplicate property"),
    ("vm: a/b\n", "invalid service id"),
])
def test_resources_errors_name_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_resources(text)
    assert fragment in str(info.value)
    assert "ha/resources.cfg:" in str(info.value)


def test_resources_trailing_garbage_line_is_an_error() -> None:
    with pytest.raises(ConfigError, match=":3"):
        parse_resources("vm: 1\n\tstate started\ngarbage here\n")


def test_groups_parse() -> None:
    groups = parse_groups("group: g1\n\tnodes node1:2,node2,node3:1\n\trestricted 1\n"
                          "\tnofailback 1\n")
    group = groups["g1"]
    assert group.nodes == {"node1": 2, "node2": 0, "node3": 1}
    assert group.restricted and group.nofailback


@pytest.mark.parametrize("text, fragment", [
    ("group: g\n\trestricted 1\n", "nodes: missing required property"),
    ("group: g\n\tnodes node1,node1\n", "listed twice"),
    ("group: g\n\tnodes node1:x\n", "expected an integer"),
    ("group: g\n\tnodes bad_name\n", "invalid node name"),
])
def test_groups_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_groups(text)


def test_rules_round_trip() -> None:
    text = ("node-affinity: prefer\n\tresources vm:100\n\tnodes node1:2,node2:1,node3\n"
            "\tstrict 1\n\nresource-affinity: apart\n\tresources vm:200,ct:300\n"
            "\taffinity negative\n\tdisable 1\n")
    rules = parse_rules(text)
    assert rules[0].nodes == {"node1": 2, "node2": 1, "node3": 0} and rules[0].strict
    assert rules[1].affinity == "negative" and rules[1].disabled
    assert parse_rules(format_rules(rules)) == rules


@pytest.mark.parametrize("text, fragment", [
    ("node-affinity: r\n\tresources vm:1\n", "nodes: missing required property"),
    ("resource-affinity: r\n\tresources vm:1,vm:2\n\taffinity sideways\n", "positive"),
    ("resource-affinity: r\n\tresources vm:1,vm:1\n\taffinity positive\n", "listed twice"),
    ("resource-affinity: r\n\tresources vm:1,vm:2\n\taffinity positive\n\tnodes node1\n",
     "unknown resource-affinity property"),
    ("colocation: r\n\tresources vm:1\n", "unknown section type"),
])
def test_rules_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_rules(text)


def test_datacenter_property_strings() -> None:
    text = ("keyboard: en-us\nha: shutdown_policy=migrate\n"
            "crs: ha=static,ha-rebalance-on-start=1\nmax_workers: 8\n")
    datacenter = parse_datacenter(text)
    assert datacenter.shutdown_policy == ShutdownPolicy.MIGRATE
    assert datacenter.crs_mode == CrsMode.STATIC and datacenter.rebalance_on_start
    assert datacenter.max_workers == 8


def test_datacenter_defaults() -> None:
    datacenter = datacenter_from_mapping({})
    assert datacenter.shutdown_policy == ShutdownPolicy.CONDITIONAL
    assert datacenter.crs_mode == CrsMode.BASIC and not datacenter.rebalance_on_start
    assert datacenter.max_workers == 4


@pytest.mark.parametrize("data, fragment", [
    ({"ha": {"shutdown_policy": "panic"}}, "ha.shutdown_policy"),
    ({"crs": {"ha": "fancy"}}, "crs.ha"),
    ({"crs": {"colour": "red"}}, "unknown crs property"),
    ({"max_workers": 0}, "max_workers"),
    ({"ha": {"fence_delay": 3}}, "unknown ha property"),
])
def test_datacenter_errors(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        datacenter_from_mapping(data)


@pytest.mark.parametrize("line", [
    "migrate vm:101 node2", "relocate ct:5 node1", "stop vm:101 0", "stop vm:101 120",
    "enable-node-maintenance node1", "disable-node-maintenance node3",
    "disarm-ha freeze", "disarm-ha ignore", "arm-ha",
])
def test_crm_commands_valid(line: str) -> None:
    assert parse_crm_command(line).line() == line


@pytest.mark.parametrize("line", [
    "migrate vm:101", "stop vm:101 soon", "disarm-ha maybe", "arm-ha now", "reboot node1", "",
    "migrate 101 node2",
])
def test_crm_commands_invalid(line: str) -> None:
    with pytest.raises(ConfigError):
        parse_crm_command(line)
