"""State snapshots as shards: what a source serves and how a joiner reassembles it.

Role: the strategy packs the training state into ``(meta, tensors)``
(msgpack metadata plus a list of tensors, see ``strategy/state.py``'s
``pack_tree``).  A :class:`Snapshot` freezes that pair at a step boundary and
cuts it into shards that sources send independently; its :class:`Manifest`
tells a joiner everything it needs to allocate the tensors and check every
shard; an :class:`Assembler` on the joiner writes verified shards in place and
finally hands back ``(meta, tensors)`` for ``unpack_tree``.

Layout and shard sizes
----------------------
The tensors' bytes are laid end to end in one *virtual concatenation* (tensor
``i`` occupies ``[offset_i, offset_i + nbytes_i)``; nothing is ever
concatenated in memory).  Shards are equal, contiguous ranges of that
concatenation, ``[k * S, min((k + 1) * S, total))``: a tensor larger than
``S`` is split across several shards, and runs of small tensors share one.
Equal sizes are the easy case for the scheduler (its LPT greedy is then
within one shard of the fluid optimum, and any shard can replace any other in
work stealing), and a shard's layout is two integers instead of a piece list.

``S`` (:func:`default_shard_bytes`) is ``total / SHARDS_PER_SNAPSHOT``
clamped to ``[MIN_SHARD_BYTES, MAX_SHARD_BYTES]`` = [1 MiB, 4 MiB]:

* 64 shards = 8 sources x the scheduler's 8 shards per source
  (:data:`~chaos_lightning.replication.scheduler.SHARDS_PER_SOURCE`), so up to
  8 sources the greedy's imbalance stays near 1/8 of a source's share;
* at least 1 MiB, so the per-shard costs (a request, two frame headers, a
  checksum call) stay under 1% of the shard's time even at 1 Gbit/s;
* at most 4 MiB, so the unit of re-fetching and stealing stays small (0.34 s
  at 100 Mbit/s): a dead or slow source costs the joiner little, and at 1 GiB
  there are 256 shards, which the scheduler plans in well under a millisecond.

The size depends on the total only, so every member holding the same state
cuts it identically and announces the same manifest.

Checksums
---------
CRC-32 (``zlib.crc32``): C code that releases the GIL on large buffers,
measured at 1.9 GB/s on this project's CPU machine against 1.0 GB/s for SHA-1
and 0.49 GB/s for BLAKE2b.  It guards against corruption in transit and in
buggy code paths, not against a malicious peer: peers are already
authenticated by the wire layer's HMAC handshake.  The :attr:`Manifest.snapshot_id`
defaults to a BLAKE2b digest of the metadata, the layout and every shard's
CRC, so equal states on different members get the same id without any
coordination, and a source holding a different state under the same step is
told apart.

Consistency while training goes on
----------------------------------
By default a snapshot *references* the tensors' memory (made contiguous and
moved to CPU once, when the snapshot is built, which copies only tensors that
were not contiguous CPU already).  The caller must then not modify them until
it calls ``retract`` on the server.  With ``copy=True`` the snapshot owns a
private copy (one memcpy, ~50 ms per GB) and the source may go on training.
Either way a joiner cannot end with a mixed state: every shard is checked
against the CRC recorded when the snapshot was built, and a mismatch is
re-fetched from elsewhere.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import hashlib
import math
import os
import sys
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from chaos_lightning.replication.scheduler import MIN_SHARD_BYTES, SHARDS_PER_SOURCE
from chaos_lightning.wire import DEFAULT_MAX_FRAME, schema

__all__ = [
    "Assembler",
    "BadManifest",
    "ChecksumMismatch",
    "DTYPES",
    "MAX_SHARD_BYTES",
    "Manifest",
    "ShardEntry",
    "ShardError",
    "Snapshot",
    "TensorEntry",
    "UnknownShard",
    "WrongShardSize",
    "checksum",
    "default_shard_bytes",
    "shard_checksums",
]

MiB = 1 << 20

MAX_SHARD_BYTES = 4 * MiB
"""Largest shard :func:`default_shard_bytes` picks (module docstring)."""

SHARDS_PER_SNAPSHOT = 8 * SHARDS_PER_SOURCE
"""Shards :func:`default_shard_bytes` aims for: 8 sources x 8 shards each."""

#: Tensor dtypes a snapshot carries, by the names torch gives them.  The one
#: table: the strategy's state encoding (``strategy/state.py``) imports it, so
#: the names on the wire are the same in both.
DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    )
}


class BadManifest(ValueError):
    """A manifest is inconsistent (layout, dtypes, sizes) or asks for too much memory."""


class ShardError(ValueError):
    """A shard was refused by the assembler; the joiner re-fetches it."""


class UnknownShard(ShardError):
    """The shard index is not in the manifest."""


class WrongShardSize(ShardError):
    """The shard has another size than the manifest announces."""


class ChecksumMismatch(ShardError):
    """The shard's bytes do not match the CRC recorded in the manifest."""


