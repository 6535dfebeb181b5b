"""The etcd baseline: the "central control plane" the peer backend is judged against.

``EtcdRendezvous`` implements :class:`chaos_lightning.rendezvous.base.Rendezvous`
with leases, compare-and-set transactions and watches on a real etcd server
(see :mod:`.rendezvous` for the protocol).  It needs the ``etcd`` extra
(``pip install 'chaos_lightning[etcd]'``) and a reachable etcd; the default
backend (``peer``) needs neither.
"""

from __future__ import annotations

from chaos_lightning.integrations.etcd.rendezvous import (
    DEFAULT_OP_TIMEOUT,
    DEFAULT_PREFIX,
    DEFAULT_TTL,
    EtcdRendezvous,
)

__all__ = ["DEFAULT_OP_TIMEOUT", "DEFAULT_PREFIX", "DEFAULT_TTL", "EtcdRendezvous"]
