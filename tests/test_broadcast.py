"""The strategy's ``broadcast`` carries msgpack only, never pickle (issue 15).

Lightning's own ``broadcast`` is ``torch.distributed.broadcast_object_list``,
which unpickles whatever the source rank put on gloo's data channel (a
channel with no authentication of its own).  Here, in one process, with a
stand-in for the elastic process group that plays the other rank: what
Lightning 2.x broadcasts during a fit arrives intact (tuples as tuples);
anything else is refused on every rank with one clear error; bytes that are
not our encoding (a pickle among them) are refused and never unpickled; and
the strategy's ``broadcast`` no longer reaches ``broadcast_object_list``.
"""

from __future__ import annotations

import pathlib
import pickle
import threading
from types import SimpleNamespace

import msgpack
import pytest
import torch

from chaos_lightning.strategy import collectives
from chaos_lightning.strategy.collectives import BroadcastRefused, broadcast_object


pytestmark = pytest.mark.timeout(60)

#: what Lightning 2.6 broadcasts in a fit or a tune (see collectives' docstring)
LIGHTNING_VALUES = [
    None,  # ModelCheckpoint.dirpath with no logger, Trainer.log_dir without one
    "/tmp/run/lightning_logs/version_0/checkpoints",  # ModelCheckpoint.dirpath
    "/tmp/run/lightning_logs/version_0",  # Trainer.log_dir
    True, False,  # skip_time, Timer's should_stop, SaveConfigCallback's flags, LR finder's should_stop
    {"lr": [1e-5, 2e-5, 4.5e-5], "loss": [2.3, 2.1, float("inf")]},  # LR finder's results
    3, -7, 2**62, 0.25, b"\x00\xff", "",
    ("a", 1, (2.0, None)), [("x",), {"k": (1, 2)}], {1: "one", "two": [2]},
]


class PeerPG:
    """The elastic process group as rank ``rank`` sees it: every all-reduce
    adds ``wire``'s contribution (what the source rank put on the network;
    empty when this rank is the source) to this rank's tensor."""

    def __init__(self, rank: int, wire: bytes = b"", announced: int | None = None) -> None:
        self.rank, self.world_size = rank, 2
        self.wire = wire
        self.announced = len(wire) if announced is None else announced
        self.sent: list[bytes] = []
        self.calls = 0

    def all_reduce(self, t: torch.Tensor, *, abort, timeout, op=None) -> None:
        self.calls += 1
        if self.calls == 1:  # the size
            t += self.announced
        else:
            if self.wire:
                t += torch.frombuffer(bytearray(self.wire), dtype=torch.uint8)
            self.sent.append(bytes(t.numpy().tobytes()))


def across(obj):
    """``obj`` broadcast from rank 0: (what rank 0 returns, what rank 1 returns)."""
    src = PeerPG(0)
    at_src = broadcast_object(src, obj, 0, threading.Event(), 5.0)
    at_peer = broadcast_object(PeerPG(1, src.sent[0]), "rank 1's own", 0, threading.Event(), 5.0)
    return at_src, at_peer


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("value", LIGHTNING_VALUES, ids=repr)
def test_what_lightning_broadcasts_arrives_intact_tuples_as_tuples(value):
    at_src, at_peer = across(value)
    assert same(at_src, value) and same(at_peer, value), (at_src, at_peer)


@pytest.mark.parametrize("value,type_name", [
    (pathlib.PurePosixPath("/tmp/x"), "PurePosixPath"),
    (torch.ones(2), "Tensor"),
    ({"w": torch.ones(2)}, "dict"),
    (object(), "object"),
    ({1, 2}, "set"),
    ({1.5: "float key"}, "dict"),
])
def test_anything_else_is_refused_on_every_rank_with_one_clear_error(value, type_name):
    src = PeerPG(0)
    with pytest.raises(BroadcastRefused) as at_src:
        broadcast_object(src, value, 0, threading.Event(), 5.0)
    with pytest.raises(BroadcastRefused) as at_peer:
        broadcast_object(PeerPG(1, src.sent[0]), None, 0, threading.Event(), 5.0)
    msg = str(at_src.value)
    assert msg.startswith(f"chaos: broadcast of {type_name} refused: "), msg
    assert "only msgpack-able values cross the network" in msg
    assert str(at_peer.value) == msg  # the receiving rank raises the same error
    assert isinstance(at_src.value, TypeError)  # what Lightning's callers would see for a bad type


