"""The rendezvous interface: what the strategy asks of a control plane.

The strategy needs three things from whoever decides membership: to get in
(``join``), to get out (``leave``), and, over and over, "the next agreed view
and a store to build that view's process group".  Two backends implement it:

* ``peer`` (default, :mod:`chaos_lightning.rendezvous.peer`): the membership
  protocol negotiated among the nodes themselves; nothing central.
* ``etcd`` (baseline, :mod:`chaos_lightning.integrations.etcd`): leases,
  compare-and-set transactions and watches on a real etcd server.

Both hand out the same :class:`~chaos_lightning.membership.view.View` type and
are checked by one contract-test suite (``tests/test_rendezvous_contract.py``).

Process-group stores: every node hosts a store server from the start
(:class:`~chaos_lightning.rendezvous.store.StoreHost`, behind the cluster
secret like every port) and publishes its address in its member ``meta``
(key ``"store"``).  The store of epoch ``e`` is the store of
the view's rank-0 member, under the prefix ``chaos/epoch/<e>/``, so each epoch's
process group starts from fresh keys (gloo's keys repeat across re-inits).
"""

from __future__ import annotations

import abc
from datetime import timedelta
from typing import TYPE_CHECKING, Callable

from chaos_lightning.membership.view import View

if TYPE_CHECKING:  # torch is heavy; only the store helpers import it
    import torch.distributed as dist


class RendezvousError(RuntimeError):
    """The control plane could not do what was asked (timeout, refused, closed)."""


class RendezvousClosed(RendezvousError):
    """This node is no longer a member (it left, or was removed) and must rejoin."""


class Rendezvous(abc.ABC):
    """One node's handle on the cluster's membership.

    All methods are thread-safe and every wait is bounded by a ``timeout`` in
    seconds.  Views are numbered by ``epoch``; a newer view has a larger epoch.
    """

    #: the backend's name, as in ``CHAOS_BACKEND``
    backend: str = ""
    #: the cluster secret the process-group stores are dialled with (``None``:
    #: loopback only); a backend sets it from the secret it was given
    store_secret: bytes | None = None

    @property
    @abc.abstractmethod
    def node_id(self) -> str:
        """This node's stable name in views."""

    @abc.abstractmethod
    def join(self, timeout: float) -> View:
        """Become a member (or found the cluster if no peers were given).

        Returns the first committed view that contains this node.  Raises
        :class:`RendezvousError` if that does not happen within ``timeout``.
        """

    @abc.abstractmethod
    def leave(self, timeout: float) -> None:
        """Leave gracefully: returns once a view without this node is committed
        (or ``timeout`` passed; leaving never raises for a slow cluster)."""

    @abc.abstractmethod
    def current_view(self) -> View | None:
        """The newest committed view this node knows, or None before joining."""

    @abc.abstractmethod
    def next_view(self, after_epoch: int, timeout: float) -> View | None:
        """Wait for a committed view with ``epoch > after_epoch``.

        Returns None on timeout.  Raises :class:`RendezvousClosed` if this node
        was removed from the cluster.
        """

    @abc.abstractmethod
    def subscribe(self, callback: Callable[[object], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every membership event (views, failures,
        link changes) from the backend's thread.  Returns an unsubscribe function.
        Callbacks must be quick and must not block."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop background work and release sockets; idempotent."""

    # -- shared behaviour --------------------------------------------------
    def store(
        self, view: View, timeout: float = 30.0, cancelled: "Callable[[], str | None] | None" = None
    ) -> "dist.Store":
        """A store to build the process group of ``view``'s epoch with;
        ``cancelled`` (asked while a call waits) ends a wait early with a reason."""
        from chaos_lightning.rendezvous.store import epoch_store

        return epoch_store(view, timeout=timedelta(seconds=timeout), secret=self.store_secret, cancelled=cancelled)

    def __enter__(self) -> "Rendezvous":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