def checksum(parts: Sequence[memoryview | bytes | bytearray]) -> int:
    """CRC-32 of the concatenation of ``parts`` (never concatenated in memory)."""
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


def default_shard_bytes(total_bytes: int) -> int:
    """The shard size for a state of ``total_bytes`` (module docstring: 1 to 4 MiB)."""
    return min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, -(-int(total_bytes) // SHARDS_PER_SNAPSHOT)))


# --------------------------------------------------------------------------- #
# The manifest (wire schema messages)
# --------------------------------------------------------------------------- #


@schema.message("repl.tensor")
@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its place in the virtual concatenation and how to allocate it."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int


@schema.message("repl.shard")
@dataclass(frozen=True)
class ShardEntry:
    """One shard: the byte range ``[offset, offset + size)`` and its CRC-32."""

    index: int
    offset: int
    size: int
    crc32: int


@schema.message("repl.manifest")
@dataclass(frozen=True)
class Manifest:
    """Everything a joiner needs before the first shard: metadata, tensors, shards."""

    snapshot_id: str
    meta: bytes
    tensors: tuple[TensorEntry, ...]
    shards: tuple[ShardEntry, ...]
    total_bytes: int

    @property
    def shard_sizes(self) -> list[int]:
        """Shard sizes in index order, as :func:`~chaos_lightning.replication.scheduler.plan` takes them."""
        return [s.size for s in self.shards]

    def to_bytes(self) -> bytes:
        return schema.encode(self)

    @staticmethod
    def from_bytes(data: bytes) -> Manifest:
        msg = schema.decode(data)
        if not isinstance(msg, Manifest):
            raise BadManifest(f"expected a manifest, got {type(msg).__name__}")
        return msg

    def validate(self, max_bytes: int | None = None, max_shard: int = DEFAULT_MAX_FRAME) -> None:
        """Raise :class:`BadManifest` unless the layout is consistent and within limits.

        Checked before a single byte is allocated: a peer's manifest decides
        how much memory the joiner reserves.
        """
        if max_bytes is not None and self.total_bytes > max_bytes:
            raise BadManifest(f"snapshot of {self.total_bytes} bytes exceeds the limit of {max_bytes} bytes")
        pos = 0
        for i, t in enumerate(self.tensors):
            if t.index != i:
                raise BadManifest(f"tensor entry {i} carries index {t.index}")
            if t.dtype not in DTYPES:
                raise BadManifest(f"tensor {i}: unknown dtype {t.dtype!r}")
            if any(d < 0 for d in t.shape):
                raise BadManifest(f"tensor {i}: negative dimension in {t.shape}")
            want = math.prod(t.shape) * DTYPES[t.dtype].itemsize
            if t.nbytes != want:
                raise BadManifest(f"tensor {i}: {t.nbytes} bytes announced, shape {t.shape} {t.dtype} has {want}")
            if t.offset != pos:
                raise BadManifest(f"tensor {i}: offset {t.offset}, expected {pos}")
            pos += t.nbytes
        if pos != self.total_bytes:
            raise BadManifest(f"tensors hold {pos} bytes, manifest says {self.total_bytes}")
        pos = 0
        for k, s in enumerate(self.shards):
            if s.index != k or s.offset != pos or not 0 < s.size <= max_shard or not 0 <= s.crc32 < 2**32:
                raise BadManifest(f"shard {k}: bad entry {s} (expected index {k}, offset {pos}, 0 < size <= {max_shard})")
            pos += s.size
        if pos != self.total_bytes:
            raise BadManifest(f"shards cover {pos} bytes, manifest says {self.total_bytes}")

    def pieces(self, index: int) -> list[tuple[int, int, int]]:
        """``(tensor, start, length)`` byte ranges of shard ``index``, in order."""
        s = self.shards[index]
        return _pieces([t.offset for t in self.tensors], [t.nbytes for t in self.tensors], s.offset, s.size)


def _pieces(offsets: Sequence[int], sizes: Sequence[int], start: int, size: int) -> list[tuple[int, int, int]]:
    """Tensor byte ranges covering ``[start, start + size)`` of the concatenation."""
    out = []
    end = start + size
    i = max(0, bisect.bisect_right(offsets, start) - 1)
    while start < end and i < len(offsets):
        lo, hi = offsets[i], offsets[i] + sizes[i]
        if hi > start:
            n = min(hi, end) - start
            out.append((i, start - lo, n))
            start += n
        i += 1
    return out


#: ``madvise(MADV_POPULATE_WRITE)``, Linux 5.14+: map a range's pages for
#: writing, every byte unchanged.
_MADV_POPULATE_WRITE = 23

#: Below this, an assembly's pages are not worth a thread.
PREFAULT_MIN_BYTES = 16 * MiB

_madvise_works = True  # False once the kernel refused the call (before 5.14): never asked again


@functools.cache
def _madvise_fn() -> Any:
    """libc's ``madvise`` (Linux), None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def populate(tensors: Sequence[torch.Tensor]) -> bool:
    """Map every page of ``tensors`` for writing now, as the first write to
    each would, fault by fault (``MADV_POPULATE_WRITE``); False where the
    kernel or platform has no such call.  It changes no byte, so it is safe
    while other threads write the same memory; ctypes releases the GIL.

    Why: a pull writes each byte once into memory just allocated, and the
    page faults were most of that copy's cost (200 MB: 100-130 ms into fresh
    pages against 20-25 ms into mapped ones, 2026-12-08); mapping them
    ahead, on another thread, takes them off the receiving thread."""
    global _madvise_works
    fn = _madvise_fn()
    if fn is None or not _madvise_works:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    for t in tensors:
        if t.numel() == 0:
            continue
        addr = t.data_ptr()
        start = addr // page * page
        end = -(-(addr + t.numel() * t.element_size()) // page) * page
        if fn(start, end - start, _MADV_POPULATE_WRITE) != 0:
            _madvise_works = False
            return False
    return True


def _byte_view(t: torch.Tensor) -> memoryview:
    """A flat, writable byte view of a contiguous CPU tensor's own memory."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


