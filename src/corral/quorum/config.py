"""The `quorum { }` options of corosync.conf, checked and resolved at load.

`QuorumConfig.from_options()` takes the `quorum` section's key/values and the
nodelist's votes per nodeid and returns the *effective* configuration: every
implied option applied and every interlock of votequorum resolved. An
incompatible combination that corosync refuses raises `ConfigError` naming the
key; a combination where corosync silently turns a feature off turns it off here
too and records a warning in `QuorumConfig.warnings` (the service logs them).

The interlocks, in the order they are applied:

1. `provider` must be `corosync_votequorum` (the default when absent).
2. A quorum device (`device { }` or any `device.*` key) is not supported yet.
3. expected votes = `expected_votes` if set, else the sum of the nodelist votes.
4. `two_node` together with `auto_tie_breaker`: two_node is disabled.
5. `two_node` with more than 2 nodes in the nodelist: two_node is disabled.
6. `wait_for_all` defaults to the effective two_node value unless set.
7. `last_man_standing` with any node holding more than 1 vote: LMS is disabled.
8. `auto_tie_breaker` with an odd number of nodes and no wait_for_all: ATB is
   disabled, or startup fails when last_man_standing is also on.
9. `allow_downscale` implies `expected_votes_tracking`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from corral.corosync_conf import ClusterConfig, parse
from corral.errors import ConfigError

# Bounds of the quorum configuration (named so tests and docs can refer to them).
MAX_NODES = 1024
MAX_VOTES_PER_NODE = 1000
MAX_EXPECTED_VOTES = MAX_NODES * MAX_VOTES_PER_NODE
MAX_NODEID = (1 << 32) - 1
LMS_WINDOW_MS_DEFAULT = 10_000
LMS_WINDOW_MS_BOUNDS = (1, 3_600_000)

KNOWN_KEYS = {
    "provider", "expected_votes", "two_node", "wait_for_all", "last_man_standing",
    "last_man_standing_window", "auto_tie_breaker", "auto_tie_breaker_node",
    "allow_downscale", "expected_votes_tracking",
}
PROVIDER = "corosync_votequorum"
_TRUE = {"1", "yes", "on", "true"}
_FALSE = {"0", "no", "off", "false"}


@dataclass(frozen=True, slots=True)
class QuorumConfig:
    """The effective votequorum configuration (after implied options and interlocks)."""

    node_votes: tuple[tuple[int, int], ...]  # (nodeid, votes), sorted by nodeid
    expected_votes: int
    two_node: bool = False
    wait_for_all: bool = False
    last_man_standing: bool = False
    last_man_standing_window_ms: int = LMS_WINDOW_MS_DEFAULT
    auto_tie_breaker: bool = False
    # "lowest", "highest", or "list" with the ids in `auto_tie_breaker_nodes`.
    auto_tie_breaker_mode: str = "lowest"
    auto_tie_breaker_nodes: tuple[int, ...] = ()
    allow_downscale: bool = False
    expected_votes_tracking: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def nodeids(self) -> tuple[int, ...]:
        return tuple(nodeid for nodeid, _ in self.node_votes)

    def votes_of(self, nodeid: int) -> int:
        for candidate, votes in self.node_votes:
            if candidate == nodeid:
                return votes
        return 1

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, str],
        node_votes: Mapping[int, int],
        has_device: bool = False,
    ) -> QuorumConfig:
        """Resolve a `quorum { }` section against the nodelist's votes per nodeid."""
        _check_keys(options, has_device)
        votes = _check_nodes(node_votes)
        warnings: list[str] = []
        expected = _expected_votes(options, votes)
        two_node = _flag(options, "two_node")
        atb = _flag(options, "auto_tie_breaker")
        lms = _flag(options, "last_man_standing")
        if two_node and atb:
            warnings.append("two_node is disabled because auto_tie_breaker is set")
            two_node = False
        if two_node and len(votes) > 2:
            warnings.append(f"two_node is disabled: the nodelist has {len(votes)} nodes")
            two_node = False
        wait_for_all = _flag(options, "wait_for_all") if "wait_for_all" in options else two_node
        if lms and any(v != 1 for _, v in votes):
            warnings.append("last_man_standing is disabled: it needs 1 vote per node")
            lms = False
        if atb and len(votes) % 2 == 1 and not wait_for_all:
            if lms:
                raise ConfigError(
                    "quorum.auto_tie_breaker",
                    "with an odd number of nodes auto_tie_breaker and last_man_standing "
                    "need wait_for_all: 1",
                )
            warnings.append(
                "auto_tie_breaker is disabled: an odd number of nodes needs wait_for_all"
            )
            atb = False
        mode, atb_nodes = _tie_breaker_node(options, votes)
        downscale = _flag(options, "allow_downscale")
        return cls(
            node_votes=votes,
            expected_votes=expected,
            two_node=two_node,
            wait_for_all=wait_for_all,
            last_man_standing=lms,
            last_man_standing_window_ms=_window_ms(options),
            auto_tie_breaker=atb,
            auto_tie_breaker_mode=mode,
            auto_tie_breaker_nodes=atb_nodes,
            allow_downscale=downscale,
            expected_votes_tracking=downscale or _flag(options, "expected_votes_tracking"),
            warnings=tuple(warnings),
        )

    @classmethod
    def from_cluster(cls, cluster: ClusterConfig, has_device: bool = False) -> QuorumConfig:
        """Build from a parsed `ClusterConfig` (its `quorum` options and nodelist).

        `ClusterConfig.quorum` holds only the section's options, so a `device { }`
        subsection is invisible there: use `from_conf_text` when reading a file."""
        votes = {node.nodeid: node.quorum_votes for node in cluster.nodes}
        return cls.from_options(dict(cluster.quorum), votes, has_device)

    @classmethod
    def from_conf_text(cls, text: str, source: str = "corosync.conf") -> QuorumConfig:
        """Build from corosync.conf text, refusing a `quorum { device { } }` section."""
        root = parse(text, source)
        quorum = root.section("quorum")
        has_device = quorum is not None and bool(quorum.sections("device"))
        return cls.from_cluster(ClusterConfig.from_tree(root, source), has_device)


