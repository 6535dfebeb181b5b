"""Lightning's own collectives, run on the elastic process group and abortable.

Role in the whole: Lightning reduces logged metrics (``sync_dist``), waits at
barriers and broadcasts small objects (ModelCheckpoint's paths) outside the
training step.  The strategy's ``reduce``, ``barrier`` and ``broadcast``
hooks call these, so they run on the current group with the same abort flag
as the gradient all-reduce: a member that fails meanwhile makes them return
the local value (logged) instead of raising in the middle of validation, and
the broken group makes the next training step fail and switch views.

Objects travel as msgpack (:mod:`.state`), never pickle (issue 15: Lightning's
own ``broadcast`` is ``broadcast_object_list``, which unpickles whatever the
source rank sent, and gloo's data channel has no authentication): ``None``,
``bool``, ``int``, ``float``, ``str``, ``bytes`` and lists, tuples and dicts
(``str``/``int`` keys) of those, tuples arriving as tuples.  That covers what
Lightning 2.x broadcasts: ModelCheckpoint's ``dirpath`` (``str``/``None``)
and its ``skip_time`` flag, ``Trainer.log_dir`` (``str``/``None``), Timer's
``should_stop``, LightningCLI's SaveConfigCallback flags, the LR finder's path,
flag and results dict.  Anything else (a tensor, a ``Path``, a numpy scalar,
a user's class) is refused on every rank with :class:`BroadcastRefused`,
naming the type; there is no pickled fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

import msgpack

from chaos_lightning.strategy.process_group import AbortFlag, CollectiveError, ElasticProcessGroup
from chaos_lightning.strategy.state import UnsupportedState, pack_tree, unpack_tree

log = logging.getLogger("chaos_lightning.strategy")

#: Lightning's reduce_op names: (gloo op, divide by the world afterwards).
#: Every op gloo has: ``sync_ddp`` takes a name as ``ReduceOp`` attribute, so
#: "product", "band", "bor" and "bxor" reach gloo's own ops there too.
REDUCE_OPS = {
    "mean": ("SUM", True), "avg": ("SUM", True), "sum": ("SUM", False), "max": ("MAX", False), "min": ("MIN", False),
    "product": ("PRODUCT", False), "band": ("BAND", False), "bor": ("BOR", False), "bxor": ("BXOR", False),
}
#: ``ReduceOp.AVG``, which gloo lacks (Lightning's own path fails on it), is a mean
_TORCH_OPS = {
    dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min", dist.ReduceOp.AVG: "mean",
    dist.ReduceOp.PRODUCT: "product", dist.ReduceOp.BAND: "band", dist.ReduceOp.BOR: "bor", dist.ReduceOp.BXOR: "bxor",
}
_BITWISE = ("BAND", "BOR", "BXOR")


def reduce_op_name(reduce_op: Any) -> str | None:
    """Lightning's ``reduce_op`` (a name or a ``ReduceOp``) as a key of :data:`REDUCE_OPS`, or None."""
    name = reduce_op.lower() if isinstance(reduce_op, str) else next(
        (n for op, n in _TORCH_OPS.items() if reduce_op == op), None
    )
    return name if name in REDUCE_OPS else None


def reduce(pg: ElasticProcessGroup, tensor: torch.Tensor, name: str, abort: AbortFlag, timeout: float, *,
           absent: bool | None = None) -> torch.Tensor:
    """The reduced value, or this rank's own if the group fails meanwhile.

    ``absent`` (not None while some rank of the group may not count: a
    stop-free joiner still catching up): True on such a rank, which sends the
    operation's identity instead of its value; a mean is then over the ranks
    that count, whose number rides in the same all-reduce."""
    op, mean = REDUCE_OPS[name]
    if op in _BITWISE and (tensor.is_floating_point() or tensor.is_complex()):
        # what gloo says, but before the collective and alike on every rank
        # (a failed op would read as a member's failure)
        raise TypeError(f"chaos: reduce_op={name!r} needs an integer or bool tensor, not {tensor.dtype}")
    result = tensor.clone() if tensor.is_floating_point() or not mean else tensor.float()
    if absent:
        result.fill_(_identity(op, result.dtype))
    counted = mean and absent is not None
    if counted:
        result = torch.cat([result.reshape(-1), torch.zeros(1, dtype=result.dtype) + (0 if absent else 1)])
    try:
        pg.all_reduce(result, abort=abort, timeout=timeout, op=getattr(dist.ReduceOp, op))
    except CollectiveError as exc:
        log.warning("chaos: metric reduction failed (%s); using this rank's value", exc)
        return tensor
    if counted:
        return (result[:-1] / result[-1]).reshape(tensor.shape)
    return result / pg.world_size if mean else result


