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


__all__ = list(_LAZY)