def _check_keys(options: Mapping[str, str], has_device: bool) -> None:
    if has_device or any(key == "device" or key.startswith("device.") for key in options):
        raise ConfigError("quorum.device", "a quorum device (qdevice) is not supported yet")
    for key in options:
        if key == "votes":
            raise ConfigError("quorum.votes", "deprecated; set quorum_votes in the nodelist")
        if key not in KNOWN_KEYS:
            raise ConfigError(f"quorum.{key}", "unknown option")
    provider = options.get("provider", PROVIDER).strip()
    if provider != PROVIDER:
        raise ConfigError("quorum.provider", f"{provider!r} is not supported; use {PROVIDER}")


def _check_nodes(node_votes: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    if not node_votes:
        raise ConfigError("nodelist", "votequorum needs a nodelist with at least one node")
    if len(node_votes) > MAX_NODES:
        raise ConfigError("nodelist", f"{len(node_votes)} nodes exceed the limit of {MAX_NODES}")
    for nodeid, votes in node_votes.items():
        if not 1 <= nodeid <= MAX_NODEID:
            raise ConfigError("nodelist.node.nodeid", f"{nodeid} is out of range")
        if not 0 <= votes <= MAX_VOTES_PER_NODE:
            raise ConfigError(
                "nodelist.node.quorum_votes",
                f"node {nodeid}: {votes} is outside [0, {MAX_VOTES_PER_NODE}]",
            )
    return tuple(sorted(node_votes.items()))


def _expected_votes(options: Mapping[str, str], votes: tuple[tuple[int, int], ...]) -> int:
    if "expected_votes" in options:
        expected = _int(options, "expected_votes", 1, MAX_EXPECTED_VOTES)
    else:
        expected = sum(v for _, v in votes)
    if expected < 1:
        raise ConfigError(
            "quorum.expected_votes", "no expected votes: set expected_votes or node votes"
        )
    return expected


def _flag(options: Mapping[str, str], key: str) -> bool:
    raw = options.get(key, "0").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"quorum.{key}", f"expected 0 or 1, got {raw!r}")


def _int(options: Mapping[str, str], key: str, low: int, high: int) -> int:
    raw = options[key]
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"quorum.{key}", f"not an integer: {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"quorum.{key}", f"{value} is outside [{low}, {high}]")
    return value


def _window_ms(options: Mapping[str, str]) -> int:
    if "last_man_standing_window" not in options:
        return LMS_WINDOW_MS_DEFAULT
    return _int(options, "last_man_standing_window", *LMS_WINDOW_MS_BOUNDS)


def _tie_breaker_node(
    options: Mapping[str, str], votes: tuple[tuple[int, int], ...]
) -> tuple[str, tuple[int, ...]]:
    raw = options.get("auto_tie_breaker_node", "lowest").strip().lower()
    if raw in ("lowest", "highest"):
        return raw, ()
    known = {nodeid for nodeid, _ in votes}
    ids: list[int] = []
    for word in raw.replace(",", " ").split():
        try:
            nodeid = int(word)
        except ValueError:
            raise ConfigError(
                "quorum.auto_tie_breaker_node",
                f"expected lowest, highest or a list of nodeids, got {word!r}",
            ) from None
        if nodeid not in known:
            raise ConfigError("quorum.auto_tie_breaker_node", f"node {nodeid} is not in the nodelist")
        if nodeid in ids:
            raise ConfigError("quorum.auto_tie_breaker_node", f"node {nodeid} is listed twice")
        ids.append(nodeid)
    if not ids:
        raise ConfigError("quorum.auto_tie_breaker_node", "empty list")
    return "list", tuple(ids)
