"""One JSON record per line on stdout, whole, from every test worker.

A ``devices=2`` node's processes share one stdout pipe, and a record longer
than ``PIPE_BUF`` (4 KiB: the final ``done`` record with its per-epoch
sample counts is about 10 KiB) is not written atomically: two processes
ending in lockstep interleaved theirs, and the harness dropped both lines
(CI, test_devices, 2026-12-06).  So a record is one ``write`` when it fits
in ``PIPE_BUF`` (atomic on a pipe), and a longer one is written under a lock
file of *that pipe* (named by its inode; opened by each process on its own:
a lock on the inherited stdout would be shared, so no lock at all).

Not one lock for every worker on the machine, as before: a worker
SIGSTOPped by a test while it held the lock stalled every other worker of
the machine in ``say`` (test_strategy's hung-node test, 1 run in 12, the
survivors' stacks ending in this function, 2026-12-07).

Every worker that imports this also dumps all its threads' stacks to stderr
(its log file) on SIGUSR1: the harness (``_procs.Node.wait``) sends it when a
wait times out, so a stalled worker's log says where it waited.
"""

from __future__ import annotations

import faulthandler
import fcntl
import json
import os
import select
import signal
import stat
import sys
import tempfile
from typing import Any

faulthandler.register(signal.SIGUSR1, all_threads=True)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def say(**kw: Any) -> None:
    data = (json.dumps(kw) + "\n").encode()
    sys.stdout.flush()  # whatever the worker printed goes first
    fd = sys.stdout.fileno()
    st = os.fstat(fd)
    if len(data) <= select.PIPE_BUF or not stat.S_ISFIFO(st.st_mode):
        _write_all(fd, data)  # one write: whole on a pipe (and a file is one writer's)
        return
    lock_path = os.path.join(tempfile.gettempdir(), f"chaos-test-say-{st.st_dev}-{st.st_ino}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_all(fd, data)
