"""Views: the agreed answer to "who trains together now".

A :class:`View` is what the membership protocol commits, epoch after epoch:
the members (in rank order), the address each can be reached at, and the
links between live members that are known to be down.  Everything above the
membership layer (rendezvous, strategy) reads views and never edits them.

Views are immutable and cheap to share: a simulator with 1,000 nodes hands the
same object to every node.

Voters and learners (issue 14): a view also says which members are
*learners*, admitted but not yet holding the training state (their state
sync has not completed).  Learners train once synced like everyone, are
probed and gossip, but they do not vote: every quorum (the acceptors of the
next epoch, the certificate of a Commit, the quorum flag) counts voters
only.  A learner becomes a voter by a later view change, once it reported its
sync done.  So joiners that crash right after their admission never hold the
healthy members hostage (before: three joiners admitted in one batch made a
view of 6 with quorum 4; when they crashed the three healthy members stalled
for good).  ``trained`` says the cluster has trained state: until then (a
fresh cluster) joiners enter as voters, so the founders of a cluster vote.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

from chaos_lightning.wire.schema import message


def link(a: str, b: str) -> tuple[str, str]:
    """The canonical (sorted) name of the undirected link between ``a`` and ``b``."""
    return (a, b) if a <= b else (b, a)


@message("member")
@dataclass(frozen=True)
class Member:
    """One node of a view.

    ``id`` is the node's stable name, ``addr`` the ``host:port`` its agent
    listens on (empty in the simulator), ``meta`` small string facts the node
    published when it joined (for example the port of its process-group store).
    ``inc`` is the incarnation it joined with: a node that rejoins (or restarts
    under the same id) comes back with a higher one, so stale gossip that
    declared its previous incarnation dead cannot remove it again.
    """

    id: str
    addr: str = ""
    meta: tuple[tuple[str, str], ...] = ()
    inc: int = 0

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.meta:
            if k == key:
                return v
        return default


@message("view")
@dataclass(frozen=True)
class View:
    """An epoch of the cluster: ``(epoch, members, links)``.

    ``members`` is in rank order: survivors keep their relative order and new
    members are appended, so ranks move as little as possible between epochs.
    ``down_links`` lists, as sorted pairs, the links between two live members
    that failed a direct probe while an indirect one succeeded.  Every pair not
    listed is assumed up (storing the up links would cost O(n^2)).
    """

    epoch: int
    members: tuple[Member, ...]
    down_links: tuple[tuple[str, str], ...] = ()
    #: members admitted as learners whose state sync is not done yet (ids, in
    #: rank order): they do not vote.  Appended field: an older peer's view
    #: decodes with none (everyone votes, the behaviour before issue 14)
    learners: tuple[str, ...] = ()
    #: some member holds trained state (it reported a completed state sync):
    #: joiners are admitted as learners from then on.  False in a fresh
    #: cluster, whose founders are voters
    trained: bool = False
    #: the cluster's size policy (``membership/policy.py``): pending joiners
    #: are admitted while the view has fewer than min(target, max) members,
    #: and members above ``max_nodes`` retire.  Written by the founder into
    #: epoch 1 and carried into every later view, so every proposer decides
    #: from the same numbers.  0: no bound (and what an older peer's view,
    #: without these appended fields, decodes to)
    target_nodes: int = 0
    max_nodes: int = 0

    # -- derived, cached (cached_property writes the instance __dict__, so it
    # works on a frozen dataclass and is not a field the wire would encode) --
    @cached_property
    def _rank_of(self) -> dict[str, int]:
        return {m.id: i for i, m in enumerate(self.members)}

    @cached_property
    def _down(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.down_links)

    @cached_property
    def _learner_set(self) -> frozenset[str]:
        return frozenset(self.learners)

    @cached_property
    def voters(self) -> tuple[str, ...]:
        """The members that vote (all but the learners), in rank order."""
        if not self.learners:
            return self.ids
        return tuple(m.id for m in self.members if m.id not in self._learner_set)

    @cached_property
    def _voter_set(self) -> frozenset[str]:
        return frozenset(self.voters)

    @property
    def voter_count(self) -> int:
        return len(self.members) - len(self.learners)

    def is_voter(self, node: str) -> bool:
        if not self.learners:  # the common case: no second index of n ids
            return node in self._rank_of
        return node in self._voter_set

    def is_learner(self, node: str) -> bool:
        return node in self._learner_set

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def quorum(self) -> int:
        """Acks needed from this view to commit the next one: a strict
        majority of its voters (learners do not count)."""
        return self.voter_count // 2 + 1

    def quorum_without(self, dead: int) -> int:
        """Acks needed when ``dead`` voters are *proven* dead (their process
        is gone: see ``agreement.py``, "Proof of death").  A strict majority of
        the voters, except in a tie: with exactly half of an even number of
        voters proven dead, all the others (that half) suffice.  Proven dead
        voters beyond half change nothing (the view needs a majority and has
        lost it).  Why no more than this is safe: a dead voter may have
        accepted a value before it died, so a quorum must still intersect
        every majority of the voters; "all voters not proven dead" does that
        exactly when the dead are at most half.  Returns 0 never: a view has
        at least one voter, and a tie leaves at least one."""
        n = self.voter_count
        if n % 2 == 0 and dead * 2 == n:
            return n // 2
        return n // 2 + 1

    def __contains__(self, node: object) -> bool:
        return node in self._rank_of

    def rank(self, node: str) -> int:
        """The node's rank in this view (raises ``KeyError`` if not a member)."""
        return self._rank_of[node]

    def member(self, node: str) -> Member:
        return self.members[self._rank_of[node]]

    def addr(self, node: str) -> str:
        return self.member(node).addr

    def link_up(self, a: str, b: str) -> bool:
        return link(a, b) not in self._down

    def connected(self) -> tuple[str, ...]:
        """Members that can all reach each other directly, in rank order.

        Greedy by rank: a member is kept if its links to every member kept
        before it are up.  With no down link this is every member.  The data
        plane trains on this set (a collective needs every pair connected);
        a member left out stays a member and comes back when its link does.
        Every member computes the same set from the same view.
        """
        if not self.down_links:
            return self.ids
        kept: list[str] = []
        for m in self.members:
            if all(self.link_up(m.id, k) for k in kept):
                kept.append(m.id)
        return tuple(kept)

    def with_changes(
        self,
        *,
        add: Iterable[Member] = (),
        remove: Iterable[str] = (),
        down: Iterable[tuple[str, str]] = (),
        up: Iterable[tuple[str, str]] = (),
        promote: Iterable[str] = (),
        trained: bool | None = None,
    ) -> "View":
        """The next epoch's view: ``remove`` dropped, ``add`` appended, links
        updated, ``promote`` made voters.

        Links touching a node that is no longer a member are forgotten.
        Members in ``add`` enter as learners when the next view is
        ``trained`` (``trained`` None: as this one), as voters otherwise.
        """
        gone = set(remove)
        kept = [m for m in self.members if m.id not in gone]
        present = {m.id for m in kept}
        added: set[str] = set()
        for m in add:
            if m.id not in present and m.id not in gone:
                kept.append(m)
                present.add(m.id)
                added.add(m.id)
        links = set(self.down_links)
        links |= {link(a, b) for a, b in down}
        links -= {link(a, b) for a, b in up}
        links = {lk for lk in links if lk[0] in present and lk[1] in present}
        is_trained = self.trained if trained is None else trained
        promoted = set(promote)
        learning = {x for x in self.learners if x in present and x not in promoted}
        if is_trained:
            learning |= added - promoted
        learners = tuple(m.id for m in kept if m.id in learning) if learning else ()
        if len(learners) == len(kept):
            # no voter would remain (the last ones left): nobody can vote on
            # the next change, so the learners vote from here on.  Whether
            # they hold trained state is the strategy's question (it refuses
            # to start over from random weights), not the protocol's
            learners = ()
        return View(self.epoch + 1, tuple(kept), tuple(sorted(links)), learners, is_trained,
                    self.target_nodes, self.max_nodes)

    def describe(self) -> str:
        """One line for logs: ``epoch 7: a,b,c (down: a-b)``."""
        text = f"epoch {self.epoch}: {','.join(self.ids)}"
        if self.down_links:
            text += " (down: " + " ".join(f"{a}-{b}" for a, b in self.down_links) + ")"
        if self.learners:
            text += " (learners: " + ",".join(self.learners) + ")"
        return text
