"""Lightning's own collectives, run on the elastic process group and abortable.

Role in the whole: Lightning reduces logged metrics (``sync_dist``), waits at
barriers and broadcasts small objects (ModelCheckpoint's paths) outside the
training step.  The strategy's ``reduce``, ``barrier`` and ``broadcast``
hooks call these, so they run on the current group with the same abort flag
as the gradient all-reduce: a member that fails meanwhile makes them return
the local value (logged) instead of raising in the middle of validation, and
the broken group makes the next training step fail and switch views.

Objects travel as msgpack (:mod:`.state`), never pickle; a result of
``None`` from :func:`broadcast_object` means "not ours to carry" (tensors,
unsupported types), and the caller falls back to Lightning's own path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from chaos_lightning.strategy.process_group import AbortFlag, CollectiveError, ElasticProcessGroup
from chaos_lightning.strategy.state import UnsupportedState, pack_tree, unpack_tree

log = logging.getLogger("chaos_lightning.strategy")

#: Lightning's reduce_op names: (gloo op, divide by the world afterwards)
REDUCE_OPS = {
    "mean": ("SUM", True), "avg": ("SUM", True), "sum": ("SUM", False), "max": ("MAX", False), "min": ("MIN", False),
}
_TORCH_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}


def reduce_op_name(reduce_op: Any) -> str | None:
    """Lightning's ``reduce_op`` (a name or a ``ReduceOp``) as a key of :data:`REDUCE_OPS`, or None."""
    name = reduce_op.lower() if isinstance(reduce_op, str) else next(
        (n for op, n in _TORCH_OPS.items() if reduce_op == op), None
    )
    return name if name in REDUCE_OPS else None


def reduce(pg: ElasticProcessGroup, tensor: torch.Tensor, name: str, abort: AbortFlag, timeout: float) -> torch.Tensor:
    """The reduced value, or this rank's own if the group fails meanwhile."""
    op, mean = REDUCE_OPS[name]
    result = tensor.clone() if tensor.is_floating_point() or not mean else tensor.float()
    try:
        pg.all_reduce(result, abort=abort, timeout=timeout, op=getattr(dist.ReduceOp, op))
    except CollectiveError as exc:
        log.warning("chaos: metric reduction failed (%s); using this rank's value", exc)
        return tensor
    return result / pg.world_size if mean else result


def barrier(pg: ElasticProcessGroup, abort: AbortFlag, timeout: float) -> None:
    try:
        pg.all_reduce(torch.zeros(1), abort=abort, timeout=timeout)
    except CollectiveError as exc:
        log.warning("chaos: barrier failed (%s)", exc)


def all_gather(pg: ElasticProcessGroup, tensor: torch.Tensor, abort: AbortFlag, timeout: float) -> torch.Tensor:
    """Every rank's ``tensor`` stacked in rank order (``(world, *shape)``; the
    same shape on every rank, as Lightning requires), as one abortable
    all-reduce over a zeroed buffer in which each rank fills its own row.
    If the group fails meanwhile: this rank's row alone (logged)."""
    rows = torch.zeros((pg.world_size, *tensor.shape), dtype=tensor.dtype)
    rows[pg.rank].copy_(tensor.detach())
    try:
        pg.all_reduce(rows, abort=abort, timeout=timeout)
    except CollectiveError as exc:
        log.warning("chaos: all_gather failed (%s); using this rank's value", exc)
        return tensor.detach().unsqueeze(0)
    return rows


def ours(group: Any) -> bool:
    """Whether a collective's ``group`` argument means the whole cluster:
    ``None``, or ``torch.distributed.group.WORLD`` (what Fabric and
    ``LightningModule.all_gather`` pass by default)."""
    return group is None or (dist.is_available() and group is dist.group.WORLD)


class NotCarried(Exception):
    """The object is not a small tensor-free tree: use Lightning's own broadcast."""


def broadcast_object(pg: ElasticProcessGroup, obj: Any, src: int, abort: AbortFlag, timeout: float) -> Any:
    """``src``'s object on every rank, as msgpack over two abortable all-reduces
    (its size, then its bytes: gloo's broadcast cannot be abandoned).

    Raises :class:`NotCarried` on every rank when ``src``'s object is not
    ours to carry; keeps this rank's object if the group fails meanwhile.
    """
    mine = pg.rank == src
    data = b""
    if mine:
        try:
            data, tensors = pack_tree(obj)
            data = data if not tensors else b""
        except UnsupportedState:
            data = b""
    try:
        size = torch.tensor([len(data) if mine else 0], dtype=torch.int64)
        pg.all_reduce(size, abort=abort, timeout=timeout)
        if int(size.item()) == 0:
            raise NotCarried
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if mine:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        pg.all_reduce(buf, abort=abort, timeout=timeout)
    except CollectiveError as exc:
        log.warning("chaos: broadcast failed (%s); keeping this rank's value", exc)
        return obj
    return unpack_tree(bytes(buf.numpy().tobytes()), [])
