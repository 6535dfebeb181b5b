"""More than one process per node (``devices=N``): who starts them, and how each binds.

Role in the whole: the strategy runs one chaos member per process.  With
``Trainer(devices=N)`` / ``Fabric(devices=N)`` and a single ``python
train.py`` per node, Lightning users expect the node's other ``N - 1``
processes to start by themselves, each on its own device (``LOCAL_RANK``).
:class:`DeviceLauncher` starts them, and each one is an ordinary member:

* local rank ``k`` binds ``CHAOS_BIND``'s host at port ``port + k`` (a
  predictable range for firewalls), or at a free port when ``CHAOS_BIND``
  gives port 0 (local rank 0 then takes a free port too, to be its siblings'
  seed);
* it joins through local rank 0 and the node's ``CHAOS_PEERS``, so it can
  still join when the node's first process is gone;
* whatever the script passes as ``bind=``/``peers=``, a started process
  takes the address the launcher gave it (:func:`child_options`).

Nothing ties the processes of a node together beyond that: one of them that
dies or leaves is one member less, the others train on (Lightning's own
launcher kills every process of a node when one exits non-zero; this one
does not).  A whole node leaves when its process group gets the SIGTERM
(``kill -TERM -PGID``, what schedulers send); a SIGTERM to one process makes
only that member leave.  At exit the first process waits (bounded) for the
others it started, so the command ends when the node's work does.

A process that already has ``LOCAL_RANK`` (torchrun, SLURM, or the user's
own starter) is one of several started from outside: nothing is launched;
with ``CHAOS_SPLIT_BY_LOCAL_RANK=1`` (the torchrun plugin sets it) the
node's one ``CHAOS_BIND`` is split the same way (:func:`child_options`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from lightning.fabric.strategies.launchers.launcher import _Launcher

from chaos_lightning.config import SPLIT_BY_LOCAL_RANK_ENV
from chaos_lightning.wire.addr import format_hostport, parse_hostport

log = logging.getLogger("chaos_lightning.strategy")

#: set by :class:`DeviceLauncher` in the processes it starts: their address and seeds
BIND_ENV = "CHAOS_DEVICE_BIND"
PEERS_ENV = "CHAOS_DEVICE_PEERS"
#: how long the first process waits at exit for the ones it started
REAP_TIMEOUT_S = 300.0


def child_options(options: dict[str, Any]) -> dict[str, Any]:
    """The strategy's options, with this process's own address and seeds
    when it is one of several on its node: the script's ``bind=`` (or the
    inherited ``CHAOS_BIND``) names the node's first process's.

    Started by :class:`DeviceLauncher`: what it set.  Started by an outside
    launcher that asks for the split (``CHAOS_SPLIT_BY_LOCAL_RANK=1``, set by
    the torchrun plugin for ``--nproc-per-node N``): local rank ``k > 0``
    binds ``port + k`` (or a free port when the node's port is 0) and joins
    through local rank 0 (when its port is known) and ``CHAOS_PEERS``.
    """
    bind = os.environ.get(BIND_ENV)
    if bind is not None:
        return {**options, "bind": bind, "peers": os.environ.get(PEERS_ENV, "")}
    k = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if os.environ.get(SPLIT_BY_LOCAL_RANK_ENV) != "1" or k == 0:
        return options
    node_bind = options.get("bind") or os.environ.get("CHAOS_BIND", "127.0.0.1:0")
    host, port = parse_hostport(node_bind, allow_port0=True)
    peers = options.get("peers")
    if peers is None:
        peers = os.environ.get("CHAOS_PEERS", "")
    if isinstance(peers, str):
        peers = [p for p in peers.split(",") if p.strip()]
    first = [format_hostport(host, port)] if port else []
    return {**options, "bind": format_hostport(host, port + k if port else 0),
            "peers": ",".join([*first, *(p for p in peers if p not in first)])}


def launcher_for(strategy: Any) -> Any:
    """The launcher the strategy uses: ``None`` when this process is its
    node's only one, or when its processes were started from outside."""
    n = strategy.num_processes
    started = os.environ.get("LOCAL_WORLD_SIZE")
    if started is not None and "LOCAL_RANK" in os.environ and int(started) != n:
        raise ValueError(
            f"chaos: devices={n}, but this node's launcher started {started} process(es) (LOCAL_WORLD_SIZE={started}): "
            f"give devices={started} (one process per device) or start {n}"
        )
    if n <= 1 or "LOCAL_RANK" in os.environ:
        return None
    return DeviceLauncher(strategy)


def _free_port(host: str) -> int:
    """A port the kernel hands out now (bound once and released: the node's first process binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _script_command() -> list[str]:
    """This process's command line again (``python -m pkg`` and interpreter flags too)."""
    return [sys.executable, *sys.orig_argv[1:]]


class DeviceLauncher(_Launcher):
    """Starts local ranks ``1 .. N-1`` of this node, then runs the fit here (local rank 0)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.procs: list[subprocess.Popen] = []

    @property
    def is_interactive_compatible(self) -> bool:
        return False  # the processes re-run the script

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        """Start the others, then run ``function`` here (the Trainer passes
        ``trainer=`` for its own launchers' use; Fabric does not)."""
        self._start_others()
        return function(*args, **kwargs)

    def kill(self, signum: int) -> None:
        """Pass a signal on to the processes this one started (the Trainer's launcher API)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def _start_others(self) -> None:
        cfg = self.strategy.config
        host, port = parse_hostport(cfg.bind, allow_port0=True)
        fixed = port != 0
        if not fixed:  # the siblings need an address to join through
            port = _free_port(host)
            self.strategy.rebind(format_hostport(host, port))
        first = format_hostport(host, port)
        seeds = ",".join([first, *(p for p in cfg.peers if p != first)])
        n = self.strategy.num_processes
        for k in range(1, n):
            env = {**os.environ, "LOCAL_RANK": str(k), "LOCAL_WORLD_SIZE": str(n),
                   BIND_ENV: format_hostport(host, port + k if fixed else 0), PEERS_ENV: seeds}
            self.procs.append(subprocess.Popen(_script_command(), env=env))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(n))
        log.info("chaos: devices=%d: started local ranks 1-%d (pids %s), each a member joining through %s",
                 n, n - 1, [p.pid for p in self.procs], first)
        atexit.register(self._reap)

    def _reap(self) -> None:
        """At exit: wait for the processes this one started (bounded), so the command ends with the node's work."""
        for proc in self.procs:
            try:
                proc.wait(timeout=REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("chaos: local rank process %d still runs %.0f s after this one ended; not waiting",
                            proc.pid, REAP_TIMEOUT_S)
