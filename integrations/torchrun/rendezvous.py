"""The ``chaos`` rendezvous backend of torchrun: one round per agent, membership left to the peers.

Role in the whole: ``torchrun --rdzv-backend=chaos`` launches chaos training
without etcd and without torchrun restarting anybody.  torchrun's elastic agent
treats membership as its own business: every join (``num_nodes_waiting() > 0``)
and every failure ends in a new rendezvous round that stops and restarts the
workers of *every* agent (``SimpleElasticAgent._invoke_run``).  Chaos does the
opposite: the peers negotiate membership among themselves at step boundaries
and survivors never restart.  So this handler gives torchrun nothing to react
to:

* every agent is its own rendezvous round of one node: :meth:`next_rendezvous`
  returns rank 0 of world 1 at once, with an in-process ``HashStore`` (all the
  agent uses the store for: its own rank assignment, ``_assign_worker_ranks``,
  and the exit barrier, ``_exit_barrier``; nothing crosses the network);
* :meth:`num_nodes_waiting` is always 0, so a join never restarts a worker;
* before the workers start it sets the chaos environment in ``os.environ``
  (workers inherit the agent's environment: ``SubprocessHandler``) and the
  strategy takes over: ``CHAOS_BIND``, ``CHAOS_PEERS``, ``CHAOS_MIN_NODES``,
  and ``CHAOS_PRESET``, ``CHAOS_BACKEND``, ``CHAOS_SECRET`` when configured.

``--rdzv-endpoint HOST:PORT`` is the cluster's founding address.  The node that
founds binds it (``CHAOS_BIND=HOST:PORT``, ``CHAOS_PEERS`` empty); every other
node binds the local address that routes to it with port 0 (or
``--local-addr``) and joins through it (``CHAOS_PEERS=HOST:PORT``).  Who
founds: ``--rdzv-conf is_host=1|0`` when given (as torch's c10d backend), else
the decision c10d makes, made race-free: the endpoint's host is an address of
this machine, no other agent on this machine has claimed the endpoint (an
``flock`` held for the agent's lifetime, so agents started together on one host
elect exactly one founder), and nobody answers on the endpoint yet.

``--rdzv-conf`` keys: ``is_host``, ``preset`` (membership timing preset),
``membership`` (preset fields overridden, as ``CHAOS_MEMBERSHIP``, but
separated by ``;``: torchrun splits the conf at commas, so
``--rdzv-conf "membership=probe_interval=0.3;suspicion_mult=3"``),
``chaos_backend`` (chaos rendezvous backend, ``peer`` by default; ``backend``
itself cannot be a conf key, torchrun would pass it twice), ``secret_env``
(the name of the variable holding the cluster secret: never the secret
itself on the command line), and the size policy (docs/standby.md):
``standby=1`` (this node's workers wait as warm standbys) and
``target_nodes=K`` (in nodes, like ``--nnodes``: times ``--nproc-per-node``
members; the founder's value is the cluster's).
torch's generic timeouts (``timeout``,
``join_timeout``, ...) are accepted and ignored: the strategy's own bounded
waits apply.  Every value is checked through
:class:`chaos_lightning.config.NodeConfig` (over the environment the workers
inherit) before any worker starts.  ``--nnodes MIN:MAX``: MIN becomes ``CHAOS_MIN_NODES``; a MAX above MIN
becomes ``CHAOS_MAX_NODES`` (the size policy: joiners beyond it wait as
standbys; a plain ``--nnodes N`` caps nothing).  ``--nproc-per-node N``: every worker
is a member (``CHAOS_MIN_NODES`` is MIN x N); the workers share the node's
``CHAOS_BIND`` and split it by ``LOCAL_RANK`` (``CHAOS_SPLIT_BY_LOCAL_RANK=1``:
local rank k binds port + k, or a free port on a joining node, and joins
through local rank 0 and the endpoint).  torchrun stops a node's whole
worker group when one of its workers fails, so under torchrun a worker's
death takes its node's other workers with it; the other nodes train on.

A worker that fails is restarted by its own agent only (``--max-restarts``):
on a joining node the new worker joins the running cluster as a new node; on
the founding node a restart is refused (its new worker could only found a
second cluster at the same address), so that agent exits and the others go on.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.distributed import HashStore
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)

from chaos_lightning.config import SPLIT_BY_LOCAL_RANK_ENV, ConfigError, NodeConfig, resolve_flags
from chaos_lightning.wire.addr import AddressError, format_hostport, parse_hostport

log = logging.getLogger("chaos_lightning.integrations.torchrun")

#: the name torchrun knows this backend by (``--rdzv-backend chaos``)
BACKEND = "chaos"
#: ``--rdzv-conf`` keys this backend reads (``chaos_backend``, not ``backend``:
#: torchrun passes the conf as keyword arguments of ``RendezvousParameters``,
#: whose own ``backend`` argument would clash: a TypeError before any plugin runs)
CONF_KEYS = ("is_host", "preset", "membership", "chaos_backend", "secret_env", "standby", "target_nodes")
#: torch's generic rendezvous options, accepted (torchrun always passes
#: ``timeout``) and ignored: peers bound their own waits
IGNORED_CONF_KEYS = ("timeout", "join_timeout", "last_call_timeout", "close_timeout", "read_timeout")
#: seconds the founder check waits for an answer on the endpoint; loopback and
#: LAN answers take well under 1 ms, a refusal is immediate
PROBE_TIMEOUT = 1.0


class ChaosRendezvousError(RendezvousError):
    """A configuration error the user can fix; its message is one line."""


def _in_torchrun_cli() -> bool:
    """Whether this process is the torchrun command (``torchrun`` or ``python -m torch.distributed.run``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "torch.distributed.run":
        return True
    run = sys.modules.get("torch.distributed.run")
    return run is not None and getattr(main, "main", None) is getattr(run, "main", False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """In the torchrun command, a :class:`ChaosRendezvousError` ends the agent
    with its one line and exit code 2 (as ``chaos-run`` does), not with
    torchrun's traceback; called as a library, it propagates."""
    try:
        yield
    except ChaosRendezvousError as exc:
        if not _in_torchrun_cli():
            raise
        sys.stderr.write(f"torchrun: error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


# ---------------------------------------------------------------------- addresses
def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of ``--rdzv-endpoint``, validated; port 1-65535."""
    if not (endpoint or "").strip():
        raise ChaosRendezvousError("chaos rendezvous: --rdzv-endpoint HOST:PORT is required (the cluster's founding address)")
    try:
        return parse_hostport(endpoint)
    except AddressError as exc:
        raise ChaosRendezvousError(f"chaos rendezvous: --rdzv-endpoint: {exc}") from None


_hostport = format_hostport


def _resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ChaosRendezvousError(f"chaos rendezvous: cannot resolve {host!r}: {exc.strerror or exc}") from None
    return [(family, addr) for family, _, _, _, addr in infos]


def is_local_host(host: str, port: int = 0) -> bool:
    """True when ``host`` resolves to an address of this machine (one it can bind)."""
    for family, addr in _resolve(host, port):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0, *addr[2:]))
                return True
        except OSError:
            continue
    return False


def answers(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether anything accepts a TCP connection on ``host:port``."""
    for family, addr in _resolve(host, port):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(addr)
                return True
        except OSError:
            continue
    return False


def route_host(host: str, port: int) -> str:
    """The local address that routes towards ``host:port`` (loopback for a loopback endpoint)."""
    family, addr = _resolve(host, port)[0]
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # UDP: no packet is sent, the kernel only picks a route
            return str(s.getsockname()[0])
    except OSError as exc:
        raise ChaosRendezvousError(f"chaos rendezvous: no route to {_hostport(host, port)}: {exc.strerror or exc}") from None


def _check_bindable(host: str, port: int) -> None:
    """One line now rather than a worker traceback after its imports."""
    for family, addr in _resolve(host, port):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the chaos agent's server does
                s.bind(addr)
                return
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    raise ChaosRendezvousError(f"chaos rendezvous: cannot bind the founding address {_hostport(host, port)}: {reason}")


class EndpointClaim:
    """This agent's claim to found at ``host:port`` among the agents of this machine.

    An ``flock`` on a file named after the endpoint, held until :meth:`release`
    or the agent's death (the kernel drops it): two agents started at once on
    the endpoint's host cannot both see "nobody answers yet" and both found.
    """

    def __init__(self, host: str, port: int) -> None:
        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
        self.path = os.path.join(tempfile.gettempdir(), f"chaos-torchrun-{safe}-{port}.lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return True  # cannot lock (another user's file): the probe alone decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None


# ---------------------------------------------------------------------- torch internals, read only
def _local_world_size() -> int | None:
    """``--nproc-per-node`` of the agent calling :meth:`next_rendezvous`, when known.

    The handler is not told (``RendezvousParameters`` has no such field); the
    caller, ``SimpleElasticAgent._rendezvous``, holds the ``WorkerSpec`` as its
    local ``spec``.  Read it from the calling frames; ``None`` when called from
    elsewhere (a unit test, another agent).
    """
    try:
        from torch.distributed.elastic.agent.server.api import WorkerSpec
    except ImportError:  # pragma: no cover - torch without the elastic agent
        return None
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        spec = frame.f_locals.get("spec")
        if isinstance(spec, WorkerSpec):
            return int(spec.local_world_size)
        frame = frame.f_back
    return None


# ---------------------------------------------------------------------- the handler
class ChaosRendezvousHandler(RendezvousHandler):
    """torchrun's rendezvous handler for ``--rdzv-backend chaos`` (see the module docstring).

    Everything the user can get wrong (endpoint, ``--rdzv-conf`` keys and
    values, the secret variable) is checked here, before the agent starts
    anything, and reported as one :class:`ChaosRendezvousError` line.
    """

    def __init__(self, params: RendezvousParameters) -> None:
        self.params = params
        self.host, self.port = parse_endpoint(params.endpoint)
        self.endpoint = _hostport(self.host, self.port)
        unknown = sorted(set(params.config) - set(CONF_KEYS) - set(IGNORED_CONF_KEYS))
        if unknown:
            raise ChaosRendezvousError(
                f"chaos rendezvous: unknown --rdzv-conf key(s) {', '.join(unknown)}; this backend reads {', '.join(CONF_KEYS)}"
            )
        try:
            self.is_host: bool | None = params.get_as_bool("is_host")
        except ValueError:
            raise ChaosRendezvousError(
                f"chaos rendezvous: --rdzv-conf is_host={params.get('is_host')!r}: expected 1 or 0"
            ) from None
        self.preset: str | None = params.get("preset")
        self.membership: str | None = params.get("membership")
        self.backend: str | None = params.get("chaos_backend")
        self.secret_env: str | None = params.get("secret_env")
        # the size policy and warm standbys (docs/standby.md), in nodes (agents) like --nnodes
        self.standby: str | None = params.get("standby")
        self.target_nodes: str | None = params.get("target_nodes")
        # --nnodes MIN:MAX with MAX above MIN caps the members (a plain --nnodes N
        # sets MAX = N too, and caps nothing, as before the policy)
        self.max_nodes: str | None = str(params.max_nodes) if params.max_nodes > params.min_nodes else None
        self.nproc = 1  # --nproc-per-node, read at the round
        self.secret: str | None = None
        if self.secret_env is not None:
            self.secret = os.environ.get(self.secret_env) or None
            if self.secret is None:
                raise ChaosRendezvousError(
                    f"chaos rendezvous: --rdzv-conf secret_env={self.secret_env}: ${self.secret_env} is not set"
                )
        self.config(min_nodes=params.min_nodes)  # every value checked now, before any worker starts
        self.local_addr: str | None = params.local_addr
        self.founds: bool | None = None  # decided at the first round
        self.env: dict[str, str] = {}  # what the last round set in os.environ
        self.rounds = 0
        self._claim = EndpointClaim(self.host, self.port)
        self._closed = threading.Event()

    def config(self, *, min_nodes: int, bind: str | None = None, peers: str | None = None) -> NodeConfig:
        """The workers' configuration as they will resolve it (``NodeConfig`` over the
        environment they inherit plus what this plugin sets); an error names the conf key."""
        flags: dict[str, tuple[str, object]] = {
            "CHAOS_PRESET": ("--rdzv-conf preset", self.preset),
            "CHAOS_MEMBERSHIP": ("--rdzv-conf membership", self.membership),
            "CHAOS_BACKEND": ("--rdzv-conf chaos_backend", self.backend),
            "CHAOS_MIN_NODES": ("--nnodes", min_nodes),
            "CHAOS_BIND": ("the bind address", bind),
            "CHAOS_PEERS": ("--rdzv-endpoint", peers),
            "CHAOS_STANDBY": ("--rdzv-conf standby", self.standby),
            "CHAOS_TARGET_NODES": ("--rdzv-conf target_nodes", self._members(self.target_nodes)),
            "CHAOS_MAX_NODES": ("--nnodes MAX", self._members(self.max_nodes)),
        }
        if self.secret_env is not None:
            flags["CHAOS_SECRET"] = (f"${self.secret_env}", self.secret)
        try:
            return resolve_flags(flags)
        except ConfigError as exc:
            raise ChaosRendezvousError(f"chaos rendezvous: {str(exc).removeprefix('chaos: ')}") from None

    def _members(self, nodes: str | None) -> str | None:
        """A node count of the conf as members (every worker is one), or the
        text as given when it is no integer (NodeConfig then names the key)."""
        if nodes is None or not nodes.strip().isdigit():
            return nodes
        return str(int(nodes) * self.nproc)

    # -- RendezvousHandler
    def get_backend(self) -> str:
        return BACKEND

    def get_run_id(self) -> str:
        return self.params.run_id

    def is_closed(self) -> bool:
        return self._closed.is_set()

    def set_closed(self) -> None:
        self._closed.set()

    def num_nodes_waiting(self) -> int:
        """Always 0: joiners are admitted by the peers at a step boundary, never by restarting workers."""
        return 0

    def shutdown(self) -> bool:
        self._closed.set()
        self._claim.release()
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        """A round of one: this agent is rank 0 of world 1; the chaos environment is set for the workers."""
        with _user_errors():
            return self._next_rendezvous()

    def _next_rendezvous(self) -> RendezvousInfo:
        if self.is_closed():
            raise RendezvousClosedError(f"chaos rendezvous {self.params.run_id!r} is closed")
        self.nproc = _local_world_size() or 1
        self.rounds += 1
        if self.founds is None:
            self.founds = self._decide_founder()
        elif self.founds:
            # a local worker restart (--max-restarts): the new worker could only
            # found a second cluster at the same address, beside the running one
            raise ChaosRendezvousError(
                "chaos rendezvous: the founding node's worker failed and founding nodes do not restart "
                "(the cluster goes on without it); restart joining nodes only"
            )
        self.env = self.chaos_env()
        os.environ.update(self.env)
        log.info("chaos rendezvous round %d: %s", self.rounds, " ".join(
            f"{k}={v}" for k, v in sorted(self.env.items()) if k != "CHAOS_SECRET"))
        store = HashStore()  # the agent's own rank assignment and exit barrier, world 1
        host = parse_hostport(self.env["CHAOS_BIND"], allow_port0=True)[0]
        return RendezvousInfo(store, 0, 1, RendezvousStoreInfo.build(0, store, local_addr=host))

    # -- the chaos side
    def _decide_founder(self) -> bool:
        if self.is_host is not None:
            if self.is_host:
                _check_bindable(self.host, self.port)
            return self.is_host
        if not is_local_host(self.host, self.port):
            return False
        if not self._claim.acquire():
            return False  # another agent on this machine founds (or founded) here
        if answers(self.host, self.port):
            self._claim.release()
            return False  # a live member listens on the endpoint: join through it
        _check_bindable(self.host, self.port)
        return True

    def chaos_env(self) -> dict[str, str]:
        """The ``CHAOS_*`` variables for this node's workers (after the founder decision)."""
        from chaos_lightning.wire.auth import is_loopback

        if self.founds is None:
            raise RuntimeError("chaos_env() before the founder decision (next_rendezvous)")
        if self.founds:
            bind, peers = self.endpoint, ""
        else:
            host = self.local_addr or route_host(self.host, self.port)
            bind, peers = _hostport(host.strip("[]"), 0), self.endpoint
        cfg = self.config(min_nodes=self.params.min_nodes, bind=bind, peers=peers)
        bind_host = cfg.bind_host
        if not is_loopback(bind_host) and cfg.secret is None:
            raise ChaosRendezvousError(
                f"chaos rendezvous: this node listens on {bind_host} (not loopback): set the cluster secret in "
                "$CHAOS_SECRET or name its variable with --rdzv-conf secret_env=VAR"
            )
        # every worker is a member: --nnodes counts agents, CHAOS_MIN_NODES members
        env = {"CHAOS_BIND": bind, "CHAOS_PEERS": peers, "CHAOS_MIN_NODES": str(self.params.min_nodes * self.nproc)}
        if self.nproc > 1:
            env[SPLIT_BY_LOCAL_RANK_ENV] = "1"  # local rank k binds port + k and joins through local rank 0
        if self.preset:
            env["CHAOS_PRESET"] = self.preset
        if self.membership:
            env["CHAOS_MEMBERSHIP"] = self.membership
        if self.backend:
            env["CHAOS_BACKEND"] = self.backend
        if self.secret:
            env["CHAOS_SECRET"] = self.secret
        if self.standby:
            env["CHAOS_STANDBY"] = self.standby
        for var, nodes in (("CHAOS_TARGET_NODES", self.target_nodes), ("CHAOS_MAX_NODES", self.max_nodes)):
            if nodes:
                env[var] = self._members(nodes)
        return env


def create_handler(params: RendezvousParameters) -> ChaosRendezvousHandler:
    """The ``RendezvousHandlerCreator`` registered as ``chaos``."""
    with _user_errors():
        return ChaosRendezvousHandler(params)


def handler_creator() -> Any:
    """The ``torchrun.handlers`` entry point: torch calls it with no arguments
    (``registry._register_out_of_tree_handlers``) and registers what it returns.
    Always the same function object: torch refuses to re-register a name with
    a different creator."""
    return create_handler
