"""The switch decision and the sync vote, in one process.

Two parts.  First every branch of :func:`~chaos_lightning.strategy.switch.decide`,
:func:`~chaos_lightning.strategy.switch.usable_for_switch`,
:func:`~chaos_lightning.strategy.sync.plan_sync` and the record layouts, one
case each.  Then seeded random event sequences (``SEQUENCES`` of them): a
model cluster whose members are real :class:`ElasticSampler` replicas drives
steps through the pure modules exactly as the strategy does (sum the control
records, decide, switch, sum the claims, plan, carry the plan out), under
joins, graceful leaves, ``kill -9`` with some survivors having completed the
step, steps that fail on some ranks only, and members sidelined and back.
After every step and every sync it checks the design's invariants:

* lockstep: every rank that completed a step decides the same (a leaver
  LEAVEs where the others SWITCH), and every rank derives the same sync plan;
* identical replicas: after every sync all members hold the same update
  history, sampler state and commit count;
* exactly-once: the update history covers each epoch's samples once, and so
  does the ledger of every node that was there from start to end.

What a replica "is" here is the list of updates it applied (the block of
samples of each committed step): two replicas with the same list hold the
same parameters, which is what the multi-process tests check by hash.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from chaos_lightning.strategy.sampler import ElasticSampler, Ledger
from chaos_lightning.strategy.switch import Action, Control, Decision, Window, adoptable, decide, usable_for_switch
from chaos_lightning.strategy.sync import Claim, Freshness, SyncAction, SyncPlan, plan_sync

NONE, ABORTED, APPLIED, PENDING = Freshness.NONE, Freshness.ABORTED, Freshness.APPLIED, Freshness.PENDING


# ---------------------------------------------------------------------- records
def summed(records: list[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*records, strict=True)]


def test_the_control_record_sums_and_decodes_exactly_beyond_bfloat16s_integers() -> None:
    # 3 ranks of batch 101 in epoch 300: the values bf16 misread (304 for 303)
    world, epoch = 3, 300
    records = [Control.local(rank=r, world=world, samples=101, epoch=epoch, leaving=r == 2, busy_us=1000 * (r + 1))
               for r in range(world)]
    assert all(len(r) == Control.size(world) for r in records)
    via_int64 = torch.stack([torch.tensor(r, dtype=torch.int64) for r in records]).sum(0).tolist()
    assert Control.decode(via_int64) == Control(samples=303, epoch_sum=900, leavers=(2,), epochs=(300, 300, 300),
                                             ready=(0, 0, 0), digests=(0, 0, 0), busy=(1000, 2000, 3000))
    # the reason the record is not in the parameters' dtype
    via_bf16 = torch.stack([torch.tensor(r, dtype=torch.bfloat16) for r in records]).sum(0)
    assert int(via_bf16[0].item()) != 303


def test_claims_take_their_own_slots_and_decode_in_rank_order() -> None:
    claims = [Claim.of(APPLIED, 7), Claim.of(NONE, 7), Claim.of(ABORTED, 6)]
    assert claims[1] == Claim(-1, NONE), "without state the commits do not count"
    total = summed([c.encode(r, len(claims)) for r, c in enumerate(claims)])
    assert Claim.decode_all(total) == claims
    assert sorted(claims) == [Claim(-1, NONE), Claim(6, ABORTED), Claim(7, APPLIED)]


def test_window_marks_only_the_synced_micro_batch_as_a_boundary() -> None:
    w = Window()
    assert w.boundary() is None and w.boundary() is None  # two unsynced micro-batches
    assert w.reduced() == range(3)
    assert w.boundary() == 3 and w.last == 3
    assert w.reduced() == range(1) and w.boundary() == 1  # no accumulation: every step


# ---------------------------------------------------------------------- decide, one branch each
def decision(**kw: object) -> Decision:
    args = {"failed": False, "control": Control(30, 3 * 5), "world": 3, "view_epoch": 5, "rank": 0, "steps_remaining": 4}
    return decide(**{**args, **kw})  # type: ignore[arg-type]


def test_decide_every_branch() -> None:
    assert decision() == Decision(Action.STAY)
    assert decision(failed=True) == Decision(Action.SWITCH, newer=True)
    assert decision(control=None) == Decision(Action.SWITCH, newer=True)
    leave = Control(30, 15, leavers=(1,))
    assert decision(control=leave, rank=1) == Decision(Action.LEAVE, exclude=(1,))
    assert decision(control=leave, rank=0) == Decision(Action.SWITCH, exclude=(1,))
    newer = Control(30, 15 + 1)  # one rank knows epoch 6
    assert decision(control=newer) == Decision(Action.SWITCH)
    assert decision(control=newer, steps_remaining=0) == Decision(Action.DEFER)
    # a leave at the epoch's last step is not deferred
    assert decision(control=leave, steps_remaining=0).action is Action.SWITCH
    # ranks that know different views, every one of which keeps the group's
    # trainers (a promotion seen by some ranks only): train on until they agree
    promoted = Control(30, 15 + 1, epochs=(5, 6, 5), keeps=3)
    assert decision(control=promoted) == Decision(Action.STAY)
    assert decision(control=promoted, steps_remaining=0) == Decision(Action.STAY)
    # one of those views changes the trainers: switch, as before
    assert decision(control=Control(30, 15 + 1, epochs=(5, 6, 5), keeps=2)) == Decision(Action.SWITCH)


def test_a_newer_view_every_rank_knows_may_be_adopted_in_place_and_nothing_else() -> None:
    """``adoptable``: the one newer epoch every rank reported, after a
    successful step with no leaver; the caller adopts it if its trainers are
    the group's (a learner's promotion), else switches as before."""
    records = [Control.local(rank=r, world=3, samples=10, epoch=6, leaving=False) for r in range(3)]
    agreed = Control.decode(summed(records))
    assert agreed.epochs == (6, 6, 6)
    switch = decision(control=agreed)
    assert switch == Decision(Action.SWITCH)
    assert adoptable(switch, agreed, 5) == 6
    # one rank knows epoch 7 already: they switch and meet in the newest
    mixed = Control.decode(summed([*records[:2], Control.local(rank=2, world=3, samples=10, epoch=7, leaving=False)]))
    assert adoptable(decision(control=mixed), mixed, 5) is None
    # ... unless every rank's view keeps the trainers: they wait for agreement
    keeping = Control.decode(summed([Control.local(rank=r, world=3, samples=10, epoch=6 + (r == 2), leaving=False,
                                                   keeps=True) for r in range(3)]))
    assert keeping.keeps == 3 and decision(control=keeping) == Decision(Action.STAY)
    assert adoptable(decision(control=keeping), keeping, 5) is None
    # a failed step, a leaver, a deferral, nothing newer: never
    assert adoptable(decision(failed=True), None, 5) is None
    leaving = Control.decode(summed([Control.local(rank=r, world=3, samples=10, epoch=6, leaving=r == 1)
                                     for r in range(3)]))
    assert adoptable(decision(control=leaving), leaving, 5) is None
    assert adoptable(decision(control=agreed, steps_remaining=0), agreed, 5) is None
    same = Control.decode(summed([Control.local(rank=r, world=3, samples=10, epoch=5, leaving=False) for r in range(3)]))
    assert adoptable(decision(control=same), same, 5) is None


def usable(**kw: object) -> bool:
    args = {"epoch": 6, "ids": {"a", "b"}, "connected": ["a", "b"], "me": "a", "old_epoch": 5, "exclude": set(),
            "newer": False}
    return usable_for_switch(**{**args, **kw})  # type: ignore[arg-type]


def test_usable_for_switch_every_branch() -> None:
    assert usable()
    assert not usable(epoch=4), "never an older view"
    assert not usable(exclude={"b"}), "never one that holds a leaver"
    assert not usable(connected=["b"]), "never one where this node is cut off"
    assert usable(epoch=5), "the same view after a leave decision"
    # after a failed step the broken group's view is rebuilt under a fresh
    # generation (a pause with no membership change regroups the same members)
    assert usable(epoch=5, newer=True), "after a failed step: the same view, regrouped"
    assert not usable(epoch=5, newer=True, news=True), "unless a member was reported failed: wait for its view"


# ---------------------------------------------------------------------- plan_sync, one branch each
def test_plan_sync_every_branch() -> None:
    same = [Claim.of(APPLIED, 4)] * 3
    assert plan_sync(same, 1, stale=False) == SyncPlan(SyncAction.NOTHING)
    nobody = [Claim.of(NONE, 0)] * 2
    assert plan_sync(nobody, 0, stale=True) == SyncPlan(SyncAction.ORPHANED)
    # the very start: everyone without state, rank 0 broadcasts and nobody loads training state
    assert plan_sync(nobody, 1, stale=False) == SyncPlan(SyncAction.BROADCAST, source=0)
    join = [Claim.of(APPLIED, 4), Claim.of(NONE, 0), Claim.of(APPLIED, 4)]
    assert plan_sync(join, 1, stale=False) == SyncPlan(SyncAction.PULL, holders=(0, 2), admits=True)
    assert plan_sync(join, 0, stale=False) == SyncPlan(SyncAction.PULL, holders=(0, 2), admits=True)
    # a kill -9 after some ranks completed the step: those that did lead
    split = [Claim.of(ABORTED, 3), Claim.of(ABORTED, 4), Claim.of(NONE, 0)]
    assert plan_sync(split, 0, stale=False) == SyncPlan(SyncAction.BROADCAST, source=1, receive=True,
                                                        adopt_aborted_step=True, admits=True)
    assert plan_sync(split, 1, stale=False) == SyncPlan(SyncAction.BROADCAST, source=1, admits=True)
    assert plan_sync(split, 2, stale=False) == SyncPlan(SyncAction.BROADCAST, source=1, receive=True, admits=True)
    behind = [Claim.of(APPLIED, 5), Claim.of(ABORTED, 5)]
    assert plan_sync(behind, 1, stale=False) == SyncPlan(SyncAction.BROADCAST, source=0, receive=True)
    # a failed step is finished in the new group only when every rank holds it
    finish = [Claim.of(PENDING, 7)] * 3
    assert plan_sync(finish, 2, stale=True) == SyncPlan(SyncAction.FINISH)
    for others in ([Claim.of(APPLIED, 8)], [Claim.of(ABORTED, 7)], [Claim.of(NONE, 0)], [Claim.of(PENDING, 6)]):
        mixed = [Claim.of(PENDING, 7), *others]
        assert {plan_sync(mixed, r, stale=False) for r in range(2)} == {SyncPlan(SyncAction.RETRY)}, others


# ---------------------------------------------------------------------- randomized sequences
SEQUENCES = 300  # seeds; together they reach every action and sync plan (checked below)
N, EPOCHS, MAX_STEPS = 47, 3, 400


@dataclass
class Replica:
    node: str
    sampler: ElasticSampler
    known_epoch: int
    history: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    commits: int = 0
    freshness: Freshness = NONE
    leaving: bool = False
    stale: bool = False
    founder: bool = False  # there from the start to the end, never sidelined: its ledger must be exact
    #: the newest view it knows keeps the group's trainers (nothing newer, or a promotion)
    keeps: bool = True
    #: finishing a failed step: the nodes of the group it ran in (their ranks are the layout's)
    unfinished: list[str] | None = None
    ledger: Ledger = field(default_factory=lambda: Ledger(N))

    def same_state(self, other: Replica) -> bool:
        return (self.history, self.sampler.state_dict(), self.commits) == (
            other.history, other.sampler.state_dict(), other.commits)


class Cluster:
    """Members step in lockstep through the pure modules, as the strategy does."""

    def __init__(self, rng: random.Random, nodes: int, batch: int | None, global_batch: int | None) -> None:
        self.rng = rng
        self.batch, self.global_batch = batch, global_batch
        self.view_epoch = 1
        self.group = [self.new(f"n{i}", founder=True) for i in range(nodes)]
        self.pending: list[Replica] = []
        self.seen: Counter[str] = Counter()
        #: CHAOS_FINISH_FAILED_STEPS: a rank whose step failed holds it and
        #: claims it in the next group (Freshness.PENDING) instead of aborting
        self.finishing = rng.random() < 0.5
        self.joined = 0
        self.sync()

    def new(self, node: str, founder: bool = False) -> Replica:
        sizes = {"batch_size": self.batch} if self.batch else {"global_batch_size": self.global_batch}
        return Replica(node, ElasticSampler(N, shuffle=True, seed=3, **sizes), self.view_epoch, founder=founder)

    @property
    def done(self) -> bool:
        return self.group[0].sampler.epoch >= EPOCHS

    # -- one training step --------------------------------------------------------
    def step(self) -> None:
        event = self.rng.choice(["ok"] * 6 + ["join", "leave", "kill", "fail", "sideline", "promote"])
        if event == "join" and len(self.group) + len(self.pending) < 6:
            self.joined += 1
            self.pending.append(self.new(f"j{self.joined}"))
            newest = max(rep.known_epoch for rep in self.group) + 1
            for rep in self.rng.sample(self.group, self.rng.randint(1, len(self.group))):
                rep.known_epoch = newest  # gossip reached some members before the step
                rep.keeps = False
        elif event == "promote" and not self.pending:
            # a view with the same trainers (a learner's promotion) reaches some ranks
            newest = max(rep.known_epoch for rep in self.group) + 1
            for rep in self.rng.sample(self.group, self.rng.randint(1, len(self.group))):
                rep.known_epoch = newest
        elif event == "leave" and len(self.group) > 1:
            self.rng.choice(self.group).leaving = True
        newest = max(self.group, key=lambda rep: rep.known_epoch)
        for rep in self.group:  # the gossip goes on reaching the others
            if rep.known_epoch < newest.known_epoch and self.rng.random() < 0.5:
                rep.known_epoch, rep.keeps = newest.known_epoch, newest.keeps

        world, group = len(self.group), self.group
        block = group[0].sampler.block(0)
        for rank, rep in enumerate(group):
            assert rep.sampler.block(0) == block, "replicas share one layout"
        assert [i for r, rep in enumerate(group) for i in rep.sampler.batch_for(0, r)] == block
        records = [Control.local(rank=r, world=world, samples=len(rep.sampler.batch_for(0)), epoch=rep.known_epoch,
                                 leaving=rep.leaving, keeps=rep.keeps) for r, rep in enumerate(group)]

        gone: list[Replica] = []  # dead or sidelined: out of the next group
        completed = set(range(world))
        if event in ("kill", "fail", "sideline") and world > 1:
            victim = self.rng.randrange(world)
            completed = {r for r in range(world) if self.rng.random() < 0.4} - {victim}
            if event != "fail":
                gone.append(group[victim])

        decisions: dict[int, Decision] = {}
        control = Control.decode(summed(records))
        for rank, rep in enumerate(group):
            steps_after = rep.sampler.steps_remaining()
            if rank in completed:
                assert control.samples == len(block), "the record's sample count is the layout's"
                rep.history.append((rep.sampler.epoch, tuple(block)))
                rep.ledger.record(rep.sampler.epoch, rep.sampler.commit_step())
                rep.commits += 1
                rep.freshness = APPLIED
                steps_after = rep.sampler.steps_remaining()
            else:
                self.fail_step(rep)
            decisions[rank] = decide(failed=rank not in completed, control=control if rank in completed else None,
                                     world=world, view_epoch=self.view_epoch, rank=rank, steps_remaining=steps_after)
        self.check_lockstep(decisions, completed)
        for d in decisions.values():
            self.seen[d.action.value] += 1
        adopted = {adoptable(d, control, self.view_epoch) for r, d in decisions.items() if r in completed}
        if adopted not in ({None}, set()) and all(rep.keeps for rep in group) and len(completed) == world:
            # the strategy's ElasticGroup.adopt: the same trainers in a newer view, no new group.
            # (Where some ranks failed the step, those that completed it adopt
            # the view, then fail their next step in the broken group and
            # switch: as the switch below, which takes them all.)
            assert len(adopted) == 1, f"ranks adopt different views: {adopted}"
            self.view_epoch = adopted.pop()
            self.seen["adopted"] += 1
            for rep in group:
                self.roll_epoch(rep)
            return
        if control.keeps == world and len(set(control.epochs)) > 1 and len(completed) == world:
            self.seen["wait_to_adopt"] += 1

        leavers = [group[r] for r, d in decisions.items() if d.action is Action.LEAVE]
        for rep in leavers:
            assert all(rep.same_state(other) for other in group if other not in gone), "a leaver leaves in sync"
        switching = any(d.action is Action.SWITCH for d in decisions.values())
        if gone:
            # whoever decided to stay tries the next step in the broken group: it fails
            for r, d in decisions.items():
                if d.action in (Action.STAY, Action.DEFER):
                    self.roll_epoch(group[r])
                    self.fail_step(group[r])
                    switching = True
        for rep in group:
            self.roll_epoch(rep)
        if switching:
            self.switch(left=leavers, gone=gone, newer=bool(gone) or len(completed) < world)

    def fail_step(self, rep: Replica) -> None:
        if self.finishing:
            rep.freshness, rep.unfinished = PENDING, [x.node for x in self.group]
        else:
            rep.sampler.abort_step()
            rep.freshness = ABORTED

    def check_lockstep(self, decisions: dict[int, Decision], completed: set[int]) -> None:
        ok = {r: d for r, d in decisions.items() if r in completed}
        others = {(d.action, d.exclude, d.newer) for d in ok.values() if d.action is not Action.LEAVE}
        assert len(others) <= 1, f"ranks that completed the step decided differently: {ok}"

    def roll_epoch(self, rep: Replica) -> None:
        if rep.sampler.steps_remaining() == 0 and rep.sampler.epoch < EPOCHS:
            rep.sampler.set_epoch(rep.sampler.epoch + 1)  # Lightning's next epoch start

    # -- a switch -------------------------------------------------------------------
    def switch(self, *, left: list[Replica], gone: list[Replica], newer: bool) -> None:
        for rep in gone:
            if self.rng.random() < 0.5 and len(self.group) > 2:  # sidelined, and back later
                rep.stale, rep.founder, rep.freshness, rep.unfinished = True, False, NONE, None
                rep.ledger.forget(rep.sampler.epoch)
                self.pending.append(rep)
        for rep in left:
            rep.founder = False
        staying = [rep for rep in self.group if rep not in left and rep not in gone]
        self.view_epoch = max(self.view_epoch + (1 if newer or self.pending else 0), *(r.known_epoch for r in staying))
        if not staying:  # nobody trained on: the rest would be orphaned; end the sequence here
            self.group = []
            return
        self.group = staying + self.pending
        self.pending = []
        for rep in self.group:
            rep.known_epoch, rep.keeps = self.view_epoch, True
        self.sync()

    def sync(self) -> None:
        world = len(self.group)
        claims = [Claim.of(rep.freshness, rep.commits) for rep in self.group]
        decoded = Claim.decode_all(summed([c.encode(r, world) for r, c in enumerate(claims)]))
        assert decoded == claims
        plans = [plan_sync(decoded, r, stale=rep.stale) for r, rep in enumerate(self.group)]
        assert len({(p.action, p.holders, p.source, p.admits) for p in plans}) == 1, f"ranks planned differently: {plans}"
        plan = plans[0]
        self.seen[plan.action.value] += 1
        if plan.action is SyncAction.RETRY:
            # the finishing ranks give their step up (no update) and every
            # rank regroups the same members: the plan of the claims left
            assert any(rep.unfinished for rep in self.group)
            for rep in self.group:
                if rep.unfinished is not None:
                    rep.sampler.abort_step()
                    rep.freshness, rep.unfinished = ABORTED, None
            self.sync()
            return
        if plan.action is SyncAction.FINISH:
            # every rank holds the same failed step: the survivors' gradients
            # make its update, and the ranks gone take their samples back
            nodes = [rep.node for rep in self.group]
            assert len({tuple(rep.unfinished or ()) for rep in self.group}) == 1, "the same step everywhere"
            for rep in self.group:
                lost = [r for r, node in enumerate(rep.unfinished) if node not in nodes]
                assert set(nodes) <= set(rep.unfinished), "nobody new finishes a step"
                kept = [r for r in range(len(rep.unfinished)) if r not in lost]
                if not any(rep.sampler.batch_for(0, r) for r in kept):
                    # every sample of the step was on the ranks gone: nothing
                    # to apply, the step fails (every rank alike)
                    rep.sampler.abort_step()
                    rep.unfinished = None
                    self.seen["finish_nothing_left"] += 1
                    continue
                trained = rep.sampler.commit_step(lost)
                rep.history.append((rep.sampler.epoch, tuple(trained)))
                rep.ledger.record(rep.sampler.epoch, trained)
                rep.commits += 1
                rep.unfinished = None
                self.roll_epoch(rep)
                if lost:
                    self.seen["finish_without"] += 1
        trained = {rep.freshness > NONE for rep in self.group}
        assert plan.admits == (trained == {True, False}), "admits: someone with state meets someone without"
        if plan.admits:
            self.seen["admits"] += 1
        if plan.action is SyncAction.PULL:
            src = self.group[plan.holders[0]]
            assert all(self.group[h].same_state(src) for h in plan.holders), "holders are replicas"
            for r, rep in enumerate(self.group):
                if r not in plan.holders:
                    self.load(rep, src)
        elif plan.action is SyncAction.BROADCAST:
            src = self.group[plan.source]
            for r, (rep, p) in enumerate(zip(self.group, plans, strict=True)):
                if r == plan.source:
                    continue
                rep.history = list(src.history)  # the module tensors go to everyone
                if p.adopt_aborted_step:
                    self.seen["adopt_aborted_step"] += 1
                    rep.ledger.record(rep.sampler.epoch, rep.sampler.block(0))
                if p.receive:
                    self.load(rep, src)
        else:
            assert plan.action in (SyncAction.NOTHING, SyncAction.FINISH), plan
        for r, rep in enumerate(self.group):
            rep.sampler.reconfigure(r, world)
            rep.freshness, rep.stale = APPLIED, False
            assert rep.unfinished is None
            assert rep.same_state(self.group[0]), f"replica {rep.node} differs after {plan}"

    @staticmethod
    def load(rep: Replica, src: Replica) -> None:
        rep.history = list(src.history)
        rep.sampler.load_state_dict(src.sampler.state_dict())
        rep.commits = src.commits


def covers_once(history: list[tuple[int, tuple[int, ...]]], epoch: int) -> bool:
    counts = Counter(i for e, block in history if e == epoch for i in block)
    return sorted(counts) == list(range(N)) and set(counts.values()) == {1}


def run(seed: int) -> Cluster:
    rng = random.Random(seed)
    batch = rng.choice([None, 2, 3, 5])
    cluster = Cluster(rng, rng.randint(1, 4), batch, None if batch else rng.choice([4, 7, 10]))
    founders = list(cluster.group)
    for _ in range(MAX_STEPS):
        if not cluster.group or cluster.done:
            break
        cluster.step()
    if not cluster.group:
        return cluster  # every member died or left: nothing left to check
    assert cluster.done, f"seed {seed}: {EPOCHS} epochs not done in {MAX_STEPS} steps"
    history = cluster.group[0].history
    for epoch in range(EPOCHS):
        assert covers_once(history, epoch), f"seed {seed}: epoch {epoch} not trained exactly once"
    for rep in founders:
        if rep.founder and rep in cluster.group:
            for epoch in range(EPOCHS):
                rep.ledger.assert_exact_cover(epoch)
    return cluster


@pytest.mark.parametrize("chunk", range(6))
def test_random_sequences_keep_lockstep_identical_replicas_and_exactly_once(chunk: int) -> None:
    per = SEQUENCES // 6
    for seed in range(chunk * per, (chunk + 1) * per):
        run(seed)


def test_the_random_sequences_reach_every_decision_and_plan() -> None:
    seen: Counter[str] = Counter()
    for seed in range(SEQUENCES):
        seen += run(seed).seen
    wanted = {a.value for a in Action} | {a.value for a in SyncAction} - {SyncAction.ORPHANED.value}
    assert wanted <= set(seen), f"never reached: {wanted - set(seen)}"
    assert seen["adopt_aborted_step"] > 0
    assert seen["admits"] > 0
    assert seen["finish_without"] > 0
    assert seen["adopted"] > 0 and seen["wait_to_adopt"] > 0
