"""The state codec: msgpack structure plus tensors, no pickle; and its
one-source broadcast over a real two-rank gloo group."""

from __future__ import annotations

import msgpack
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chaos_lightning.strategy.state import UnsupportedState, broadcast_tree, pack_tree, unpack_tree


def sample_state() -> dict:
    return {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}, 1: {"momentum": torch.arange(5)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None, "amsgrad": False}],
        "mask": torch.tensor([True, False]),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "blob": b"\x00\x01",
        "name": "adam",
    }


def assert_same(a, b) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_keeps_types_keys_and_tensors():
    state = sample_state()
    meta, tensors = pack_tree(state)
    assert len(tensors) == 5
    assert_same(state, unpack_tree(meta, tensors))


def test_values_that_would_need_pickle_are_refused_with_their_path():
    with pytest.raises(UnsupportedState, match=r"state\.param_groups\[0\]\.fn: value of type function"):
        pack_tree({"param_groups": [{"fn": lambda x: x}]})
    with pytest.raises(UnsupportedState, match="dict key"):
        pack_tree({(1, 2): 3})


def test_malformed_metadata_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown extension record 9"):
        unpack_tree(msgpack.packb([msgpack.ExtType(9, b"")]), [])
    meta, tensors = pack_tree({"t": torch.zeros(2)})
    with pytest.raises(ValueError, match="metadata says"):
        unpack_tree(meta, [torch.zeros(3)])
    bad = msgpack.packb([msgpack.ExtType(1, msgpack.packb([0, [2], "object"]))])
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        unpack_tree(bad, [torch.zeros(2)])


def _rank(rank: int, path: str, out, received) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        got = broadcast_tree(sample_state() if rank == 0 else None, 0, rank)
        meta, tensors = pack_tree(got)
        out.put((rank, meta, [t.clone() for t in tensors]))
        # the tensors travel as shared memory handed over by this process:
        # it must outlive the parent's unpickling
        received.wait(45)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_broadcast_tree_delivers_an_identical_state_to_the_other_rank(tmp_path):
    torch.manual_seed(0)
    expected = sample_state()
    ctx = mp.get_context("spawn")
    out, received = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), out, received)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict((r, unpack_tree(m, t)) for r, m, t in (out.get(timeout=45) for _ in procs))
    finally:
        received.set()
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join()
    assert_same(results[0], results[1])
    assert results[1]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert_same(expected["name"], results[1]["name"])
