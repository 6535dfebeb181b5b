"""The process-group store's messages (tags ``store.*``), spoken over the wire layer.

Role: the request/reply vocabulary between
:class:`~chaos_lightning.rendezvous.store.WireStore` (a ``torch.distributed.Store``
client) and the :class:`~chaos_lightning.rendezvous.store.StoreHost` server.
They live here, not in :mod:`chaos_lightning.wire.schema`, because they are
this layer's protocol: the wire layer only frames, types and authenticates.

Every request carries ``rid``, a per-connection request number chosen by the
client; the reply carries the same ``rid``.  That lets one connection have a
blocking ``wait``/``get`` pending while other requests are answered (gloo
rendezvous is one thread, but ``torch.distributed`` may use the store from
several).  Timeouts travel in milliseconds and are enforced by the server,
so a waiter that times out leaves nothing behind on the host; the client
adds a grace period on top only to survive a host that stopped answering.

The operations are those ``ProcessGroupGloo``, ``PrefixStore`` and
``init_process_group`` call through torch's Python-store trampoline (measured
on torch 2.13: gloo's rendezvous uses ``set``, ``wait(keys, timeout)`` and
``get``; ``TORCH_DIST_INIT_BARRIER=1`` adds ``add`` and ``wait``;
``append`` falls back to ``compare_set``), plus ``check``, ``delete_key`` and
``num_keys`` for completeness.  There is deliberately no ``list_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass

from chaos_lightning.wire.schema import message

# -- requests -------------------------------------------------------------------------------


@message("store.set")
@dataclass(frozen=True)
class SetRequest:
    rid: int
    key: str
    value: bytes


@message("store.get")
@dataclass(frozen=True)
class GetRequest:
    """Blocks until ``key`` exists or ``timeout_ms`` passed (``TCPStore.get`` semantics).

    ``siblings`` (appended; 0 from an older client): the reply may also carry
    up to that many other keys that exist in ``key``'s directory and are
    named by a number, as gloo names its ranks' addresses
    (:meth:`WireStore.wait` reads them all in one round trip)."""

    rid: int
    key: str
    timeout_ms: int
    siblings: int = 0


@message("store.add")
@dataclass(frozen=True)
class AddRequest:
    rid: int
    key: str
    amount: int


@message("store.cas")
@dataclass(frozen=True)
class CompareSetRequest:
    rid: int
    key: str
    expected: bytes
    desired: bytes


@message("store.wait")
@dataclass(frozen=True)
class WaitRequest:
    rid: int
    keys: tuple[str, ...]
    timeout_ms: int


@message("store.check")
@dataclass(frozen=True)
class CheckRequest:
    rid: int
    keys: tuple[str, ...]


@message("store.del")
@dataclass(frozen=True)
class DeleteRequest:
    rid: int
    key: str


@message("store.nkeys")
@dataclass(frozen=True)
class NumKeysRequest:
    rid: int


REQUESTS = (
    SetRequest, GetRequest, AddRequest, CompareSetRequest, WaitRequest, CheckRequest, DeleteRequest, NumKeysRequest,
)

# -- replies --------------------------------------------------------------------------------


@message("store.ok")
@dataclass(frozen=True)
class Done:
    rid: int


@message("store.value")
@dataclass(frozen=True)
class ValueReply:
    rid: int
    value: bytes
    #: (key, value) of the requested key's siblings (:class:`GetRequest`)
    siblings: tuple[tuple[str, bytes], ...] = ()


@message("store.int")
@dataclass(frozen=True)
class IntReply:
    rid: int
    value: int


@message("store.bool")
@dataclass(frozen=True)
class BoolReply:
    rid: int
    value: bool


#: ``StoreError.kind`` values
TIMEOUT = "timeout"  # the wait ran out: the client raises DistStoreError, connection kept
INVALID = "invalid"  # e.g. add on a non-integer value: the client raises, connection kept
REFUSED = "refused"  # a bound was broken (value size, total bytes): the server closes the connection


@message("store.error")
@dataclass(frozen=True)
class StoreError:
    rid: int
    kind: str
    reason: str
