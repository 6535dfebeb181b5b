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
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, TextIO


class Trace:
    """Appends records to ``path`` (or does nothing when ``path`` is None)."""

    def __init__(self, path: str | None) -> None:
        self._file: TextIO | None = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115
        self._lock = threading.Lock()  # the agent thread writes views
        self.node = ""
        self._pid = os.getpid()

    @classmethod
    def from_env(cls) -> Trace:
        return cls(os.environ.get("CHAOS_TRACE") or None)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def emit(self, ev: str, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"t": time.time(), "ev": ev, "node": self.node, "pid": self._pid, **fields}, default=str)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def progress(desc: str, **kwargs: Any) -> Any:
    """A progress display on stderr for a wait or transfer that may take a
    while: tqdm (Lightning's own dependency), shown only once it has lasted
    two seconds, and gone when done."""
    from tqdm import tqdm

    return tqdm(desc=desc, delay=2.0, leave=False, dynamic_ncols=True, mininterval=1.0, **kwargs)
