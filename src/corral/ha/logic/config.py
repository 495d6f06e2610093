"""Parsers and writers for the HA config files: resources.cfg, groups.cfg, rules.cfg (section
config), datacenter.cfg `ha:`/`crs:` keys and ha/crm_commands lines.

Every parse error is a ConfigError whose key names the file, line and property, so a user sees
exactly what to fix. Writers produce text the parsers read back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from corral.errors import ConfigError
from corral.ha.logic.types import CrsMode, RequestedState, ShutdownPolicy

MAX_CONFIG_BYTES = 1 << 20
MAX_SECTIONS = 10_000
SID_RE = re.compile(r"^(vm|ct|fa):([0-9A-Za-z_-]{1,64})$")
SECTION_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
NODE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})$")


@dataclass
class Section:
    """One `type: id` block with its raw `key value` properties."""

    kind: str
    ident: str
    props: dict[str, str]
    line: int


def parse_sections(text: str, filename: str, kinds: set[str]) -> list[Section]:
    """Split section-config text into sections; properties are indented `key value` lines."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(filename, f"larger than {MAX_CONFIG_BYTES} bytes")
    sections: list[Section] = []
    current: Section | None = None
    seen: set[tuple[str, str]] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            if not line.strip():
                current = None if current is None else current
            continue
        where = f"{filename}:{number}"
        if not raw[0].isspace():
            match = re.match(r"^([a-z-]+):\s*(\S+)\s*$", line)
            if not match:
                raise ConfigError(where, f"expected 'type: id' section header, got {line!r}")
            kind, ident = match.group(1), match.group(2)
            if kind not in kinds:
                raise ConfigError(where, f"unknown section type {kind!r} "
                                         f"(expected one of {', '.join(sorted(kinds))})")
            if (kind, ident) in seen:
                raise ConfigError(where, f"duplicate section '{kind}: {ident}'")
            seen.add((kind, ident))
            current = Section(kind, ident, {}, number)
            sections.append(current)
            if len(sections) > MAX_SECTIONS:
                raise ConfigError(filename, f"more than {MAX_SECTIONS} sections")
            continue
        if current is None:
            raise ConfigError(where, "property line outside of a section")
        parts = line.strip().split(None, 1)
        key = parts[0]
        value = parts[1].strip() if len(parts) > 1 else ""
        if key in current.props:
            raise ConfigError(where, f"duplicate property {key!r}")
        current.props[key] = value
    return sections


