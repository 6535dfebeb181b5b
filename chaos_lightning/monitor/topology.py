"""The link topology of one view: which members can talk directly, and how well.

The membership layer agrees on *which* links are down (a :class:`View` lists
them; every other pair of members is up).  The monitor knows *how good* the
links from this node are (:class:`~chaos_lightning.monitor.links.LinkStats`).
A :class:`Topology` joins the two into a graph the shard scheduler can ask:
"which of my neighbors are up, and which are the fastest?", "can a reach b?",
"which nodes are cut off from the rest?".

The graph is the complete graph minus a few down links, so it is stored the
same way the view stores it: members plus the down set.  Neighbors, paths and
components are computed from the complement, never by materialising the
~500k up edges of a 1,000-member view.

A topology is an immutable picture taken at one instant (``now``): build a
new one (``Monitor.topology()``) when the view or the measurements change.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Iterator, Literal

from chaos_lightning.monitor.links import Direction, LinkEstimate, LinkStats

if TYPE_CHECKING:  # only the shape is used: epoch, members[].id, down_links
    from chaos_lightning.membership.view import View


class Topology:
    """The up-link graph of ``view``, with this node's measurements on its edges.

    ``origin`` is the node whose :class:`LinkStats` ``links`` are; edges
    incident to it carry ``rtt`` (seconds) and ``bandwidth`` (bytes/s) when
    known.  Other edges carry no measurements (they are another node's to make).
    """

    def __init__(
        self,
        view: View,
        links: LinkStats | None = None,
        *,
        origin: str | None = None,
        now: float | None = None,
    ) -> None:
        self.epoch: int = view.epoch
        self.nodes: tuple[str, ...] = tuple(m.id for m in view.members)
        self._index = {n: i for i, n in enumerate(self.nodes)}
        self.down_links: frozenset[tuple[str, str]] = frozenset(
            (a, b) if a <= b else (b, a) for a, b in view.down_links
        )
        # Adjacency of the *down* graph: tiny (a handful of entries) in practice.
        self._down: dict[str, set[str]] = {}
        for a, b in self.down_links:
            if a in self._index and b in self._index:
                self._down.setdefault(a, set()).add(b)
                self._down.setdefault(b, set()).add(a)
        self.origin = origin
        now = time.monotonic() if now is None else now
        # Snapshot the measurements once, so the picture is consistent and
        # queries do not take the LinkStats lock per edge.
        self._measured: dict[str, LinkEstimate] = (
            links.estimates(now) if links is not None and origin is not None else {}
        )

    # -- graph -------------------------------------------------------------------
    def __contains__(self, node: object) -> bool:
        return node in self._index

    def __len__(self) -> int:
        return len(self.nodes)

    def reachable(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are both members and their direct link is up."""
        if a == b or a not in self._index or b not in self._index:
            return False
        return b not in self._down.get(a, ())

    def neighbors(self, node: str) -> list[str]:
        """Members with an up direct link to ``node``, in rank order."""
        self._check(node)
        down = self._down.get(node, ())
        return [n for n in self.nodes if n != node and n not in down]

    def degree(self, node: str) -> int:
        self._check(node)
        return len(self.nodes) - 1 - len(self._down.get(node, ()))

    def edges(self) -> Iterator[tuple[str, str, dict[str, float]]]:
        """Every up link as ``(a, b, attributes)`` with ``a`` before ``b`` in rank
        order; a generator, so a 1,000-member view is walked, not stored."""
        origin = self.origin
        for i, a in enumerate(self.nodes):
            down = self._down.get(a, ())
            for b in self.nodes[i + 1 :]:
                if b not in down:
                    # Only the origin's links carry measurements; skip the lookup
                    # for the other ~n^2/2 edges.
                    yield a, b, (self.edge(a, b) or {}) if origin in (a, b) else {}

    def edge(self, a: str, b: str) -> dict[str, float] | None:
        """Measurements on the up link ``a``-``b`` (``None`` if it is not up).

        Keys present only when known: ``rtt`` (s), ``rtt_var`` (s),
        ``bandwidth`` (bytes/s from ``a`` to ``b``) and ``bandwidth_reverse``
        (``b`` to ``a``).
        """
        if not self.reachable(a, b):
            return None
        attrs: dict[str, float] = {}
        if self.origin in (a, b):
            peer = b if a == self.origin else a
            est = self._measured.get(peer)
            if est is not None:
                # "up" is origin -> peer; orient it as a -> b.
                a_to_b, b_to_a = (est.bw_up, est.bw_down) if a == self.origin else (est.bw_down, est.bw_up)
                for key, value in (
                    ("rtt", est.rtt),
                    ("rtt_var", est.rtt_var),
                    ("bandwidth", a_to_b),
                    ("bandwidth_reverse", b_to_a),
                ):
                    if value is not None:
                        attrs[key] = value
        return attrs

    def path(self, a: str, b: str) -> list[str] | None:
        """A shortest path ``[a, ..., b]`` by hop count over up links, ``None`` if cut off.

        BFS on the complement of the down graph: each step takes every still
        unvisited node that is not a down-neighbor of the current one, so the
        whole search costs O(nodes + down links), not O(nodes^2).
        Ties go to the lower rank, so the answer is deterministic.
        """
        self._check(a)
        self._check(b)
        if a == b:
            return [a]
        parent, _ = self._bfs(a, [n for n in self.nodes if n != a], stop=b)
        if b not in parent:
            return None
        out = [b]
        while out[-1] != a:
            out.append(parent[out[-1]])
        return out[::-1]

    def components(self) -> list[list[str]]:
        """Connected components over up links, each in rank order, largest first
        (ties by rank of the first member).

        One unvisited list is shared by all the searches, so even a fully cut
        cluster (n components) costs O(nodes + down links)."""
        unvisited = list(self.nodes)
        comps: list[list[str]] = []
        while unvisited:
            start = unvisited[0]
            parent, unvisited = self._bfs(start, unvisited[1:])
            comps.append(sorted(parent, key=self._index.__getitem__))
        comps.sort(key=lambda c: (-len(c), self._index[c[0]]))
        return comps

    def _bfs(
        self, start: str, unvisited: list[str], stop: str | None = None
    ) -> tuple[dict[str, str], list[str]]:
        """Parents of every node reached from ``start`` (``start`` maps to itself)
        among ``unvisited`` (in rank order), and the nodes left unreached."""
        parent = {start: start}
        queue = deque([start])
        while queue and unvisited:
            u = queue.popleft()
            down = self._down.get(u)
            if not down:
                # The common case: u sees everyone left, one step ends the search.
                nxt, unvisited = unvisited, []
            else:
                nxt = [n for n in unvisited if n not in down]
                unvisited = [n for n in unvisited if n in down]
            for n in nxt:
                parent[n] = u
                if n == stop:
                    return parent, unvisited
                queue.append(n)
        return parent, unvisited

    # -- ranking -------------------------------------------------------------------
    def nearest(
        self,
        node: str,
        k: int | None = None,
        by: Literal["bandwidth", "rtt"] = "bandwidth",
        direction: Direction = "down",
    ) -> list[str]:
        """``node``'s direct neighbors, best first, at most ``k`` of them.

        ``by="bandwidth"``: highest bandwidth first, where ``direction`` says
        which way, seen from ``node``: ``"down"`` (the default) ranks by what
        ``node`` would *receive*, the question a joiner pulling state asks.
        ``by="rtt"``: lowest smoothed RTT first.  Neighbors without a (fresh)
        measurement rank after all measured ones; ties break by id, so every
        node computes the same ranking from the same data.
        """
        if by not in ("bandwidth", "rtt"):
            raise ValueError(f"by must be 'bandwidth' or 'rtt', got {by!r}")
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        ranked: list[tuple[int, float, str]] = []
        for n in self.neighbors(node):
            value = self._metric(node, n, by, direction)
            if value is None:
                ranked.append((1, 0.0, n))
            else:
                # Sort ascending: negate bandwidth so that larger comes first.
                ranked.append((0, -value if by == "bandwidth" else value, n))
        ranked.sort()
        out = [n for _, _, n in ranked]
        return out if k is None else out[: max(0, k)]

    def _metric(self, node: str, peer: str, by: str, direction: str) -> float | None:
        if self.origin not in (node, peer):
            return None
        est = self._measured.get(peer if node == self.origin else node)
        if est is None:
            return None
        if by == "rtt":
            return est.rtt
        # est is oriented from origin; flip when ranking from the peer's side.
        from_origin_side = node == self.origin
        want_up = (direction == "up") == from_origin_side
        value = est.bw_up if want_up else est.bw_down
        return None if value is None or math.isnan(value) else value

    def _check(self, node: str) -> None:
        if node not in self._index:
            raise KeyError(f"{node!r} is not a member of epoch {self.epoch}")

    def describe(self) -> str:
        """One line for logs: ``epoch 7: 5 nodes, 1 down link, 2 components``."""
        comps = self.components()
        return (
            f"epoch {self.epoch}: {len(self.nodes)} nodes, "
            f"{len(self.down_links)} down links, {len(comps)} components"
        )