# --------------------------------------------------------------------------- #
# Source side
# --------------------------------------------------------------------------- #


class Snapshot:
    """A frozen state, cut into checksummed shards, ready to be served.

    ``tensors`` are detached and made contiguous CPU once, here; with
    ``copy=False`` (default) the snapshot keeps references to their memory
    and the caller must not modify them while it is published (module
    docstring).  ``shard_bytes`` defaults to :func:`default_shard_bytes`.
    """

    def __init__(
        self,
        meta: bytes,
        tensors: Sequence[torch.Tensor],
        *,
        shard_bytes: int | None = None,
        snapshot_id: str | None = None,
        copy: bool = False,
        crcs: Sequence[int] | None = None,
    ) -> None:
        frozen: list[torch.Tensor] = []
        entries: list[TensorEntry] = []
        pos = 0
        for i, t in enumerate(tensors):
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise TypeError(f"tensor {i}: dtype {t.dtype} is not carried")
            t = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
            if copy:
                t = t.clone()
            frozen.append(t)
            nbytes = t.numel() * t.element_size()
            entries.append(TensorEntry(i, dtype, tuple(t.shape), nbytes, pos))
            pos += nbytes
        total = pos
        size = default_shard_bytes(total) if shard_bytes is None else int(shard_bytes)
        if not 0 < size <= DEFAULT_MAX_FRAME:
            raise ValueError(f"shard_bytes must be in 1..{DEFAULT_MAX_FRAME}, got {size}")
        self._tensors = frozen
        self._views = [_byte_view(t) for t in frozen]
        self._offsets = [e.offset for e in entries]
        self._sizes = [e.nbytes for e in entries]
        spans = _spans(total, size)
        if crcs is not None and len(crcs) != len(spans):
            raise ValueError(f"{len(crcs)} checksums for {len(spans)} shards")
        shards = [ShardEntry(k, off, n, int(crcs[k]) if crcs is not None else checksum(self._views_of(off, n)))
                  for k, (off, n) in enumerate(spans)]
        meta = bytes(meta)
        if snapshot_id is None:
            h = hashlib.blake2b(meta, digest_size=16)
            for e in entries:
                h.update(repr((e.dtype, e.shape)).encode())
            for s in shards:
                h.update(s.crc32.to_bytes(4, "big") + s.size.to_bytes(8, "big"))
            snapshot_id = h.hexdigest()
        self.manifest = Manifest(snapshot_id, meta, tuple(entries), tuple(shards), total)

    @property
    def snapshot_id(self) -> str:
        return self.manifest.snapshot_id

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The frozen (contiguous CPU) tensors the shards are read from."""
        return list(self._tensors)

    def _views_of(self, start: int, size: int) -> list[memoryview]:
        return [self._views[i][a : a + n] for i, a, n in _pieces(self._offsets, self._sizes, start, size)]


    def shard_views(self, index: int) -> list[memoryview]:
        """Shard ``index`` as memoryviews over the tensors' own memory (no copy)."""
        if not 0 <= index < len(self.manifest.shards):
            raise UnknownShard(f"no shard {index} in snapshot {self.snapshot_id} ({len(self.manifest.shards)} shards)")
        s = self.manifest.shards[index]
        return self._views_of(s.offset, s.size)

    def shard_payload(self, index: int) -> memoryview | bytes:
        """Shard ``index`` as one buffer: a view (no copy) when it lies in one tensor.

        A shard spanning several tensors is joined (one copy of at most one
        shard, of small tensors only).
        """
        views = self.shard_views(index)
        return views[0] if len(views) == 1 else b"".join(views)


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    """Each shard's ``(offset, size)`` in the virtual concatenation."""
    return [(off, min(size, total - off)) for off in range(0, total, size)]


