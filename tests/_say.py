"""One JSON record per line on stdout, whole, from every test worker.

A ``devices=2`` node's processes share one stdout pipe, and a record longer
than ``PIPE_BUF`` (4 KiB: the final ``done`` record with its per-epoch
sample counts is about 10 KiB) is not written atomically: two processes
ending in lockstep interleaved theirs, and the harness dropped both lines
(CI, test_devices, 2026-12-06).  A lock file, opened by each process on its
own (a lock on the inherited stdout would be shared, so no lock at all),
keeps every record whole.

Every worker that imports this also dumps all its threads' stacks to stderr
(its log file) on SIGUSR1: the harness (``_procs.Node.wait``) sends it when a
wait times out, so a stalled worker's log says where it waited.
"""

from __future__ import annotations

import faulthandler
import fcntl
import json
import os
import signal
import sys
import tempfile
from typing import Any

_LOCK = os.path.join(tempfile.gettempdir(), "chaos-test-say.lock")

faulthandler.register(signal.SIGUSR1, all_threads=True)


def say(**kw: Any) -> None:
    line = json.dumps(kw) + "\n"
    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sys.stdout.write(line)
        sys.stdout.flush()
