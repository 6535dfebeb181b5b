"""Scenarios for the elastic sampler: every sample of an epoch trained exactly
once, and every rank running the same number of steps, whatever joins, leaves
and crashes happen between (and during) steps.

All ranks of a cluster are simulated in one process, one sampler object per
rank, driven exactly as ChaosStrategy drives them: the same calls, in the same
order, on every member; a joiner starts from another member's state_dict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgpack
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from chaos_lightning.strategy.sampler import (
    ElasticBatchSampler,
    ElasticSampler,
    Ledger,
    StaleLayoutError,
    split_sizes,
)


def wire_roundtrip(state: dict) -> dict:
    """What a joiner receives: the state after msgpack encoding and decoding."""
    return msgpack.unpackb(msgpack.packb(state), raw=False)


@dataclass
class Cluster:
    """A simulated view: one sampler per rank plus the DataLoader-side iterators."""

    members: list[ElasticSampler]
    ledger: Ledger
    iters: list = field(default_factory=list)
    epochs_checked: list[int] = field(default_factory=list)
    weights: tuple[int, ...] | None = None  # adaptive shares (None: equal)

    @classmethod
    def start(cls, n: int, world: int, **kw) -> Cluster:
        members = [ElasticSampler(n, rank=r, world_size=world, **kw) for r in range(world)]
        c = cls(members, Ledger(n))
        c.relayout()
        return c

    @property
    def lead(self) -> ElasticSampler:
        return self.members[0]

    def relayout(self) -> None:
        """A view switch (equal shares) or new ``weights`` for the same
        members: every member re-splits the rest; the DataLoaders are re-iterated."""
        if self.weights is not None and len(self.weights) != len(self.members):
            self.weights = None  # the members changed: shares start equal again
        for r, m in enumerate(self.members):
            m.reconfigure(r, len(self.members), weights=self.weights)
        self.iters = [iter(ElasticBatchSampler(m)) for m in self.members]
        self.assert_full_plans_agree()

    def assert_full_plans_agree(self) -> None:
        """Each rank's whole plan for the layout: same step count, disjoint, what remains."""
        plans = [list(ElasticBatchSampler(m)) for m in self.members]
        assert {len(p) for p in plans} == {self.lead.steps_remaining()}
        flat = sorted(x for p in plans for b in p for x in b)
        assert len(flat) == len(set(flat))
        assert [sum(map(len, p)) for p in plans] == [len(m) for m in self.members]
        if not self.lead.drop_last:
            assert len(flat) == self.lead.samples_remaining()

    def assert_lockstep(self) -> None:
        steps = {m.steps_remaining() for m in self.members}
        assert len(steps) == 1, f"ranks disagree on steps remaining: {steps}"
        assert {len(ElasticBatchSampler(m)) for m in self.members} == steps
        states = {msgpack.packb(m.state_dict()) for m in self.members}
        assert len(states) == 1, "members' shared sampler state diverged"

    def run_batches(self) -> list[list[int]]:
        """Every rank fetches its batch for the step about to run and checks it."""
        self.assert_lockstep()
        batches = [next(it) for it in self.iters]
        lead = self.lead
        block = lead.block(0)
        assert block, "a step was run with nothing left in the epoch"
        assert batches == lead.step_slices(0)
        assert [m.batch_for(0) for m in self.members] == batches
        assert [x for b in batches for x in b] == block  # disjoint slices covering the block
        for r, b in enumerate(batches):
            assert len(b) <= lead.per_rank_batch_size(r) + 2  # a short block's slice: up to two moved to it
        sizes = [len(b) for b in batches]
        if len(block) >= 2 and not lead.singles:
            assert 1 not in sizes, sizes  # BatchNorm refuses a batch of one: nobody gets one the user did not ask for
        # each slice within three samples of its (weighted) share: one for the
        # rounding, at most two moved to it off slices of one
        weights = self.weights or [1] * len(sizes)
        assert all(abs(n - len(block) * w / sum(weights)) < 3 for n, w in zip(sizes, weights)), sizes
        if self.weights is None:
            assert max(sizes) - min(x for x in sizes if x) <= 1  # a short block is split evenly, never padded
        return batches

    def step(self, lost: list[int] | None = None) -> None:
        """A step that commits; ``lost`` ranks' gradients are missing from the update."""
        if self.lead.steps_remaining() == 0:
            # drop_last with a world whose step outgrew what is left: the
            # epoch has no step to run (Lightning sees len() == 0 and skips it).
            self.maybe_next_epoch()
            return
        self.run_batches()
        survivors = [m for r, m in enumerate(self.members) if r not in (lost or [])]
        trained = [m.commit_step(lost_ranks=lost or []) for m in survivors]
        assert all(t == trained[0] for t in trained)
        self.ledger.record(self.lead.epoch, trained[0])
        if lost:
            self.members = survivors
            self.relayout()
        self.maybe_next_epoch()

    def crash_mid_step(self, victim: int) -> None:
        """``victim`` dies during the all-reduce: no update anywhere, survivors go on."""
        if self.lead.steps_remaining() == 0:
            self.maybe_next_epoch()
            return
        self.run_batches()
        aborted = self.lead.block(0)
        del self.members[victim]
        for m in self.members:
            m.abort_step()
        self.relayout()
        # The failed step's samples are the first ones served again.
        # (bounded by the steps left: with drop_last a smaller world may drop
        # the tail, and an unbounded loop here once hung CI)
        again: list[int] = []
        for k in range(self.lead.steps_remaining()):
            again += self.lead.block(k)
            if len(again) >= len(aborted):
                break
        shown = min(len(again), len(aborted))
        assert again[:shown] == aborted[:shown]
        if not self.lead.drop_last:
            assert shown == len(aborted)

    def join(self, position: int, donor: int) -> None:
        # Deliberately wrong constructor settings: the state must carry them all.
        joiner = ElasticSampler(self.lead.num_samples, 1, seed=12345, shuffle=not self.lead.shuffle)
        joiner.load_state_dict(wire_roundtrip(self.members[donor].state_dict()))
        self.members.insert(position, joiner)
        self.relayout()

    def leave(self, who: int) -> None:
        del self.members[who]
        self.relayout()

    def reshare(self, seed: int) -> None:
        """Adaptive shares: the same members, the block split by new weights."""
        rng = random.Random(seed)
        self.weights = tuple(rng.choice([0, 1, 2, 5, 4096, 65536]) for _ in self.members)
        if not any(self.weights):
            self.weights = None
        self.relayout()

    def maybe_next_epoch(self) -> None:
        if self.lead.steps_remaining() > 0:
            return
        self.assert_lockstep()
        epoch = self.lead.epoch
        if self.lead.drop_last:
            assert not self.ledger.duplicates(epoch)
            assert len(self.ledger.missing(epoch)) < self.lead.capacity
        else:
            self.ledger.assert_exact_cover(epoch)
        self.epochs_checked.append(epoch)
        for m in self.members:
            m.set_epoch(epoch + 1)
        self.iters = [iter(ElasticBatchSampler(m)) for m in self.members]
        self.assert_full_plans_agree()

    def finish_epoch(self) -> None:
        epoch = self.lead.epoch
        while self.lead.epoch == epoch:
            self.step()


