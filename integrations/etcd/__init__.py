"""The etcd baseline: the "central control plane" the peer backend is judged against.

``EtcdRendezvous`` implements :class:`chaos_lightning.rendezvous.base.Rendezvous`
with leases, compare-and-set transactions and watches on a real etcd server
(see :mod:`.rendezvous` for the protocol).  It needs the ``etcd`` extra
(``pip install 'chaos_lightning[etcd]'``) and a reachable etcd; the default
backend (``peer``) needs neither.
"""

from __future__ import annotations

from typing import Any

#: names of :mod:`.rendezvous`, imported on first use: importing etcd3 fixes
#: protobuf's implementation for the process, and :mod:`.server` (a throwaway
#: etcd for benchmarks and tests) needs none of it
_LAZY = ("DEFAULT_OP_TIMEOUT", "DEFAULT_PREFIX", "DEFAULT_TTL", "EtcdRendezvous")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from chaos_lightning.integrations.etcd import rendezvous

        return getattr(rendezvous, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create(
    *,
    bind: str = "127.0.0.1:0",
    node_id: str | None = None,
    etcd_endpoints: str = "127.0.0.1:2379",
    etcd_prefix: str | None = None,
    etcd_ttl: float | None = None,
    etcd_op_timeout: float | None = None,
    meta: dict[str, str] | None = None,
    host_store: bool = True,
    secret: bytes | str | None = None,
    **_: object,
) -> Any:
    """The ``etcd`` entry point of the ``chaos_lightning.rendezvous`` group.

    Peers and membership timing are the peer backend's: etcd decides
    membership itself and its clients authenticate to etcd, not to each other.
    ``secret`` guards this node's process-group store, as on every backend.
    ``None`` for a setting: :mod:`.rendezvous`'s default.
    """
    from chaos_lightning.integrations.etcd.rendezvous import EtcdRendezvous

    return EtcdRendezvous(
        bind=bind, node_id=node_id, endpoints=etcd_endpoints, meta=meta, host_store=host_store, secret=secret,
        prefix=etcd_prefix, ttl=etcd_ttl, op_timeout=etcd_op_timeout,
    )


__all__ = [*_LAZY, "create"]
