"""A votequorum partition simulator for `QuorumCore`, in the spirit of corosync-vqsim.

Every node runs the real `QuorumCore`; there is no network and no clock, only
this module's model of them:

- a *topology*: groups of nodeids that can talk to each other. The nodes of a
  group that are up form one partition, i.e. one Totem ring; the membership
  each partition sees is handed to its cores directly;
- per partition, a FIFO queue of group messages delivered to every member in
  the same order (the total order CPG gives). When a partition changes, a prefix
  of its queue reaches all its members and the rest is lost, as under extended
  virtual synchrony;
- a simulated clock in integer nanoseconds that fires the cores' timers;
- a disk per node holding ev_tracking, which survives crashes.

`QuorumSim` is driven step by step (tests use it directly), by a script
(`--script FILE`, commands below), or by a seed (`--seed S`): a swarm run
whose seed picks the configuration and the faults, then a safety phase of
random splits, merges, crashes, clean leaves, restarts, time jumps and partial
deliveries, then a liveness phase (everything up, one partition).

Checkers run after every step:

- `one quorate partition`: at most one partition holds a quorate node, for
  configurations whose rules promise it (`strict_safety_applies`: not
  two_node, whose split brain is settled by a fence race, nor the features that
  lower expected votes on the assumption that departed nodes are dead:
  last_man_standing, allow_downscale, an expected_votes below the nodelist);
- `majority liveness`: once messages have settled, every node of a partition
  holding a strict majority of the configured votes is quorate (when
  wait_for_all is off);
- `heal liveness`: with every node up in one partition, after the
  last_man_standing window, every node is quorate.

Script commands: `split 1,2 3,4,5` (topology), `join` (one group), `down N`
(crash), `leave N` (clean shutdown), `up N` (restart), `expected N ON_NODE`,
`wait MS`, `settle`, `show` (the partitions, `*` = quorate), `numbers N`
(that node's expected, highest, total, quorum, quorate), `status N` (its
`corosync-quorumtool -s` output). Every command settles the messages.
Lines starting with `#` are comments; `# nodes: 1,2,3:2` and
`# option: key=value` set up the cluster; a line `> text` must equal the last
output line (scenario files in tests/quorum/scenarios/ use this).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from corral.errors import UsageError
from corral.quorum.config import QuorumConfig
from corral.quorum.core import (
    NS_PER_MS,
    Effect,
    ExpectedVotesRefused,
    PersistExpected,
    QuorumCore,
    QuorumStatus,
    Send,
)
from corral.quorum.format import format_status

MAX_STEPS = 100_000
MAX_SIM_NODES = 64


class CheckFailed(AssertionError):
    """A checker found a violation; the message says which step and how to replay it."""


@dataclass
class SimNode:
    nodeid: int
    core: QuorumCore
    up: bool = True
    disk_expected: int = 0  # the ev_tracking file
    pending_persist: list[int] = field(default_factory=list)


@dataclass
class Partition:
    members: frozenset[int]
    ring_id: tuple[int, int]
    queue: list[tuple[int, bytes]] = field(default_factory=list)


def derive_rng(seed: int, label: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}/{label}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


class QuorumSim:
    """N quorum cores, a partitionable topology, total-order queues and a clock."""

    def __init__(
        self,
        options: Mapping[str, str],
        node_votes: Mapping[int, int],
        delayed_persist: bool = False,
        check_one_quorate: bool | None = None,
        auto_settle: bool = False,
        down: Iterable[int] = (),
        groups: Iterable[Iterable[int]] | None = None,
    ) -> None:
        if len(node_votes) > MAX_SIM_NODES:
            raise UsageError(f"at most {MAX_SIM_NODES} simulated nodes")
        self.options = dict(options)
        self.config = QuorumConfig.from_options(options, node_votes)
        self.now_ns = 0
        self.ring_seq = 0
        self.delayed_persist = delayed_persist
        self.auto_settle = auto_settle
        self.check_one_quorate = (
            strict_safety_applies(self.config) if check_one_quorate is None else check_one_quorate
        )
        self.nodes = {n: SimNode(n, QuorumCore(self.config, n)) for n in sorted(node_votes)}
        for nodeid in down:
            self.nodes[nodeid].up = False
        self.topology: list[frozenset[int]] = [frozenset(self.nodes)]
        if groups is not None:
            named = [frozenset(g) for g in groups]
            seen = set().union(*named) if named else set()
            self.topology = named + [frozenset({n}) for n in self.nodes if n not in seen]
        self.partitions: dict[int, Partition] = {}  # nodeid -> its partition
        self.clean_leavers: set[int] = set()
        self.log: list[str] = []
        self.steps = 0
        self.replay = ""
        self._step("start")

    # ----------------------------------------------------------- operations

    def split(self, groups: Iterable[Iterable[int]]) -> None:
        """Set the topology; nodes not named form one group each."""
        named: list[frozenset[int]] = [frozenset(g) for g in groups if g]
        seen = set().union(*named) if named else set()
        unknown = seen - set(self.nodes)
        if unknown or sum(len(g) for g in named) != len(seen):
            raise UsageError(f"bad split {named}: unknown or repeated nodes")
        rest = [frozenset({n}) for n in self.nodes if n not in seen]
        self.topology = named + rest
        self._step(f"split {' '.join(','.join(map(str, sorted(g))) for g in named)}")

    def join(self) -> None:
        self.topology = [frozenset(self.nodes)]
        self._step("join")

    def crash(self, nodeid: int) -> None:
        node = self.nodes[nodeid]
        if not node.up:
            return
        node.up = False
        node.pending_persist.clear()  # not yet on disk: lost with the crash
        self._step(f"down {nodeid}")

    def leave(self, nodeid: int) -> None:
        """Clean shutdown: announce LEAVING, let it be delivered, then go down."""
        node = self.nodes[nodeid]
        if not node.up:
            return
        self._effects(nodeid, node.core.leave())
        self.settle()
        node.up = False
        self.clean_leavers.add(nodeid)
        self._step(f"leave {nodeid}")

    def restart(self, nodeid: int) -> None:
        node = self.nodes[nodeid]
        if node.up:
            return
        node.core = QuorumCore(self.config, nodeid, tracked_expected=node.disk_expected)
        node.up = True
        self.clean_leavers.discard(nodeid)
        self._step(f"up {nodeid}")

    def status(self, nodeid: int) -> QuorumStatus:
        return self.nodes[nodeid].core.status()

    def quorate_nodes(self) -> list[int]:
        return [n for n, node in self.nodes.items() if node.up and node.core.quorate]

    def set_expected(self, expected_votes: int, on_node: int) -> None:
        self._effects(on_node, self.nodes[on_node].core.set_expected(expected_votes))
        self._step(f"expected {expected_votes} {on_node}")

    def wait_ms(self, duration_ms: int) -> None:
        self.advance_ns(duration_ms * NS_PER_MS)

    def advance_ns(self, duration_ns: int) -> None:
        """Move the clock, firing due timers in deadline order (settling after each)."""
        end = self.now_ns + duration_ns
        while True:
            due = self._due_timers(end)
            if not due:
                break
            deadline, nodeid = min(due)
            self.now_ns = max(self.now_ns, deadline)
            self._effects(nodeid, self.nodes[nodeid].core.timer_expired(self.now_ns))
            self.settle()
        self.now_ns = end
        self._step(f"wait {duration_ns // NS_PER_MS}")

    def _due_timers(self, end_ns: int) -> list[tuple[int, int]]:
        due = []
        for node in self.nodes.values():
            deadline = node.core.next_deadline_ns
            if node.up and deadline is not None and deadline <= end_ns:
                due.append((deadline, node.nodeid))
        return due

    def settle(self) -> None:
        """Deliver every queued message and complete every pending persist."""
        for _ in range(MAX_STEPS):
            if not self.deliver_one() and not self.complete_persists():
                return
        raise CheckFailed("messages did not settle (a message loop?)")

    def deliver_one(self) -> bool:
        for partition in self._distinct_partitions():
            if partition.queue:
                sender, payload = partition.queue.pop(0)
                for member in sorted(partition.members):
                    self._effects(member, self.nodes[member].core.message_received(sender, payload))
                return True
        return False

    def complete_persists(self) -> bool:
        done = False
        for node in self.nodes.values():
            while node.up and node.pending_persist:
                value = node.pending_persist.pop(0)
                node.disk_expected = max(node.disk_expected, value)
                self._effects(node.nodeid, node.core.persisted(value))
                done = True
        return done

    # -------------------------------------------------------------- checks

    def quorate_partitions(self) -> list[frozenset[int]]:
        return [
            p.members for p in self._distinct_partitions()
            if any(self.nodes[n].core.quorate for n in p.members)
        ]

    def check(self) -> None:
        quorate = self.quorate_partitions()
        if self.check_one_quorate and len(quorate) > 1:
            self._fail(f"{len(quorate)} quorate partitions: {[sorted(p) for p in quorate]}")

    def check_majority_liveness(self) -> None:
        """After settle: a partition with a strict majority of the configured votes is quorate."""
        if self.config.wait_for_all:
            return
        total_configured = sum(v for _, v in self.config.node_votes)
        for partition in self._distinct_partitions():
            votes = sum(self.config.votes_of(n) for n in partition.members)
            if 2 * votes > total_configured:
                stuck = [n for n in partition.members if not self.nodes[n].core.quorate]
                if stuck:
                    self._fail(f"majority partition {sorted(partition.members)}: {stuck} not quorate")

    def check_heal_liveness(self) -> None:
        for nodeid in self.nodes:
            self.restart(nodeid)
        self.join()
        self.settle()
        self.advance_ns((self.config.last_man_standing_window_ms + 1) * NS_PER_MS)
        self.settle()
        stuck = [n for n, node in self.nodes.items() if not node.core.quorate]
        if stuck:
            self._fail(f"after healing, nodes {stuck} are not quorate")

    def _fail(self, message: str) -> None:
        tail = "\n  ".join(self.log[-12:])
        raise CheckFailed(f"{message} at step {self.steps}\n  {tail}\nreplay: {self.replay}")

    # ------------------------------------------------------------ internals

    def _step(self, text: str) -> None:
        self.steps += 1
        self._reform()
        if self.auto_settle:
            self.settle()
        self.log.append(f"{self.now_ns // NS_PER_MS:>8} ms  {text}  -> {self.describe()}")
        self.check()

    def describe(self) -> str:
        parts = []
        for partition in self._distinct_partitions():
            nodes = " ".join(
                f"{n}{'*' if self.nodes[n].core.quorate else ''}" for n in sorted(partition.members)
            )
            parts.append(f"[{nodes}]")
        return " ".join(parts) or "(all down)"

    def _distinct_partitions(self) -> list[Partition]:
        seen: dict[int, Partition] = {}
        for partition in self.partitions.values():
            seen[id(partition)] = partition
        return sorted(seen.values(), key=lambda p: min(p.members))

    def _reform(self) -> None:
        """Give every group of up nodes whose membership changed a new ring."""
        for group in self.topology:
            members = frozenset(n for n in group if self.nodes[n].up)
            if not members:
                continue
            current = {id(self.partitions.get(n)) for n in members}
            same = len(current) == 1 and all(
                n in self.partitions and self.partitions[n].members == members for n in members
            )
            if not same:
                self._new_ring(members)
        for nodeid in list(self.partitions):
            if not self.nodes[nodeid].up:
                del self.partitions[nodeid]

    def _new_ring(self, members: frozenset[int]) -> None:
        self.ring_seq += 4
        ring_id = (min(members), self.ring_seq)
        partition = Partition(members, ring_id)
        for nodeid in sorted(members):
            old = self.partitions.get(nodeid)
            if old is not None:
                self._flush_old(old)
        left_clean = set(self.clean_leavers)
        for nodeid in sorted(members):
            self.partitions[nodeid] = partition
        for nodeid in sorted(members):
            effects = self.nodes[nodeid].core.membership_changed(
                ring_id, members, left_clean, self.now_ns
            )
            self._effects(nodeid, effects)

    def _flush_old(self, old: Partition) -> None:
        """The old ring ends: its queued messages are delivered to its members now
        (still in the old ring), unless a subclass chooses to lose some."""
        keep = self._surviving_prefix(len(old.queue))
        pending, old.queue = old.queue[:keep], []
        for sender, payload in pending:
            for member in sorted(old.members):
                if self.nodes[member].up and self.partitions.get(member) is old:
                    self._effects(member, self.nodes[member].core.message_received(sender, payload))

    def _surviving_prefix(self, length: int) -> int:
        return length

    def _effects(self, nodeid: int, effects: Sequence[Effect]) -> None:
        node = self.nodes[nodeid]
        for effect in effects:
            if isinstance(effect, Send):
                partition = self.partitions.get(nodeid)
                if partition is not None and node.up:
                    partition.queue.append((nodeid, effect.payload))
            elif isinstance(effect, PersistExpected):
                node.pending_persist.append(effect.expected_votes)
                if not self.delayed_persist:
                    self.complete_persists()


class FuzzSim(QuorumSim):
    """A seeded run: random faults, partial delivery at ring changes."""

    def __init__(self, seed: int, options: Mapping[str, str], node_votes: Mapping[int, int]):
        self.rng = derive_rng(seed, "faults")
        super().__init__(options, node_votes, delayed_persist=True)

    def _surviving_prefix(self, length: int) -> int:
        return self.rng.randint(0, length) if length else 0

    def random_step(self) -> None:
        rng, ids = self.rng, sorted(self.nodes)
        choice = rng.random()
        if choice < 0.30:
            self.split(self._random_groups(ids))
        elif choice < 0.40:
            self.join()
        elif choice < 0.50:
            self.crash(rng.choice(ids))
        elif choice < 0.55:
            self.leave(rng.choice(ids))
        elif choice < 0.67:
            self.restart(rng.choice(ids))
        elif choice < 0.80:
            window_ms = self.config.last_man_standing_window_ms
            self.wait_ms(rng.choice([100, window_ms // 2, window_ms + 1, window_ms + 1]))
        elif choice < 0.85:
            self.settle()
            self._step("settle")
            self.check_majority_liveness()
        else:
            for _ in range(rng.randint(1, 6)):
                self.deliver_one()
            if rng.random() < 0.5:
                self.complete_persists()
            self._step("deliver")

    def _random_groups(self, ids: list[int]) -> list[list[int]]:
        """Two or three groups; half of the two-way splits are exact halves."""
        shuffled = ids[:]
        self.rng.shuffle(shuffled)
        if len(ids) % 2 == 0 and self.rng.random() < 0.5:
            half = len(ids) // 2
            return [shuffled[:half], shuffled[half:]]
        count = min(len(ids) - 1, self.rng.randint(1, 2))
        cuts = sorted(self.rng.sample(range(1, len(ids)), k=count))
        return [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]


def strict_safety_applies(config: QuorumConfig) -> bool:
    """Whether the rules promise at most one quorate partition for this configuration.

    They do not with two_node (both halves stay quorate; fencing decides), nor
    with last_man_standing or allow_downscale: both lower expected votes on the
    assumption that the nodes gone are gone, and a node written off that comes
    back in another partition (a partition, not a crash) can make that side
    quorate too, with or without wait_for_all (see docs/quorum.md). Nor with
    expected_votes set below the nodelist's votes (two disjoint sets of nodes
    can each reach it).
    """
    if config.two_node or config.last_man_standing or config.allow_downscale:
        return False
    return config.expected_votes >= sum(v for _, v in config.node_votes)


SWARM_FEATURES = (
    "wait_for_all", "last_man_standing", "auto_tie_breaker", "allow_downscale",
    "expected_votes_tracking",
)


def swarm_config(seed: int) -> tuple[dict[str, str], dict[int, int]]:
    """The seed picks the cluster size, the votes and which features are on."""
    rng = derive_rng(seed, "config")
    count = rng.randint(2, 7)
    nodeids = sorted(rng.sample(range(1, 33), count))
    options: dict[str, str] = {}
    for feature in SWARM_FEATURES:
        # The features that lower expected votes void the strict check; keep them
        # rarer so most seeds run it.
        lowering = feature in ("last_man_standing", "allow_downscale")
        if rng.random() < (0.2 if lowering else 0.35):
            options[feature] = "1"
    if "auto_tie_breaker" in options:
        options["auto_tie_breaker_node"] = rng.choice(
            ["lowest", "highest", " ".join(map(str, rng.sample(nodeids, min(2, count))))]
        )
        if count % 2 == 1:
            options["wait_for_all"] = "1"
    if "last_man_standing" in options:
        options["last_man_standing_window"] = str(rng.choice([1000, 10_000]))
        votes = dict.fromkeys(nodeids, 1)
    else:
        votes = {n: rng.choice([1, 1, 1, 2]) for n in nodeids}
    if "allow_downscale" in options and rng.random() < 0.5:
        options["expected_votes"] = str(max(1, sum(votes.values()) - rng.randint(1, 2)))
    return options, votes


def run_seed(seed: int, steps: int = 200, options: Mapping[str, str] | None = None,
             node_votes: Mapping[int, int] | None = None) -> FuzzSim:
    """One swarm run: safety phase with faults, then the liveness phases."""
    if options is None or node_votes is None:
        options, node_votes = swarm_config(seed)
    sim = FuzzSim(seed, options, node_votes)
    sim.replay = f"python -m corral.quorum.vqsim --seed {seed} --steps {steps}"
    for _ in range(min(steps, MAX_STEPS)):
        sim.random_step()
    sim.settle()
    sim.check_majority_liveness()
    sim.check_heal_liveness()
    return sim


# ------------------------------------------------------------------ CLI

def run_script(sim: QuorumSim, lines: Iterable[str], out: list[str]) -> None:
    """Run script commands; a line `> text` must equal the last output line."""
    sim.settle()
    sim._step("settle")
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith(">"):
            expected = line[1:].strip()
            actual = out[-1] if out else "(no output yet)"
            if actual != expected:
                sim._fail(f"line {number}: expected {expected!r}, got {actual!r}")
            continue
        if line:
            _run_command(sim, line, out)
            sim.settle()
            sim._step("settle")


def _run_command(sim: QuorumSim, line: str, out: list[str]) -> None:
    word, *args = line.split()
    if word == "split":
        sim.split([int(n) for n in group.split(",")] for group in args)
    elif word == "join":
        sim.join()
    elif word == "down":
        sim.crash(int(args[0]))
    elif word == "leave":
        sim.leave(int(args[0]))
    elif word == "up":
        sim.restart(int(args[0]))
    elif word == "expected":
        try:
            sim.set_expected(int(args[0]), int(args[1]))
        except ExpectedVotesRefused as refused:
            out.append(f"refused: {refused}")
    elif word == "wait":
        sim.wait_ms(int(args[0]))
    elif word == "settle":
        pass  # every command settles anyway
    elif word == "show":
        out.append(sim.describe())
    elif word == "numbers":
        s = sim.status(int(args[0]))
        out.append(f"expected={s.expected_votes} highest={s.highest_expected} "
                   f"total={s.total_votes} quorum={s.quorum} quorate={int(s.quorate)}")
    elif word == "status":
        out.append(format_status(sim.nodes[int(args[0])].core.status(), _epoch()))
    else:
        raise UsageError(f"unknown command {word!r}")


def script_header(lines: Sequence[str]) -> tuple[dict[int, int] | None, dict[str, str]]:
    """`# nodes: 1,2,3:2` and `# option: key=value` comment lines of a scenario file."""
    nodes: dict[int, int] | None = None
    options: dict[str, str] = {}
    for raw in lines:
        text = raw.strip()
        if text.startswith("# nodes:"):
            nodes = _nodes(text.removeprefix("# nodes:").strip())
        elif text.startswith("# option:"):
            key, _, value = text.removeprefix("# option:").strip().partition("=")
            options[key.strip()] = value.strip()
    return nodes, options


def run_scenario(text: str) -> list[str]:
    """Run a scenario file's text (header, commands, `>` expectations); returns its output."""
    lines = text.splitlines()
    nodes, options = script_header(lines)
    sim = QuorumSim(options, nodes or {1: 1, 2: 1, 3: 1})
    out: list[str] = []
    run_script(sim, lines, out)
    return out


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m corral.quorum.vqsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="run one seeded swarm run")
    parser.add_argument("--seeds", help="run a range of seeds, e.g. 0:500")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--script", help="command file ('-' for stdin); its '# nodes:' and "
                        "'# option:' lines are used unless given here")
    parser.add_argument("--nodes", help="nodeids[:votes], e.g. 1,2,3:2 (default 1,2,3)")
    parser.add_argument("--option", action="append", default=[],
                        help="quorum option key=value, e.g. --option wait_for_all=1")
    parser.add_argument("--verbose", action="store_true", help="print the step log")
    return parser.parse_args(argv)


