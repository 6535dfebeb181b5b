"""Per-epoch process-group stores, hosted by the members themselves.

Every node starts a ``TCPStore`` server when it starts (so hosting costs
nothing at switch time) and advertises its port as member meta ``"store"``.
The process group of epoch ``e`` rendezvouses on the rank-0 member's store
under ``chaos/epoch/<e>/``: a fresh prefix per epoch because
``destroy_process_group`` resets gloo's group counter and its keys would
otherwise collide with the previous epoch's (see docs/design.md).

If the rank-0 member dies while the group is forming, ``init_process_group``
times out and the next view names another host; no node is special.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from chaos_lightning.membership.view import View
from chaos_lightning.wire.addr import format_hostport, parse_hostport

STORE_META_KEY = "store"


class StoreHost:
    """A ``TCPStore`` server owned by this process (port chosen by the OS)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout: timedelta = timedelta(seconds=30)):
        self.host = host
        # world_size=None + wait_for_workers=False: clients come and go per epoch.
        self._store = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
        self.port = self._store.port

    @property
    def endpoint(self) -> str:
        return format_hostport(self.host, self.port)

    def close(self) -> None:
        # TCPStore has no explicit close; dropping the last reference stops it.
        self._store = None  # type: ignore[assignment]


def epoch_store(view: View, timeout: timedelta = timedelta(seconds=30)) -> dist.Store:
    """The store for ``view``'s process group: rank 0's store, epoch-prefixed."""
    if not view.members:
        raise ValueError("an empty view has no store")
    host0 = view.members[0]
    endpoint = host0.get(STORE_META_KEY)
    if not endpoint:
        raise ValueError(f"member {host0.id} published no {STORE_META_KEY!r} endpoint")
    host, port = parse_hostport(endpoint)
    client = dist.TCPStore(host, port, None, False, timeout, wait_for_workers=False)
    return dist.PrefixStore(f"chaos/epoch/{view.epoch}/", client)