# -- static world ------------------------------------------------------------------


@pytest.mark.parametrize("n, world, batch", [(100, 4, 8), (97, 4, 8), (7, 3, 5), (1000, 7, 13)])
def test_static_world_every_sample_once_same_steps_everywhere(n, world, batch):
    c = Cluster.start(n, world, batch_size=batch, seed=3)
    expected_steps = -(-n // (world * batch))
    assert c.lead.steps_remaining() == expected_steps
    c.finish_epoch()
    c.ledger.assert_exact_cover(0)
    assert c.epochs_checked == [0]


def test_short_last_block_is_split_evenly_without_padding():
    # 4 ranks x 8 = 32 per step; 104 = 3 full steps + a tail of 8.
    members = [ElasticSampler(104, 8, rank=r, world_size=4) for r in range(4)]
    batches = [list(ElasticBatchSampler(m)) for m in members]
    assert {len(b) for b in batches} == {4}
    assert [len(b[-1]) for b in batches] == [2, 2, 2, 2]
    flat = [x for b in batches for step in b for x in step]
    assert sorted(flat) == list(range(104))
    # The flat sampler's length is this rank's index count, not a padded one.
    assert [len(m) for m in members] == [26, 26, 26, 26]
    # 106 = 3 x 32 + 10: the larger slices go first.
    tail = ElasticSampler(106, 8, rank=0, world_size=4).step_slices(3)
    assert [len(s) for s in tail] == [3, 3, 2, 2]
    assert [len(ElasticSampler(106, 8, rank=r, world_size=4)) for r in range(4)] == [27, 27, 26, 26]


@pytest.mark.parametrize(("n", "tail"), [(100, [0, 2, 0, 2]), (102, [2, 2, 0, 2]), (97, [1, 0, 0, 0]), (99, [0, 3, 0, 0])])
def test_a_short_block_leaves_no_rank_a_batch_of_one(n, tail):
    """A tail of 4 over 4 ranks is not 1, 1, 1, 1: a ``BatchNorm`` in
    training mode refuses a batch of one (a churned run made such tails from
    a dataset that divides evenly at every world size it ran).  The one goes
    to the next rank with a slice; the rank left empty runs a stand-in of two
    samples weighted 0, and every sample is still trained once."""
    members = [ElasticSampler(n, 8, rank=r, world_size=4) for r in range(4)]
    plans = [list(ElasticBatchSampler(m, pad_empty=True)) for m in members]
    assert [len(m.step_slices(3)[r]) for r, m in enumerate(members)] == tail
    assert all(len(p[3]) >= 2 for p in plans) or n == 97  # 97: a tail of one sample is one sample
    assert [m.loss_scale(3) > 0 for m in members] == [x > 0 for x in tail]
    trained = sorted(x for step in range(4) for piece in members[0].step_slices(step) for x in piece)
    assert trained == list(range(n))


def test_a_batch_of_one_the_user_asked_for_is_kept():
    """``batch_size=1`` (or a global batch below twice the ranks): slices of
    one are the user's own choice, as in plain DDP, and stay."""
    assert [len(s) for s in ElasticSampler(100, 1, world_size=4).step_slices(0)] == [1, 1, 1, 1]
    assert [len(s) for s in ElasticSampler(100, global_batch_size=5, world_size=4).step_slices(0)] == [2, 1, 1, 1]


def test_fewer_samples_than_ranks_gives_empty_batches_that_still_run():
    members = [ElasticSampler(3, 4, rank=r, world_size=5) for r in range(5)]
    batches = [list(ElasticBatchSampler(m)) for m in members]
    # One step for everyone; the ranks with no slice get an empty batch but
    # still run it.  Three slices of one would be 1, 1, 1, 0, 0: the ones
    # move on (a BatchNorm refuses a batch of one).
    assert [len(b) for b in batches] == [1] * 5
    assert [len(b[0]) for b in batches] == [0, 3, 0, 0, 0]
    assert [m.loss_scale() for m in members] == [0.0, 5.0, 0.0, 0.0, 0.0]
    assert [len(m) for m in members] == [0, 3, 0, 0, 0]
    # pad_empty hands the idle ranks real samples (another rank's) to weight 0: two of them.
    padded = list(ElasticBatchSampler(members[4], pad_empty=True))
    assert padded == [members[0].block(0)[:2]]


def test_loss_scales_make_ddp_average_the_block_mean():
    members = [ElasticSampler(10, 3, rank=r, world_size=3) for r in range(3)]
    for step in (0, 1):  # a full block, then a tail of one sample
        block = members[0].block(step)
        # Per-sample "loss" = its index; each rank's loss is the mean of its batch.
        means = [sum(b) / len(b) if b else 0.0 for b in (m.batch_for(step) for m in members)]
        scaled = [m.loss_scale(step) * mean for m, mean in zip(members, means)]
        assert sum(scaled) / 3 == pytest.approx(sum(block) / len(block))  # what DDP's average yields
    assert [m.loss_scale(1) for m in members] == [3.0, 0.0, 0.0]


def test_empty_dataset_has_no_steps():
    m = ElasticSampler(0, 4, world_size=2)
    assert m.steps_remaining() == 0 and len(m) == 0 and list(ElasticBatchSampler(m)) == []


def test_drop_last_drops_only_the_short_tail():
    c = Cluster.start(100, 4, batch_size=8, drop_last=True)
    assert c.lead.steps_remaining() == 3
    c.finish_epoch()
    assert not c.ledger.duplicates(0) and len(c.ledger.missing(0)) == 4


# -- view changes ------------------------------------------------------------------


def test_three_nodes_one_killed_mid_step_every_sample_trained_once():
    c = Cluster.start(200, 3, batch_size=7, seed=11)
    c.step()
    c.step()
    c.crash_mid_step(victim=1)
    assert len(c.members) == 2
    c.step()
    c.finish_epoch()
    assert c.epochs_checked == [0]


def test_node_vanishes_after_commit_its_slice_is_trained_later_exactly_once():
    c = Cluster.start(120, 4, batch_size=5)
    c.step()
    lost_slice = c.lead.batch_for(0, rank=2)
    c.step(lost=[2])
    assert c.lead.returned == lost_slice
    assert c.lead.block(0)[: len(lost_slice)] == lost_slice
    c.finish_epoch()
    assert c.epochs_checked == [0]


def test_joiner_mid_epoch_continues_from_a_members_state():
    c = Cluster.start(150, 2, batch_size=4, seed=5)
    for _ in range(3):
        c.step()
    c.join(position=1, donor=0)
    assert len(c.members) == 3 and c.lead.capacity == 12
    c.step()
    c.leave(0)
    c.finish_epoch()
    c.finish_epoch()
    assert c.epochs_checked == [0, 1]


def test_old_iterator_refuses_to_continue_after_a_view_switch():
    m = ElasticSampler(50, 4, rank=0, world_size=2)
    it = iter(ElasticBatchSampler(m))
    next(it)
    m.commit_step()
    next(it)  # plain commits are what the iterator planned for
    m.reconfigure(0, 3)
    with pytest.raises(StaleLayoutError):
        next(it)
    # A fresh iterator follows the new layout from the committed cursor.
    assert next(iter(ElasticBatchSampler(m))) == m.batch_for(0)


def test_abort_serves_the_same_block_again():
    m = ElasticSampler(50, 4, rank=0, world_size=2, seed=9)
    m.commit_step()
    before = m.block(0)
    m.abort_step()
    assert m.block(0) == before
    m.reconfigure(0, 1)  # the survivor splits the same samples over two steps
    assert m.block(0) + m.block(1) == before


@st.composite
def churn(draw):
    n = draw(st.integers(1, 500))
    world = draw(st.integers(1, 6))
    if draw(st.booleans()):
        batch = {"global_batch_size": draw(st.integers(1, 24))}
    else:
        batch = {"batch_size": draw(st.integers(1, 12))}
    kw = dict(
        batch,
        seed=draw(st.integers(0, 2**31)),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.integers(0, 4)) == 0,
    )
    events = draw(
        st.lists(
            st.tuples(st.sampled_from(["steps", "join", "leave", "crash", "lose", "reshare"]), st.integers(0, 10**6)),
            max_size=30,
        )
    )
    return n, world, kw, events


