"""Events the membership state machine reports to whoever drives it.

Small immutable records, in the manner of h11's events: the machine returns
them from ``receive``/``tick``; the agent forwards them to subscribers (the
rendezvous, the strategy, the monitor, logs).  The etcd baseline emits the
same ``ViewChanged``/``Removed`` so the layers above cannot tell backends apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from chaos_lightning.membership.view import View


@dataclass(frozen=True)
class ViewChanged:
    """A view containing this node was committed (or learned late)."""

    view: View


@dataclass(frozen=True)
class Removed:
    """A committed view no longer contains this node.

    ``graceful`` is True when this node asked to leave; otherwise it was
    declared failed (for instance it sat on the minority side of a partition)
    and must join again to train.  It is also reported, with the last view
    the node held, when the node gives its slot up because no peer can
    prove how the cluster moved on from it (it fell further behind than the
    commits peers keep); it then joins again as a new incarnation.
    """

    view: View
    graceful: bool


@dataclass(frozen=True)
class MemberSuspected:
    """This node suspects ``node`` (missed direct and indirect probes)."""

    node: str


@dataclass(frozen=True)
class MemberFailed:
    """``node``'s failure is confirmed; a view without it will be proposed.

    Reported before the view commits, so the data plane can abandon a
    collective that waits on ``node`` without waiting for the commit.
    """

    node: str


@dataclass(frozen=True)
class LinkDown:
    """The direct link ``a``-``b`` between two live members is down.

    Reported at both ends (``a`` and ``b``), and visible to all members in the
    next view's ``down_links``.
    """

    a: str
    b: str


@dataclass(frozen=True)
class LinkUp:
    """The direct link ``a``-``b`` works again."""

    a: str
    b: str


@dataclass(frozen=True)
class QuorumLost:
    """This node cannot reach a majority of its view's voters: it must not
    train, and it waits for the majority to return (a minority side of a
    partition, or a majority dead at once).

    ``reachable`` of ``voters`` are the voters it believes alive (itself
    included when it votes); ``proven_dead`` of them are proven dead (their
    address refused).  ``allow_minority``: the node is configured to go on
    anyway (``Config.allow_minority``).  Reported once per loss; the agent
    logs it in one line."""

    epoch: int
    reachable: int = 0
    voters: int = 0
    proven_dead: int = 0
    allow_minority: bool = False

    @property
    def all_voters_dead(self) -> bool:
        """Every voter of the view is proven dead: no member holding the
        trained state is left (unless this node, a learner, synced and was
        not promoted yet).  Learners alone never commit a view (the dead may
        have chosen one they were not told of), so the layer above must stop
        here with a clear error rather than wait."""
        return self.voters > 0 and self.proven_dead == self.voters


@dataclass(frozen=True)
class QuorumRegained:
    epoch: int


@dataclass(frozen=True)
class Proposed:
    """This node, as coordinator, proposed ``view`` (for metrics: the
    benchmark times the call that emitted this as the decision time)."""

    view: View
    reason: str


@dataclass(frozen=True)
class Held:
    """This node, as coordinator, holds ``node`` outside the view as a
    standby: the view is at its size policy's bound (``reason`` says which).
    Reported once per (node, incarnation) and coordinator; the node stays a
    pending join and is admitted by the first view with room
    (``membership/policy.py``)."""

    node: str
    reason: str


@dataclass(frozen=True)
class Retire:
    """The committed ``view`` has more members than its ``max_nodes`` and
    this node is among the newest ones: it should leave gracefully (the
    strategy does, at its next step boundary).  Reported to the surplus
    member only, with every view that still lists it above the bound."""

    view: View
    reason: str


@dataclass(frozen=True)
class JoinExpired:
    """This node, as coordinator, dropped ``node``'s pending join: it was not
    heard asking for ``after_s`` seconds (a standby that died while it
    waited).  Asking again later makes it a candidate again."""

    node: str
    after_s: float


Event = (
    ViewChanged
    | Removed
    | MemberSuspected
    | MemberFailed
    | LinkDown
    | LinkUp
    | QuorumLost
    | QuorumRegained
    | Proposed
    | Held
    | JoinExpired
    | Retire
)
