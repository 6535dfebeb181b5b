"""The default rendezvous: peer negotiation, nothing central.

A thin adapter from the :class:`~chaos_lightning.agent.Agent` (which runs the
membership protocol) to the :class:`~chaos_lightning.rendezvous.base.Rendezvous`
interface the strategy uses.  ``peers`` empty: this node founds the cluster;
otherwise it joins through any of them.  The process-group store of each epoch
is hosted by that epoch's rank-0 member (see :mod:`.store`).
"""

from __future__ import annotations

import threading
from typing import Callable

from chaos_lightning.agent import Agent
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.view import View
from chaos_lightning.rendezvous.base import Rendezvous, RendezvousClosed, RendezvousError
from chaos_lightning.wire.addr import parse_hostport
from chaos_lightning.wire.auth import load_secret


class PeerRendezvous(Rendezvous):
    backend = "peer"

    def __init__(
        self,
        *,
        bind: str = "127.0.0.1:0",
        peers: list[str] | tuple[str, ...] = (),
        node_id: str | None = None,
        secret: bytes | str | None = None,
        membership: Config | None = None,
        meta: dict[str, str] | None = None,
        host_store: bool = True,
    ):
        host, _ = parse_hostport(bind, allow_port0=True)
        self.store_secret = load_secret(secret)
        self._store_host = None
        meta = dict(meta or {})
        if host_store:
            from chaos_lightning.rendezvous.store import STORE_META_KEY, StoreHost

            self._store_host = StoreHost(host, secret=self.store_secret)
            meta[STORE_META_KEY] = self._store_host.endpoint
        self._peers = [p for p in peers if p]
        # bind now, so node_id and addr are known before joining
        self.agent = Agent(bind=bind, node_id=node_id, secret=secret, membership=membership, meta=meta).start(None)
        self._started = False
        self._lock = threading.Lock()

    @property
    def node_id(self) -> str:
        return self.agent.node_id

    @property
    def addr(self) -> str:
        return self.agent.addr

    def _ensure_started(self) -> None:
        with self._lock:
            if not self._started:
                self.agent.join(self._peers)
                self._started = True

    def join(self, timeout: float) -> View:
        self._ensure_started()
        view = self.agent.wait_view(0, timeout)
        if view is None:
            where = self.agent.seed_errors() or ", ".join(self._peers) or "(founding)"
            raise RendezvousError(f"{self.node_id}: no view with this node within {timeout:g}s (peers: {where})")
        return view

    def leave(self, timeout: float) -> None:
        if self._started:
            self.agent.leave(timeout)

    def current_view(self) -> View | None:
        return self.agent.view()

    def next_view(self, after_epoch: int, timeout: float) -> View | None:
        if not self._started:
            raise RendezvousClosed(f"{self.node_id} has not joined")
        view = self.agent.wait_view(after_epoch, timeout, member=False)
        removed = self.agent.removed
        # declared failed while alive: the agent asks to be let in again (a new
        # incarnation); until a view has us, this is a wait, not the end
        # (measured by the soak: a node back from a partition raised here and
        # exited 1 a moment before the view that re-admitted it)
        if removed is not None and self.agent.rejoining():
            return view if view is not None and self.node_id in view else None
        if removed is not None and (view is None or self.node_id not in view):
            how = "left" if removed.graceful else "was removed from"
            raise RendezvousClosed(f"{self.node_id} {how} the cluster at epoch {removed.view.epoch}")
        return view

    def subscribe(self, callback: Callable[[object], None]) -> Callable[[], None]:
        return self.agent.subscribe(callback)

    def close(self) -> None:
        self.agent.stop()
        if self._store_host is not None:
            self._store_host.close()


def create(
    *,
    bind: str = "127.0.0.1:0",
    peers: list[str] | tuple[str, ...] = (),
    node_id: str | None = None,
    secret: bytes | str | None = None,
    membership: Config | None = None,
    meta: dict[str, str] | None = None,
    host_store: bool = True,
    **_: object,
) -> PeerRendezvous:
    """The ``peer`` entry point of the ``chaos_lightning.rendezvous`` group (the etcd settings are not ours)."""
    return PeerRendezvous(
        bind=bind, peers=peers, node_id=node_id, secret=secret, membership=membership, meta=meta, host_store=host_store
    )