class _Boom:
    fired: list[str] = []

    def __reduce__(self):
        return (_Boom.fired.append, ("unpickled",))


@pytest.mark.parametrize("attack", ["pickle", "garbage", "tensor_ext", "oversize", "not_a_value"])
def test_bytes_from_the_network_that_are_not_our_encoding_are_refused_never_unpickled(attack):
    """What an on-path attacker could write into gloo's unauthenticated channel,
    or a broken source: a clear refusal, nothing executed, nothing huge allocated."""
    _Boom.fired.clear()
    wire = {
        "pickle": pickle.dumps([_Boom()]),
        "garbage": b"\xc1\xc1\xc1",
        # a value that names tensor 0, which a broadcast never carries
        "tensor_ext": msgpack.packb([0, msgpack.packb(msgpack.ExtType(1, msgpack.packb([0, [2], "float32"])))]),
        "oversize": b"x",
        "not_a_value": msgpack.packb([0, "a str where the packed value belongs"]),
    }[attack]
    announced = 2**40 if attack == "oversize" else None
    pg = PeerPG(1, wire, announced)
    with pytest.raises(BroadcastRefused, match="chaos: a broadcast"):
        broadcast_object(pg, None, 0, threading.Event(), 5.0)
    assert _Boom.fired == []
    if attack == "oversize":
        assert pg.calls == 1  # refused before allocating or receiving


def test_the_strategys_broadcast_never_reaches_the_pickled_path(monkeypatch):
    """Before, an object msgpack could not carry fell back to DDPStrategy's
    broadcast (``broadcast_object_list``: pickle).  Now the strategy and the
    Fabric strategy refuse it, alone or in a group, and carry the rest."""
    import torch.distributed as dist

    import lightning  # noqa: F401  (first, as in a user's script: it loads the strategies)

    from chaos_lightning.strategy.elastic import ElasticMember
    from chaos_lightning.strategy.fabric import ChaosFabricStrategy
    from chaos_lightning.strategy.strategy import ChaosStrategy

    def pickled(*a, **k):
        raise AssertionError("broadcast_object_list (pickle) was called")

    monkeypatch.setattr(dist, "broadcast_object_list", pickled)
    for cls in (ChaosStrategy, ChaosFabricStrategy):
        for pg in (SimpleNamespace(group=None), PeerPG(0)):  # alone, and rank 0 of a group
            if isinstance(pg, PeerPG):
                pg.group = object()
            me = SimpleNamespace(group=SimpleNamespace(pg=pg, abort=threading.Event()),
                                 config=SimpleNamespace(collective_timeout=5.0), newcomer_window=False)
            me._local_only = ElasticMember._local_only.__get__(me)
            me._user_broadcast = ElasticMember._user_broadcast.__get__(me)
            assert cls.broadcast(me, ("ckpt", None), 0) == ("ckpt", None)
            if isinstance(pg, PeerPG):
                pg.calls = 0
            with pytest.raises(BroadcastRefused, match="broadcast of PosixPath refused"):
                cls.broadcast(me, pathlib.Path("/tmp/x"), 0)


def test_a_failed_group_keeps_this_ranks_value():
    from chaos_lightning.strategy.process_group import CollectiveFailed

    class Broken(PeerPG):
        def all_reduce(self, t, *, abort, timeout, op=None):
            raise CollectiveFailed("peer gone")

    assert broadcast_object(Broken(1), "mine", 0, threading.Event(), 5.0) == "mine"
    assert collectives.MAX_BROADCAST_BYTES >= 1 << 20


