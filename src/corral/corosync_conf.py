"""Parser and writer of `corosync.conf` syntax, and its typed view `ClusterConfig`.

The syntax: `name {` opens a section, `}` closes it, `key: value` (or
`key = value`) sets an option, `#` starts a comment line, blank lines are
ignored. Sections nest (`totem { interface { } }`, `nodelist { node { } }`).
`parse()` builds a `Section` tree that keeps line numbers, so every error
names the line; `dump()` writes a tree back in canonical form (4-space
indent) and `parse(dump(tree))` equals the tree.

`ClusterConfig.from_tree()` reads the parts Corral uses: cluster name,
config_version, the totem timing options (`TotemConfig.from_mapping`),
encryption (`secauth`, `crypto_cipher`, `crypto_hash`), links (`interface`
sections: link number, priority, ping/pong settings, port), the nodelist
(name, nodeid, ringX_addr, quorum_votes), and the `quorum`/`logging`
sections, and `system` (e.g. `state_dir`), as plain dicts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from corral.errors import ConfigError
from corral.totem.config import TotemConfig

MAX_DEPTH = 8
MAX_LINE_BYTES = 4096
MAX_LINKS = 8
DEFAULT_PORT = 5405
DEFAULT_PONG_COUNT = 2
PINGS_PER_TIMEOUT = 4

# totem keys that are not timers (TotemConfig rejects unknown keys).
TOTEM_OTHER_KEYS = {
    "version", "cluster_name", "config_version", "transport", "ip_version", "link_mode",
    "crypto_model", "crypto_cipher", "crypto_hash", "secauth", "keyfile", "key",
    "clear_node_high_bit", "block_unlisted_ips", "cancel_token_hold_on_retransmit",
    "knet_mtu", "knet_pmtud_interval", "knet_compression_model",
    "knet_compression_threshold", "knet_compression_level",
}
INTERFACE_KEYS = {
    "linknumber", "knet_link_priority", "knet_ping_interval", "knet_ping_timeout",
    "knet_ping_precision", "knet_pong_count", "knet_transport", "mcastport",
    "bindnetaddr", "mcastaddr", "ttl", "broadcast",
}
NODE_KEYS = {"name", "nodeid", "quorum_votes"} | {f"ring{i}_addr" for i in range(MAX_LINKS)}


class ConfSyntaxError(ConfigError):
    """A syntax error in a corosync.conf file, naming its line."""

    def __init__(self, line: int, message: str, source: str = "corosync.conf") -> None:
        super().__init__(f"{source}:{line}", message)
        self.line = line


@dataclass
class Section:
    name: str
    line: int = field(default=0, compare=False)
    options: dict[str, str] = field(default_factory=dict)
    option_lines: dict[str, int] = field(default_factory=dict, compare=False)
    children: list[Section] = field(default_factory=list)

    def sections(self, name: str) -> list[Section]:
        return [child for child in self.children if child.name == name]

    def section(self, name: str) -> Section | None:
        found = self.sections(name)
        if len(found) > 1:
            raise ConfSyntaxError(found[1].line, f"section {name!r} appears more than once")
        return found[0] if found else None

    def line_of(self, key: str) -> int:
        return self.option_lines.get(key, self.line)


def parse(text: str, source: str = "corosync.conf") -> Section:
    root = Section("", 0)
    stack = [root]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if len(raw) > MAX_LINE_BYTES:
            raise ConfSyntaxError(number, "line too long", source)
        if not line or line.startswith("#"):
            continue
        if line == "}":
            if len(stack) == 1:
                raise ConfSyntaxError(number, "'}' without an open section", source)
            stack.pop()
        elif line.endswith("{"):
            stack.append(_open_section(stack[-1], line[:-1].strip(), number, len(stack), source))
        else:
            _set_option(stack[-1], line, number, source)
    if len(stack) > 1:
        raise ConfSyntaxError(stack[-1].line, f"section {stack[-1].name!r} is never closed", source)
    return root


def _open_section(parent: Section, name: str, number: int, depth: int, source: str) -> Section:
    if not name or not _is_word(name):
        raise ConfSyntaxError(number, f"bad section name {name!r}", source)
    if depth > MAX_DEPTH:
        raise ConfSyntaxError(number, f"sections nested deeper than {MAX_DEPTH}", source)
    section = Section(name, number)
    parent.children.append(section)
    return section


def _set_option(section: Section, line: str, number: int, source: str) -> None:
    colon, equals = line.find(":"), line.find("=")
    cut = min(i for i in (colon, equals) if i >= 0) if max(colon, equals) >= 0 else -1
    if cut <= 0:
        raise ConfSyntaxError(number, f"expected 'key: value', 'name {{' or '}}', got {line!r}", source)
    key, value = line[:cut].strip(), line[cut + 1 :].strip()
    if not _is_word(key):
        raise ConfSyntaxError(number, f"bad option name {key!r}", source)
    if "{" in value or "}" in value:
        raise ConfSyntaxError(number, f"braces inside the value of {key!r}", source)
    if key in section.options:
        where = section.name or "top level"
        raise ConfSyntaxError(number, f"{key!r} set twice in {where} (first on line "
                              f"{section.option_lines[key]})", source)
    section.options[key] = value
    section.option_lines[key] = number


def _is_word(text: str) -> bool:
    return all(ch.isalnum() or ch in "_-." for ch in text)


def dump(root: Section) -> str:
    lines: list[str] = []
    _dump_into(root, lines, 0)
    return "\n".join(lines) + "\n"


def _dump_into(section: Section, lines: list[str], depth: int) -> None:
    indent = "    " * depth
    for key, value in section.options.items():
        lines.append(f"{indent}{key}: {value}")
    for child in section.children:
        if lines and depth == 0:
            lines.append("")
        lines.append(f"{indent}{child.name} {{")
        _dump_into(child, lines, depth + 1)
        lines.append(f"{indent}}}")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    linknumber: int
    priority: int = 1
    port: int = DEFAULT_PORT
    ping_interval_ms: int = 0  # 0 = computed from the token timeout
    ping_timeout_ms: int = 0
    pong_count: int = DEFAULT_PONG_COUNT


@dataclass(frozen=True, slots=True)
class NodeSpec:
    nodeid: int
    name: str
    addrs: dict[int, str]  # link number -> address
    quorum_votes: int = 1


@dataclass(frozen=True)
class ClusterConfig:
    cluster_name: str
    config_version: int
    totem: TotemConfig
    encrypt: bool
    links: tuple[LinkSpec, ...]
    nodes: tuple[NodeSpec, ...]
    keyfile: str | None = None
    link_mode: str = "passive"
    quorum: dict[str, str] = field(default_factory=dict)
    logging: dict[str, str] = field(default_factory=dict)
    system: dict[str, str] = field(default_factory=dict)

    def node(self, nodeid: int) -> NodeSpec:
        for node in self.nodes:
            if node.nodeid == nodeid:
                return node
        raise ConfigError("nodelist", f"nodeid {nodeid} is not in the nodelist")

    def link(self, linknumber: int) -> LinkSpec:
        for link in self.links:
            if link.linknumber == linknumber:
                return link
        raise ConfigError("totem.interface", f"no link {linknumber}")

    def ping_timing_ms(self, link: LinkSpec) -> tuple[int, int]:
        """(interval, timeout) of link pings: explicit values, else token-derived
        defaults: timeout = token / pong_count as in corosync, but interval =
        timeout / PINGS_PER_TIMEOUT (corosync: / 2), so that a link only goes down
        after 4 lost ping rounds, not 2: on a link losing 10 % of round trips that
        is one false 'down' per ~10^4 rounds instead of per ~10^2."""
        token_ms = self.totem.effective_token_ms(len(self.nodes))
        timeout = link.ping_timeout_ms or max(20, token_ms // link.pong_count)
        interval = link.ping_interval_ms or max(5, timeout // PINGS_PER_TIMEOUT)
        return interval, timeout

    @classmethod
    def from_text(cls, text: str, source: str = "corosync.conf") -> ClusterConfig:
        return cls.from_tree(parse(text, source), source)

    @classmethod
    def from_file(cls, path: str) -> ClusterConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ConfigError(path, error.strerror or "cannot read") from None
        except UnicodeDecodeError:
            raise ConfigError(path, "not UTF-8 text") from None
        return cls.from_text(text, path)

    @classmethod
    def from_tree(cls, root: Section, source: str = "corosync.conf") -> ClusterConfig:
        totem = root.section("totem")
        if totem is None:
            raise ConfSyntaxError(1, "no totem { } section", source)
        nodelist = root.section("nodelist")
        if nodelist is None:
            raise ConfSyntaxError(1, "no nodelist { } section (Corral needs one)", source)
        nodes = tuple(_read_node(node, source) for node in nodelist.sections("node"))
        _check_nodes(nodes, nodelist, source)
        links = _read_links(totem, nodes, source)
        timers = {k: v for k, v in totem.options.items() if k not in TOTEM_OTHER_KEYS}
        try:
            totem_config = TotemConfig.from_mapping(timers)
            totem_config.timers(len(nodes))
        except ConfigError as error:
            key = error.key.removeprefix("totem.")
            raise ConfSyntaxError(totem.line_of(key), str(error), source) from None
        quorum, logging = root.section("quorum"), root.section("logging")
        system = root.section("system")
        return cls(
            cluster_name=totem.options.get("cluster_name", "corral"),
            config_version=_int(totem, "config_version", 0, source, minimum=0),
            totem=totem_config,
            encrypt=_read_encrypt(totem, source),
            links=links,
            nodes=nodes,
            keyfile=totem.options.get("keyfile"),
            link_mode=_read_link_mode(totem, source),
            quorum=dict(quorum.options) if quorum else {},
            logging=dict(logging.options) if logging else {},
            system=dict(system.options) if system else {},
        )


def _int(section: Section, key: str, default: int, source: str, minimum: int = 0,
         maximum: int = (1 << 32) - 1) -> int:
    raw = section.options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        raise ConfSyntaxError(section.line_of(key), f"{key}: not an integer: {raw!r}", source) from None
    if not minimum <= value <= maximum:
        raise ConfSyntaxError(section.line_of(key), f"{key}: {value} is outside "
                              f"[{minimum}, {maximum}]", source)
    return value


def _read_encrypt(totem: Section, source: str) -> bool:
    """secauth: on = aes256; crypto_cipher aes256 = on; none/absent = MAC only.
    Packets are always authenticated (keyed BLAKE2b) even without a cipher."""
    cipher = totem.options.get("crypto_cipher")
    if cipher is not None:
        if cipher not in ("none", "aes256"):
            raise ConfSyntaxError(totem.line_of("crypto_cipher"), f"crypto_cipher {cipher!r}: "
                                  "only 'aes256' (AES-256-GCM) and 'none' are supported", source)
        return cipher == "aes256"
    secauth = totem.options.get("secauth", "off")
    if secauth not in ("on", "off"):
        raise ConfSyntaxError(totem.line_of("secauth"), f"secauth must be on or off, got "
                              f"{secauth!r}", source)
    return secauth == "on"


def _read_link_mode(totem: Section, source: str) -> str:
    mode = totem.options.get("link_mode", "passive")
    if mode != "passive":
        raise ConfSyntaxError(totem.line_of("link_mode"), f"link_mode {mode!r}: only "
                              "'passive' is supported", source)
    transport = totem.options.get("transport", "knet")
    if transport not in ("knet", "udpu"):
        raise ConfSyntaxError(totem.line_of("transport"), f"transport {transport!r}: only "
                              "knet and udpu (unicast UDP) are supported", source)
    return mode


def _read_node(node: Section, source: str) -> NodeSpec:
    for key in node.options:
        if key not in NODE_KEYS:
            raise ConfSyntaxError(node.line_of(key), f"unknown node option {key!r}", source)
    if "nodeid" not in node.options:
        raise ConfSyntaxError(node.line, "node without nodeid", source)
    nodeid = _int(node, "nodeid", 0, source, minimum=1)
    addrs: dict[int, str] = {}
    for link in range(MAX_LINKS):
        key = f"ring{link}_addr"
        if key in node.options:
            try:
                addrs[link] = str(ipaddress.ip_address(node.options[key]))
            except ValueError:
                raise ConfSyntaxError(node.line_of(key), f"{key}: not an IP address: "
                                      f"{node.options[key]!r} (names are not resolved)",
                                      source) from None
    if not addrs:
        raise ConfSyntaxError(node.line, f"node {nodeid} has no ringX_addr", source)
    name = node.options.get("name", f"node{nodeid}")
    return NodeSpec(nodeid, name, addrs, _int(node, "quorum_votes", 1, source))


def _check_nodes(nodes: tuple[NodeSpec, ...], nodelist: Section, source: str) -> None:
    if not nodes:
        raise ConfSyntaxError(nodelist.line, "empty nodelist", source)
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for node, section in zip(nodes, nodelist.sections("node"), strict=True):
        if node.nodeid in seen_ids:
            raise ConfSyntaxError(section.line, f"duplicate nodeid {node.nodeid}", source)
        if node.name in seen_names:
            raise ConfSyntaxError(section.line, f"duplicate node name {node.name!r}", source)
        seen_ids.add(node.nodeid)
        seen_names.add(node.name)
    seen_addresses: dict[tuple[int, str], int] = {}
    for node, section in zip(nodes, nodelist.sections("node"), strict=True):
        for link, address in node.addrs.items():
            other = seen_addresses.setdefault((link, address), node.nodeid)
            if other != node.nodeid:
                raise ConfSyntaxError(section.line, f"ring{link}_addr {address} is also node "
                                      f"{other}'s address", source)
    link_sets = {frozenset(node.addrs) for node in nodes}
    if len(link_sets) != 1:
        raise ConfSyntaxError(nodelist.line, "nodes list different ringX_addr links; every "
                              "node needs an address on every link", source)


def _read_links(totem: Section, nodes: tuple[NodeSpec, ...], source: str) -> tuple[LinkSpec, ...]:
    numbers = sorted(nodes[0].addrs)
    specs: dict[int, LinkSpec] = {n: LinkSpec(n) for n in numbers}
    for interface in totem.sections("interface"):
        for key in interface.options:
            if key not in INTERFACE_KEYS:
                raise ConfSyntaxError(interface.line_of(key), f"unknown interface option "
                                      f"{key!r}", source)
        number = _int(interface, "linknumber", 0, source, maximum=MAX_LINKS - 1)
        if number not in specs:
            raise ConfSyntaxError(interface.line, f"interface linknumber {number} has no "
                                  f"ring{number}_addr in the nodelist", source)
        specs[number] = LinkSpec(
            linknumber=number,
            priority=_int(interface, "knet_link_priority", 1, source, maximum=255),
            port=_int(interface, "mcastport", DEFAULT_PORT, source, minimum=1, maximum=65535),
            ping_interval_ms=_int(interface, "knet_ping_interval", 0, source, maximum=600_000),
            ping_timeout_ms=_int(interface, "knet_ping_timeout", 0, source, maximum=600_000),
            pong_count=_int(interface, "knet_pong_count", DEFAULT_PONG_COUNT, source,
                            minimum=1, maximum=255),
        )
    return tuple(specs[n] for n in numbers)


def render_cluster(cluster_name: str, nodes: list[tuple[int, str, list[str]]],
                   config_version: int = 1, secauth: bool = True, port: int = DEFAULT_PORT,
                   totem_options: dict[str, str] | None = None,
                   quorum: dict[str, str] | None = None) -> str:
    """Write a corosync.conf for `nodes` = [(nodeid, name, [ring0_addr, ring1_addr, ...])]."""
    totem = Section("totem", options={
        "version": "2", "cluster_name": cluster_name, "config_version": str(config_version),
        "secauth": "on" if secauth else "off", "link_mode": "passive",
    })
    totem.options.update(totem_options or {})
    for link in range(len(nodes[0][2])):
        totem.children.append(Section("interface", options={
            "linknumber": str(link), "knet_link_priority": str(10 - link), "mcastport": str(port),
        }))
    nodelist = Section("nodelist")
    for nodeid, name, addrs in nodes:
        options = {"name": name, "nodeid": str(nodeid), "quorum_votes": "1"}
        options.update({f"ring{i}_addr": addr for i, addr in enumerate(addrs)})
        nodelist.children.append(Section("node", options=options))
    quorum_section = Section("quorum", options=quorum or {"provider": "corosync_votequorum"})
    logging = Section("logging", options={"to_stderr": "yes", "timestamp": "hires"})
    return dump(Section("", children=[totem, nodelist, quorum_section, logging]))
