"""The size policy: how many members a view may have, and who waits outside.

What this file owns: the rule that turns "who asks to join" into "who is let
in now" (:func:`admit`), and the rule that names the members above the bound
(:func:`surplus`).  Both are pure functions of a committed view and the
pending join requests; they do no I/O and keep no state.

Where the numbers live, and why there.  A cluster's ``target_nodes`` and
``max_nodes`` are *fields of the view* (:class:`~chaos_lightning.membership.
view.View`), written by the founder from its configuration into epoch 1 and
carried unchanged into every later view by :meth:`View.with_changes`.  So
every member holds the same policy, agreed like everything else in a view
(by the Paxos instance that committed it), and whichever member coordinates
a change computes the same number of admissions from the same view.  The
alternative, each node reading its own configuration, would let two
coordinators with different settings (a member restarted with other
variables, a torchrun plugin and a ``chaos-run`` node in one cluster) admit
differently; a setting on a joiner is therefore ignored (the strategy logs
the cluster's policy when it joins).  ``0`` means "no bound", and is what an
older peer's view decodes to (an appended field), which keeps the behaviour
before the policy: every pending joiner is admitted.

The rules (the smallest that work with the existing machine):

* **Admission** (in :func:`~chaos_lightning.membership.agreement.next_view`,
  so it holds for every proposer and in Paxos' recovery path alike): the
  next view takes pending joiners only while it has fewer than
  ``min(target_nodes, max_nodes)`` members (each 0: unbounded), counted
  *after* this change's leaves and failures.  A joiner held by the policy
  stays a pending join in the gossip table, exactly as a joiner that arrived
  between two proposals does: it is a *standby*.  When a member fails or
  leaves, the view that removes it has room again and admits the standby in
  that same view change (no extra round; a failure is proposed at once, not
  batched).  Who goes first among several: the lowest ``(incarnation, id)``,
  and an incarnation is the process's boot time in ms, so the standby that
  has waited longest; the order never depends on arrival order, which
  differs from node to node.
* **Retirement**: members above ``max_nodes`` are the newest ones (members
  are appended, so the highest ranks).  The protocol does not remove them:
  a removal would abort the members' step like a failure.  Each surplus
  member learns it from the committed view (the same on every member) and
  the machine reports :class:`~chaos_lightning.membership.events.Retire` to
  it alone; the strategy then leaves gracefully at its next step boundary
  (the lockstep leave that SIGTERM triggers).  With admissions capped, a
  view above ``max_nodes`` arises only from a cluster founded without a
  policy and joined by nodes with one, or from views committed by an older
  peer: the rule is a safety net, not a path that training depends on.

What the policy does not promise: the choice among standbys uses the
proposer's own table of pending joins (gossip, not replicated state), so two
proposers that heard of different standbys may pick different ones; Paxos
still commits one value per epoch, and the count is the view's.

A standby that dies while it waits stops asking, and its pending join
expires (``Config.join_expiry``, ten join retries): every node drops a join
it has not heard asked for that long, and a proposal computed after that
never admits it, so the next failure admits a live standby in its one view
change.  The coordinator and the member next in line for it hear every
request (the contact forwards each one to both), so a live standby stays
pending with them, across a change of coordinator too.  A standby that dies
within ``join_expiry`` before a slot opens may still be admitted: it is then
a learner in a trained cluster (never blocking a quorum), and the failure
detector removes it, after which the next standby is admitted (two view
changes instead of one).  With ``join_expiry`` 0 joins never expire.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    from chaos_lightning.membership.view import Member, View


def capacity(view: "View") -> int | None:
    """The most members the policy of ``view`` lets in (None: unbounded)."""
    bounds = [b for b in (view.target_nodes, view.max_nodes) if b > 0]
    return min(bounds) if bounds else None


def admit(view: "View", staying: int, candidates: Iterable["Member"]) -> tuple[list["Member"], list["Member"]]:
    """Split the join ``candidates`` into (admitted now, held as standbys).

    ``staying``: the members of ``view`` that the next view keeps (after its
    leaves and failures).  Admitted first: the lowest ``(inc, id)``."""
    cands = list(candidates)
    cap = capacity(view)
    if cap is None:
        return cands, []
    cands.sort(key=lambda m: (m.inc, m.id))
    room = max(0, cap - staying)
    return cands[:room], cands[room:]


def surplus(view: "View") -> tuple[str, ...]:
    """Members above ``max_nodes``, newest (highest rank) first; empty when unbounded."""
    if view.max_nodes <= 0 or view.size <= view.max_nodes:
        return ()
    ids: Sequence[str] = view.ids
    return tuple(reversed(ids[view.max_nodes:]))


def describe(view: "View") -> str:
    """The policy in words, for logs: ``target 2, max 3`` or ``no size bound``."""
    parts = []
    if view.target_nodes > 0:
        parts.append(f"target_nodes={view.target_nodes}")
    if view.max_nodes > 0:
        parts.append(f"max_nodes={view.max_nodes}")
    return ", ".join(parts) or "no size bound"