class SharedSumPG:
    """Two ranks in two threads of this process: each ``all_reduce`` waits
    for both ranks' tensors and gives each their sum, as gloo would."""

    def __init__(self) -> None:
        self.world_size = 2
        self._barrier = threading.Barrier(2, timeout=10)
        self._slots: list[torch.Tensor | None] = [None, None]

    def rank_view(self, rank: int) -> SimpleNamespace:
        def all_reduce(t: torch.Tensor, *, abort, timeout, op=None) -> None:
            self._slots[rank] = t.clone()
            self._barrier.wait()
            total = self._slots[0] + self._slots[1]
            self._barrier.wait()
            t.copy_(total)

        return SimpleNamespace(rank=rank, world_size=2, all_reduce=all_reduce)


@pytest.mark.parametrize(
    "tensors",
    [
        [torch.tensor(3.5), torch.tensor(-1.0)],  # a SumMetric's state
        [torch.arange(3.0), torch.arange(5.0) * 2],  # a CatMetric's states of different lengths
        [torch.ones(2, 3, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64)],
        [torch.tensor([True, False]), torch.tensor([True])],
    ],
    ids=["scalar", "ragged-1d", "ragged-2d", "bool"],
)
def test_metric_states_of_any_shape_gather_in_rank_order(tensors: list[torch.Tensor]) -> None:
    """torchmetrics' ``dist_sync_fn`` contract, on the abortable group:
    every rank gets every rank's tensor, its own shape and dtype, in order."""
    pg = SharedSumPG()
    out: list[list[torch.Tensor] | None] = [None, None]

    def rank(r: int) -> None:
        out[r] = collectives.gather_uneven(pg.rank_view(r), tensors[r], abort=None, timeout=10)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for got in out:
        assert got is not None and len(got) == 2
        for mine, theirs in zip(got, tensors):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_all_gather_with_grads_sends_each_rank_the_gradient_of_its_rows() -> None:
    """``all_gather(..., sync_grads=True)`` (a contrastive loss over every
    rank's embeddings) on the abortable group: each rank's loss uses every
    row, and each rank's input gets the sum over ranks of its row's
    gradient, as one process computing every loss would give it."""
    pg = SharedSumPG()
    xs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 4.0])]
    ws = [torch.tensor([[1.0, 0.0, 2.0], [3.0, -1.0, 0.5]]), torch.tensor([[0.0, 1.0, 1.0], [-2.0, 4.0, 1.0]])]
    grads: list[torch.Tensor | None] = [None, None]
    rows: list[torch.Tensor | None] = [None, None]

    def rank(r: int) -> None:
        x = xs[r].clone().requires_grad_(True)
        y = collectives.all_gather_with_grad(pg.rank_view(r), x, None, 10)
        rows[r] = y.detach()
        ((y * ws[r]) ** 2).sum().backward()  # every rank's own loss over every rank's row
        grads[r] = x.grad

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    # one process, every loss: the reference gradients
    leaves = [x.clone().requires_grad_(True) for x in xs]
    stacked = torch.stack(leaves)
    sum(((stacked * w) ** 2).sum() for w in ws).backward()
    for r in range(2):
        assert torch.equal(rows[r], torch.stack(xs)), rows[r]
        assert grads[r] is not None and torch.allclose(grads[r], leaves[r].grad), (r, grads[r], leaves[r].grad)


def test_all_gather_with_grads_on_a_failed_group_keeps_this_ranks_row_and_gradient() -> None:
    from chaos_lightning.strategy.process_group import CollectiveFailed

    class Broken(SimpleNamespace):
        def all_reduce(self, t, *, abort, timeout, op=None):
            raise CollectiveFailed("peer gone")

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = collectives.all_gather_with_grad(Broken(rank=1, world_size=2), x, None, 1.0)
    assert y.shape == (1, 2)
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0, 3.0]))
