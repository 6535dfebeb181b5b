"""``chaos-run``: the launcher of chaos_lightning training scripts (torchrun-like).

Role in the whole: the strategy (``Trainer(strategy="chaos")``) resolves its
configuration from ``CHAOS_*`` environment variables
(:class:`chaos_lightning.config.NodeConfig`) and is started as one process per
device by the user.  This module is that user: it sets the environment
(checked through the same ``NodeConfig`` first, so a bad flag or variable is
one line here, not a traceback in every child), starts the script, forwards signals (SIGTERM = graceful leave at
the next step boundary) and reaps what it started.  It also queries a live
node (``status``) and asks a node to leave (``leave``).

Usage (see ``chaos-run --help``)::

    chaos-run --bind HOST:PORT [--peers HOST:PORT,...] [--min-nodes K] train.py ARGS...   # one node
    chaos-run --nodes N [--host H] [--base-port P] train.py ARGS...                      # N local nodes
    chaos-run --nodes N --standby S [--target-nodes K] train.py ARGS...                 # ... and S warm standbys
    chaos-run --join HOST:PORT train.py ARGS...                                          # join a running cluster
    chaos-run leave --pid PID | --node HOST:PORT [--wait S]                              # graceful leave
    chaos-run status --peer HOST:PORT [--json]                                           # view, links, resources

Children run in their own session (so a Ctrl-C in the terminal reaches them
once, through the launcher) and receive SIGTERM if the launcher itself dies
(Linux ``PR_SET_PDEATHSIG``), so no node outlives its launcher unnoticed.
Every wait is bounded: after a forwarded signal the children have ``--grace``
seconds before SIGKILL; a second Ctrl-C kills at once.

Errors the user can fix (a malformed or unreachable address, a wrong secret, a
missing script, a busy port) are one line on stderr and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

from chaos_lightning.config import ConfigError, NodeConfig, secret_from_env
from chaos_lightning.wire.addr import AddressError, format_hostport, normalize_hostport, parse_hostport

PROG = "chaos-run"
#: exit code of every user error (argparse's convention)
EXIT_USAGE = 2
#: default first port of ``--nodes`` (torchrun's master port)
DEFAULT_BASE_PORT = 29500
#: seconds children get to leave after a forwarded signal before SIGKILL
DEFAULT_GRACE = 30.0
#: signals forwarded to the children
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: seconds between two status polls of each waiting standby (is it a member
#: now?): a replacement starts within this of an admission; the poll is one
#: authenticated request per waiting standby, bounded by the same time
STANDBY_POLL_S = 1.0


class LaunchError(Exception):
    """A user error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------- addresses
# parsed by the one HOST:PORT parser (chaos_lightning.wire.addr); its
# AddressError is a user error like LaunchError (main() prints it in one line)


def _addr_arg(allow_port0: bool = False) -> Callable[[str], str]:
    def convert(text: str) -> str:
        try:
            return normalize_hostport(text, allow_port0=allow_port0)
        except AddressError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _addr_list_arg(text: str) -> list[str]:
    return [_addr_arg()(part) for part in text.split(",") if part.strip()]


def _route_host(peer: str) -> str:
    """The local address that routes towards ``peer`` (loopback for a loopback peer)."""
    host, port = parse_hostport(peer)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])  # UDP: no packet is sent, the kernel only picks a route
            return str(s.getsockname()[0])
    except OSError as exc:
        raise LaunchError(f"cannot route to {peer}: {exc.strerror or exc}") from None


def _check_port_free(host: str, port: int) -> None:
    """Fail early (one line) when ``host:port`` cannot be bound, instead of N tracebacks."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent's server does
            s.bind((host, port))
    except OSError as exc:
        reason = "already in use" if exc.errno == 98 else (exc.strerror or str(exc))
        raise LaunchError(f"cannot bind {format_hostport(host, port)}: {reason} (choose another --base-port/--bind)") from None


# ---------------------------------------------------------------------- argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


_FORMATTER = argparse.RawDescriptionHelpFormatter

LAUNCH_DESCRIPTION = """\
Start chaos_lightning training processes (Trainer(strategy="chaos")) with the
CHAOS_* environment set, forward SIGTERM/SIGINT/SIGHUP to them, reap them, and
exit with their exit code (128+N for a child killed by signal N).

