"""What a node tells: its timeline as JSON lines (for scenario reports and
benchmarks) and, for people, a progress display for a long wait.

``CHAOS_TRACE=path`` makes the strategy append one JSON object per line to
``path``: when the process started, its join request, every view it learned,
every group it trained in, every committed or failed step, state pulls,
sidelining and leaving.  Every record carries ``t`` (wall clock, so records
of nodes on one machine or in its network namespaces compare directly),
``ev``, ``node`` (the member id) and ``pid``.  The scenario runner
(:mod:`chaos_lightning.scenario`) computes the design's metrics from these.

A record is one ``write`` of one line, flushed at once, so a killed node's
file ends at its last complete record (or a torn last line, which readers
skip).  Writing costs about 10 µs per step; without ``CHAOS_TRACE`` nothing
is written.

The same records feed the node's live outputs: :meth:`Trace.subscribe` hands
every record (a dict, shared by all subscribers: read it, never change it) to
a callable on the emitting thread, with or without a file; the Prometheus
endpoint (:mod:`chaos_lightning.metrics`) and the Lightning-logger bridge
(:mod:`.loggers`) are such subscribers, so the strategy has one place that
says what happened.  A subscriber runs on the training thread (steps) and on
the agent's thread (committed views): it must be quick, and what it raises is
logged once and otherwise ignored (a metrics bug never fails a step).  With
neither a file nor a subscriber, :meth:`Trace.emit` returns at its first test
and :attr:`Trace.enabled` is false, so callers skip building the fields.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("chaos_lightning.strategy")

#: what :meth:`Trace.subscribe` takes: called with each record
Subscriber = Callable[[dict[str, Any]], None]


class Trace:
    """Appends records to ``path`` (None: no file) and hands them to its subscribers."""

    def __init__(self, path: str | None) -> None:
        self._file: TextIO | None = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115
        self._lock = threading.Lock()  # the agent thread writes views
        self.node = ""
        self._pid = os.getpid()
        # a tuple replaced whole on (un)subscribe: emit reads it without the lock
        self._subscribers: tuple[Subscriber, ...] = ()
        self._failed: set[int] = set()  # subscribers whose error was logged once

    @classmethod
    def from_env(cls) -> Trace:
        return cls(os.environ.get("CHAOS_TRACE") or None)

    @property
    def enabled(self) -> bool:
        """Someone reads the records (a file or a subscriber)."""
        return self._file is not None or bool(self._subscribers)

    def subscribe(self, fn: Subscriber) -> None:
        """Hand every record emitted from now on to ``fn`` (see the module docstring)."""
        with self._lock:
            self._subscribers = (*self._subscribers, fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not fn)

    def emit(self, ev: str, **fields: Any) -> None:
        subscribers = self._subscribers
        if self._file is None and not subscribers:
            return
        record = {"t": time.time(), "ev": ev, "node": self.node, "pid": self._pid, **fields}
        for fn in subscribers:
            try:
                fn(record)
            except Exception:  # noqa: BLE001 - an output's bug must not fail the step that emitted
                if id(fn) not in self._failed:
                    self._failed.add(id(fn))
                    log.exception("chaos: trace subscriber %r failed on a %r record (logged once)", fn, ev)
        if self._file is None:
            return
        line = json.dumps(record, default=str)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        """Close the file and drop the subscribers (the node is done)."""
        with self._lock:
            self._subscribers = ()
            if self._file is not None:
                self._file.close()
                self._file = None


def progress(desc: str, **kwargs: Any) -> Any:
    """A progress display on stderr for a wait or transfer that may take a
    while: tqdm (Lightning's own dependency), shown only once it has lasted
    two seconds, and gone when done."""
    from tqdm import tqdm

    return tqdm(desc=desc, delay=2.0, leave=False, dynamic_ncols=True, mininterval=1.0, **kwargs)
