"""The failure and link detector of one node: SWIM's probes, suspicion, link watch.

What this file owns: every rule that turns probe traffic into knowledge about
the members of the current view —

* the direct probe (one ``Ping`` per period to the next member of a shuffled
  round robin), the indirect probe (``PingReq`` through ``indirect_probes``
  helpers when the direct ping is not acked in ``probe_timeout``) and the
  relaying of other nodes' indirect probes;
* each member's status (:class:`Status`) and incarnation, suspicion and its
  timeout, the confirmation of a failure, and the ``MemberSuspected`` /
  ``MemberFailed`` events;
* the link table: a probe whose direct path fails while an indirect one
  succeeds, ``link_confirm`` periods in a row, is a link-down between two live
  nodes, one direct success on such a link a link-up; link versions decide
  between reports, and ``LinkDown`` / ``LinkUp`` are reported once per
  transition at our end;
* the round trips of direct probes (``rtt``, for the monitor).

What it never does: decide a view, send a fact to the coordinator or gossip one
(a verdict is handed to :meth:`Membership._learn`, which spreads it), touch a
socket or a clock.  It reads the current view, the node's id, config, rng and
address book from the :class:`~chaos_lightning.membership.machine.Membership`
that composes it, and sends through it.

Determinism: the only randomness is the machine's ``random.Random``, drawn in
a fixed order (round-robin insertion and reshuffle, helper sampling, the
suspects probed per period, the first probe's phase), and nothing iterates
over a ``set`` of strings.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.messages import ALIVE, DEAD, LINK, SUSPECT, Ack, Fact, Ping, PingReq
from chaos_lightning.membership.view import View, link

if TYPE_CHECKING:  # the composing machine; imported for annotations only
    from chaos_lightning.membership.machine import Membership, Output


#: probes started by data-plane suspicions (:meth:`Detector.suspect`) per
#: probe period, all suspected nodes together (a group of up to this many
#: peers is probed at once; a flood costs no more)
SUSPECT_PROBES = 8

#: indirect probes relayed for others at once (each lives one probe period;
#: a member relays about k per period, so this is never reached honestly)
RELAYS = 256


class Status(str, Enum):
    """What this node believes of a member.  A ``str`` enum: equal to the fact
    kind of the same name (``Status.DEAD == FactKind.DEAD == "dead"``)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


# module constants: a class attribute lookup on an Enum costs about three
# times a global one, and these comparisons run per message
_ALIVE, _SUSPECT, _DEAD = Status.ALIVE, Status.SUSPECT, Status.DEAD


@dataclass
class MemberStatus:
    state: Status
    inc: int


@dataclass
class _Probe:
    target: str
    seq: int
    started: float
    direct_deadline: float
    end: float  # end of the probe period: verdict time
    direct_ok: bool = False
    indirect_ok: bool = False
    indirect_sent: bool = False


@dataclass
class LinkState:
    up: bool
    version: int
    reporter: str

    def key(self) -> tuple[int, str, bool]:
        # a later version wins; on a tie, "down" wins so a flapping link is
        # not declared up by a stale report
        return (self.version, self.reporter, not self.up)