def shard_checksums(tensors: Sequence[torch.Tensor], part: int, parts: int,
                    shard_bytes: int | None = None) -> list[int]:
    """The CRC-32 of every ``parts``-th shard from ``part`` on (0 for the
    others) of the snapshot ``Snapshot(meta, tensors)`` would cut, and so how
    many shards it has.  Holders of the same state each compute one share and
    sum them (one all-reduce), then pass the whole list as ``crcs=``: each
    pays 1/``parts`` of the checksums (89 ms at 203 MB here).  The tensors
    must be contiguous CPU tensors (what a snapshot would serve as they are)."""
    views, offsets, sizes, pos = [], [], [], 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("shard_checksums needs contiguous CPU tensors")
        views.append(_byte_view(t.detach()))
        nbytes = t.numel() * t.element_size()
        offsets.append(pos)
        sizes.append(nbytes)
        pos += nbytes
    size = default_shard_bytes(pos) if shard_bytes is None else int(shard_bytes)
    spans = _spans(pos, size)
    mine = [k for k in range(len(spans)) if k % parts == part]

    def one(k: int) -> int:
        off, n = spans[k]
        return checksum([views[i][a : a + m] for i, a, m in _pieces(offsets, sizes, off, n)])

    out = [0] * len(spans)
    threads = min(_checksum_threads(), len(mine))
    if threads > 1 and sum(spans[k][1] for k in mine) >= PARALLEL_CHECKSUM_BYTES:
        # zlib releases the GIL: a lone holder (a cluster of two after a
        # death) checksums 200 MB in 27-30 ms on two threads, not 48-49
        with ThreadPoolExecutor(threads, thread_name_prefix="chaos-crc") as pool:
            for k, crc in zip(mine, pool.map(one, mine)):
                out[k] = crc
    else:
        for k in mine:
            out[k] = one(k)
    return out


