"""A failed collective is evidence (issue 14).

When a member is ``kill -9``-ed, the survivors' gloo all-reduce fails at once
("Connection closed by peer"), while the membership layer, left alone, finds
the death only at the dead node's turn in the probe round robin plus the
suspicion timeout.  Now the strategy calls ``Agent.suspect`` on the group's
peers; the machine probes them at once (direct, then indirect), a dead
peer's address refuses the connect (proof of death for that incarnation),
which confirms the failure at once, and the coordinator proposes the view
without it immediately: one round.

In one process (the simulator, virtual time): the view without a killed
node commits within one probe timeout plus one round of a suspicion fed
10 ms after the kill; a suspicion of a live node changes no view; a flood of
suspicions stays rate-limited.  Then real processes on loopback: three
trainers, one ``kill -9``-ed; the time from the kill to the view without it
and to the first step in world 2 is printed, and only the invariants are
asserted (survivors exit 0, identical replicas, every epoch an exact cover).

Before/after on one machine: ``python tests/test_fast_failure.py 5`` prints
the medians of 5 kills (``PYTHONPATH=<a checkout of the code before>`` runs
the same measurement against it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.messages import Ping
from chaos_lightning.membership.sim import Simulator

PRESETS = ["local", "lan"]


def cluster(n: int, preset: str, seed: int = 1, *, refuse: bool = True) -> tuple[Simulator, list[str]]:
    sim = Simulator(seed=seed, config=Config.preset(preset))
    sim.refuse_crashed = refuse
    ids = sim.start_cluster(n)
    sim.synced(*ids)
    sim.run_for(1.0)
    assert sim.agreed(size=n)
    return sim, ids


def view_without(sim: Simulator, dead: str, among: list[str]) -> bool:
    return all(dead not in sim.view_of(x).ids for x in among)


# ------------------------------------------------------------ simulator
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("victim", [0, 2])  # the coordinator itself, and another member
def test_a_suspicion_after_a_kill_commits_the_view_without_it_in_one_probe_timeout_plus_one_round(preset, victim):
    sim, ids = cluster(5, preset)
    cfg = sim.config
    dead = ids[victim]
    survivors = [x for x in ids if x != dead]
    sim.crash(dead)
    t_kill = sim.now
    sim.run_for(0.010)
    # the strategy's all-reduce failed on one survivor: it names every peer
    reporter = survivors[-1]
    for peer in ids:
        sim.call(reporter, lambda m, p=peer: m.suspect(p, sim.now))
    assert sim.run_until(lambda: view_without(sim, dead, survivors), timeout=30, check_every=0.001), sim.summary()
    took = sim.now - t_kill
    # one round: a refused connect (a round trip), the fact to the
    # coordinator, Accept/Accepted/Commit (a coordinator that took over runs
    # Prepare too); each hop under 1 ms of simulated latency
    bound = 0.010 + cfg.probe_timeout + 0.010
    print(f"{preset}: kill -> view without {dead} at every survivor {1e3 * took:.1f} ms (bound {1e3 * bound:.0f} ms)")
    assert took <= bound, (took, sim.summary())
    assert not sim.split
    assert len(sim.view_of(survivors[0]).ids) == 4


@pytest.mark.parametrize("preset", PRESETS)
def test_a_suspicion_with_only_timeouts_still_waits_for_the_suspicion_timeout(preset):
    """Timeouts prove nothing (a partition looks the same): with no refusal
    the suspicion only starts the probe early, and the failure is confirmed
    after the normal suspicion timeout, never sooner."""
    sim, ids = cluster(5, preset, refuse=False)
    cfg = sim.config
    dead, survivors = ids[2], [x for x in ids if x != ids[2]]
    sim.crash(dead)
    t_kill = sim.now
    sim.run_for(0.010)
    for peer in ids:
        sim.call(survivors[-1], lambda m, p=peer: m.suspect(p, sim.now))
    assert sim.run_until(lambda: view_without(sim, dead, survivors), timeout=60, check_every=0.001), sim.summary()
    took = sim.now - t_kill
    print(f"{preset}: timeouts only: kill -> view {1e3 * took:.1f} ms")
    assert took >= cfg.suspicion_timeout(5), took
    assert not sim.split


@pytest.mark.parametrize("preset", PRESETS)
def test_a_suspicion_of_a_live_node_costs_one_probe_and_changes_nothing(preset):
    sim, ids = cluster(4, preset)
    epoch = sim.view_of(ids[0]).epoch
    pings: list[tuple[str, str]] = []
    sim.filters.append(lambda src, dst, msg: bool(isinstance(msg, Ping) and pings.append((src, dst))) and False)
    sim.call(ids[1], lambda m: m.suspect(ids[3], sim.now))
    sent = [p for p in pings if p == (ids[1], ids[3])]
    assert len(sent) == 1, "one direct probe, at once"
    sim.run_for(5.0)
    assert sim.agreed(size=4) and sim.view_of(ids[0]).epoch == epoch
    assert not sim.events(ev.MemberSuspected) and not sim.events(ev.MemberFailed)
    # unknown nodes and ourselves are ignored
    m = sim.nodes[ids[1]]
    assert not m.suspect("nobody", sim.now).messages and not m.suspect(ids[1], sim.now).messages


def test_a_flood_of_suspicions_stays_rate_limited():
    from chaos_lightning.membership.detector import SUSPECT_PROBES

    sim, ids = cluster(20, "local", seed=3)
    m = sim.nodes[ids[0]]
    cfg = sim.config
    pings = 0
    t = sim.now
    # 20,000 suspicions within one probe period: every peer, over and over
    for i in range(1000):
        for peer in ids:
            out = m.suspect(peer, t + i * cfg.probe_interval / 2000)
            pings += sum(1 for _, _, msg in out.messages if isinstance(msg, Ping))
    assert pings <= SUSPECT_PROBES, pings
    # the same node is not probed again within a period, whatever the budget
    sim.run_for(cfg.probe_interval * 1.01)
    first = m.suspect(ids[1], sim.now).messages
    again = m.suspect(ids[1], sim.now + cfg.probe_interval / 3).messages
    assert len(first) <= 1 and not again
    # and the cluster is untouched
    sim.run_for(3.0)
    assert sim.agreed(size=20) and not sim.events(ev.MemberFailed)
    assert m.next_deadline() > sim.now


def test_suspicions_under_random_faults_keep_the_invariants():
    """Random crashes with suspicions of every peer fed at random moments
    (refused where the crashed node's host answers, timeouts where a
    partition drops): never two views for one epoch, no spin, one view at the
    end."""
    import random

    for seed in range(12):
        rng = random.Random(seed)
        sim = Simulator(seed=seed, config=Config.preset(rng.choice(PRESETS)))
        sim.refuse_crashed = rng.random() < 0.7
        ids = sim.start_cluster(rng.randrange(3, 8))
        sim.synced(*ids)
        sim.run_for(1.0)
        crashed: list[str] = []
        for _ in range(6):
            action = rng.random()
            live = sim.live()
            if action < 0.3 and len(crashed) < (len(ids) - 1) // 2:
                victim = rng.choice(live)
                sim.crash(victim)
                crashed.append(victim)
            elif action < 0.4:
                sim.partition(ids[: len(ids) // 2 + 1])
            elif action < 0.5:
                sim.heal()
            for x in sim.live():
                if rng.random() < 0.5:
                    for p in ids:
                        sim.call(x, lambda m, p=p: m.suspect(p, sim.now))
            sim.run_for(rng.uniform(0.01, 0.5))
        sim.heal()
        live = sim.live()
        assert sim.run_until(lambda: sim.agreed(among=live), timeout=120), (seed, sim.summary())
        assert not sim.split, seed


# ------------------------------------------------------------ the strategy's call
class _Agent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def suspect(self, ids) -> None:
        self.calls.append(tuple(ids))


class _Rdv:
    node_id = "a"

    def __init__(self, agent: object | None) -> None:
        if agent is not None:
            self.agent = agent


def _group(rdv: object):
    import chaos_lightning.strategy.strategy  # noqa: F401 - the usual import order (lightning registers chaos on import)
    from chaos_lightning.config import NodeConfig
    from chaos_lightning.strategy.group import ElasticGroup
    from chaos_lightning.strategy.trace import Trace

    g = ElasticGroup(NodeConfig(), Trace(None))
    g.rdv = rdv
    g.trainers = ("a", "b", "c")
    return g


def test_a_failed_collective_names_the_groups_peers_not_after_an_abort_and_not_without_an_agent():
    from chaos_lightning.strategy.process_group import CollectiveAborted, CollectiveFailed, CollectiveTimeout

    agent = _Agent()
    g = _group(_Rdv(agent))
    g.suspect_peers(CollectiveFailed("all_reduce: Connection closed by peer [127.0.0.1]:1234"))
    g.suspect_peers(CollectiveTimeout("not completed within 3 s"))
    g.suspect_peers(CollectiveAborted("aborted"))  # the membership layer raised it: it knows
    assert agent.calls == [("b", "c"), ("b", "c")]
    _group(_Rdv(None)).suspect_peers(CollectiveFailed("x"))  # etcd: no agent, no error

    class Broken(_Agent):
        def suspect(self, ids) -> None:
            raise RuntimeError("agent is not running")

    _group(_Rdv(Broken())).suspect_peers(CollectiveFailed("x"))  # never raises in the failure path


def test_the_watchdog_fences_a_stuck_thread_only_on_evidence_that_the_others_wait():
    """Issue 14: the watchdog (``ElasticGroup._check_stuck``) takes the node
    out only when the others are seen waiting for it: a regroup of its view
    at a newer generation, or trainers counted in to form a newer view that
    holds it.  Its own long absence is no evidence (every member may sit in
    the same long validation while a newer view commits); here each store
    is a real in-process ``torch.distributed.HashStore`` per view."""
    import torch.distributed as dist

    from chaos_lightning.membership.view import Member, View

    class Agent:
        left = 0

        def leave(self, timeout: float) -> bool:
            self.left += 1
            return True

    stores: dict[int, object] = {}

    class Rdv(_Rdv):
        def __init__(self, agent: Agent) -> None:
            super().__init__(agent)
            self.view: View | None = None

        def current_view(self):
            return self.view

        def store(self, view, timeout=30.0, cancelled=None):
            return dist.PrefixStore(f"chaos/epoch/{view.epoch}/", stores.setdefault(view.epoch, dist.HashStore()))

    def view(epoch: int, *ids: str) -> View:
        return View(epoch, tuple(Member(i, i) for i in ids))

    agent = Agent()
    rdv = Rdv(agent)
    g = _group(rdv)
    g.config = dataclasses.replace(g.config, join_timeout=4.0)  # fence after 2 s away
    g.view, g.trainers, g.generation = view(3, "a", "b", "c"), ("a", "b", "c"), 0
    rdv.view = view(4, "a", "b", "c", "j")  # a joiner admitted while everyone validates
    g.pg.presence._since = time.monotonic() - 60  # the training thread away for a minute
    g._check_stuck()
    assert not g.fenced and agent.left == 0, "a newer view alone is no evidence"
    rdv.store(view(3, "a"), 1.0).set("regroup/gen", "0")
    g._check_stuck()
    assert not g.fenced, "generation 0 is the group we are in"
    rdv.store(view(4, "a"), 1.0).add("meet/present", 2)  # two trainers wait to form epoch 4
    g._check_stuck()
    assert g.fenced and agent.left == 1 and g.abort.is_set()
    assert "wait to form the group of epoch 4" in g._needed
    # they waited a collective timeout and gave up: still evidence (they now wait for a newer view)
    g3 = _group(Rdv(Agent()))
    g3.config = dataclasses.replace(g3.config, join_timeout=4.0)
    g3.view, g3.trainers = view(3, "a", "b", "c"), ("a", "b", "c")
    g3.rdv.view = view(5, "a", "b", "j")
    g3.pg.presence._since = time.monotonic() - 60
    rdv.store(view(5, "a"), 1.0).add("meet/gave_up", 1)
    g3._check_stuck()
    assert g3.fenced and "gave up forming the group of epoch 5" in g3._needed
    # the thread is back: the evidence of that absence is void, and the next
    # formation asks back in (here only the flags: the agent has no rejoin)
    g2 = _group(Rdv(Agent()))
    g2.view, g2.trainers = view(3, "a", "b", "c"), ("a", "b", "c")
    g2.pg.presence._since = time.monotonic() - 60
    stores.clear()
    g2.rdv.store(view(3, "a"), 1.0).set("regroup/gen", "1")  # the others regroup without us
    g2.config = dataclasses.replace(g2.config, join_timeout=400.0)  # not away long enough yet
    g2._check_stuck()
    assert not g2.fenced and g2._needed and "regroup epoch 3 (generation 1)" in g2._needed
    with g2.pg.presence.inside():
        pass  # back in our code
    g2._check_stuck()
    assert g2._needed is None

    # back after a fence, with nobody left to let it in: a clear error at the join timeout
    class Gone(Rdv):
        def next_view(self, after_epoch: int, timeout: float):
            time.sleep(min(timeout, 0.1))
            return None

    rejoined = []
    gone = Gone(Agent())
    gone.agent.rejoin = lambda: rejoined.append(True)
    g4 = _group(gone)
    g4.fenced = True
    with pytest.raises(TimeoutError, match="left the cluster while its training thread was stuck"):
        g4.form(None, lambda v: False, time.monotonic() + 0.3)
    assert rejoined == [True] and g4.stale and not g4.fenced


# ------------------------------------------------------------ real processes
WORKER = Path(__file__).with_name("_train_worker.py")


def kill_once(tmp: Path, *, steps_before: int = 8, hidden: int = 16) -> dict:
    """Three trainers on loopback, one ``kill -9``-ed mid-fit.  Returns the
    survivors' results and the timings (seconds from the kill): ``commit``,
    the view without the victim committed at every survivor (their traces);
    ``step``, the first step in world 2 at every survivor (the JSON records'
    ``_t``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _procs import Node
    from chaos_lightning.testbed.procs import free_ports

    n, epochs = 240, 2
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = [
        Node(WORKER, [str(n), str(epochs), "0.05"],
             {"CHAOS_BIND": a, "CHAOS_PEERS": "" if i == 0 else addrs[0], "CHAOS_MIN_NODES": "3",
              "CHAOS_COLLECTIVE_TIMEOUT": "10", "CHAOS_JOIN_TIMEOUT": "60", "CHAOS_TRACE": str(tmp / f"t{i}.jsonl"),
              "CHAOS_TEST_HIDDEN": str(hidden)},
             tmp / f"n{i}.log")
        for i, a in enumerate(addrs)
    ]
    victim, survivors = nodes[1], [nodes[0], nodes[2]]
    try:
        pids = [x.event("ready", 120)["pid"] for x in nodes]
        victim.wait(lambda r: r["event"] == "step" and r["step"] >= steps_before, 120)
        t_mono, t_wall = time.monotonic(), time.time()
        victim.proc.kill()
        firsts = [x.wait(lambda r: r["event"] == "step" and r["world"] == 2, 60)["_t"] - t_mono for x in survivors]
        results = [x.event("done", 180) for x in survivors]
        codes = [x.exit_code(30) for x in survivors]
    finally:
        for x in nodes:
            x.stop()
    victim_id = addrs[1]
    commits = []
    for i in (0, 2):
        recs = [json.loads(line) for line in (tmp / f"t{i}.jsonl").read_text().splitlines() if line.strip()]
        t = min((r["t"] for r in recs if r.get("ev") == "view_committed" and r["t"] > t_wall
                 and victim_id not in r["members"]), default=float("nan"))
        commits.append(t - t_wall)
    logs = [x.log.read_text() for x in survivors]
    return {"commit": max(commits), "step": max(firsts), "results": results, "codes": codes,
            "pids": [pids[0], pids[2]], "logs": logs, "epochs": epochs, "n": n}


@pytest.mark.timeout(300)
def test_kill_9_of_one_of_three_the_survivors_go_on_identical_and_exactly_once(tmp_path):
    r = kill_once(tmp_path)
    print(f"kill -9 -> view without it at both survivors {r['commit']:.3f} s; "
          f"-> first step in world 2 at both {r['step']:.3f} s")
    assert r["codes"] == [0, 0], r["logs"]
    for text in r["logs"]:
        assert "Traceback" not in text
    results = r["results"]
    assert [x["pid"] for x in results] == r["pids"], "no survivor restarted"
    assert len({(x["params"], x["optim"], x["global_step"]) for x in results}) == 1, results
    for x in results:
        for epoch in range(r["epochs"]):
            counts = dict(x["epochs"][str(epoch)])
            assert sorted(counts) == list(range(r["n"])) and set(counts.values()) == {1}, f"epoch {epoch}"


if __name__ == "__main__":  # python tests/test_fast_failure.py [kills] [hidden]
    import tempfile

    kills = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    import chaos_lightning

    print("code:", os.path.dirname(chaos_lightning.__file__))
    commit, step = [], []
    for k in range(kills):
        with tempfile.TemporaryDirectory() as d:
            r = kill_once(Path(d), hidden=hidden)
        ok = r["codes"] == [0, 0] and len({(x["params"], x["optim"]) for x in r["results"]}) == 1
        print(f"kill {k}: commit {r['commit']:.3f} s, first step {r['step']:.3f} s, invariants {'ok' if ok else 'FAILED'}",
              flush=True)
        commit.append(r["commit"])
        step.append(r["step"])
    print(f"median of {kills}: kill -> view committed {statistics.median(commit):.3f} s, "
          f"kill -> first step in world 2 {statistics.median(step):.3f} s")


def test_a_node_in_a_minority_says_so_for_as_long_as_it_waits(capsys):
    """Issue 14: a minority logged one line at the loss and then waited in
    silence; the wait for a view now shows it (a progress bar on stderr,
    after 2 s, as every long wait) and traces it, until the majority returns."""
    class Silent(_Rdv):
        def next_view(self, after_epoch: int, timeout: float):
            time.sleep(min(timeout, 0.2))
            return None

    g = _group(Silent(None))
    g.config = dataclasses.replace(g.config, join_timeout=2.6)
    g._on_event(ev.QuorumLost(epoch=4, reachable=1, voters=3))
    assert g.minority is not None
    with pytest.raises(TimeoutError):
        g.form(None, lambda v: False, time.monotonic() + 2.6)
    assert "in a minority (1 of 3 voters reachable), waiting for the majority" in capsys.readouterr().err
    g._on_event(ev.QuorumRegained(epoch=4))
    assert g.minority is None
    g._on_event(ev.QuorumLost(epoch=4, reachable=1, voters=3, allow_minority=True))
    assert g.minority is None, "a node told to go on in a minority is not waiting"
    # removed while in a minority, then back through a rejoin (whose reset
    # sets the quorum flag without a QuorumRegained): the bar must not stay
    from chaos_lightning.membership.view import Member, View

    g._on_event(ev.QuorumLost(epoch=4, reachable=1, voters=3))
    g._on_event(ev.Removed(View(5, (Member("b", "b"),)), False))
    assert g.minority is None
    g._on_event(ev.QuorumLost(epoch=6, reachable=1, voters=3))
    g._on_event(ev.ViewChanged(View(7, (Member("b", "b"), Member(g.node_id, g.node_id)))))
    assert g.minority is None


def test_only_a_committed_view_without_a_trainer_ends_the_groups_collectives():
    """One rank's own MemberFailed is its conclusion, not the cluster's: at
    8 nodes a rank confirmed a busy member failed, the others refuted it,
    and the aborting rank left the all-reduce the other seven then waited
    in for 30 s.  The commit of the view without the member ends every
    rank's collective; a lost quorum (maybe regained with no view change)
    does not."""
    from chaos_lightning.membership.view import Member, View

    g = _group(_Rdv(None))
    members = tuple(Member(n, f"{n}:1") for n in ("a", "b", "c"))
    g.view, g.trainers = View(5, members), ("a", "b", "c")
    g._on_event(ev.MemberFailed("b"))
    g._on_event(ev.QuorumLost(epoch=5, reachable=1, voters=3))
    assert not g.abort.is_set()
    g._on_event(ev.ViewChanged(View(6, members)))
    assert not g.abort.is_set(), "the same trainers"
    g._on_event(ev.ViewChanged(View(7, (members[0], members[2]))))
    assert g.abort.is_set(), "b is out of the committed view"


def test_a_newer_view_is_adopted_in_place_only_with_the_same_processes_in_the_same_order():
    """Issue 13: a learner's promotion keeps the trainers; the group adopts
    the view every rank reported instead of rebuilding.  A node restarted
    under its id (a new incarnation), another order, or a view nobody
    reported is never adopted: those switch as before."""
    from chaos_lightning.membership.view import Member, View

    g = _group(_Rdv(None))
    members = tuple(Member(n, f"{n}:1") for n in ("a", "b", "c"))
    g.view = View(5, members + (Member("j", "j:1"),), learners=("j",), trained=True)
    g.trainers = ("a", "b", "c", "j")
    promoted = g.known(View(6, g.view.members, trained=True))
    assert g.keeps(g.view) and g.keeps(promoted), "what each rank reports beside its epoch"
    assert g.adopt(7) is False, "never reported"
    assert g.adopt(6) is True and g.view is promoted and g.trainers == ("a", "b", "c", "j")
    assert g.adopt(6) is False, "not newer than the group's own"
    restarted = (members[0], members[1], Member("c", "c:1", inc=1), Member("j", "j:1"))
    assert not g.keeps(g.known(View(7, restarted, trained=True)))
    assert g.adopt(7) is False, "c is a new process"
    assert not g.keeps(g.known(View(8, (members[1], members[0], members[2], Member("j", "j:1")), trained=True)))
    assert g.adopt(8) is False, "the ranks would change"
    assert not g.keeps(View(9, members, trained=True)), "j left: a switch"


def test_a_late_rank_never_enters_gloo_for_a_group_the_others_left():
    """The long soak (docs/results/soak/seed0-200events-hang.md): ranks that
    gave up forming a view's group left their addresses in its store; a node
    back from a partition learnt that view late, found every key, and waited
    in gloo's connect for good.  Now each rank counts itself in and out of
    the group's rendezvous and enters gloo only when all are there; a rank
    removed by a newer view gives up at once."""
    import torch.distributed as dist

    from chaos_lightning.membership.view import Member, View

    class Removed:
        def __init__(self, epoch: int) -> None:
            self.view = View(epoch, (Member("b", "b:1"),))

    class Agent:
        removed = None

    class Rdv(_Rdv):
        def current_view(self):
            return view

    view = View(163, tuple(Member(n, f"{n}:1") for n in ("a", "b", "c")))
    store = dist.HashStore()
    g = _group(Rdv(Agent()))
    # the others came and left (superseded): the count is back where it was
    assert store.add("meet/present", 2) == 2 and store.add("meet/present", -2) == 0
    g.rdv.agent.removed = Removed(164)
    assert "removed in epoch 164" in g._superseded(view)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="removed in epoch 164"):
        g._meet(store, view, 3)
    assert time.monotonic() - t0 < 1.0
    assert store.add("meet/present", 0) == 0, "counted out again"
    # all there: no wait
    g.rdv.agent.removed = None
    assert g._superseded(view) is None
    store.add("meet/present", 2)
    g._meet(store, view, 3)
    assert store.add("meet/present", 0) == 3
