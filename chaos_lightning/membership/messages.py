"""The membership protocol's messages, registered with the wire schema.

Three families:

* failure detection (SWIM): ``Ping``, ``Ack``, ``PingReq``, each carrying the
  sender's view epoch and a few gossiped ``Fact``\\ s;
* view agreement (one Paxos instance per epoch; the acceptors are the members
  of the previous view): ``Prepare``, ``Promise``, ``Accept``, ``Accepted``,
  ``Nack``, ``Commit``;
* everything else: ``JoinRequest``, ``Facts`` (facts sent straight to the
  coordinator), ``SyncRequest``/``ViewSync`` (catch up a node that missed commits).

A ballot is ``(round, node)``, compared as a tuple.  Round 0 belongs to the
rank-0 member of the previous view only, which may therefore skip the prepare
phase (nobody can have accepted anything at a lower ballot).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from chaos_lightning.membership.view import Member, View
from chaos_lightning.wire.schema import message

class FactKind(str, Enum):
    """What a :class:`Fact` says.  A fact is a piece of knowledge spread by
    gossip until the view reflects it.

    A ``str`` enum so that the wire carries the same strings as before the
    enum existed (the schema encodes a ``str`` subclass as a plain ``str``)
    and a decoded fact, whose ``kind`` is a plain ``str``, compares and hashes
    equal to the member.
    """

    ALIVE = "alive"  # node refutes a suspicion with incarnation inc
    SUSPECT = "suspect"
    DEAD = "dead"  # suspicion confirmed: remove node from the next view
    JOIN = "join"  # member wants in
    LEAVE = "leave"  # node asked to leave
    LINK = "link"  # link node-other is up/down, version inc
    #: node (incarnation inc) completed its state sync: it holds the trained
    #: state, so a learner may be promoted to voter (issue 14)
    SYNCED = "synced"


ALIVE = FactKind.ALIVE
SUSPECT = FactKind.SUSPECT
DEAD = FactKind.DEAD
JOIN = FactKind.JOIN
LEAVE = FactKind.LEAVE
LINK = FactKind.LINK
SYNCED = FactKind.SYNCED
#: the kinds that speak about a member's liveness (one entry per node in the gossip queue)
STATUS_KINDS = (ALIVE, SUSPECT, DEAD)


@message("m.fact")
@dataclass(frozen=True)
class Fact:
    #: a :class:`FactKind` (annotated ``str``: that is what the wire carries)
    kind: str
    node: str
    inc: int = 0
    other: str = ""
    up: bool = True
    member: Member | None = None


@message("m.ping")
@dataclass(frozen=True)
class Ping:
    seq: int
    epoch: int
    #: set when a helper pings for someone else (an indirect probe)
    origin: str = ""
    gossip: tuple[Fact, ...] = ()


@message("m.ack")
@dataclass(frozen=True)
class Ack:
    seq: int
    epoch: int
    #: the node whose liveness this ack proves
    target: str
    gossip: tuple[Fact, ...] = ()


@message("m.pingreq")
@dataclass(frozen=True)
class PingReq:
    seq: int
    epoch: int
    target: str
    target_addr: str = ""
    gossip: tuple[Fact, ...] = ()


@message("m.prepare")
@dataclass(frozen=True)
class Prepare:
    epoch: int
    round: int
    node: str


@message("m.promise")
@dataclass(frozen=True)
class Promise:
    epoch: int
    round: int
    node: str
    accepted_round: int = -1
    accepted_node: str = ""
    accepted: View | None = None


@message("m.accept")
@dataclass(frozen=True)
class Accept:
    epoch: int
    round: int
    node: str
    value: View


@message("m.accepted")
@dataclass(frozen=True)
class Accepted:
    epoch: int
    round: int
    node: str


@message("m.nack")
@dataclass(frozen=True)
class Nack:
    epoch: int
    round: int
    node: str
    promised_round: int
    promised_node: str


@message("m.commit")
@dataclass(frozen=True)
class Commit:
    """``view`` is chosen.  The rest is its certificate, checked by every
    member of the previous view before it installs ``view`` (see
    :meth:`~chaos_lightning.membership.agreement.Agreement.certifies`): the
    ballot ``(round, node)`` at which ``quorum`` — a majority of the voters
    of view ``view.epoch - 1`` — accepted it.  ``dead`` lists the voters the
    proposer held *proven* dead (their own address refused: see
    ``agreement.py``); only when they are exactly half of an even number of
    voters do they lower the quorum, to all the others
    (:meth:`View.quorum_without`).  A bare ``Commit(view)`` (round -1)
    certifies nothing; only a joiner, which has no acceptor state to check
    against, installs it (when it lists the joiner's own incarnation)."""

    view: View
    round: int = -1
    node: str = ""
    quorum: tuple[str, ...] = ()
    #: appended (issue 14): an older peer's Commit decodes with none
    dead: tuple[str, ...] = ()


@message("m.join")
@dataclass(frozen=True)
class JoinRequest:
    member: Member


@message("m.stale")
@dataclass(frozen=True)
class StaleIncarnation:
    """Answer to a ``JoinRequest`` from an incarnation that a view already
    removed (the joiner never heard it was admitted): join again above ``inc``."""

    inc: int


@message("m.facts")
@dataclass(frozen=True)
class Facts:
    epoch: int
    facts: tuple[Fact, ...]


@message("m.syncreq")
@dataclass(frozen=True)
class SyncRequest:
    epoch: int


@message("m.sync")
@dataclass(frozen=True)
class ViewSync:
    """The sender's current ``view``, and the certified commits that lead to
    it from the epoch the receiver holds (consecutive, oldest first, as many
    as the sender keeps).  A member installs only commits it can certify one
    epoch at a time; ``view`` alone is trusted by a joiner only."""

    view: View
    commits: tuple[Commit, ...] = ()


Message = (
    Ping | Ack | PingReq | Prepare | Promise | Accept | Accepted | Nack | Commit | JoinRequest | Facts | SyncRequest | ViewSync
    | StaleIncarnation
)