#: a holder's share of the checksums from this size on is computed on
#: several threads (:func:`shard_checksums`)
PARALLEL_CHECKSUM_BYTES = 16 * 2**20


def _checksum_threads() -> int:
    """Threads for a holder's checksums: the cores this process may use, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


# --------------------------------------------------------------------------- #
# Joiner side
# --------------------------------------------------------------------------- #


class Assembler:
    """Rebuilds a snapshot's tensors from shards arriving in any order, from any source.

    Allocates every tensor from the (validated) manifest up front; each
    :meth:`accept` checks one shard's index, size and CRC, then copies it into
    place.  A refused shard leaves the tensors untouched.
    """

    def __init__(self, manifest: Manifest, *, max_bytes: int | None = None) -> None:
        manifest.validate(max_bytes)
        self.manifest = manifest
        self._tensors = [torch.empty(t.shape, dtype=DTYPES[t.dtype]) for t in manifest.tensors]
        self._views = [_byte_view(t) for t in self._tensors]
        self._missing = set(range(len(manifest.shards)))
        if sum(s.size for s in manifest.shards) >= PREFAULT_MIN_BYTES:
            # the pages, mapped while the first shards are on the way (the
            # thread holds the tensors: their memory outlives it)
            threading.Thread(target=populate, args=(list(self._tensors),), name="chaos-prefault",
                             daemon=True).start()

    @property
    def missing(self) -> frozenset[int]:
        """Indices of the shards not yet accepted."""
        return frozenset(self._missing)

    @property
    def done(self) -> bool:
        return not self._missing

    def has(self, index: int) -> bool:
        return 0 <= index < len(self.manifest.shards) and index not in self._missing

    def check(self, index: int, data: memoryview | bytes | bytearray) -> None:
        """Raise a :class:`ShardError` unless ``data`` is shard ``index`` intact."""
        shards = self.manifest.shards
        if not 0 <= index < len(shards):
            raise UnknownShard(f"no shard {index} in snapshot {self.manifest.snapshot_id} ({len(shards)} shards)")
        s = shards[index]
        n = memoryview(data).nbytes
        if n != s.size:
            raise WrongShardSize(f"shard {index}: got {n} bytes, the manifest says {s.size}")
        crc = zlib.crc32(data)
        if crc != s.crc32:
            raise ChecksumMismatch(f"shard {index}: CRC-32 {crc:08x}, the manifest says {s.crc32:08x}")

    def accept(self, index: int, data: memoryview | bytes | bytearray) -> bool:
        """Verify shard ``index`` and write it in place; False if it was already there.

        Raises :class:`UnknownShard`, :class:`WrongShardSize` or
        :class:`ChecksumMismatch` (then nothing is written).
        """
        self.check(index, data)
        if index not in self._missing:
            return False
        view = memoryview(data).cast("B")
        pos = 0
        for i, a, n in self.manifest.pieces(index):
            self._views[i][a : a + n] = view[pos : pos + n]
            pos += n
        self._missing.discard(index)
        return True

    def result(self) -> tuple[bytes, list[torch.Tensor]]:
        """``(meta, tensors)`` for ``unpack_tree``, once every shard is in."""
        if self._missing:
            raise RuntimeError(f"snapshot incomplete: {len(self._missing)} of {len(self.manifest.shards)} shards missing")
        return self.manifest.meta, list(self._tensors)
