"""The process-level pieces of a chaos node that need no Lightning.

Role in the whole: :func:`pin_gloo_interface` makes gloo talk on the
interface of the address the node binds; :func:`take_sigterm` turns SIGTERM
into a graceful leave and :func:`sigterm_ends_wait` ends a wait with it;
:func:`freeze_heap` keeps the interpreter's full garbage collections off the
step.  They live apart from :mod:`.environment` (whose ``ChaosEnvironment``
subclasses Lightning's) so that the modules that use them (the group, the
standby wait, the elastic member) import without Lightning: importing
Lightning first runs ``chaos_lightning``'s registration hook, which imports
the strategy, which imported :mod:`.environment` while it was still
half-initialized (``import chaos_lightning.strategy.standby`` as a process's
first import failed so).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("chaos_lightning.strategy")


def pin_gloo_interface(host: str) -> None:
    """Make gloo use the interface of the address we bind.

    Gloo picks its address from the host name unless ``GLOO_SOCKET_IFNAME``
    names an interface; inside a network namespace (or on a host whose name
    resolves to loopback) the name gave an address the peers cannot reach
    (measured on the testbed: "connectFullMesh failed ... Connection
    refused", and no group ever formed).  A user's own setting wins.
    """
    import ipaddress

    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return  # a host name: leave it to gloo
    if ip.is_loopback or ip.is_unspecified:
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == str(ip) for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def take_sigterm(leave: Callable[[], None]) -> None:
    """SIGTERM calls ``leave`` (the node leaves at the next step boundary).

    The strategy calls this at setup and again at train start, because
    Lightning's signal connector installs its own SIGTERM handler in between
    and would chain ours behind one that ends fit with SIGTERMException.
    Ours replaces it, not chained.  Only the main thread may set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        leave()  # it says how (at the next step boundary, or at once inside a step)

    signal.signal(signal.SIGTERM, on_sigterm)


@contextmanager
def sigterm_ends_wait(what: str) -> Iterator[None]:
    """While this node waits outside any group (to join, for ``min_nodes``),
    SIGTERM ends the process within the wait's next wake-up: one line, exit
    143 (128 + SIGTERM), no traceback.  There is nothing to leave yet, so
    "leave at the next step boundary" would wait for a boundary that never
    comes (issue 12: a SIGTERM at 20 s was honoured at 124 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        log.warning("chaos: SIGTERM while %s: exiting", what)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def freeze_heap() -> None:
    """Move every object alive now (imports, Lightning, the model, the data
    set: what a training process keeps to its end) into the interpreter's
    permanent generation (:func:`gc.freeze`).  How many is logged at DEBUG
    only: counting walks the whole list (:func:`gc.get_freeze_count`, 32 ms
    for 358,000 objects here), and this runs on a joiner's first step, which
    every member waits for (it used to count, always: 20-30 ms of each
    join's critical path in a py-spy profile, 2026-12-07).

    Why: CPython's full (generation-2) collection walks every tracked object,
    and a training process holds hundreds of thousands from start-up (370,000
    in benchmarks/heterogeneity.py's worker).  One took 0.40 s at 0.4 CPU,
    every 3-5 s, each node at its own moment; in a synchronous step every
    member waits for each one, so the cluster lost a pause per node: 22,485
    against 28,230 samples/s with equal shares, 33,714 against 46,389 with
    adaptive ones (4 nodes, one run each, 2026-12-07).  Frozen, the same
    collection walks only what was allocated since: 4-20 ms.  No collection
    runs first (at a joiner's first step it would be the members' wait); the
    little garbage alive now (40-812 objects in those runs) stays frozen.
    ``CHAOS_GC_FREEZE=0`` turns it off."""
    gc.freeze()
    if log.isEnabledFor(logging.DEBUG):
        log.debug("chaos: %d objects frozen out of the full garbage collections", gc.get_freeze_count())
