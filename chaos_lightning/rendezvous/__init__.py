"""Rendezvous backends: how the strategy learns the agreed views.

``create(backend, ...)`` builds one; ``peer`` is the default and needs nothing
but the other nodes, ``etcd`` is the comparison baseline and needs a server.
"""

from __future__ import annotations

from chaos_lightning.rendezvous.base import Rendezvous, RendezvousClosed, RendezvousError

BACKENDS = ("peer", "etcd")


def create(
    backend: str = "peer",
    *,
    bind: str = "127.0.0.1:0",
    peers: list[str] | tuple[str, ...] = (),
    node_id: str | None = None,
    secret: bytes | str | None = None,
    preset: str = "local",
    etcd_endpoints: str = "127.0.0.1:2379",
    meta: dict[str, str] | None = None,
    host_store: bool = True,
) -> Rendezvous:
    """Build the rendezvous of ``backend`` for this node (it does not join yet).

    ``bind`` is the ``host:port`` this node listens on (port 0 picks one);
    ``peers`` any existing members (empty: this node founds the cluster);
    ``node_id`` defaults to the bound ``host:port``.  ``host_store`` starts this
    node's process-group ``TCPStore`` (needs torch); the membership benchmarks
    turn it off.
    """
    if backend == "peer":
        from chaos_lightning.rendezvous.peer import PeerRendezvous

        return PeerRendezvous(
            bind=bind, peers=list(peers), node_id=node_id, secret=secret, preset=preset, meta=meta, host_store=host_store
        )
    if backend == "etcd":
        from chaos_lightning.integrations.etcd import EtcdRendezvous

        return EtcdRendezvous(
            bind=bind, node_id=node_id, endpoints=etcd_endpoints, meta=meta, host_store=host_store
        )
    raise ValueError(f"unknown rendezvous backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Rendezvous", "RendezvousClosed", "RendezvousError", "create"]
