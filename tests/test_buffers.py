"""BufferSync in one process: what the SUM of every rank's outgoing flats
gives back (rank 0's buffers, bit for bit, in every dtype), and the restore
after a failed step.  The multi-process path is test_dropin's ``norm`` feature."""

from __future__ import annotations

import math

import torch

from chaos_lightning.strategy.buffers import BufferSync


def ranks_buffers(k: int) -> list[list[torch.Tensor]]:
    """``k`` replicas of one module's buffers, each moved differently (as a
    training forward moves them), with the awkward values a sum must keep."""
    out = []
    for r in range(k):
        g = torch.Generator().manual_seed(r)
        mean = torch.randn(5, generator=g)
        mean[0] = math.inf if r == 0 else 1.0
        mean[1] = math.nan if r == 0 else 2.0
        mean[2] = -0.0 if r == 0 else 3.0
        out.append([
            mean,
            torch.rand(5, generator=g, dtype=torch.float64),
            torch.tensor(10 + r, dtype=torch.int64),  # num_batches_tracked
            torch.tensor([True, r == 0, False]),
            torch.randn(2, 3, generator=g).to(torch.bfloat16),
        ])
    return out


def all_reduce_sum(per_rank: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """What SUM over the group gives each rank (gloo's result is the same on every rank)."""
    total = [sum(flats[i] for flats in per_rank) for i in range(len(per_rank[0]))]
    return [[t.clone() for t in total] for _ in per_rank]


def raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_every_rank_ends_with_rank0s_buffers_in_every_dtype():
    replicas = ranks_buffers(3)
    expected = [b.clone() for b in replicas[0]]
    syncs = [BufferSync() for _ in replicas]
    outgoing = [s.outgoing(bufs, rank0=r == 0) for r, (s, bufs) in enumerate(zip(syncs, replicas))]
    assert all(torch.count_nonzero(f) == 0 for flats in outgoing[1:] for f in flats), "only rank 0 contributes"
    for s, bufs, flats in zip(syncs, replicas, all_reduce_sum(outgoing)):
        s.incoming(bufs, flats)
    for bufs in replicas:
        for got, want in zip(bufs, expected):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.allclose(got.double(), want.double(), equal_nan=True, rtol=0, atol=0), (got, want)
    # bit-identical across replicas (the replica hash reads bytes): -0.0 + 0.0 is +0.0 on every rank alike
    for bufs in replicas[1:]:
        assert [raw(a) for a in bufs] == [raw(b) for b in replicas[0]]


def test_a_failed_step_restores_the_buffers_of_the_last_sync():
    bufs = ranks_buffers(1)[0]
    sync = BufferSync()
    assert not sync.restore(bufs), "nothing synced yet: nothing to restore"
    sync.snapshot(bufs)
    kept = [b.clone() for b in bufs]
    with torch.no_grad():  # the failed step's forward moves them
        bufs[0].add_(1.0)
        bufs[2].add_(1)
        bufs[3].logical_not_()
    assert sync.restore(bufs)
    for got, want in zip(bufs, kept):
        assert torch.allclose(got.double(), want.double(), equal_nan=True, rtol=0, atol=0)
    # a reduction that succeeded, in a batch that then failed (manual
    # optimization's second reduction): the whole batch is undone
    with torch.no_grad():
        bufs[1].mul_(2)
    sync.incoming(bufs, sync.outgoing(bufs, rank0=True))
    with torch.no_grad():
        bufs[1].add_(5)
    assert sync.restore(bufs)
    assert torch.equal(bufs[1], kept[1])
    # once its step commits, a sync's result is what a later failure restores
    with torch.no_grad():
        bufs[1].mul_(2)
    sync.incoming(bufs, sync.outgoing(bufs, rank0=True))
    sync.commit()
    after = bufs[1].clone()
    with torch.no_grad():
        bufs[1].add_(5)
    assert sync.restore(bufs)
    assert torch.equal(bufs[1], after)


def test_a_snapshot_of_other_buffers_is_not_restored():
    sync = BufferSync()
    sync.snapshot([torch.zeros(3)])
    assert not sync.restore([torch.zeros(4)])
    assert not sync.restore([torch.zeros(3, dtype=torch.float64)])


def test_no_buffers_add_nothing_to_the_launch():
    sync = BufferSync()
    assert sync.outgoing([], rank0=True) == [] and sync.outgoing([], rank0=False) == []
    sync.incoming([], [])
    assert sync.restore([])
