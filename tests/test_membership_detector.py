"""The failure and link detector on its own: one machine, messages fed by hand.

Each test installs a view on one real :class:`Membership` (the detector's only
host) and plays the peers' side of the probe protocol in virtual time: which
pings it sends, which acks it gets, and what it concludes.
"""

from __future__ import annotations

import random

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.detector import Status
from chaos_lightning.membership.machine import Membership, Output, Phase
from chaos_lightning.membership.messages import DEAD, LINK, SUSPECT, Ack, Commit, Fact, Ping, PingReq
from chaos_lightning.membership.view import Member, View, link

CFG = Config.preset("lan")


def member_of(me: str, ids: list[str], *, epoch: int = 2, seed: int = 0) -> Membership:
    m = Membership(Member(me, me), CFG, rng=random.Random(seed))
    m.join([ids[0]], 0.0)
    m.receive(ids[0], ids[0], Commit(View(epoch, tuple(Member(i, i) for i in ids))), 0.0)
    assert m.phase is Phase.MEMBER
    return m


def sent(out, kind: type) -> list[tuple[str, object]]:
    return [(dst, msg) for dst, _, msg in out.messages if isinstance(msg, kind)]


def first_probe(m: Membership) -> tuple[float, str, Ping]:
    t = m.next_deadline()
    out = m.tick(t)
    pings = sent(out, Ping)
    assert len(pings) == 1, out.messages
    return t, pings[0][0], pings[0][1]


def test_a_direct_ack_is_a_round_trip_and_no_verdict():
    m = member_of("a", ["a", "b", "c"])
    t, target, ping = first_probe(m)
    out = m.receive(target, target, Ack(ping.seq, 2, target), t + 0.01)
    (peer, rtt), = out.rtt
    assert peer == target and abs(rtt - 0.01) < 1e-9
    assert m.rtt[target] == out.rtt[0][1]
    out = m.tick(t + CFG.probe_interval)
    assert not [e for e in out.events if isinstance(e, ev.MemberSuspected)]
    assert m._status[target].state is Status.ALIVE


def test_no_answer_on_either_path_is_a_suspicion_then_a_confirmed_failure():
    ids = ["a", "b", "c", "d"]
    m = member_of("a", ids)
    t, target, ping = first_probe(m)
    # the direct ping times out: a second direct ping and k indirect probes
    out = m.tick(t + CFG.probe_timeout)
    assert [d for d, _ in sent(out, Ping)] == [target]
    helpers = [d for d, msg in sent(out, PingReq) if msg.target == target]
    assert sorted(helpers) == sorted(set(ids) - {"a", target})
    # nobody answers within the period: suspected, and told to the suspect first
    out = m.tick(t + CFG.probe_interval)
    assert ev.MemberSuspected(target) in out.events
    assert m._status[target].state == SUSPECT
    assert m._take_gossip(about=target)[0] == Fact(SUSPECT, target, 0), "the accused hears it first"
    # the suspicion times out: a confirmed failure, sent to the coordinator (rank 0 is us here)
    deadline = t + CFG.probe_interval + CFG.suspicion_timeout(len(ids))
    assert ev.MemberFailed(target) in events_until(m, deadline)
    assert m.detector.dead(target) and target in m.detector.dead_nodes
    assert m.quorate, "one dead of four leaves a majority"


def events_until(m: Membership, until: float) -> list[object]:
    """Tick at every deadline up to ``until``; the events, in order."""
    events: list[object] = []
    while m.next_deadline() <= until:
        events += m.tick(m.next_deadline()).events
    events += m.tick(until).events
    return events


def test_an_ack_through_a_helper_clears_a_suspicion_and_a_refutation_needs_a_newer_incarnation():
    m = member_of("a", ["a", "b", "c"])
    out = Output()
    assert m.detector.apply_status(Fact(SUSPECT, "b", 0), 1.0, out)
    assert m._status["b"].state == SUSPECT and out.events == [ev.MemberSuspected("b")]
    assert not m.detector.apply_status(Fact(SUSPECT, "b", 0), 1.0, Output()), "the same suspicion is no news"
    assert not m.detector.apply_status(Fact("alive", "b", 0), 1.0, Output()), "refuting needs inc > 0"
    assert m.detector.apply_status(Fact("alive", "b", 1), 1.0, Output())
    assert m._status["b"].state == Status.ALIVE and m._status["b"].inc == 1
    assert not m.detector.apply_status(Fact(DEAD, "b", 0), 1.0, Output()), "a verdict on an older incarnation"