def format_sections(sections: list[Section]) -> str:
    blocks = []
    for section in sections:
        lines = [f"{section.kind}: {section.ident}"]
        lines += [f"\t{key} {value}".rstrip() for key, value in section.props.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def parse_bool(value: str, key: str) -> bool:
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(key, f"expected a boolean (0 or 1), got {value!r}")


def parse_int(value: Any, key: str, minimum: int = 0, maximum: int = 1_000_000) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected an integer, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise ConfigError(key, f"must be between {minimum} and {maximum}, got {number}")
    return number


def check_sid(sid: str, key: str = "sid") -> str:
    if not SID_RE.match(sid):
        raise ConfigError(key, f"invalid service id {sid!r} (expected vm:<id>, ct:<id> or fa:<id>)")
    return sid


def check_node(node: str, key: str = "node") -> str:
    if not NODE_RE.match(node):
        raise ConfigError(key, f"invalid node name {node!r}")
    return node


# --- resources.cfg -----------------------------------------------------------------------

@dataclass
class ResourceConfig:
    """One HA resource. `node` is where the guest's config lives (not part of resources.cfg)."""

    sid: str
    state: RequestedState = RequestedState.STARTED
    max_restart: int = 1
    max_relocate: int = 1
    failback: bool = True
    group: str | None = None
    comment: str | None = None
    node: str | None = None

    @property
    def kind(self) -> str:
        return self.sid.split(":", 1)[0]


RESOURCE_KEYS = {"state", "max_restart", "max_relocate", "failback", "group", "comment"}


def parse_requested_state(value: str, key: str) -> RequestedState:
    if value == "enabled":
        return RequestedState.STARTED
    try:
        return RequestedState(value)
    except ValueError:
        raise ConfigError(key, f"invalid state {value!r} (expected started, stopped, "
                               "disabled, ignored or enabled)") from None


def resource_from_props(sid: str, props: dict[str, Any], where: str,
                        default_state: RequestedState = RequestedState.STARTED) -> ResourceConfig:
    check_sid(sid, where)
    resource = ResourceConfig(sid=sid, state=default_state)
    for key, value in props.items():
        name = f"{where}: {key}"
        if key == "state":
            resource.state = parse_requested_state(str(value), name)
        elif key == "max_restart":
            resource.max_restart = parse_int(value, name, 0, 10)
        elif key == "max_relocate":
            resource.max_relocate = parse_int(value, name, 0, 10)
        elif key == "failback":
            resource.failback = parse_bool(str(value), name)
        elif key == "group":
            resource.group = str(value)
        elif key == "comment":
            resource.comment = str(value)
        elif key == "node":
            resource.node = check_node(str(value), name)
        else:
            raise ConfigError(name, f"unknown resource property (known: {', '.join(sorted(RESOURCE_KEYS))})")
    return resource


def parse_resources(text: str, filename: str = "ha/resources.cfg") -> dict[str, ResourceConfig]:
    resources: dict[str, ResourceConfig] = {}
    for section in parse_sections(text, filename, {"vm", "ct"}):
        sid = f"{section.kind}:{section.ident}"
        props = {k: v for k, v in section.props.items()}
        if "node" in props:
            raise ConfigError(f"{filename}:{section.line}: node", "not a resources.cfg property")
        resources[sid] = resource_from_props(sid, props, f"{filename}:{section.line}")
    return resources


def format_resources(resources: dict[str, ResourceConfig]) -> str:
    sections = []
    for sid in sorted(resources):
        resource = resources[sid]
        kind, ident = sid.split(":", 1)
        props: dict[str, str] = {}
        if resource.state != RequestedState.STARTED:
            props["state"] = resource.state.value
        if resource.max_restart != 1:
            props["max_restart"] = str(resource.max_restart)
        if resource.max_relocate != 1:
            props["max_relocate"] = str(resource.max_relocate)
        if not resource.failback:
            props["failback"] = "0"
        if resource.group:
            props["group"] = resource.group
        if resource.comment:
            props["comment"] = resource.comment
        sections.append(Section(kind, ident, props, 0))
    return format_sections(sections)


# --- groups.cfg (legacy) -----------------------------------------------------------------

@dataclass
class GroupConfig:
    name: str
    nodes: dict[str, int]
    restricted: bool = False
    nofailback: bool = False
    comment: str | None = None


def parse_node_priorities(value: str, key: str) -> dict[str, int]:
    """`node1:2,node2,node3:1` -> {node: priority}; priority defaults to 0."""
    nodes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, priority = item.partition(":")
        check_node(name, key)
        if name in nodes:
            raise ConfigError(key, f"node {name!r} listed twice")
        nodes[name] = parse_int(priority, key, -1000, 1000) if priority else 0
    if not nodes:
        raise ConfigError(key, "needs at least one node")
    return nodes


def format_node_priorities(nodes: dict[str, int]) -> str:
    return ",".join(f"{n}:{p}" if p else n for n, p in sorted(nodes.items()))


def parse_groups(text: str, filename: str = "ha/groups.cfg") -> dict[str, GroupConfig]:
    groups: dict[str, GroupConfig] = {}
    for section in parse_sections(text, filename, {"group"}):
        where = f"{filename}:{section.line}"
        props = section.props
        unknown = set(props) - {"nodes", "restricted", "nofailback", "comment"}
        if unknown:
            raise ConfigError(f"{where}: {sorted(unknown)[0]}", "unknown group property")
        if "nodes" not in props:
            raise ConfigError(f"{where}: nodes", "missing required property")
        groups[section.ident] = GroupConfig(
            name=section.ident,
            nodes=parse_node_priorities(props["nodes"], f"{where}: nodes"),
            restricted=parse_bool(props.get("restricted", "0"), f"{where}: restricted"),
            nofailback=parse_bool(props.get("nofailback", "0"), f"{where}: nofailback"),
            comment=props.get("comment"),
        )
    return groups


# --- datacenter.cfg ----------------------------------------------------------------------

@dataclass
class DatacenterHa:
    shutdown_policy: ShutdownPolicy = ShutdownPolicy.CONDITIONAL
    crs_mode: CrsMode = CrsMode.BASIC
    rebalance_on_start: bool = False
    max_workers: int = 4
    timings: dict[str, Any] = field(default_factory=dict)
    rebalance: AutoRebalance = field(default_factory=lambda: AutoRebalance())


@dataclass
class AutoRebalance:
    """crs ha-auto-rebalance* keys (static mode only)."""

    enabled: bool = False
    threshold: float = 0.3
    hold_rounds: int = 3
    margin: float = 0.1
    method: str = "bruteforce"


def parse_float(value: Any, key: str, minimum: float, maximum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a number, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise ConfigError(key, f"must be between {minimum} and {maximum}, got {number}")
    return number


def _auto_rebalance_key(rebalance: AutoRebalance, key: str, value: Any, where: str) -> None:
    if key == "ha-auto-rebalance":
        rebalance.enabled = parse_bool(str(value), where)
    elif key == "ha-auto-rebalance-threshold":
        rebalance.threshold = parse_float(value, where, 0.0, 10.0)
    elif key == "ha-auto-rebalance-hold-duration":
        rebalance.hold_rounds = parse_int(value, where, 1, 1000)
    elif key == "ha-auto-rebalance-margin":
        rebalance.margin = parse_float(value, where, 0.0, 1.0)
    elif key == "ha-auto-rebalance-method":
        if value not in ("bruteforce", "topsis"):
            raise ConfigError(where, "must be 'bruteforce' or 'topsis'")
        rebalance.method = str(value)
    else:
        raise ConfigError(where, "unknown crs property")


def parse_property_string(value: str, key: str) -> dict[str, str]:
    """`a=1,b=x` -> {a: 1, b: x}; a bare first word is the default key's value."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, val = item.partition("=")
        if not sep:
            raise ConfigError(key, f"expected key=value, got {item!r}")
        result[name.strip()] = val.strip()
    return result


def datacenter_from_mapping(data: dict[str, Any], filename: str = "datacenter.cfg") -> DatacenterHa:
    """Interpret the `ha`, `crs`, `max_workers` and `ha-timing` keys (already split)."""
    result = DatacenterHa()
    ha = data.get("ha") or {}
    crs = data.get("crs") or {}
    if not isinstance(ha, dict) or not isinstance(crs, dict):
        raise ConfigError(filename, "'ha' and 'crs' must be property maps")
    for key, value in ha.items():
        if key == "shutdown_policy":
            try:
                result.shutdown_policy = ShutdownPolicy(value)
            except ValueError:
                raise ConfigError(f"{filename}: ha.shutdown_policy",
                                  f"invalid policy {value!r} (expected conditional, freeze, "
                                  "failover or migrate)") from None
        else:
            raise ConfigError(f"{filename}: ha.{key}", "unknown ha property")
    for key, value in crs.items():
        if key == "ha":
            try:
                result.crs_mode = CrsMode(value)
            except ValueError:
                raise ConfigError(f"{filename}: crs.ha", f"invalid mode {value!r} "
                                  "(expected basic, static or dynamic)") from None
        elif key == "ha-rebalance-on-start":
            result.rebalance_on_start = parse_bool(str(value), f"{filename}: crs.{key}")
        elif key.startswith("ha-auto-rebalance"):
            _auto_rebalance_key(result.rebalance, key, value, f"{filename}: crs.{key}")
        else:
            raise ConfigError(f"{filename}: crs.{key}", "unknown crs property")
    if "max_workers" in data:
        result.max_workers = parse_int(data["max_workers"], f"{filename}: max_workers", 1, 64)
    timing = data.get("ha-timing") or {}
    if not isinstance(timing, dict):
        raise ConfigError(f"{filename}: ha-timing", "must be a property map")
    result.timings = dict(timing)
    return result


def parse_datacenter(text: str, filename: str = "datacenter.cfg") -> DatacenterHa:
    """Read the HA-related keys of a real datacenter.cfg (`key: value` lines)."""
    data: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ConfigError(f"{filename}:{number}", f"expected 'key: value', got {line!r}")
        key, value = key.strip(), value.strip()
        if key in ("ha", "crs", "ha-timing"):
            data[key] = parse_property_string(value, f"{filename}:{number}: {key}")
        elif key == "max_workers":
            data[key] = value
    return datacenter_from_mapping(data, filename)


# --- crm_commands ------------------------------------------------------------------------

@dataclass(frozen=True)
class CrmCommand:
    verb: str
    args: tuple[str, ...]

    def line(self) -> str:
        return " ".join((self.verb, *self.args))


def parse_crm_command(line: str) -> CrmCommand:
    """Parse one ha/crm_commands line; ConfigError with the reason if it is malformed."""
    words = line.split()
    if not words:
        raise ConfigError("crm_commands", "empty command")
    verb, args = words[0], tuple(words[1:])
    if verb in ("migrate", "relocate") and len(args) == 2:
        check_sid(args[0], "crm_commands")
        check_node(args[1], "crm_commands")
    elif verb == "stop" and len(args) == 2:
        check_sid(args[0], "crm_commands")
        parse_int(args[1], "crm_commands: stop timeout", 0, 86400)
    elif verb in ("enable-node-maintenance", "disable-node-maintenance") and len(args) == 1:
        check_node(args[0], "crm_commands")
    elif verb == "disarm-ha" and args in (("freeze",), ("ignore",)):
        pass
    elif verb == "arm-ha" and not args:
        pass
    else:
        raise ConfigError("crm_commands", f"unable to parse crm command: {line.strip()}")
    return CrmCommand(verb, args)
