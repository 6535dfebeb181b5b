"""Views: the agreed answer to "who trains together now".

A :class:`View` is what the membership protocol commits, epoch after epoch:
the members (in rank order), the address each can be reached at, and the
links between live members that are known to be down.  Everything above the
membership layer (rendezvous, strategy) reads views and never edits them.

Views are immutable and cheap to share: a simulator with 1,000 nodes hands the
same object to every node.
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

    # -- derived, cached (cached_property writes the instance __dict__, so it
    # works on a frozen dataclass and is not a field the wire would encode) --
    @cached_property
    def _rank_of(self) -> dict[str, int]:
        return {m.id: i for i, m in enumerate(self.members)}

    @cached_property
    def _down(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.down_links)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def quorum(self) -> int:
        """Acks needed from this view to commit the next one: a strict majority."""
        return len(self.members) // 2 + 1

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
    ) -> "View":
        """The next epoch's view: ``remove`` dropped, ``add`` appended, links updated.

        Links touching a node that is no longer a member are forgotten.
        """
        gone = set(remove)
        kept = [m for m in self.members if m.id not in gone]
        present = {m.id for m in kept}
        for m in add:
            if m.id not in present and m.id not in gone:
                kept.append(m)
                present.add(m.id)
        links = set(self.down_links)
        links |= {link(a, b) for a, b in down}
        links -= {link(a, b) for a, b in up}
        links = {lk for lk in links if lk[0] in present and lk[1] in present}
        return View(self.epoch + 1, tuple(kept), tuple(sorted(links)))

    def describe(self) -> str:
        """One line for logs: ``epoch 7: a,b,c (down: a-b)``."""
        text = f"epoch {self.epoch}: {','.join(self.ids)}"
        if self.down_links:
            text += " (down: " + " ".join(f"{a}-{b}" for a, b in self.down_links) + ")"
        return text