def play(m: Membership, until: float, *, direct_to_b: bool, gossiped: list[Fact] | None = None) -> list[object]:
    """Run ``m`` to ``until`` with peers b and c answering as live nodes
    would, except that ``a``-``b`` drops everything unless ``direct_to_b``
    (c still reaches b, so c's relayed acks prove b alive)."""
    events: list[object] = []
    pending: list[tuple[float, str, object]] = []
    t = 0.0
    while True:
        t = min([m.next_deadline(), *(p[0] for p in pending)])
        if t > until:
            return events
        if pending and pending[0][0] <= t:
            _, src, msg = pending.pop(0)
            out = m.receive(src, src, msg, t)
        else:
            out = m.tick(t)
        events += out.events
        for dst, _, msg in out.messages:
            if gossiped is not None:
                gossiped += getattr(msg, "gossip", ())
            if isinstance(msg, Ping) and (dst == "c" or direct_to_b):
                pending.append((t + 0.001, dst, Ack(msg.seq, 2, dst)))
            elif isinstance(msg, PingReq) and dst == "c":
                pending.append((t + 0.002, "c", Ack(msg.seq, 2, msg.target)))
        pending.sort(key=lambda p: p[0])


def test_direct_fails_but_helpers_reach_the_peer_for_link_confirm_periods_is_a_link_down():
    m = member_of("a", ["a", "b", "c"])
    # the round robin reaches b within two periods, then b is watched every period
    gossiped: list[Fact] = []
    events = play(m, (CFG.link_confirm + 3) * CFG.probe_interval, direct_to_b=False, gossiped=gossiped)
    assert ev.LinkDown(*link("a", "b")) in events
    assert not m.detector.links[link("a", "b")].up
    assert Fact(LINK, "a", 1, "b", False) in gossiped, "the link-down is gossiped"
    assert not [e for e in events if isinstance(e, (ev.MemberSuspected, ev.MemberFailed))], "not a failure"
    # the link works again: the next period's direct ack is a link-up
    t = m.next_deadline()
    events = play(m, t + 2 * CFG.probe_interval, direct_to_b=True)
    assert events == [ev.LinkUp(*link("a", "b"))]
    assert m.detector.links[link("a", "b")].up


def test_a_helper_relays_an_indirect_probe_and_its_ack():
    m = member_of("c", ["a", "b", "c"])
    out = m.receive("a", "a", PingReq(7, 2, "b", "b"), 1.0)
    (dst, ping), = sent(out, Ping)
    assert dst == "b" and ping.origin == "a"
    out = m.receive("b", "b", Ack(ping.seq, 2, "b"), 1.01)
    (dst, ack), = sent(out, Ack)
    assert dst == "a" and ack.seq == 7 and ack.target == "b"


def test_reset_forgets_the_cluster_but_never_reuses_a_probe_number():
    m = member_of("a", ["a", "b", "c"])
    _, _, ping = first_probe(m)
    m.detector.apply_status(Fact(DEAD, "b", 0), 1.0, Output())
    assert m.detector.dead_nodes
    m.detector.reset()
    assert not m.detector.status and not m.detector.links and not m.detector.dead_nodes
    m.detector._start_probe("c", 2.0, Output())
    assert max(m.detector._probes) > ping.seq


def test_a_transport_hint_probes_a_node_whose_probe_was_answered_already():
    """With few peers a probe of each is always in its period.  One answered
    already says the node was alive at its ping, not now: a connection lost
    since (a kill -9 closes the dead process's sockets at once) gets a probe
    at once, whose connect the dead node's host refuses.  Before, the hint
    waited for the next period.  A probe still waiting for its answer sends
    its ping again at once (it went over the connection now lost), not at
    its timeout: no second probe."""
    m = member_of("a", ["a", "b"])
    t, target, ping = first_probe(m)
    assert target == "b"
    again = sent(m.hint_unreachable("b", t + 0.001), Ping)
    assert [(d, p.seq) for d, p in again] == [("b", ping.seq)], "the waiting probe pings again"
    m.receive("b", "b", Ack(ping.seq, 2, "b"), t + 0.002)
    assert not m.hint_unreachable("b", t + 0.05).messages, "one hint probe per probe interval"
    out = m.hint_unreachable("b", t + 0.001 + CFG.probe_interval)  # no tick has ended the answered probe yet
    pings = sent(out, Ping)
    assert [d for d, _ in pings] == ["b"] and pings[0][1].seq != ping.seq, out.messages


def test_a_transport_hint_probes_at_once_but_only_one_at_a_time():
    m = member_of("a", ["a", "b", "c"])
    out = m.hint_unreachable("b", 0.001)
    assert [d for d, _ in sent(out, Ping)] == ["b"]
    assert not m.hint_unreachable("c", 0.002).messages, "one hint probe per probe interval"
    assert not m.hint_unreachable("zz", 0.5).messages, "not a member"

