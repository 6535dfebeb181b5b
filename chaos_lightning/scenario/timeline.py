"""Scenario timelines: what happens to which node, and when.

A timeline is a text file, one action per line, ``#`` starting a comment::

    # seconds  action    arguments
    set        hidden    512             # workload and testbed settings (before any action; SETTINGS)
    0          start     n0 n1 n2 n3     # the nodes training starts with (n0 founds the cluster)
    8          join      n4              # a new node starts and joins through a live member
    20         leave     n1              # graceful leave at the next step boundary (SIGTERM)
    30         kill      n2              # kill -9
    36         stop      n3 4            # SIGSTOP for 4 s, then SIGCONT
    40         cut       n0 n3           # the link between two nodes goes down (both ways)
    50         restore   n0 n3           # and comes back
    55         throttle  n4 20mbit       # shape a node's link (namespace testbed only)
    58         partition n0,n4 n3        # every link between the two groups goes down
    64         heal                      # and those links come back
    70         restart   n4              # kill -9, then a new process under the same id joins back
    80         end                       # every node stops at one common step; the run ends

Times are seconds since training started (the cluster's first committed
step), so a slow machine shifts nothing but the start.  An action on a node
that joined waits until that node has trained for 2 s (its start-up takes seconds, more on
a loaded machine), and the rest of the timeline moves back by the wait: a
leave or kill always hits a training member.  Names are free-form
words; a name is started once (by ``start`` or ``join``) and never reused,
except by ``restart``: the node's process is killed (``kill -9``) and a new
one starts under the same name, so the same bind address and therefore the
same node id; membership takes it as a new incarnation of that id (the old
slot is removed, the new process joins and pulls the state).

``partition A,B C,D,E`` cuts every link between the two comma-separated
groups (a node named in neither keeps all its links); ``heal`` restores
exactly those links.  One partition at a time; a link cut by ``cut`` stays
cut through a ``heal``.  ``end`` is required and last.  Errors name the file
and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

#: action -> (minimum, maximum) number of arguments
ARITY = {
    "start": (1, 64),
    "join": (1, 1),
    "leave": (1, 1),
    "kill": (1, 1),
    "stop": (2, 2),
    "cut": (2, 2),
    "restore": (2, 2),
    "throttle": (2, 2),
    "partition": (2, 2),
    "heal": (0, 0),
    "restart": (1, 1),
    "end": (0, 0),
}
#: ``set`` keys: workload flags and testbed options, with their types
SETTINGS: dict[str, type] = {
    "samples": int,  # training samples per epoch
    "batch_size": int,  # per-node batch size
    "hidden": int,  # MLP width: the state to transfer grows with its square
    "step_sleep": float,  # seconds of stand-in compute per step
    "val_every": int,  # validate every N training batches (default 0: never)
    "val_sleep": float,  # seconds of stand-in work per validation batch
    "ckpt_every": int,  # save a checkpoint every N global steps into RUN/ckpt (default 0: never)
    "link": str,  # testbed: every node's link rate at start (e.g. 100mbit); default unshaped
    "preset": str,  # membership timing preset (local, lan, edge)
}
#: the settings that are the workload's command-line flags (``--step-sleep`` for ``step_sleep``)
WORKLOAD_SETTINGS = ("samples", "batch_size", "hidden", "step_sleep", "val_every", "val_sleep", "ckpt_every")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_RATE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>kbit|mbit|gbit)$", re.IGNORECASE)
_UNIT_BITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class TimelineError(ValueError):
    """A malformed timeline: the message names the file and line."""


@dataclass(frozen=True)
class Action:
    at: float
    action: str
    args: tuple[str, ...]
    line: int

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node names this action concerns (its arguments but numbers and rates)."""
        if self.action == "stop":
            return self.args[:1]
        if self.action == "throttle":
            return self.args[:1]
        if self.action == "partition":
            return tuple(n for g in self.groups for n in g)
        return self.args

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """``partition``: the two sides, each a tuple of names; otherwise ()."""
        if self.action != "partition":
            return ()
        return tuple(tuple(n for n in arg.split(",") if n) for arg in self.args)

    def cross_pairs(self) -> list[tuple[str, str]]:
        """``partition``: every pair with one node on each side."""
        if self.action != "partition":
            return []
        a, b = self.groups
        return [(x, y) for x in a for y in b]

    def __str__(self) -> str:
        return " ".join((self.action, *self.args))


@dataclass
class Timeline:
    actions: list[Action]
    settings: dict[str, object] = field(default_factory=dict)
    source: str = "<timeline>"

    @property
    def initial(self) -> tuple[str, ...]:
        return self.actions[0].args

    @property
    def names(self) -> list[str]:
        """Every node the timeline starts, in the order it starts them."""
        out: list[str] = []
        for a in self.actions:
            if a.action in ("start", "join"):
                out.extend(a.args)
        return out

    @property
    def duration(self) -> float:
        return self.actions[-1].at

    def uses_links(self) -> bool:
        return any(a.action in ("cut", "restore", "throttle", "partition", "heal") for a in self.actions) \
            or "link" in self.settings