modes:
  one node        chaos-run --bind HOST:PORT [--peers HOST:PORT,...] train.py ARGS...
                  (no --peers: this node founds a cluster)
  N local nodes   chaos-run --nodes N [--host H] [--base-port P] train.py ARGS...
                  node 0 founds, nodes 1..N-1 join through it; training starts
                  once N nodes are members (--min-nodes); every output line is
                  prefixed with [nodeI]; exit code non-zero if any node failed
  warm standbys   chaos-run --nodes N --standby S train.py ARGS...
                  also S processes with CHAOS_STANDBY=1 (ports after the
                  nodes'): each runs the script up to trainer.fit and waits
                  outside the cluster (size policy: --target-nodes, default N;
                  --max-nodes); one is admitted when a member fails or leaves.
                  Standbys still waiting when the fit has ended are stopped.
                  An admitted standby is replaced: the launcher polls each
                  waiting standby's agent (as chaos-run status does) and,
                  once it is a member, starts a new one on the next free
                  port, so S wait again (docs/standby.md)
  join            chaos-run --join HOST:PORT train.py ARGS...
                  one node joining a running cluster through any of its members
                  (CHAOS_MIN_NODES=1); with --nodes N, N nodes join

other commands:
  chaos-run status --peer HOST:PORT [--json]   a live node's view, links, resources, transfers
  chaos-run leave --pid PID | --node HOST:PORT  graceful leave (SIGTERM) at the next step boundary
  chaos-run scenario [TIMELINE] [--testbed]     a scripted churn run (joins, leaves, kills, link cuts)
                                                with a report: metrics table, JSON and plot

signals: SIGTERM to chaos-run (or to a node) makes the node(s) leave
gracefully at the next step boundary; the others go on training.  Ctrl-C is
forwarded as SIGINT; a second Ctrl-C kills the children.  Children still
running --grace seconds after a forwarded signal are killed.

secret: the cluster secret is read from the environment (CHAOS_SECRET, or the
variable named by --secret-env), never from the command line; it is required
to listen on a non-loopback address.
"""


def _launch_parser() -> _Parser:
    p = _Parser(prog=PROG, description=LAUNCH_DESCRIPTION, formatter_class=_FORMATTER, allow_abbrev=False)
    where = p.add_argument_group("cluster")
    where.add_argument(
        "--bind", type=_addr_arg(allow_port0=True), default=None, metavar="HOST:PORT",
        help="address this node listens on and is known by (CHAOS_BIND; default: $CHAOS_BIND, or 127.0.0.1:0, "
        "or, with --join/--peers, the local address routing to the peer with port 0)",
    )
    where.add_argument(
        "--peers", type=_addr_list_arg, default=None, metavar="HOST:PORT,...",
        help="members to join through (CHAOS_PEERS; default: $CHAOS_PEERS; empty: found a cluster)",
    )
    where.add_argument("--join", type=_addr_arg(), default=None, metavar="HOST:PORT",
                       help="join a running cluster through this member (sets --min-nodes 1 unless given)")
    where.add_argument("--nodes", type=int, default=None, metavar="N", help="start N local nodes")
    where.add_argument("--host", type=str, default="127.0.0.1",
                       help="with --nodes: the host the nodes bind (default %(default)s)")
    where.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, metavar="P",
                       help="with --nodes: node I binds port P+I (default %(default)s)")
    where.add_argument("--min-nodes", type=int, default=None, metavar="K",
                       help="training starts once a view has K members (CHAOS_MIN_NODES; default: N with --nodes, "
                       "1 with --join, else $CHAOS_MIN_NODES or 1)")
    where.add_argument("--standby", type=int, default=0, metavar="N",
                       help="with --nodes: also keep N warm standby processes (CHAOS_STANDBY=1: script run up to "
                       "trainer.fit, then waiting outside the cluster); admitted when a member fails or leaves, "
                       "and then replaced by a new one")
    where.add_argument("--target-nodes", type=int, default=None, metavar="K",
                       help="size policy: admit joiners while a view has fewer than K members, the rest wait as "
                       "standbys (CHAOS_TARGET_NODES; default with --standby: N of --nodes)")
    where.add_argument("--max-nodes", type=int, default=None, metavar="M",
                       help="size policy: never more than M members; the newest above it retire (CHAOS_MAX_NODES)")
    where.add_argument("--secret-env", default="CHAOS_SECRET", metavar="VAR",
                       help="environment variable holding the cluster secret, passed as CHAOS_SECRET (default %(default)s)")
    where.add_argument("--preset", default=None, help="membership timing preset: local, lan, edge (CHAOS_PRESET)")
    where.add_argument("--membership", default=None, metavar="FIELD=VALUE,...",
                       help="membership settings overriding the preset's, e.g. probe_interval=0.3,suspicion_mult=3 "
                       "(CHAOS_MEMBERSHIP)")
    where.add_argument("--backend", default=None, help="rendezvous backend: peer, etcd (CHAOS_BACKEND)")
    run = p.add_argument_group("process")
    run.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m SCRIPT)")
    run.add_argument("--no-python", action="store_true", help="run SCRIPT as an executable, not with the Python interpreter")
    run.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="S",
                     help="seconds children get to exit after a forwarded signal before SIGKILL (default %(default)s)")
    p.add_argument("script", metavar="SCRIPT", nargs="?",
                   help="training script (or module with -m, or executable with --no-python)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")
    return p


def _status_parser() -> _Parser:
    p = _Parser(
        prog=f"{PROG} status", formatter_class=_FORMATTER, allow_abbrev=False,
        description="Query a live node's agent and print its current view (epoch, members), links (RTT, bandwidth),\n"
        "resources and transfer statistics.  The cluster secret comes from $CHAOS_SECRET (or --secret-env).",
    )
    p.add_argument("--peer", required=True, type=_addr_arg(), metavar="HOST:PORT",
                   help="the node's agent address (its CHAOS_BIND)")
    p.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="connect/answer bound in seconds (default %(default)s)")
    p.add_argument("--secret-env", default="CHAOS_SECRET", metavar="VAR",
                   help="variable holding the cluster secret (default %(default)s)")
    return p


def _leave_parser() -> _Parser:
    p = _Parser(
        prog=f"{PROG} leave", formatter_class=_FORMATTER, allow_abbrev=False,
        description="Make a node on this machine leave gracefully: send it SIGTERM; it leaves the cluster at the next\n"
        "step boundary and its fit returns (the others go on).  Sending SIGTERM to a chaos-run launcher does the\n"
        "same for all of its nodes.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int, help="process id of the node (or of its chaos-run launcher)")
    who.add_argument("--node", type=_addr_arg(), metavar="HOST:PORT",
                     help="the local process listening on this address (its CHAOS_BIND)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the process to exit (exit 1 if it does not)")
    return p


# ---------------------------------------------------------------------- launching
@dataclass
class NodeSpec:
    """One process to start: its index, environment additions and command line."""

    index: int
    env: dict[str, str]
    argv: list[str]
    #: a warm standby (``CHAOS_STANDBY=1``): stopped with SIGTERM once every
    #: other node's fit has ended, and that exit is not a failure
    standby: bool = False


def _secret(var: str) -> str | None:
    value = os.environ.get(var)
    if var != "CHAOS_SECRET" and not value:
        raise LaunchError(f"--secret-env {var}: the variable is not set")
    return value or None


def _script_argv(args: argparse.Namespace) -> list[str]:
    if args.module and args.no_python:
        raise LaunchError("--module and --no-python exclude each other")
    if args.no_python:
        exe = shutil.which(args.script)
        if exe is None:
            raise LaunchError(f"no such executable: {args.script}")
        return [exe, *args.script_args]
    if args.module:
        return [sys.executable, "-m", args.script, *args.script_args]
    if not os.path.isfile(args.script):
        raise LaunchError(f"no such script: {args.script}")
    return [sys.executable, args.script, *args.script_args]


def plan(args: argparse.Namespace) -> list[NodeSpec]:
    """The processes a launch command starts (validated; no side effects but port checks)."""
    from chaos_lightning.wire.auth import is_loopback

    argv = _script_argv(args)
    secret = _secret(args.secret_env)
    common: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if secret:
        common["CHAOS_SECRET"] = secret
    if args.preset:
        common["CHAOS_PRESET"] = args.preset
    if args.membership:
        common["CHAOS_MEMBERSHIP"] = args.membership
    if args.backend:
        common["CHAOS_BACKEND"] = args.backend
    if args.standby < 0:
        raise LaunchError("--standby must be at least 0")
    if args.standby and args.nodes is None:
        raise LaunchError("--standby needs --nodes (the standbys join the nodes this launcher starts)")
    target = args.target_nodes if args.target_nodes is not None else (args.nodes if args.standby else None)
    if target is not None:
        common["CHAOS_TARGET_NODES"] = str(target)
    if args.max_nodes is not None:
        common["CHAOS_MAX_NODES"] = str(args.max_nodes)
    if args.grace <= 0:
        raise LaunchError("--grace must be positive")
    if args.min_nodes is not None and args.min_nodes < 1:
        raise LaunchError("--min-nodes must be at least 1")
    if args.join and args.peers:
        raise LaunchError("--join and --peers exclude each other (--join A is --peers A --min-nodes 1)")
    peers = [args.join] if args.join else args.peers

    if args.nodes is not None:
        if args.nodes < 1:
            raise LaunchError("--nodes must be at least 1")
        if args.bind:
            raise LaunchError("--bind is for one node; with --nodes use --host and --base-port")
        host = parse_hostport(format_hostport(args.host.strip().strip("[]"), 1))[0]
        if not 1 <= args.base_port <= 65535 - args.nodes + 1:
            last = args.base_port + args.nodes - 1
            raise LaunchError(f"--base-port {args.base_port}: ports {args.base_port}..{last} are out of range")
        if not is_loopback(host) and not secret:
            raise LaunchError(f"--host {host} is not loopback: set the cluster secret in ${args.secret_env}")
        total = args.nodes + args.standby
        if args.base_port + total - 1 > 65535:
            raise LaunchError(f"--base-port {args.base_port}: ports {args.base_port}..{args.base_port + total - 1} "
                              "are out of range")
        addrs = [format_hostport(host, args.base_port + i) for i in range(total)]
        for i in range(total):
            _check_port_free(host, args.base_port + i)
        min_nodes = args.min_nodes if args.min_nodes is not None else (1 if peers else args.nodes)
        specs = []
        for i, addr in enumerate(addrs[:args.nodes]):
            node_peers = peers if peers else ([] if i == 0 else [addrs[0]])
            env = {**common, "CHAOS_BIND": addr, "CHAOS_PEERS": ",".join(node_peers),
                   "CHAOS_MIN_NODES": str(min_nodes), "CHAOS_LAUNCH_INDEX": str(i)}
            specs.append(NodeSpec(i, env, argv))
        for i, addr in enumerate(addrs[args.nodes:], start=args.nodes):
            # every node's address as a seed: a standby must still reach the
            # cluster after the member it would have asked first has died
            seeds = peers if peers else addrs[:args.nodes]
            env = {**common, "CHAOS_BIND": addr, "CHAOS_PEERS": ",".join(seeds), "CHAOS_MIN_NODES": "1",
                   "CHAOS_STANDBY": "1", "CHAOS_LAUNCH_INDEX": str(i)}
            specs.append(NodeSpec(i, env, argv, standby=True))
        for spec in specs:
            _check_config(spec.env, args)
        return specs

    if peers is None:
        peers = list(_from_env("CHAOS_PEERS").peers)
    bind = args.bind or (_from_env("CHAOS_BIND").bind if (os.environ.get("CHAOS_BIND") or "").strip() else None)
    if bind:
        bind = format_hostport(*parse_hostport(bind, allow_port0=True))
    elif peers:
        bind = format_hostport(_route_host(peers[0]), 0)
    else:
        bind = "127.0.0.1:0"
    host, port = parse_hostport(bind, allow_port0=True)
    if not is_loopback(host) and not secret:
        raise LaunchError(f"--bind {bind} is not loopback: set the cluster secret in ${args.secret_env}")
    _check_port_free(host, port)
    if args.min_nodes is not None:
        min_nodes = str(args.min_nodes)
    elif args.join:
        min_nodes = "1"
    else:
        min_nodes = os.environ.get("CHAOS_MIN_NODES", "1")
    env = {**common, "CHAOS_BIND": bind, "CHAOS_PEERS": ",".join(peers), "CHAOS_MIN_NODES": min_nodes, "CHAOS_LAUNCH_INDEX": "0"}
    _check_config(env, args)
    return [NodeSpec(0, env, argv)]


def replacement_standby(spec: NodeSpec, index: int, taken: set[int], tries: int = 64,
                        seeds: Sequence[str] = ()) -> NodeSpec | None:
    """A new standby like ``spec`` (same script, policy, secret), node
    ``index``, on the first port after ``spec``'s that no child of this
    launcher uses and that is free now (None if none of ``tries`` is).
    Its seeds: ``seeds`` (the members alive now) first, then ``spec``'s."""
    host, port = parse_hostport(spec.env["CHAOS_BIND"])
    peers = ",".join(dict.fromkeys([*seeds, *filter(None, spec.env.get("CHAOS_PEERS", "").split(","))]))
    for candidate in range(port + 1, min(port + 1 + tries, 65536)):
        if candidate in taken:
            continue
        try:
            _check_port_free(host, candidate)
        except LaunchError:
            continue
        env = {**spec.env, "CHAOS_BIND": format_hostport(host, candidate), "CHAOS_LAUNCH_INDEX": str(index),
               "CHAOS_PEERS": peers}
        return NodeSpec(index, env, list(spec.argv), standby=True)
    return None


def _from_env(var: str) -> NodeConfig:
    """The one setting ``var`` of this environment, parsed as a child would (one line naming it if bad)."""
    try:
        return NodeConfig.resolve(env={var: os.environ.get(var, "")})
    except ConfigError as exc:
        raise LaunchError(str(exc).removeprefix("chaos: ")) from None


def _check_config(env: dict[str, str], args: argparse.Namespace) -> NodeConfig:
    """The configuration a child will resolve from the environment it gets, resolved
    here first: a bad value is one line naming the flag (or variable) now, not a
    traceback in every child after its imports."""
    flags = {"CHAOS_PRESET": "--preset", "CHAOS_MEMBERSHIP": "--membership", "CHAOS_BACKEND": "--backend",
             "CHAOS_BIND": "--bind", "CHAOS_MIN_NODES": "--min-nodes", "CHAOS_PEERS": "--join" if args.join else "--peers"}
    given = {var: flag for var, flag in flags.items() if getattr(args, flag[2:].replace("-", "_"), None) is not None}
    if args.nodes is not None:
        given["CHAOS_BIND"] = "--host"
    if args.secret_env != "CHAOS_SECRET":
        given["CHAOS_SECRET"] = f"${args.secret_env}"
    try:
        return NodeConfig.resolve(env={**os.environ, **env})
    except ConfigError as exc:
        raise LaunchError(f"{given.get(exc.name, exc.name)} {exc.requirement}, got {exc.value!r}") from None


def _pdeathsig_preexec(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM this child when the launcher dies (Linux; a no-op elsewhere).

    libc is looked up here, in the launcher: the function runs in the forked
    child, where (a replacement standby is started while relay threads run)
    it should do no more than a C call and two system calls."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is None:
            return
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _exit_code(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class _Child:
    spec: NodeSpec
    proc: subprocess.Popen
    readers: list[threading.Thread] = field(default_factory=list)
    reported: bool = False
    released: bool = False  # a standby this launcher stopped after the fit ended
    admitted: bool = False  # a standby seen as a member (then replaced by a new one)


class Supervisor:
    """Starts the planned processes, relays their output, forwards signals, reaps them.

    ``prefix``: relay each child's stdout/stderr line by line as ``[nodeI] line``
    (several nodes); otherwise children inherit the launcher's stdio.

    Standbys are kept at their number: every :data:`STANDBY_POLL_S` seconds
    each standby not yet admitted is asked for its agent's status (what
    ``chaos-run status`` reads; bounded by the same interval); once it is a
    member, a new standby is started (:func:`replacement_standby`), unless
    the launcher is stopping or the fit has ended.  Why the status and not
    the child's output: the script's output is the user's (its logging may
    be off), the agent's phase is the protocol's own answer.
    """

    def __init__(self, specs: Sequence[NodeSpec], *, prefix: bool, grace: float = DEFAULT_GRACE,
                 out: IO[str] | None = None, err: IO[str] | None = None,
                 standby_poll: float | None = None) -> None:
        self.specs = list(specs)
        self.standby_poll = STANDBY_POLL_S if standby_poll is None else standby_poll
        self._next_poll = 0.0
        self.prefix = prefix
        self.grace = grace
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.children: list[_Child] = []
        self._lock = threading.Lock()
        self._signals: list[int] = []
        self._stop_at: float | None = None  # monotonic deadline after a forwarded signal
        self._width = len(str(len(self.specs) - 1))

    # -- output
    def _say(self, message: str) -> None:
        with self._lock:
            self.err.write(f"[{PROG}] {message}\n")
            self.err.flush()

    def _relay(self, child: _Child, stream: IO[bytes], sink: IO[str]) -> None:
        tag = f"[node{child.spec.index:<{self._width}}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                sink.write(tag + line + "\n")
                sink.flush()
        stream.close()

    # -- life
    def _spawn(self, spec: NodeSpec) -> _Child:
        pipe = subprocess.PIPE if self.prefix else None
        try:
            proc = subprocess.Popen(
                spec.argv, env={**os.environ, **spec.env}, stdout=pipe, stderr=pipe,
                stdin=subprocess.DEVNULL if self.prefix else None,
                start_new_session=True, preexec_fn=_pdeathsig_preexec(os.getpid()),
            )
        except OSError as exc:
            raise LaunchError(f"cannot start {spec.argv[0]}: {exc.strerror or exc}") from None
        child = _Child(spec, proc)
        self.children.append(child)
        if self.prefix:
            self._say(f"node {spec.index}{' (standby)' if spec.standby else ''}: pid {proc.pid}, "
                      f"bind {spec.env['CHAOS_BIND']}, "
                      f"peers {spec.env['CHAOS_PEERS'] or '(founds the cluster)'}")
        return child

    def _start_relays(self, child: _Child) -> None:
        if not self.prefix:
            return
        for stream, sink in ((child.proc.stdout, self.out), (child.proc.stderr, self.err)):
            assert stream is not None
            t = threading.Thread(
                target=self._relay, args=(child, stream, sink), name=f"relay{child.spec.index}", daemon=True
            )
            t.start()
            child.readers.append(t)

    def start(self) -> None:
        """Spawn every process (all before any relay thread: the fork is
        simplest with one thread), then start the relays."""
        for spec in self.specs:
            self._spawn(spec)
        for child in self.children:
            self._start_relays(child)

    def _replenish_standbys(self) -> None:
        """Each standby seen as a member now is replaced by a new standby
        (see the class docstring).  A status that fails (the standby still
        starting, or gone) is asked again at the next poll."""
        now = time.monotonic()
        if now < self._next_poll or self._stop_at is not None:
            return
        self._next_poll = now + self.standby_poll
        for child in list(self.children):
            spec = child.spec
            if not spec.standby or child.admitted or child.released or child.proc.poll() is not None:
                continue
            try:
                snap = fetch_status(spec.env["CHAOS_BIND"], secret=spec.env.get("CHAOS_SECRET"),
                                    timeout=self.standby_poll)
            except LaunchError:
                continue
            if (snap.get("membership") or {}).get("phase") != "member":
                continue
            child.admitted = True
            taken = {int(c.spec.env["CHAOS_BIND"].rsplit(":", 1)[1]) for c in self.children}
            # seeds: this launcher's members alive now (the first nodes may
            # all have died by now), then the seeds the standbys were given
            alive = [c.spec.env["CHAOS_BIND"] for c in self.children
                     if c.proc.poll() is None and (not c.spec.standby or c.admitted)]
            new = replacement_standby(spec, 1 + max(c.spec.index for c in self.children), taken, seeds=alive)
            if new is None:
                self._say(f"node {spec.index} (standby, pid {child.proc.pid}) is a member now; "
                          "no free port for a new standby")
                continue
            self._say(f"node {spec.index} (standby, pid {child.proc.pid}) is a member now; "
                      f"starting standby node {new.index}")
            self._start_relays(self._spawn(new))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        if len(self._signals) > 1 and signum == signal.SIGINT:
            self._kill_all()  # a second Ctrl-C: no more waiting
            return
        self.send(signum)
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.grace

    def send(self, signum: int) -> None:
        """Send ``signum`` to every child still running."""
        for child in self.children:
            if child.proc.poll() is None:
                try:
                    child.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                try:
                    child.proc.kill()
                except ProcessLookupError:
                    pass

    def _report(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None and not child.reported:
                child.reported = True
                if self.prefix or code != 0:
                    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    self._say(f"node {child.spec.index} (pid {child.proc.pid}) {how}")

    def wait(self) -> int:
        """Wait for all children (killing them ``grace`` seconds after a forwarded
        signal); the first non-zero exit code, else 0."""
        while any(c.proc.poll() is None for c in self.children):
            self._report()
            self._release_standbys()
            self._replenish_standbys()
            if self._stop_at is not None and time.monotonic() > self._stop_at:
                self._say(f"children still running {self.grace:g}s after the signal: killing them")
                self._kill_all()
                self._stop_at = float("inf")
            time.sleep(0.05)
        self._report()
        self._join_relays(5.0)
        codes = [_exit_code(c.proc.returncode) for c in self.children if not c.released]
        failed = [c for c in codes if c != 0]
        if self.prefix and failed:
            self._say(f"{len(failed)} of {len(codes)} nodes failed")
        return failed[0] if failed else 0

    def _release_standbys(self) -> None:
        """Once every node that is not a standby has exited 0 (the fit ended),
        the standbys still running have nothing left to wait for: SIGTERM
        (a waiting standby exits at once; an admitted one leaves at its next
        step boundary, after the last one), and their exit is no failure.
        Nodes that died otherwise leave the standbys running: they may be
        the cluster now."""
        nodes = [c for c in self.children if not c.spec.standby]
        if not nodes or any(c.proc.poll() != 0 for c in nodes):
            return
        for c in self.children:
            if c.spec.standby and not c.released and c.proc.poll() is None:
                c.released = True
                self._say(f"node {c.spec.index} (standby, pid {c.proc.pid}): the fit ended; stopping it")
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
                if self._stop_at is None:
                    self._stop_at = time.monotonic() + self.grace

    def _join_relays(self, timeout: float) -> None:
        # bounded: a grandchild that inherited the pipe may keep it open
        deadline = time.monotonic() + timeout
        for child in self.children:
            for t in child.readers:
                t.join(max(0.0, deadline - time.monotonic()))

    def reap(self) -> None:
        """Make sure nothing outlives the launcher: SIGTERM, a bounded wait, SIGKILL."""
        live = [c for c in self.children if c.proc.poll() is None]
        if not live:
            return
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + min(self.grace, 10.0)
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in live):
            time.sleep(0.05)
        self._kill_all()
        for c in live:
            try:
                c.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass

    def run(self) -> int:
        """start, wait, reap; signal handlers installed for the duration."""
        previous = {s: signal.getsignal(s) for s in FORWARDED}
        for s in FORWARDED:
            signal.signal(s, self._on_signal)
        try:
            self.start()
            if self._signals:  # a signal that came while spawning missed the later children
                self.send(self._signals[-1])
            return self.wait()
        finally:
            try:
                self.reap()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)


def launch(argv: Sequence[str]) -> int:
    """``chaos-run [options] SCRIPT ARGS...``."""
    parser = _launch_parser()
    args = parser.parse_args(list(argv))
    if args.script is None:
        parser.error("no training script given")
    specs = plan(args)
    return Supervisor(specs, prefix=args.nodes is not None, grace=args.grace).run()


# ---------------------------------------------------------------------- leave
def _pid_listening_on(addr: str) -> int:
    import psutil

    host, port = parse_hostport(addr)
    wanted = {str(info[4][0]) for info in _resolve(host, port)}
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        raise LaunchError("cannot list this machine's sockets (permission denied): use --pid") from None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            if c.laddr.ip in wanted or c.laddr.ip in ("0.0.0.0", "::"):
                return int(c.pid)
    raise LaunchError(f"no process of yours on this machine listens on {addr}")


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise LaunchError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


def leave(argv: Sequence[str]) -> int:
    """``chaos-run leave --pid PID | --node HOST:PORT [--wait S]``."""
    args = _leave_parser().parse_args(list(argv))
    pid = args.pid if args.pid is not None else _pid_listening_on(args.node)
    if pid <= 0:
        raise LaunchError(f"invalid pid {pid}")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise LaunchError(f"no process with pid {pid}") from None
    except PermissionError:
        raise LaunchError(f"not allowed to signal pid {pid}") from None
    print(f"sent SIGTERM to pid {pid}: it leaves at the next step boundary")
    if args.wait > 0:
        deadline = time.monotonic() + args.wait
        while _alive(pid):
            if time.monotonic() > deadline:
                sys.stderr.write(f"{PROG} leave: pid {pid} still running after {args.wait:g}s\n")
                return 1
            time.sleep(0.05)
        print(f"pid {pid} has exited")
    return 0


# ---------------------------------------------------------------------- status
def fetch_status(addr: str, *, secret: str | bytes | None, timeout: float) -> dict:
    """The agent snapshot of the node at ``addr``; :class:`LaunchError` with a one-line reason on failure."""
    from chaos_lightning.agent import query_status
    from chaos_lightning.wire.errors import AuthError, HandshakeTimeout, WireError

    async def bounded() -> dict:
        # query_status bounds connect and reply; the outer bound covers the rest
        return await asyncio.wait_for(query_status(addr, secret=secret, timeout=timeout), timeout * 2 + 1)

    try:
        return asyncio.run(bounded())
    except HandshakeTimeout:
        raise LaunchError(
            f"{addr}: no chaos_lightning handshake within {timeout:g}s (not an agent port, or unreachable)"
        ) from None
    except AuthError as exc:
        if "CHAOS_ENCRYPT" in str(exc):
            raise LaunchError(f"{addr}: {str(exc).split('failed: ', 1)[-1]}") from None
        raise LaunchError(f"{addr}: the node refused the cluster secret (set CHAOS_SECRET to the cluster's secret)") from None
    except WireError as exc:
        raise LaunchError(f"{addr}: not a chaos_lightning agent, or another protocol version ({exc})") from None
    except ConnectionRefusedError:
        raise LaunchError(f"{addr}: connection refused (no node listening there)") from None
    except socket.gaierror as exc:
        reason = str(exc).rsplit(": ", 1)[-1]
        raise LaunchError(f"{addr}: cannot resolve the host ({reason})") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise LaunchError(f"{addr}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise LaunchError(f"{addr}: cannot connect ({exc.strerror or exc})") from None


def _fmt(value: Any, spec: str = ".1f", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _gpu(g: dict) -> str:
    return f"{g.get('index')}: {g.get('name')} {_bytes(g.get('mem_used'))}/{_bytes(g.get('mem_total'))}"


def status_tables(snap: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The snapshot as (title, header, rows) tables: node, members, links, resources, transfers."""
    m = snap.get("membership") or {}
    view = snap.get("view") or {}
    node = m.get("node") or snap.get("node", "?")
    members: list[str] = list(view.get("members") or [])
    down = {tuple(sorted(pair)) for pair in view.get("down_links") or []}
    links: dict[str, dict] = snap.get("links") or {}
    transfers: dict[str, dict] = snap.get("transfers") or {}

    tables: list[tuple[str, list[str], list[list[str]]]] = []
    tables.append((
        f"node {node}",
        ["addr", "phase", "quorate", "coordinator", "view epoch", "members"],
        [[str(m.get("addr", "-")), str(m.get("phase", "-")), str(m.get("quorate", "-")),
          str(m.get("coordinator", "-")), str(view.get("epoch", "-")), str(len(members))]],
    ))
    rows = []
    for rank, member in enumerate(members):
        role = []
        if member == node:
            role.append("this node")
        if member == m.get("coordinator"):
            role.append("coordinator")
        bad = sorted(p for pair in down for p in pair if member in pair and p != member)
        rows.append([str(rank), member, ", ".join(role), ", ".join(bad) or "-"])
    tables.append((f"view {view.get('epoch', '-')}", ["rank", "member", "role", "links down to"], rows))
    rows = []
    for peer in sorted(set(links) | set(transfers)):
        est = links.get(peer, {})
        tr = transfers.get(peer, {})
        rows.append([
            peer, _fmt(est.get("rtt_ms"), ".2f"), _fmt(est.get("rtt_min_ms"), ".2f"), _fmt(est.get("bw_up_mbit"), ".1f"),
            _fmt(est.get("bw_down_mbit"), ".1f"), _bytes(tr.get("sent_bytes")), _bytes(tr.get("recv_bytes")),
            str(tr.get("count", "-")),
        ])
    tables.append(("links and transfers (from this node)",
                   ["peer", "rtt ms", "min rtt ms", "up Mbit/s", "down Mbit/s", "sent", "received", "transfers"], rows))
    res = snap.get("resources") or {}
    gpus = res.get("gpus") or []
    tables.append((
        "resources",
        ["cpus", "cpu %", "load 1m", "memory available", "memory total", "net sent", "net received", "gpus"],
        [[str(res.get("cpu_count", "-")), _fmt(res.get("cpu_percent")), _fmt(res.get("load_avg_1m"), ".2f"),
          _bytes(res.get("mem_available_bytes")), _bytes(res.get("mem_total_bytes")), _bytes(res.get("net_bytes_sent")),
          _bytes(res.get("net_bytes_recv")),
          ", ".join(_gpu(g) for g in gpus) or "none"]],
    ))
    return tables


def render_plain(tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    """Fixed-width text tables (when rich is not installed)."""
    out = []
    for title, header, rows in tables:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        out.append(title)
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        out.append("  ".join("-" * w for w in widths))
        out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
        if not rows:
            out.append("(none)")
        out.append("")
    return "\n".join(out)


def print_status(snap: dict, stream: IO[str] | None = None) -> None:
    """Print the snapshot as tables (rich when installed, plain text otherwise)."""
    stream = stream or sys.stdout
    tables = status_tables(snap)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        stream.write(render_plain(tables))
        return
    tty = stream.isatty()
    console = Console(file=stream, width=None if tty else 160, no_color=not tty, highlight=False)
    for title, header, rows in tables:
        table = Table(title=title, title_justify="left", show_edge=True)
        for h in header:
            table.add_column(h, overflow="fold")
        for r in rows:
            table.add_row(*r)
        console.print(table)


def status(argv: Sequence[str]) -> int:
    """``chaos-run status --peer HOST:PORT [--json]``."""
    args = _status_parser().parse_args(list(argv))
    if args.timeout <= 0:
        raise LaunchError("--timeout must be positive")
    _secret(args.secret_env)  # a --secret-env naming an unset variable is an error
    snap = fetch_status(args.peer, secret=secret_from_env(var=args.secret_env), timeout=args.timeout)
    if args.json:
        json.dump(snap, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print_status(snap)
    return 0


# ---------------------------------------------------------------------- entry point
def scenario(argv: Sequence[str]) -> int:
    """``chaos-run scenario [TIMELINE] [--testbed] [--run-dir DIR]``: a scripted churn run and its report."""
    from chaos_lightning.scenario.__main__ import main as scenario_main

    return scenario_main(list(argv), prog=f"{PROG} scenario")


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"status": status, "leave": leave, "scenario": scenario}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``chaos-run`` console script: dispatch, and turn user errors into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the agent logs refused handshakes and the like; the launcher reports in one line itself
    logging.getLogger("chaos_lightning").addHandler(logging.NullHandler())
    logging.getLogger("chaos_lightning").propagate = False
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else launch(argv)
    except (LaunchError, AddressError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {str(exc).removeprefix('chaos: ')}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