@settings(max_examples=150, deadline=None, derandomize=True)
@given(churn())
def test_churn_every_epoch_is_an_exact_cover_and_ranks_stay_in_lockstep(case):
    n, world, kw, events = case
    c = Cluster.start(n, world, **kw)
    for kind, arg in events:
        size = len(c.members)
        if kind == "steps":
            for _ in range(arg % 5):
                c.step()
        elif kind == "join" and size < 8:
            c.join(position=arg % (size + 1), donor=(arg // 7) % size)
        elif kind == "leave" and size > 1:
            c.leave(arg % size)
        elif kind == "crash" and size > 1:
            c.crash_mid_step(arg % size)
        elif kind == "lose" and size > 1 and c.lead.steps_remaining():
            c.step(lost=[arg % size])
        elif kind == "reshare":
            c.reshare(arg)
        c.assert_lockstep()
    c.finish_epoch()
    event(f"epochs completed: {min(len(c.epochs_checked), 3)}+")
    for kind in {k for k, _ in events}:
        event(f"had {kind}")
    assert c.epochs_checked and c.epochs_checked[-1] == c.lead.epoch - 1


# -- state, epochs, modes --------------------------------------------------------


@given(world=st.integers(1, 5), steps=st.integers(1, 4), data=st.data())
@settings(max_examples=60, deadline=None)
def test_a_window_finished_without_some_ranks_hands_back_exactly_their_slices(world, steps, data):
    """A failed step finished by the survivors (gradient accumulation: one
    update over ``steps`` micro-batches): every block of the window is
    consumed, the lost ranks' slices of all of them come first in the queue,
    in order, and the epoch still trains every sample once."""
    lost = data.draw(st.sets(st.integers(0, world - 1), max_size=world - 1))
    m = ElasticSampler(97, 3, rank=0, world_size=world, seed=5)
    slices = [[m.batch_for(j, r) for r in range(world)] for j in range(steps)]
    trained = m.commit_steps(steps, lost)
    assert trained == [i for j in range(steps) for r in range(world) if r not in lost for i in slices[j][r]]
    back = [i for j in range(steps) for r in sorted(lost) for i in slices[j][r]]
    assert m.block(0)[: len(back)] == back[: len(m.block(0))]
    seen = list(trained)
    while m.steps_remaining():
        seen += m.commit_step()
    assert sorted(seen) == list(range(97))


def test_state_roundtrip_through_msgpack_continues_identically():
    a = ElasticSampler(300, 6, rank=1, world_size=3, seed=42)
    a.commit_step()
    a.commit_step(lost_ranks=[2])
    a.commit_step()
    state = wire_roundtrip(a.state_dict())
    assert state == a.state_dict()
    b = ElasticSampler(300, 1, seed=0)
    b.load_state_dict(state)
    b.reconfigure(1, 3)
    assert list(ElasticBatchSampler(b)) == list(ElasticBatchSampler(a))
    while a.steps_remaining():
        assert a.commit_step() == b.commit_step()
        assert a.state_dict() == b.state_dict()


def test_state_for_another_dataset_is_refused():
    m = ElasticSampler(10, 2)
    with pytest.raises(ValueError, match="samples"):
        m.load_state_dict(ElasticSampler(11, 2).state_dict())
    with pytest.raises(ValueError, match="version"):
        m.load_state_dict({**m.state_dict(), "version": 99})


def test_each_epoch_has_its_own_permutation_the_same_on_every_rank():
    def epoch_order(epoch: int, world: int) -> list[list[int]]:
        ms = [ElasticSampler(64, 4, rank=r, world_size=world, seed=7) for r in range(world)]
        for m in ms:
            m.set_epoch(epoch)
        return [m.block(k) for m in ms for k in range(ms[0].steps_remaining())]

    e0, e1 = epoch_order(0, 2), epoch_order(1, 2)
    assert e0 != e1
    assert all(b in e0 for b in epoch_order(0, 2))  # every rank's view of the blocks agrees
    perm0 = [x for b in e0[: len(e0) // 2] for x in b]
    g = torch.Generator()
    g.manual_seed(7)
    assert perm0 == torch.randperm(64, generator=g).tolist()  # DistributedSampler's recipe
    # The same epoch twice is a no-op: a resumed joiner keeps its cursor.
    m = ElasticSampler(64, 4, seed=7)
    m.commit_step()
    m.set_epoch(0)
    assert m.start == 4
    m.set_epoch(1)
    assert m.start == 0 and m.returned == []


def test_no_shuffle_is_sequential():
    members = [ElasticSampler(10, 2, rank=r, world_size=2, shuffle=False) for r in range(2)]
    # the tail of two is not split one and one (a BatchNorm refuses a batch of one)
    assert [list(ElasticBatchSampler(m)) for m in members] == [[[0, 1], [4, 5], []], [[2, 3], [6, 7], [8, 9]]]
    assert list(members[0]) == [0, 1, 4, 5]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 16, 20])
def test_global_batch_stays_constant_as_the_world_changes(world):
    m = ElasticSampler(1000, global_batch_size=16, world_size=world, rank=0)
    assert m.capacity == 16
    assert len(m.block(0)) == 16
    assert [len(m.batch_for(0, r)) for r in range(world)] == split_sizes(16, world)
    assert m.steps_remaining() == -(-1000 // 16)
    if world > 16:
        # More ranks than samples per step: the extra ranks idle (weight 0) every step.
        assert m.batch_for(0, world - 1) == [] and m.loss_scale(0, world - 1) == 0.0


def test_global_batch_mode_through_a_shrink():
    c = Cluster.start(203, 4, global_batch_size=10, seed=1)
    c.step()
    c.crash_mid_step(victim=3)
    assert c.lead.capacity == 10 and [len(b) for b in c.lead.step_slices(0)] == [4, 3, 3]
    c.join(position=0, donor=1)
    c.finish_epoch()
    assert c.epochs_checked == [0]


def test_constructor_needs_exactly_one_batch_setting():
    with pytest.raises(ValueError):
        ElasticSampler(10)
    with pytest.raises(ValueError):
        ElasticSampler(10, 2, global_batch_size=4)
    with pytest.raises(ValueError):
        ElasticSampler(10, 2, rank=2, world_size=2)
    assert ElasticSampler(list(range(7)), 2).num_samples == 7


def test_dataloader_with_the_batch_sampler_collates_and_lightning_sets_its_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(5))
    # 5 samples over 4 ranks x 2: one step split 2, 0, 3, 0 (2, 1, 1, 1 with the ones moved on).
    third = ElasticSampler(data, 2, rank=2, world_size=4, shuffle=False)
    assert [b[0].tolist() for b in DataLoader(data, batch_sampler=ElasticBatchSampler(third))] == [[2, 3, 4]]
    # 2 samples over 3 ranks: rank 2 is idle, yet must run the step; the
    # default collate cannot take [], so it gets two padded samples at weight 0.
    idle = ElasticSampler(TensorDataset(torch.arange(2)), 2, rank=2, world_size=3, shuffle=False)
    loader = DataLoader(data, batch_sampler=ElasticBatchSampler(idle, pad_empty=True))
    assert len(loader) == 1
    assert [b[0].tolist() for b in loader] == [[0, 1]] and idle.loss_scale() == 0.0
    _set_sampler_epoch(loader, 4)  # what Lightning's fit loop does at each epoch start
    assert idle.epoch == 4