def rate_bps(text: str) -> float:
    """``20mbit`` -> 20e6 (bits per second); raises ValueError."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"bad rate {text!r}: write e.g. 500kbit, 20mbit, 1gbit")
    value = float(m["num"]) * _UNIT_BITS[m["unit"].lower()]
    if value <= 0:
        raise ValueError(f"bad rate {text!r}: must be positive")
    return value


def parse(text: str, source: str = "<timeline>") -> Timeline:
    """Parse and check a timeline (module docstring); raises :class:`TimelineError`."""
    actions: list[Action] = []
    settings: dict[str, object] = {}
    started: set[str] = set()
    gone: set[str] = set()  # left or killed: no further action on them
    cut: set[frozenset[str]] = set()
    partitioned: Action | None = None  # the partition in effect

    for lineno, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue

        def fail(why: str) -> TimelineError:
            return TimelineError(f"{source}:{lineno}: {why}: {raw.strip()!r}")

        if words[0] == "set":
            if actions:
                raise fail("settings come before the first action")
            if len(words) != 3 or words[1] not in SETTINGS:
                raise fail(f"expected 'set KEY VALUE' with KEY one of {', '.join(SETTINGS)}")
            try:
                value = SETTINGS[words[1]](words[2])
                if words[1] == "link":
                    rate_bps(words[2])
            except ValueError as exc:
                raise fail(f"bad value for {words[1]} ({exc})") from None
            if isinstance(value, (int, float)) and value < 0:
                raise fail(f"{words[1]} must not be negative")
            settings[words[1]] = value
            continue
        if len(words) < 2:
            raise fail("expected 'SECONDS ACTION ARGS...'")
        try:
            at = float(words[0].rstrip("s"))
        except ValueError:
            raise fail(f"{words[0]!r} is not a time in seconds") from None
        action, args = words[1], tuple(words[2:])
        if action not in ARITY:
            raise fail(f"unknown action {action!r} (one of {', '.join(ARITY)})")
        lo, hi = ARITY[action]
        if not lo <= len(args) <= hi:
            raise fail(f"{action} takes {lo if lo == hi else f'{lo} to {hi}'} argument(s)")
        if at < 0 or (actions and at < actions[-1].at):
            raise fail("times must not go backwards")
        if actions and actions[-1].action == "end":
            raise fail("nothing may follow 'end'")
        if not actions and action != "start":
            raise fail("the first action must be '0 start NAME...' (the nodes training starts with)")
        if action == "start" and (actions or at != 0):
            raise fail("'start' comes once, at time 0 (later nodes 'join')")
        a = Action(at, action, args, lineno)
        for name in a.nodes:
            if not _NAME.match(name):
                raise fail(f"bad node name {name!r} (a letter, then letters, digits, - or _)")
        if action in ("start", "join"):
            for name in args:
                if name in started:
                    raise fail(f"{name} is already started (names are never reused)")
                started.add(name)
            if len(set(args)) != len(args):
                raise fail("a name appears twice")
        else:
            for name in a.nodes:
                if name not in started:
                    raise fail(f"{name} was never started")
                if name in gone:
                    raise fail(f"{name} has left or was killed already")
        if action == "partition":
            sides = a.groups
            if any(not side for side in sides) or any(not part for arg in args for part in arg.split(",")):
                raise fail("expected 'partition A,B,... C,D,...': two non-empty comma-separated groups")
            if set(sides[0]) & set(sides[1]):
                raise fail(f"{', '.join(sorted(set(sides[0]) & set(sides[1])))} on both sides")
            if len(set(a.nodes)) != len(a.nodes):
                raise fail("a name appears twice")
            if partitioned is not None:
                raise fail(f"the partition of line {partitioned.line} is in effect (heal it first)")
            partitioned = a
        if action == "heal":
            if partitioned is None:
                raise fail("no partition to heal")
            partitioned = None
        if action in ("leave", "kill"):
            gone.add(args[0])
        if action == "stop":
            try:
                if float(args[1]) <= 0:
                    raise ValueError
            except ValueError:
                raise fail(f"{args[1]!r} is not a positive number of seconds") from None
        if action in ("cut", "restore"):
            pair = frozenset(args)
            if len(pair) != 2:
                raise fail("a link joins two different nodes")
            if action == "cut" and pair in cut:
                raise fail("that link is cut already")
            if action == "restore" and pair not in cut:
                raise fail("that link is not cut")
            (cut.add if action == "cut" else cut.discard)(pair)
        if action == "throttle":
            try:
                rate_bps(args[1])
            except ValueError as exc:
                raise fail(str(exc)) from None
        actions.append(a)
    if not actions:
        raise TimelineError(f"{source}: no actions")
    if actions[-1].action != "end":
        raise TimelineError(f"{source}: the last action must be 'SECONDS end'")
    return Timeline(actions, settings, source)


def load(path: str | Path) -> Timeline:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TimelineError(f"cannot read timeline {p}: {exc.strerror or exc}") from None
    return parse(text, str(p))


#: The timeline of the README's main command (``python -m chaos_lightning.scenario``).
DEFAULT = """\
# The default scenario: 4 nodes, then a join, a graceful leave, a crash,
# and a link cut and restored, on the embedded peer rendezvous (no etcd).
set  hidden   768
0    start    n0 n1 n2 n3
6    join     n4
18   leave    n1
28   kill     n2
38   cut      n0 n3
50   restore  n0 n3
64   end
"""
