"""The stop-free join's local parts, in one process: the step log and its
replay, the parameter digest, the shadow layout of the sampler.

A "member" trains a model from a snapshot; a "shadow" with other (garbage)
parameters and optimizer state runs the same steps on the same averaged
gradients (as the all-reduce gives it), recording them; after loading the
snapshot and replaying, it must hold the member's parameters and optimizer
state bit for bit.  Clipping and a learning-rate schedule run inside the
recorded span, as Lightning's closure runs them, and one step is taken the
AMP scaler's way (no closure).
"""

from __future__ import annotations

import copy

import pytest
import torch

from chaos_lightning.strategy.sampler import ElasticSampler
from chaos_lightning.strategy.shadow import Background, StepLog, param_digest


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _grads(step: int, model: torch.nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def _step(opt: torch.optim.Optimizer, model: torch.nn.Module, grads: list[torch.Tensor], *, closure: bool) -> None:
    """One step the way Lightning takes it: gradients set, clipped inside the
    closure (after the step pre-hooks ran), or set before a closure-less step."""

    def fill() -> torch.Tensor:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        return torch.zeros(())

    if closure:
        opt.step(closure=fill)
    else:
        fill()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.02, amsgrad=True),
], ids=["adam", "sgd-nesterov", "adamw-amsgrad"])
def test_a_shadow_that_replays_its_recorded_steps_on_the_snapshot_is_bit_identical(make_opt):
    member = _model(0)
    member_opt = make_opt(member.parameters())
    sched = torch.optim.lr_scheduler.StepLR(member_opt, step_size=2, gamma=0.5)
    for s in range(3):  # the members trained before the join
        _step(member_opt, member, _grads(s, member), closure=True)
        sched.step()
    # the switch: the holders copy their state, the shadow loads the small state
    snapshot_params = [p.detach().clone() for p in member.parameters()]
    snapshot_opt = copy.deepcopy(member_opt.state_dict())
    shadow = _model(7)  # its own (wrong) parameters
    shadow_opt = make_opt(shadow.parameters())
    shadow_opt.load_state_dict({"state": {}, "param_groups": member_opt.state_dict()["param_groups"]})
    shadow_sched = torch.optim.lr_scheduler.StepLR(shadow_opt, step_size=2, gamma=0.5)
    shadow_sched.load_state_dict(sched.state_dict())
    log = StepLog([shadow_opt])
    for s in range(3, 9):  # both train on the same averaged gradients
        closure = s != 5  # one step the scaler's way
        _step(member_opt, member, _grads(s, member), closure=closure)
        _step(shadow_opt, shadow, _grads(s, shadow), closure=closure)
        sched.step()
        shadow_sched.step()
    assert log.steps == 6 and log.bytes == 6 * sum(p.numel() * 4 for p in shadow.parameters())
    assert param_digest(list(shadow.parameters())) != param_digest(list(member.parameters()))
    replayed = log.catch_up(list(shadow.parameters()), snapshot_params, [snapshot_opt])
    assert replayed == 6 and log.steps == 0
    for a, b in zip(member.parameters(), shadow.parameters(), strict=True):
        assert torch.equal(a, b)
    assert param_digest(list(shadow.parameters())) == param_digest(list(member.parameters()))
    # the optimizer state too, and the live learning rate (the scheduler's), not the replayed one
    ms, ss = member_opt.state_dict(), shadow_opt.state_dict()
    assert ms["param_groups"] == ss["param_groups"]
    for k, state in ms["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ss["state"][k][name])), name
    # and the next steps stay identical, unrecorded
    _step(member_opt, member, _grads(9, member), closure=True)
    _step(shadow_opt, shadow, _grads(9, shadow), closure=True)
    assert log.steps == 0
    assert param_digest(list(shadow.parameters())) == param_digest(list(member.parameters()))


def test_the_digest_sees_one_flipped_bit_and_the_order_of_tensors():
    a = [torch.randn(1000), torch.randn(10, 10)]
    b = [t.clone() for t in a]
    assert param_digest(a) == param_digest(b)
    b[0].view(torch.int32)[17] ^= 1
    assert param_digest(a) != param_digest(b)
    assert param_digest(a) != param_digest(a[::-1])
    half = [t.to(torch.bfloat16) for t in a]
    assert 0 < param_digest(half) < 2**40


def test_a_background_pull_reports_a_failure_as_none():
    def boom() -> None:
        raise OSError("refused")

    pull = Background(boom)
    assert pull.wait(5) and pull.result() is None
    ok = Background(lambda: 42)
    assert ok.wait(5) and ok.result() == 42 and ok.seconds is not None


def test_shadow_ranks_take_no_share_and_run_two_of_the_first_contributors_samples():
    """3 members and a shadow at rank 2: the block is the three members'
    (capacity 3 x batch), split over ranks 0, 1, 3; the shadow's batch is
    empty (weight 0) and its stand-in is the first two samples of rank 0's."""
    samplers = [ElasticSampler(60, batch_size=4, rank=r, world_size=4, seed=3) for r in range(4)]
    for r, s in enumerate(samplers):
        s.reconfigure(r, 4, shadows=(2,))
    s0 = samplers[0]
    assert s0.capacity == 12 and s0.steps_remaining() == 5
    slices = s0.step_slices()
    assert [len(x) for x in slices] == [4, 4, 0, 4]
    assert samplers[2].batch_for() == [] and samplers[2].loss_scale() == 0.0
    from chaos_lightning.strategy.sampler import ElasticBatchSampler

    first = next(iter(ElasticBatchSampler(samplers[2], pad_empty=True)))
    assert first == slices[0][:2]
    # every sample once over the epoch, the shadow's stand-ins counted nowhere
    seen: list[int] = []
    while s0.steps_remaining():
        seen += s0.commit_step()
    assert sorted(seen) == list(range(60))
    with pytest.raises(ValueError):
        s0.reconfigure(0, 2, shadows=(0, 1))


class _ThreadGroup:
    """``world`` ranks in threads of this process; ``all_reduce`` combines
    every rank's tensor with the operation given (SUM, MAX, MIN), as gloo would."""

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self._barrier = threading.Barrier(world, timeout=10)
        self._slots: list[torch.Tensor | None] = [None] * world

    def rank_view(self, rank: int):
        from types import SimpleNamespace

        import torch.distributed as dist

        def all_reduce(t: torch.Tensor, *, abort, timeout, op=None) -> None:
            self._slots[rank] = t.clone()
            self._barrier.wait()
            stacked = torch.stack(self._slots)
            if op == dist.ReduceOp.MAX:
                out = stacked.max(0).values
            elif op == dist.ReduceOp.MIN:
                out = stacked.min(0).values
            else:
                out = stacked.sum(0)
            self._barrier.wait()
            t.copy_(out)

        return SimpleNamespace(rank=rank, world_size=self.world, all_reduce=all_reduce)


@pytest.mark.parametrize("name, expected", [("mean", 2.0), ("sum", 6.0), ("max", 3.0), ("min", 1.0)])
def test_a_shadows_value_counts_in_no_reduction(name, expected):
    """Ranks 0, 1, 3 log 1, 2, 3; rank 2 is a shadow whose value (100, on a
    stand-in batch and wrong parameters) must not count: the mean is over
    the three others, and max, min and sum ignore it."""
    import threading

    from chaos_lightning.strategy import collectives

    group = _ThreadGroup(4)
    values = [1.0, 2.0, 100.0, 3.0]
    out: list[torch.Tensor | None] = [None] * 4

    def rank(r: int) -> None:
        out[r] = collectives.reduce(group.rank_view(r), torch.tensor([values[r]]), name, None, 10, absent=r == 2)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(o is not None and o.shape == (1,) and o.item() == expected for o in out), out