def _identity(op: str, dtype: torch.dtype) -> float | int | bool:
    """The value that leaves ``op``'s result unchanged."""
    if op in ("SUM", "BOR", "BXOR"):
        return 0
    if op == "PRODUCT":
        return 1
    if op == "BAND":  # every bit set
        return True if dtype == torch.bool else (torch.iinfo(dtype).max if dtype == torch.uint8 else -1)
    if dtype == torch.bool:
        return op == "MIN"
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    if dtype.is_floating_point:
        return float("-inf") if op == "MAX" else float("inf")
    return info.min if op == "MAX" else info.max


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


class _GatherWithGrad(torch.autograd.Function):
    """:func:`all_gather` whose backward sends each rank's rows their
    gradient: every rank's loss may use every row, so rank ``r``'s input
    gets the sum over ranks of the gradient of row ``r`` (one abortable
    all-reduce of the gradient rows; what ``torch.distributed.nn``'s
    all_gather does with a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, pg: ElasticProcessGroup, abort: AbortFlag,
                timeout: float) -> torch.Tensor:
        ctx.pg, ctx.abort, ctx.timeout = pg, abort, timeout
        return all_gather(pg, tensor, abort, timeout).clone()

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[Any, ...]:
        pg = ctx.pg
        if grad_rows.shape[0] != pg.world_size:  # the forward failed: this rank's row alone
            return grad_rows[0], None, None, None
        grad = grad_rows.detach().contiguous().clone()
        try:
            pg.all_reduce(grad, abort=ctx.abort, timeout=ctx.timeout)
        except CollectiveError as exc:
            # the group is broken now, so this step's gradient all-reduce
            # fails too and the step applies no update on any rank
            log.warning("chaos: all_gather's gradient failed (%s); the step will not apply", exc)
            return grad_rows[pg.rank], None, None, None
        return grad[pg.rank], None, None, None


def all_gather_with_grad(pg: ElasticProcessGroup, tensor: torch.Tensor, abort: AbortFlag,
                         timeout: float) -> torch.Tensor:
    """``all_gather(..., sync_grads=True)`` on the current group: the rows of
    :func:`all_gather`, differentiable (a contrastive loss over every rank's
    embeddings), forward and backward abortable."""
    return _GatherWithGrad.apply(tensor, pg, abort, timeout)


def gather_uneven(pg: ElasticProcessGroup, tensor: torch.Tensor, abort: AbortFlag, timeout: float) -> list[torch.Tensor]:
    """Every rank's ``tensor`` in rank order, shapes free to differ (same
    ``ndim``): torchmetrics' ``dist_sync_fn`` contract.  Two abortable
    gathers, the shapes then the values padded to the largest; if the group
    fails meanwhile, this rank's tensor alone (as :func:`all_gather`)."""
    t = tensor.detach().contiguous()
    flag = t.dtype == torch.bool  # summed in the gather: carried as bytes
    if flag:
        t = t.to(torch.uint8)
    world = pg.world_size
    shapes = all_gather(pg, torch.tensor(t.shape, dtype=torch.int64), abort, timeout)
    if shapes.shape[0] != world:
        return [tensor.detach()]
    largest = tuple(int(n) for n in shapes.max(dim=0).values.tolist()) if t.ndim else ()
    padded = torch.zeros(largest, dtype=t.dtype)
    padded[tuple(slice(0, n) for n in t.shape)] = t
    rows = all_gather(pg, padded, abort, timeout)
    if rows.shape[0] != world:
        return [tensor.detach()]
    out = [rows[r][tuple(slice(0, int(n)) for n in shapes[r].tolist())] for r in range(world)]
    return [o.to(torch.bool) for o in out] if flag else out


def metric_sync_fn(member: Any) -> Any:
    """torchmetrics' ``dist_sync_fn`` for ``member`` (an ``ElasticMember``):
    :func:`gather_uneven` on its current group, whichever that is when a
    metric syncs; a group the user named goes to torchmetrics' own gather."""

    def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        g = member.group
        if not ours(group):
            from torchmetrics.utilities.distributed import gather_all_tensors

            return gather_all_tensors(tensor, group)
        if g.pg.group is None:
            return [tensor]
        return gather_uneven(g.pg, tensor, g.abort, member.config.collective_timeout)

    return gather


def route_metric_sync(module: torch.nn.Module, gather: Any) -> int:
    """Make every torchmetrics ``Metric`` in ``module`` sync its states with
    ``gather`` (:func:`metric_sync_fn`: the current group, abortable) instead of
    torchmetrics' own ``torch.distributed.all_gather`` on the default group,
    which nothing can abort: a member killed while the others compute a
    metric would stall them for the collective timeout.  A ``dist_sync_fn``
    the user set is kept.  The number of metrics routed."""
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is Lightning's dependency, but a project may run without it
        return 0
    routed = 0
    for sub in module.modules():
        if isinstance(sub, Metric) and getattr(sub, "dist_sync_fn", None) is None:
            sub.dist_sync_fn = gather
            routed += 1
    return routed


