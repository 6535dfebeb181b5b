"""Shipping live training state between replicas: msgpack for structure, collectives for tensors.

Role in the whole: after a view change the strategy makes every replica
identical by sending one member's state to the others (a joiner gets the
full state; survivors of a partially completed step get the parameters and
optimizer state of whoever completed it).  This module is the encoding of
that state and its one-source transfer over the current process group; the
replication layer will replace the transfer with a multi-neighbor pull and
keep the encoding.

Encoding (DESIGN.md: no unrestricted pickle over the network): a state tree
of dicts, lists, tuples, ``None``, bools, ints, floats, strings, bytes and
tensors becomes msgpack bytes in which each tensor is an extension record
``(index, shape, dtype)`` and each tuple an extension record of its items;
the tensors themselves travel as raw buffers, one per dtype.  Decoding
allocates exactly what the metadata announces and builds no object other
than those types, so a peer cannot make a receiver run code.  Anything else
in a state (a function in a scheduler's state, a custom class) is refused at
the sender with the path to the offending value.
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch
import torch.distributed as dist

# The tensor dtypes a state may carry, by torch's names: the replication
# layer's table, so a state and a snapshot carry the same set, spelt the same.
from chaos_lightning.replication.snapshot import DTYPES

__all__ = ["UnsupportedState", "broadcast_bytes", "broadcast_tree", "pack_tree", "unpack_tree"]

_EXT_TENSOR = 1
_EXT_TUPLE = 2


class UnsupportedState(TypeError):
    """A state holds a value this encoding does not carry (named by its path)."""


def pack_tree(obj: Any) -> tuple[bytes, list[torch.Tensor]]:
    """``obj`` as msgpack metadata plus the tensors it holds, in order."""
    tensors: list[torch.Tensor] = []

    def enc(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            return v
        if torch.is_tensor(v):
            dtype = str(v.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise UnsupportedState(f"{path}: tensor dtype {v.dtype} is not carried")
            tensors.append(v)
            return msgpack.ExtType(_EXT_TENSOR, msgpack.packb([len(tensors) - 1, list(v.shape), dtype]))
        if isinstance(v, tuple):
            return msgpack.ExtType(_EXT_TUPLE, msgpack.packb([enc(x, f"{path}[{i}]") for i, x in enumerate(v)]))
        if isinstance(v, list):
            return [enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, (str, int)):
                    raise UnsupportedState(f"{path}: dict key {k!r} of type {type(k).__name__} is not carried")
                out[k] = enc(x, f"{path}.{k}")
            return out
        raise UnsupportedState(f"{path}: value of type {type(v).__name__} is not carried (no pickle)")

    meta = msgpack.packb(enc(obj, "state"))
    return meta, tensors


def _unpack(meta: bytes, tensor_for: Any) -> Any:
    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_TENSOR:
            index, shape, dtype = msgpack.unpackb(data)
            if dtype not in DTYPES:
                raise ValueError(f"state announces an unknown tensor dtype {dtype!r}")
            return tensor_for(int(index), [int(s) for s in shape], DTYPES[dtype])
        if code == _EXT_TUPLE:
            return tuple(msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False))
        raise ValueError(f"state holds an unknown extension record {code}")

    return msgpack.unpackb(meta, ext_hook=ext_hook, raw=False, strict_map_key=False)


def unpack_tree(meta: bytes, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`pack_tree` (the tensors are used as given, not copied)."""

    def tensor_for(index: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = tensors[index]
        if list(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"tensor {index}: metadata says {shape} {dtype}, got {list(t.shape)} {t.dtype}")
        return t

    return _unpack(meta, tensor_for)


def broadcast_bytes(data: bytes, src: int) -> bytes:
    """``data`` from rank ``src`` to every rank of the default group."""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return bytes(buf.numpy().tobytes())


def broadcast_tree(obj: Any, src: int, rank: int) -> Any:
    """``obj`` (a state tree, read on ``src`` only) to every rank of the default group.

    One broadcast of the metadata, then one per tensor dtype (tensors are
    flattened into a buffer per dtype).  On ``src`` the result is ``obj``
    itself; elsewhere fresh CPU tensors (callers' ``load_state_dict`` moves
    them where they belong).
    """
    meta, tensors = pack_tree(obj) if rank == src else (b"", [])
    meta = broadcast_bytes(meta, src)
    if rank == src:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):
            flat = torch.cat([t.detach().reshape(-1).cpu() for t in by_dtype[dtype]])
            dist.broadcast(flat, src)
        return obj
    announced: list[tuple[int, list[int], torch.dtype]] = []
    _unpack(meta, lambda i, shape, dtype: announced.append((i, shape, dtype)))
    received: dict[int, torch.Tensor] = {}
    for dtype in sorted({d for _, _, d in announced}, key=str):
        items = sorted((i, shape) for i, shape, d in announced if d == dtype)
        sizes = [int(torch.Size(shape).numel()) for _, shape in items]
        flat = torch.empty(sum(sizes), dtype=dtype)
        dist.broadcast(flat, src)
        for (i, shape), part in zip(items, torch.split(flat, sizes)):
            received[i] = part.view(shape)
    return _unpack(meta, lambda i, shape, dtype: received[i])
