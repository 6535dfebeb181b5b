"""The per-step control record and the switch decision: pure, no I/O.

Role in the whole: every training step ends in one gradient all-reduce (see
:mod:`chaos_lightning.strategy.strategy`).  Beside the gradients each rank
contributes a small *control record*: the samples it trained, the newest
view epoch it knows, and whether it asks to leave.  Summed over the group
this tells every rank, at the same step and with no extra round trip,
whether the group must change; since every member decides from the same
summed values, every member decides alike (the design's *lockstep switch*).

What this module owns: the layout of the record (:class:`Control`), the
decision at a step boundary (:func:`decide`), which views a switching member
may train in (:func:`usable_for_switch`), and the gradient-accumulation
window that says when a boundary is a real one (:class:`Window`).

What it never does: touch torch.distributed, tensors, threads or clocks.  The
strategy moves the record in a tensor; tests drive this module directly
(``tests/test_switch_sync.py``), with randomized event sequences checked
against lockstep, exactly-once and identical replicas.

Why the record is integers, apart from the gradients: it once rode in the
gradient buffer's own dtype, and a ``bf16-true`` model on 3 nodes with batch
101 read back 304 samples for 303 (bfloat16 holds integers exactly only up
to 256; an epoch number above 256 would be misread the same way).  An
``int64`` record is exact whatever the parameters' dtype, and it is reduced
in the same launch as the gradients (two buffers in flight at once), so the
step still costs one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "Control", "Decision", "Window", "adoptable", "decide", "usable_for_switch"]


@dataclass(frozen=True)
class Control:
    """The control record of a step, summed over the group.

    ``samples``: samples trained by all ranks in the window (every rank
    derives the expected total from the shared layout: a mismatch is a bug);
    ``epoch_sum``: the sum of every rank's newest known view epoch (equal to
    ``world * epoch`` exactly when everyone knows no newer view than the
    group's); ``leavers``: the ranks that asked to leave, in rank order;
    ``epochs``: each rank's newest known view epoch, in rank order (one slot
    per rank, so every rank learns whether they all know the same view:
    :func:`adoptable`).  While a stop-free joiner trains as a shadow
    (:mod:`.shadow`): ``ready``, the ranks whose replica is exact (members
    always, a shadow once it caught up), and ``digests``, each rank's
    parameter digest when the step carries them (0 otherwise).  ``keeps``:
    how many ranks' newest known view keeps the group's trainers as they are
    (a learner's promotion; a rank that knows nothing newer counts too), so
    every rank learns whether a newer view can wait to be adopted in place.
    """

    samples: int
    epoch_sum: int
    leavers: tuple[int, ...] = ()
    epochs: tuple[int, ...] = ()
    ready: tuple[int, ...] = ()
    digests: tuple[int, ...] = ()
    busy: tuple[int, ...] = ()
    keeps: int = 0

    #: slots before the per-rank leave flags (samples, epoch sum, keeps; then
    #: one epoch slot, one ready flag, one digest slot and one busy-time slot
    #: per rank)
    HEADER = 3
    PER_RANK = 5

    @staticmethod
    def size(world: int) -> int:
        """Integers in the record of a group of ``world`` ranks."""
        return Control.HEADER + Control.PER_RANK * world

    @staticmethod
    def local(*, rank: int, world: int, samples: int, epoch: int, leaving: bool, ready: bool = False,
              digest: int = 0, busy_us: int = 0, keeps: bool = False) -> list[int]:
        """This rank's contribution, to be summed with everyone else's
        (``keeps``: the view of ``epoch`` keeps the group's trainers)."""
        values = [0] * Control.size(world)
        values[0] = samples
        values[1] = epoch
        values[2] = int(keeps)
        if leaving:
            values[Control.HEADER + rank] = 1
        values[Control.HEADER + world + rank] = epoch
        values[Control.HEADER + 2 * world + rank] = int(ready)
        values[Control.HEADER + 3 * world + rank] = digest
        values[Control.HEADER + 4 * world + rank] = busy_us
        return values

    @classmethod
    def decode(cls, summed: Sequence[int]) -> Control:
        """The record from the summed values (each leave flag is 0 or 1 after the sum)."""
        world = (len(summed) - cls.HEADER) // cls.PER_RANK
        h = cls.HEADER

        def part(i: int) -> tuple[int, ...]:
            return tuple(int(v) for v in summed[h + i * world : h + (i + 1) * world])

        flags = part(0)
        return cls(int(summed[0]), int(summed[1]), tuple(r for r, f in enumerate(flags) if f > 0), part(1), part(2),
                   part(3), part(4), keeps=int(summed[2]))


class Action(Enum):
    STAY = "stay"  # nothing changed: train on
    DEFER = "defer"  # a newer view at the epoch's last step: switch at the next step
    LEAVE = "leave"  # this rank asked to leave and the group knows it
    SWITCH = "switch"  # build the next group (without the leavers)


@dataclass(frozen=True)
class Decision:
    action: Action
    #: ranks of the current group the next view must not hold (the leavers)
    exclude: tuple[int, ...] = ()
    #: the step failed: the broken group is never used again.  The next group
    #: is that of a newer view if one commits, else the same view's group
    #: rebuilt under a fresh generation (``group.ElasticGroup._regroup``: a
    #: rank paused past the collective timeout and not evicted changes no
    #: membership, and no newer view would ever come)
    newer: bool = False


def decide(*, failed: bool, control: Control | None, world: int, view_epoch: int, rank: int, steps_remaining: int) -> Decision:
    """What a member does at a step boundary.

    ``failed``: this rank's all-reduce failed or was abandoned (then
    ``control`` is unknown: nobody learned the others' values, and the
    leave flags ride again on the next group's first step).  Otherwise every
    rank of the group calls this with the same ``control``, ``world``,
    ``view_epoch`` and ``steps_remaining`` and so gets the same answer (except
    LEAVE for a leaver versus SWITCH for the others).
    """
    if failed or control is None:
        return Decision(Action.SWITCH, newer=True)
    if control.leavers:
        return Decision(Action.LEAVE if rank in control.leavers else Action.SWITCH, exclude=control.leavers)
    if control.epoch_sum == world * view_epoch:
        return Decision(Action.STAY)
    if control.keeps == world and len(set(control.epochs)) > 1:
        # Every rank's newest view keeps the group's trainers (a learner's
        # promotion), but not every rank knew the same one when it sent its
        # record: train on, and adopt it in place at the step where they
        # agree (:func:`adoptable`).  Switching now rebuilt the group for
        # nothing: at 8 nodes the promotion commits during the join's first
        # step, so the ranks reported both epochs and every join cost the
        # members a second group (0.10-0.15 s of stall each, measured).
        return Decision(Action.STAY)
    if steps_remaining == 0:
        # A newer view (a join) at the epoch's last step: switch at the next
        # epoch's first step instead.  A joiner handed an exhausted epoch
        # would end fit at once ("No training batches"), and the members'
        # end-of-epoch validation runs on the group it started on.  Shared
        # values only, so every member decides alike; a failure hidden in
        # that view fails the next step and switches then.
        return Decision(Action.DEFER)
    return Decision(Action.SWITCH)


def adoptable(decision: Decision, control: Control | None, view_epoch: int) -> int | None:
    """The newer view every rank of the group knows, when a switch could
    keep the group as it is; else None.

    A view change that leaves the trainers as they are (a learner promoted
    to voter once it synced: one per join, issue 13) needs no new process
    group and no state sync: the replicas are identical and the ranks
    unchanged.  Rebuilding cost every member a group init (measured 16-103
    ms at 203 MB, 4 processes).  Whether the trainers are unchanged depends
    on the view's content, which only the caller holds; what this decides
    from shared values alone is that every rank means the same view: a
    successful step, no leaver, and every rank reported the same newest
    epoch (ranks that know different views switch, and meet in the newest).
    """
    if decision.action is not Action.SWITCH or decision.newer or decision.exclude or control is None:
        return None
    epochs = set(control.epochs)
    if len(epochs) != 1:
        return None
    (epoch,) = epochs
    return epoch if epoch > view_epoch else None


def usable_for_switch(
    *, epoch: int, ids: frozenset[str] | set[str], connected: Sequence[str], me: str, old_epoch: int,
    exclude: frozenset[str] | set[str], newer: bool, news: bool = False,
) -> bool:
    """Whether a committed view may hold the next group of a switching member.

    Never an older view, never one that still holds a leaver, never one where
    this node is cut off from the others (a down link sidelines it instead).
    After a failed step (``newer``) the broken group's own view is usable
    too: its group is then rebuilt under a fresh generation, never as it was
    (a failed collective with no membership change must regroup the same
    members, not wait for a view nobody will propose), unless ``news``: the
    membership layer reported a member of the group failed, so a view
    without it is coming and is the one to wait for.
    """
    if epoch < old_epoch or exclude & ids or me not in connected:
        return False
    return epoch > old_epoch or not (newer and news)


@dataclass
class Window:
    """Gradient accumulation: which micro-batch of the window this is.

    Lightning calls backward once per micro-batch and syncs (our all-reduce)
    only at the window's last one; the step boundary after an unsynced
    micro-batch is not a boundary: nothing to commit or decide.
    """

    micro: int = 0  # micro-batches of the current window already done
    synced: bool = False  # the last backward was the window's all-reduce
    last: int = 1  # micro-batches of the last synced window

    def reduced(self) -> range:
        """Called at the all-reduce: the window's micro-batch indices so far."""
        self.synced = True
        return range(self.micro + 1)

    def boundary(self) -> int | None:
        """At a step boundary: the window's size if it was synced, else None."""
        if not self.synced:
            self.micro += 1
            return None
        self.last, self.micro, self.synced = self.micro + 1, 0, False
        return self.last