def ours(group: Any) -> bool:
    """Whether a collective's ``group`` argument means the whole cluster:
    ``None``, or ``torch.distributed.group.WORLD`` (what Fabric and
    ``LightningModule.all_gather`` pass by default)."""
    return group is None or (dist.is_available() and group is dist.group.WORLD)


#: The largest broadcast object, packed: Lightning's are a path or a flag (and
#: the LR finder's results, a few kB); a receiver allocates no more than this
#: whatever size arrives.
MAX_BROADCAST_BYTES = 16 * 2**20

_VALUE, _REFUSED = 0, 1


class BroadcastRefused(TypeError):
    """A broadcast whose object does not travel as msgpack (raised on every rank),
    or whose bytes from the source do not decode."""


def refused(type_name: str, why: str) -> str:
    return (f"chaos: broadcast of {type_name} refused: {why}; only msgpack-able values cross the network (None, "
            "bool, int, float, str, bytes, and lists, tuples and dicts of those), never pickle: send a str path, "
            "a number or a flag instead, or reduce tensors with all_reduce/all_gather")


def pack_object(obj: Any) -> bytes:
    """``obj`` as msgpack (see the module docstring), or :class:`BroadcastRefused`."""
    try:
        meta, tensors = pack_tree(obj)
    except UnsupportedState as exc:
        raise BroadcastRefused(refused(type(obj).__name__, str(exc).replace("state", "the object", 1))) from None
    if tensors:
        raise BroadcastRefused(refused(type(obj).__name__, f"it holds {len(tensors)} tensor(s)"))
    if len(meta) > MAX_BROADCAST_BYTES:
        raise BroadcastRefused(refused(type(obj).__name__, f"{len(meta)} bytes packed, over {MAX_BROADCAST_BYTES}"))
    return meta


def unpack_object(data: bytes) -> Any:
    """The inverse of :func:`pack_object`, for bytes from the network: no
    pickle, no tensors, anything malformed is :class:`BroadcastRefused`."""
    try:
        return unpack_tree(data, [])
    except Exception as exc:  # noqa: BLE001 - any malformed input is one clear error
        raise BroadcastRefused(f"chaos: a broadcast's bytes from the source rank do not decode ({exc}); refused "
                               "(only msgpack-able values cross the network, never pickle)") from None


def broadcast_object(pg: ElasticProcessGroup, obj: Any, src: int, abort: AbortFlag, timeout: float) -> Any:
    """``src``'s object on every rank, as msgpack over two abortable all-reduces
    (its size, then its bytes: gloo's broadcast cannot be abandoned).

    When ``src``'s object is not msgpack-able, ``src`` sends the refusal
    instead and every rank raises the same :class:`BroadcastRefused`; keeps
    this rank's object if the group fails meanwhile.
    """
    mine = pg.rank == src
    data = b""
    if mine:
        try:
            data = msgpack.packb([_VALUE, pack_object(obj)])
        except BroadcastRefused as exc:
            data = msgpack.packb([_REFUSED, str(exc)])
    try:
        size = torch.tensor([len(data) if mine else 0], dtype=torch.int64)
        pg.all_reduce(size, abort=abort, timeout=timeout)
        n = int(size.item())
        if not 0 < n <= MAX_BROADCAST_BYTES + 64:
            raise BroadcastRefused(f"chaos: a broadcast announced {n} bytes (at most {MAX_BROADCAST_BYTES}); refused")
        buf = torch.zeros(n, dtype=torch.uint8)
        if mine:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        pg.all_reduce(buf, abort=abort, timeout=timeout)
    except CollectiveError as exc:
        log.warning("chaos: broadcast failed (%s); keeping this rank's value", exc)
        return obj
    try:
        tag, body = msgpack.unpackb(bytes(buf.numpy().tobytes()), raw=False)
    except Exception as exc:  # noqa: BLE001 - malformed bytes from the network
        raise BroadcastRefused(f"chaos: a broadcast's bytes from the source rank do not decode ({exc}); "
                               "refused (only msgpack-able values cross the network, never pickle)") from None
    if tag == _REFUSED and isinstance(body, str):
        raise BroadcastRefused(body)
    if tag != _VALUE or not isinstance(body, bytes):
        raise BroadcastRefused("chaos: a broadcast's bytes from the source rank are not a value; refused")
    return unpack_object(body)
