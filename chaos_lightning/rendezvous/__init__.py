"""Rendezvous backends: how the strategy learns the agreed views.

``create(backend, ...)`` builds one.  Backends are found through the
``chaos_lightning.rendezvous`` entry-point group (``pyproject.toml``), so the
core names none of them and imports none of them until asked: ``peer``
(:mod:`chaos_lightning.rendezvous.peer`) is the default and needs nothing but
the other nodes; ``etcd`` (``chaos_lightning.integrations.etcd``) is the
comparison baseline and needs a server.  A third-party package adds a backend
by declaring an entry point in that group whose object is a factory with the
keyword signature of :data:`Factory` (see :func:`create`).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Callable

from chaos_lightning.rendezvous.base import Rendezvous, RendezvousClosed, RendezvousError

if TYPE_CHECKING:
    from chaos_lightning.membership.config import Config

#: the entry-point group every backend registers in
ENTRY_POINT_GROUP = "chaos_lightning.rendezvous"

#: a backend's factory: called with every keyword of :func:`create` but
#: ``backend``; it uses those it knows and ignores the rest (``**_``)
Factory = Callable[..., Rendezvous]


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backends() -> tuple[str, ...]:
    """The names of the installed backends, sorted (``("etcd", "peer")`` for this package)."""
    return tuple(sorted(_entry_points()))


def create(
    backend: str = "peer",
    *,
    bind: str = "127.0.0.1:0",
    peers: list[str] | tuple[str, ...] = (),
    node_id: str | None = None,
    secret: bytes | str | None = None,
    membership: Config | None = None,
    etcd_endpoints: str = "127.0.0.1:2379",
    etcd_prefix: str | None = None,
    etcd_ttl: float | None = None,
    etcd_op_timeout: float | None = None,
    meta: dict[str, str] | None = None,
    host_store: bool = True,
) -> Rendezvous:
    """Build the rendezvous of ``backend`` for this node (it does not join yet).

    ``bind`` is the ``host:port`` this node listens on (port 0 picks one);
    ``peers`` any existing members (empty: this node founds the cluster);
    ``node_id`` defaults to the bound ``host:port``; ``membership`` is the
    peer protocol's timing (``None``: the default preset); the ``etcd_*``
    settings are the etcd baseline's (``None``: its defaults).  ``host_store``
    starts this node's process-group store host (needs torch); the
    membership benchmarks turn it off.  Values are taken as given: resolving
    them from the environment is :class:`chaos_lightning.config.NodeConfig`'s job.
    """
    found = _entry_points()
    ep = found.get(backend)
    if ep is None:
        installed = ", ".join(sorted(found)) or "none (is chaos_lightning installed? pip install -e .)"
        raise ValueError(f"unknown rendezvous backend {backend!r}; installed: {installed}")
    factory: Factory = ep.load()
    return factory(
        bind=bind, peers=tuple(peers), node_id=node_id, secret=secret, membership=membership,
        etcd_endpoints=etcd_endpoints, etcd_prefix=etcd_prefix, etcd_ttl=etcd_ttl, etcd_op_timeout=etcd_op_timeout,
        meta=meta, host_store=host_store,
    )


__all__ = ["ENTRY_POINT_GROUP", "Factory", "Rendezvous", "RendezvousClosed", "RendezvousError", "backends", "create"]
