"""Process helpers shared by the tests, the demo, the scenarios and the
benchmarks: ports to hand to a process that binds later, and a bounded reap.

Not part of the runtime: nothing under the layers imports this module.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Collection

#: Ports handed out for processes to bind later: below Linux's ephemeral
#: range (32768-60999), which every ``bind(0)`` and every outgoing connection
#: draws from.  A port taken from that range stayed free only until some
#: other test's connection picked it in the seconds before our worker bound
#: it ("address already in use", seen once in three runs).
PORTS = (20000, 32000)
_rng = random.Random(os.getpid())


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port free right now, outside the ephemeral range (see :data:`PORTS`),
    and not in ``avoid``: the ports given to processes that may not have
    bound them yet (a Python worker binds seconds after it starts), which a
    bind test alone would find free and hand out twice."""
    for _ in range(200):
        port = _rng.randrange(*PORTS)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS} after 200 tries")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports, each free right now (see :func:`free_port`)."""
    ports: list[int] = []
    while len(ports) < n:
        ports.append(free_port(host, avoid=ports))
    return ports


def kill_and_reap(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` if it still runs and reap it (bounded: 10 s)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not honoured
        pass
