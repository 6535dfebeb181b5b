"""The state-sync decision after a group change: pure, no I/O.

Role in the whole: after every switch the members of the new group must hold
bit-identical replicas before they train.  Each rank claims how fresh its
replica is (:class:`Claim`); the claims are summed in one collective (each
rank writes only its own slots), and every rank derives the same
:class:`SyncPlan` from them with :func:`plan_sync`: nothing to do, pull the
state from these holders (a join), or broadcast it from this source (the
very start, or survivors of a step that committed on some of them only).
Survivors of a failed gradient reduction may also finish that step in the
new group (:attr:`Freshness.PENDING`, :attr:`SyncAction.FINISH`) when all
of them hold it.

Why commits, then freshness: a failure can strike while some members have
committed a step and others aborted it, and the ones that committed may even
abort the next (measured: a ``kill -9`` left two survivors one step ahead of
the third, all with an aborted last step, and their sample layouts disagreed
from then on).  So the freshest replicas are those with the most commits,
then the highest :class:`Freshness`; they hold the state and the others
receive it.

What this module never does: touch tensors, torch.distributed, threads or
clocks.  The strategy moves the claims and the state;
``tests/test_switch_sync.py`` drives this module directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum

__all__ = ["Claim", "Freshness", "SyncAction", "SyncPlan", "plan_sync"]


class Freshness(IntEnum):
    """How a replica stands after its last step (higher is fresher)."""

    #: no state yet: a newcomer, a member back from the sideline or from
    #: being declared failed, or everyone at the very start
    NONE = 0
    #: trained, but the last step was aborted here (it may have committed elsewhere)
    ABORTED = 1
    #: trained and applied the last step
    APPLIED = 2
    #: trained; the last step's gradient reduction failed here, and this rank
    #: still holds its own gradient of that step, to finish the step in the
    #: next group (the survivors' gradients, without those of the ranks that
    #: left).  Not an order of freshness: :func:`plan_sync` answers any
    #: claim of it before comparing the others.
    PENDING = 3


@dataclass(frozen=True, order=True)
class Claim:
    """One rank's claim; claims order by freshness (commits first)."""

    commits: int  # steps committed since fit began; -1 without state
    freshness: Freshness

    #: integers per rank in the summed claims vector
    SLOTS = 2

    @staticmethod
    def of(freshness: Freshness, commits: int) -> Claim:
        return Claim(commits if freshness > Freshness.NONE else -1, Freshness(freshness))

    def encode(self, rank: int, world: int) -> list[int]:
        """This rank's slots in a zero vector; summing every rank's gives all claims."""
        values = [0] * (self.SLOTS * world)
        values[self.SLOTS * rank] = int(self.freshness)
        values[self.SLOTS * rank + 1] = self.commits
        return values

    @classmethod
    def decode_all(cls, summed: Sequence[int]) -> list[Claim]:
        return [cls(int(summed[i + 1]), Freshness(int(summed[i]))) for i in range(0, len(summed), cls.SLOTS)]


class SyncAction(Enum):
    NOTHING = "nothing"  # every replica is equally fresh
    ORPHANED = "orphaned"  # this stale replica finds nobody who trained on
    PULL = "pull"  # newcomers pull from the holders (multi-source, bandwidth-aware)
    BROADCAST = "broadcast"  # the source broadcasts; the staler ranks load it
    FINISH = "finish"  # every rank holds the same unfinished step: reduce its gradients again, here
    RETRY = "retry"  # some ranks hold an unfinished step, others do not: regroup, those give their step up


@dataclass(frozen=True)
class SyncPlan:
    action: SyncAction
    #: PULL: the ranks holding the freshest state (they serve it)
    holders: tuple[int, ...] = ()
    #: BROADCAST: the rank that sends
    source: int = -1
    #: BROADCAST: this rank loads what it receives (it is staler than the source)
    receive: bool = False
    #: this rank aborted the step that committed at the source: record the
    #: window's samples as trained (the source trained them for everyone)
    adopt_aborted_step: bool = False
    #: some rank of the group had no state (a newcomer, or a stale member
    #: back): it starts at the next batch, while the others stand at a step
    #: boundary, so a validation due right after this boundary must not run
    #: there (the newcomer would meet it with a training collective)
    admits: bool = False


def plan_sync(claims: Sequence[Claim], rank: int, *, stale: bool) -> SyncPlan:
    """The plan every rank derives from the same claims (``stale`` is this
    rank's own knowledge that it fell behind: it only turns "nobody trained"
    into ORPHANED for that rank)."""
    if any(c.freshness == Freshness.PENDING for c in claims):
        # A rank finishing its step does so inside the step (the optimizer
        # has not run), so it can neither serve nor load the state there:
        # the step is finished only when every rank of the group holds the
        # same unfinished step (the same commits, so the same replica and
        # layout); otherwise every rank regroups, and the finishing ones
        # count the step as failed and sync at their step boundary as before.
        return SyncPlan(SyncAction.FINISH if all(c == claims[0] for c in claims) else SyncAction.RETRY)
    best = max(claims)
    mine = claims[rank]
    if best.freshness > Freshness.NONE and min(claims) == best:
        return SyncPlan(SyncAction.NOTHING)
    if best.freshness == Freshness.NONE and stale:
        return SyncPlan(SyncAction.ORPHANED)
    admits = best.freshness > Freshness.NONE and any(c.freshness == Freshness.NONE for c in claims)
    if best.freshness > Freshness.NONE and all(c == best or c.freshness == Freshness.NONE for c in claims):
        return SyncPlan(SyncAction.PULL, holders=tuple(r for r, c in enumerate(claims) if c == best), admits=admits)
    source = claims.index(best)
    receive = rank != source and mine < best
    return SyncPlan(
        SyncAction.BROADCAST,
        source=source,
        receive=receive,
        adopt_aborted_step=receive and mine.freshness == Freshness.ABORTED and best.commits - mine.commits == 1,
        admits=admits,
    )