def _nodes(text: str) -> dict[int, int]:
    votes: dict[int, int] = {}
    for item in text.split(","):
        nodeid, _, count = item.partition(":")
        votes[int(nodeid)] = int(count or 1)
    return votes


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    options = dict(item.split("=", 1) for item in args.option)
    try:
        if args.script:
            handle = sys.stdin if args.script == "-" else open(args.script, encoding="utf-8")
            with handle:
                lines = handle.read().splitlines()
            header_nodes, header_options = script_header(lines)
            sim = QuorumSim({**header_options, **options},
                            header_nodes if header_nodes and args.nodes is None
                            else _nodes(args.nodes or "1,2,3"))
            out: list[str] = []
            run_script(sim, lines, out)
            print("\n".join(sim.log + out if args.verbose else out))
            return 0
        seeds = [args.seed or 0]
        if args.seeds:
            first, _, last = args.seeds.partition(":")
            seeds = list(range(int(first), int(last)))
        for seed in seeds:
            nodes = _nodes(args.nodes or "1,2,3") if options else None
            sim = run_seed(seed, args.steps, options or None, nodes)
            if args.verbose:
                print("\n".join(sim.log))
            print(f"seed {seed}: ok, {sim.steps} steps, config {sim.options} "
                  f"nodes {dict(sim.config.node_votes)}")
    except CheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def _epoch() -> datetime:
    return datetime.fromtimestamp(0, UTC)


if __name__ == "__main__":
    sys.exit(main())