class Detector:
    """Probes, member statuses, suspicion and the link table of one node."""

    def __init__(self, node: "Membership"):
        self._m = node
        self.rtt: dict[str, float] = {}  # peer -> smoothed direct-probe round trip
        self.status: dict[str, MemberStatus] = {}
        self.links: dict[tuple[str, str], LinkState] = {}
        self.dead_nodes: dict[str, None] = {}  # confirmed failed, not yet removed
        # how many of dead_nodes are voters of a view, cached until either
        # changes (:meth:`dead_voters`: asked at every quorum check, which
        # scanned every dead node each time: a third of the 1,000-node
        # partition simulation's time)
        self._dead_version = 0
        self._dead_voters: tuple[object, int, int] = (None, -1, 0)  # (view, version, count)
        # survives a rejoin: a sequence number is never reused, so a late ack
        # of a probe from before cannot pass for an answer to a new one
        self._seq = 0
        # survives a rejoin: the next view prunes and extends it (a reshuffle
        # would cost n random draws)
        self._probe_order: list[str] = []
        self._probe_pos = 0
        self._next_probe_at = 0.0
        self._hint_probe_end = 0.0  # at most one probe from transport hints at a time
        # data-plane suspicions (:meth:`suspect`): node -> when it may be
        # suspected again (members only), and the probes they started in the
        # current window (a flood must not become a probe storm)
        self._suspected_until: dict[str, float] = {}
        self._suspect_window_end = 0.0
        self._suspect_probes = 0
        self._my_suspicions: dict[str, bool] = {}  # suspicions our own probes raised
        self._probes: dict[int, _Probe] = {}
        self._reset_view_state()

    def _reset_view_state(self) -> None:
        self._relays: dict[int, tuple[str, int, str]] = {}  # our seq -> (origin, origin seq, target)
        self._relay_deadline: dict[int, float] = {}
        self._link_fails: dict[str, int] = {}  # peer -> consecutive direct-fail/indirect-ok periods
        self._suspects: dict[str, float] = {}  # node -> suspicion deadline
        # (deadline, node), lazily pruned: entries whose deadline no longer
        # matches _suspects are stale.  A partition makes hundreds of suspects,
        # and scanning them on every tick dominated the 1,000-node simulation.
        self._suspect_heap: list[tuple[float, str]] = []
        self._reported_down: dict[tuple[str, str], bool] = {}  # links touching us reported down
        self._failed_reported: dict[str, bool] = {}

    def dead_voters(self, view: "View") -> int:
        """How many nodes believed dead are voters of ``view``."""
        cached_view, version, count = self._dead_voters
        if cached_view is view and version == self._dead_version:
            return count
        count = sum(1 for d in self.dead_nodes if view.is_voter(d))
        self._dead_voters = (view, self._dead_version, count)
        return count

    def reset(self) -> None:
        """Forget everything learned about the cluster we were removed from
        (before joining again).  Kept: round trips, the probe sequence number,
        the round-robin order and the record of our own suspicions."""
        self.status.clear()
        self.links.clear()
        self.dead_nodes.clear()
        self._dead_version += 1
        self._probes.clear()
        self._suspected_until.clear()
        self._reset_view_state()

    def stop(self) -> None:
        """A view without us: no probe of ours is still worth a verdict."""
        self._probes.clear()

    # ------------------------------------------------------------ queries
    def dead(self, node: str) -> bool:
        st = self.status.get(node)
        return st is not None and st.state == _DEAD

    def alive(self, node: str) -> bool:
        st = self.status.get(node)
        return st is not None and st.state == _ALIVE

    def buddy(self, about: str) -> tuple[Fact, ...]:
        """A message to a suspected node leads with the suspicion, so the
        accused hears it (and can refute) first (Lifeguard's buddy system).

        A node confirmed dead but still in the view (no quorum to remove it)
        is probed directly only to notice a heal, and that probe leads with
        the verdict: a node alive on the far side of a healed partition
        refutes it, or the two sides, each holding the other dead, would
        never speak again (the gossip that carried the verdicts was spent
        inside each side).  Found by the simulator (seed 602, ``lan``: a
        partition, then crashes that left neither side a quorum; after the
        heal, three live voters of six each held the others dead for good)."""
        st = self.status.get(about)
        if st is not None and st.state == _SUSPECT:
            return (Fact(SUSPECT, about, st.inc),)
        if st is not None and st.state == _DEAD:
            return (Fact(DEAD, about, st.inc),)
        return ()

    def next_deadline(self) -> float:
        times = [self._next_probe_at]
        for p in self._probes.values():
            times.append(p.end if (p.direct_ok or p.indirect_sent) else p.direct_deadline)
        if self._relay_deadline:
            times.append(min(self._relay_deadline.values()))
        heap = self._suspect_heap
        while heap and self._suspects.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if heap:
            times.append(heap[0][0])
        return min(times)

    def down_now(self) -> frozenset[tuple[str, str]] | tuple[()]:
        if not self.links:
            return ()
        return frozenset(p for p, s in self.links.items() if not s.up)

    # ------------------------------------------------------------ probing
    def tick(self, now: float, out: "Output") -> None:
        cfg = self._m.config
        for seq in list(self._probes):
            p = self._probes[seq]
            if not p.direct_ok and not p.indirect_sent and now >= p.direct_deadline:
                self._send_indirect(p, out)
            if now >= p.end:
                del self._probes[seq]
                self._verdict(p, now, out)
        for seq in [s for s, d in self._relay_deadline.items() if now >= d]:
            del self._relay_deadline[seq]
            self._relays.pop(seq, None)
        if now >= self._next_probe_at:
            self._next_probe_at = now + cfg.probe_interval
            target = self._next_probe_target()
            if target is not None:
                self._start_probe(target, now, out)
            # links we suspect or know to be down get a full probe every period,
            # or a link-up would wait for the round robin (n periods)
            # suspects too: a direct ping carries the suspicion to the accused
            # (Lifeguard's "buddy system"), which refutes it at once if alive
            # (a bounded few per period: in a partition there are hundreds)
            # only suspicions we raised: if every node that heard one probed the
            # suspect each period, one crash at 1,000 nodes would cost ~46,000
            # pings (measured by benchmarks/membership.py)
            suspects = [n for n in self._my_suspicions if n in self._suspects]
            if len(suspects) > 2:
                suspects = self._m.rng.sample(suspects, 2)
            for peer in self._link_watch() + suspects:
                if not self._probing(peer):
                    self._start_probe(peer, now, out)
        self._tick_suspicion(now, out)

    def hint(self, node: str, now: float, out: "Output") -> None:
        """The transport lost its connection to ``node``: probe it now."""
        # Only news is worth a probe: a node already suspected is being dealt
        # with, and a cap on hint probes keeps a partition (every send fails)
        # from multiplying probes by the number of unreachable nodes.
        # A probe of it already answered is old news (the node was alive at
        # its ping) and the connection lost since is not: a probe of its own.
        # A probe still waiting for its answer sent its ping over the
        # connection now lost: its ping again now, over a new connection
        # (which a dead node's host refuses), not at the probe timeout.
        # Before, any probe of the node in its period blocked the hint, and
        # with one peer one always is (a period lasts until the next): a
        # kill -9 in a cluster of two took 99 ms median to a view of one,
        # 5 ms now (benchmarks/kill_detection.py).
        m = self._m
        if node == m.id or not self.alive(node) or now < self._hint_probe_end:
            return
        self._hint_probe_end = now + m.config.probe_interval
        waiting = self._unanswered(node)
        if waiting is not None:
            m._send(node, Ping(waiting.seq, m._epoch(), "", m._take_gossip(about=node)), out)
        else:
            self._start_probe(node, now, out)

    def suspect(self, node: str, now: float, out: "Output") -> bool:
        """The data plane saw a collective with ``node`` fail (issue 14): probe
        it now, direct and then indirect, instead of at its turn in the round
        robin.  True if a probe was started.

        Evidence, not a verdict: a live node answers the probe and nothing
        changes; a dead one's address refuses the connect (the agent's
        ``peer_refused``, which confirms the failure at once), and silence
        goes the normal way (suspicion, then its timeout).  Rate-limited:
        one suspicion probe per node per probe period, and at most
        ``SUSPECT_PROBES`` per period in all, so a flood of suspicions (a
        job's every collective failing, every rank naming every peer) costs
        no more than a few probes."""
        if node == self._m.id or self.dead(node) or node not in self.status:
            return False
        # a probe of it still waiting for its answer will tell (its second
        # direct ping goes within the probe timeout); one answered already
        # (before the collective failed) is old news
        if self._unanswered(node) is not None:
            return False
        if now < self._suspected_until.get(node, 0.0):
            return False
        interval = self._m.config.probe_interval
        if now >= self._suspect_window_end:
            self._suspect_window_end = now + interval
            self._suspect_probes = 0
        if self._suspect_probes >= SUSPECT_PROBES:
            return False
        self._suspect_probes += 1
        self._suspected_until[node] = now + interval
        self._start_probe(node, now, out)
        return True

    def _probing(self, node: str) -> bool:
        return any(p.target == node for p in self._probes.values())

    def _unanswered(self, node: str) -> _Probe | None:
        """A probe of ``node`` still waiting for its answer (its second direct
        ping and the indirect ones go within the probe timeout), if any."""
        return next((p for p in self._probes.values() if p.target == node and not (p.direct_ok or p.indirect_ok)),
                    None)

    def _link_watch(self) -> list[str]:
        """Peers whose direct link to us is suspected or known down."""
        me = self._m.id
        peers = dict.fromkeys(self._link_fails)
        for (a, b), st in self.links.items():
            if not st.up and me in (a, b):
                peers[b if a == me else a] = None
        view = self._m.view
        return [p for p in peers if view is not None and p in view and not self.dead(p)]

    def _next_probe_target(self) -> str | None:
        if not self._probe_order:
            return None
        for _ in range(len(self._probe_order)):
            if self._probe_pos >= len(self._probe_order):
                self._m.rng.shuffle(self._probe_order)
                self._probe_pos = 0
            target = self._probe_order[self._probe_pos]
            self._probe_pos += 1
            if not self._probing(target):
                return target
        return None

    def _start_probe(self, target: str, now: float, out: "Output") -> None:
        m = self._m
        cfg = m.config
        self._seq += 1
        p = _Probe(target, self._seq, now, now + cfg.probe_timeout, now + cfg.probe_interval)
        self._probes[p.seq] = p
        m._send(target, Ping(p.seq, m._epoch(), "", m._take_gossip(about=target)), out)

    def _send_indirect(self, p: _Probe, out: "Output") -> None:
        m = self._m
        p.indirect_sent = True
        if self.dead(p.target):
            return  # already confirmed dead: the direct probe is only for a heal
        # a second direct ping alongside the indirect ones (memberlist does the
        # same over TCP): one lost datagram must not look like a broken link
        m._send(p.target, Ping(p.seq, m._epoch(), "", m._take_gossip(about=p.target)), out)
        helpers = self._pick_helpers(p.target)
        addr = m._addr_of(p.target)
        for h in helpers:
            m._send(h, PingReq(p.seq, m._epoch(), p.target, addr, m._take_gossip()), out)

    def _pick_helpers(self, target: str) -> list[str]:
        m = self._m
        if m.view is None:
            return []
        members = m.view.members
        down = self.down_now()
        k = m.config.indirect_probes
        me, status, rng = m.id, self.status, m.rng

        def usable(h: str) -> bool:
            st = status.get(h)
            return h != me and h != target and (st is None or st.state == _ALIVE) and link(me, h) not in down

        if len(members) <= 4 * k:
            pool = [x.id for x in members if usable(x.id)]
            return pool if len(pool) <= k else rng.sample(pool, k)
        # large views: draw at random instead of filtering all n members
        picked: list[str] = []
        for _ in range(8 * k):
            h = members[rng.randrange(len(members))].id
            if h not in picked and usable(h):
                picked.append(h)
                if len(picked) == k:
                    break
        return picked

    def _verdict(self, p: _Probe, now: float, out: "Output") -> None:
        pair = link(self._m.id, p.target)
        if p.direct_ok:
            self._link_fails.pop(p.target, None)
            cur = self.links.get(pair)
            if cur is not None and not cur.up:
                self._report_link(p.target, up=True, now=now, out=out)
            return
        if p.indirect_ok:
            n = self._link_fails.get(p.target, 0) + 1
            self._link_fails[p.target] = n
            cur = self.links.get(pair)
            if n >= self._m.config.link_confirm and (cur is None or cur.up):
                self._report_link(p.target, up=False, now=now, out=out)
            return
        if p.target in self._link_fails and not (self.links.get(pair) and not self.links[pair].up):
            # neither path answered: not a link problem (any more)
            self._link_fails.pop(p.target, None)
        st = self.status.get(p.target)
        if st is not None and st.state == _ALIVE:
            if self._m._learn(Fact(SUSPECT, p.target, st.inc), now, out, from_self=True):
                self._my_suspicions[p.target] = True

    def _report_link(self, peer: str, *, up: bool, now: float, out: "Output") -> None:
        pair = link(self._m.id, peer)
        cur = self.links.get(pair)
        version = (cur.version + 1) if cur is not None else 1
        if up:
            self._link_fails.pop(peer, None)
        self._m._learn(Fact(LINK, self._m.id, version, peer, up), now, out, from_self=True)

    # ------------------------------------------------------------ messages
    def on_ping(self, src: str, msg: Ping, now: float, out: "Output") -> None:
        m = self._m
        m._absorb(src, msg.epoch, msg.gossip, now, out)
        m._check_epoch(src, msg.epoch, now, out)
        # an indirect ping (msg.origin set) is answered to the helper, who
        # relays the ack to the origin
        m._send(src, Ack(msg.seq, m._epoch(), m.id, m._take_gossip()), out)

    def on_ack(self, src: str, msg: Ack, now: float, out: "Output") -> None:
        m = self._m
        m._absorb(src, msg.epoch, msg.gossip, now, out)
        m._check_epoch(src, msg.epoch, now, out)
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._relay_deadline.pop(msg.seq, None)
            origin, origin_seq, target = relay
            if target == msg.target:
                m._send(origin, Ack(origin_seq, m._epoch(), target, m._take_gossip()), out)
            return
        p = self._probes.get(msg.seq)
        if p is None or p.target != msg.target:
            return
        if p.target in m._proofs:
            # an answer of the slot, direct or relayed (a joiner under the id
            # answers no probe): a refused connection was not its death
            m.alive_sign(p.target, out)
        if src == p.target:
            if not p.direct_ok:
                p.direct_ok = True
                rtt = now - p.started
                prev = self.rtt.get(src)
                self.rtt[src] = rtt if prev is None else 0.875 * prev + 0.125 * rtt
                out.rtt.append((src, rtt))
        else:
            p.indirect_ok = True
        # an ack proves the target alive now; a suspicion of it is moot
        st = self.status.get(p.target)
        if st is not None and st.state == _SUSPECT:
            self._set_state(p.target, st, _ALIVE, st.inc)

    def on_ping_req(self, src: str, msg: PingReq, now: float, out: "Output") -> None:
        m = self._m
        m._absorb(src, msg.epoch, msg.gossip, now, out)
        m._check_epoch(src, msg.epoch, now, out)
        view = m.view
        # relay only for members, and a bounded number at a time: each relay
        # is kept a probe period, and forged senders must not grow the table
        if view is None or src not in view or len(self._relays) >= RELAYS:
            return
        if msg.target_addr and not m._addr_of(msg.target):
            m._note_addr(msg.target, msg.target_addr)
        self._seq += 1
        self._relays[self._seq] = (src, msg.seq, msg.target)
        self._relay_deadline[self._seq] = now + m.config.probe_interval
        m._send(msg.target, Ping(self._seq, m._epoch(), src, m._take_gossip(about=msg.target)), out)

    # ------------------------------------------------------------ suspicion
    def _tick_suspicion(self, now: float, out: "Output") -> None:
        heap, due = self._suspect_heap, []
        while heap and heap[0][0] <= now:
            deadline, node = heapq.heappop(heap)
            if self._suspects.get(node) == deadline:
                due.append(node)
        for node in due:
            # every node that heard the suspicion confirms it on its own timer;
            # only the one whose probe failed tells the coordinator directly
            # (the rest is gossip), or a partition would send it O(n^2) messages
            mine = self._my_suspicions.pop(node, False)
            self._m._learn(Fact(DEAD, node, self.status[node].inc), now, out, from_self=mine)

    def apply_status(self, f: Fact, now: float, out: "Output") -> bool:
        """Apply an ALIVE/SUSPECT/DEAD fact about another member; True if news."""
        m = self._m
        view = m.view
        if view is None or f.node not in view:
            return False
        st = self.status.setdefault(f.node, MemberStatus(_ALIVE, 0))
        if f.kind == ALIVE:  # a refutation: only a newer incarnation counts
            if f.inc <= st.inc:
                return False
            self._set_state(f.node, st, _ALIVE, f.inc)
            self._failed_reported.pop(f.node, None)
            m.alive_sign(f.node, out)  # it refuted a suspicion: alive
            m._update_quorum(out)
            return True
        if f.kind == SUSPECT:
            if st.state == _DEAD or f.inc < st.inc or (st.state == _SUSPECT and f.inc == st.inc):
                return False
            self._set_state(f.node, st, _SUSPECT, f.inc)
            deadline = now + m.config.suspicion_timeout(view.size)
            self._suspects[f.node] = deadline
            heapq.heappush(self._suspect_heap, (deadline, f.node))
            out.events.append(ev.MemberSuspected(f.node))
            return True
        # DEAD
        if st.state == _DEAD or f.inc < st.inc:
            return False
        self._set_state(f.node, st, _DEAD, f.inc)
        if not self._failed_reported.get(f.node):
            self._failed_reported[f.node] = True
            out.events.append(ev.MemberFailed(f.node))
        m._update_quorum(out)
        return True

    def _set_state(self, node: str, st: MemberStatus, state: Status, inc: int) -> None:
        if st.state == _DEAD and state != _DEAD:
            self.dead_nodes.pop(node, None)
            self._dead_version += 1
        elif st.state != _DEAD and state == _DEAD:
            self.dead_nodes[node] = None
            self._dead_version += 1
        if state != _SUSPECT:
            self._suspects.pop(node, None)
            if state == _ALIVE:
                self._my_suspicions.pop(node, None)
        st.state, st.inc = state, inc

    # ------------------------------------------------------------ links
    def apply_link(self, f: Fact, out: "Output") -> bool:
        """Apply a LINK fact (a report by ``f.node`` at version ``f.inc``); True if news."""
        view = self._m.view
        if view is None or f.node not in view or f.other not in view or f.node == f.other:
            return False
        pair = link(f.node, f.other)
        new = LinkState(f.up, f.inc, f.node)
        cur = self.links.get(pair)
        if cur is not None and cur.key() >= new.key():
            return False
        self.links[pair] = new
        if self._m.id in pair:
            self._emit_link(pair, f.up, out)
        return True

    def _emit_link(self, pair: tuple[str, str], up: bool, out: "Output") -> None:
        """Report a change of a link touching us, once per transition."""
        was_down = self._reported_down.get(pair, False)
        if not up and not was_down:
            self._reported_down[pair] = True
            out.events.append(ev.LinkDown(*pair))
        elif up and was_down:
            del self._reported_down[pair]
            out.events.append(ev.LinkUp(*pair))

    # ------------------------------------------------------------ views
    def on_view(self, view: View, old: View | None, now: float, out: "Output") -> None:
        """Keep only what concerns members of ``view`` and adopt what it settled."""
        me, rng = self._m.id, self._m.rng
        for nid in [n for n in self.status if n not in view]:
            del self.status[nid]
            self._failed_reported.pop(nid, None)
            self._link_fails.pop(nid, None)
        # maps keyed by remote ids keep members only
        for table in (self.rtt, self._my_suspicions, self._link_fails, self._failed_reported, self._suspected_until):
            for nid in [n for n in table if n not in view]:
                del table[nid]
        for pair in [p for p in self.links if p[0] not in view or p[1] not in view]:
            del self.links[pair]
        # Links: local knowledge wins where we have some (a newer report may
        # still be on its way to the coordinator; the endpoints re-probe down
        # links every period, so a wrong belief corrects itself); the view
        # fills in what we never heard of.
        down = set(view.down_links)
        old_down = set(old.down_links) if old is not None else set()
        for pair in down ^ old_down:  # links this commit changed
            cur = self.links.get(pair)
            up = pair not in down
            if cur is None or cur.up != up:
                self.links[pair] = LinkState(up, cur.version + 1 if cur else 0, "view")
        for x in view.members:
            st = self.status.get(x.id)
            if x.id != me and (st is None or st.inc < x.inc):
                if st is not None and st.state == _DEAD:
                    self._failed_reported.pop(x.id, None)
                self.status[x.id] = MemberStatus(_ALIVE, x.inc)
        self.dead_nodes = {n: None for n, st in self.status.items() if st.state == _DEAD}
        self._dead_version += 1
        self._suspects = {n: d for n, d in self._suspects.items() if n in view}
        # link events at this end for links the view changed
        for pair in view.down_links:
            if me in pair:
                self._emit_link(pair, False, out)
        for pair in [p for p in self._reported_down if p not in down]:
            st = self.links.get(pair)
            if st is None or st.up:
                self._emit_link(pair, True, out)
        # keep the round robin: drop departed members, insert new ones at
        # random places (memberlist's way; a full reshuffle per view is O(n)
        # random draws and dominated the 1,000-node simulation)
        order = [n for n in self._probe_order if n in view]
        known = set(order)
        for x in view.members:
            if x.id != me and x.id not in known:
                order.insert(rng.randrange(len(order) + 1), x.id)
        self._probe_order = order
        self._probe_pos = min(self._probe_pos, len(order))
        self._probes = {s: p for s, p in self._probes.items() if p.target in view}

    def start(self, now: float) -> None:
        """We just became a member: the first probe at a random phase of the
        period, so nodes admitted together do not probe in lockstep."""
        self._next_probe_at = now + self._m.rng.random() * self._m.config.probe_interval
