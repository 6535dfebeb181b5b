"""The agent: one background thread per process that runs the membership
state machine over real TCP.

Role in the whole: the membership machine (:mod:`chaos_lightning.membership`)
decides; the wire layer (:mod:`chaos_lightning.wire`) moves authenticated
frames; the agent joins them.  It owns an asyncio event loop in a daemon
thread, a listening socket, one outgoing connection per peer, the timer that
ticks the machine at its ``next_deadline()``, and the node's
:class:`~chaos_lightning.monitor.Monitor`.  Layers above (the rendezvous, the
strategy) use its thread-safe API: ``view()``, ``wait_view()``,
``subscribe()``, ``leave()``, ``snapshot()``, ``probe_bandwidth()``,
``mark_synced()`` and ``suspect()``.

Messages are one-way: a reply travels over the replier's own outgoing
connection.  A send that cannot connect (refused, timed out, reset) drops the
message, as a datagram would be dropped, and tells the machine
(``hint_unreachable``), which probes that peer at once: a ``kill -9`` on the
same host resets connections immediately, so detection does not wait for the
round robin.  A connect *refused* (``ConnectionRefusedError``: the peer's
host answered with a reset, nothing listens on its port) is more: proof that
the process at that address is gone, reported as ``peer_refused`` (see
``membership/agreement.py``, "Proof of death": with two members, one killed,
the survivor goes on alone), which confirms that member's failure at once.
Since messages are one-way, nothing is read on an outgoing connection; a
peer killed with ``kill -9`` half-closes it, and a write there would vanish,
so the sender checks for the peer's EOF before each write and dials again
(refused within a round trip when the process is gone).  Every connect,
handshake and queue is bounded.

The layers above report what the machine cannot see: :meth:`Agent.mark_synced`
once this process holds the trained state (a learner is then promoted to
voter), and :meth:`Agent.suspect` when a collective with some peers failed
(the machine probes them at once; issue 14).  A node that can reach only a minority of its view's voters logs it
once, in one line ("this node is in a minority (k of n reachable); waiting
for the majority to return").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Callable

import msgpack

from chaos_lightning.agent.messages import (
    BandwidthProbe,
    BandwidthReply,
    Envelope,
    LinkFault,
    LinkFaultDone,
    LinkFaultRefused,
    StatusReply,
    StatusRequest,
)
from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import PRESETS, Config, default_preset
from chaos_lightning.membership.machine import STRANGERS, Membership, Output, Phase
from chaos_lightning.membership.view import Member, View
from chaos_lightning.monitor import Monitor
from chaos_lightning.monitor.links import estimate_bandwidth
from chaos_lightning.wire import KIND_BLOB, ConnectionClosed, WireError, load_secret, open_connection, start_server
from chaos_lightning.wire.connection import quiet_accept_errors
from chaos_lightning.wire.addr import format_hostport, parse_hostport
from chaos_lightning.wire.errors import AuthError

log = logging.getLogger("chaos_lightning.agent")

#: messages queued per peer before the oldest are dropped: a peer that cannot
#: keep up is a peer SWIM will suspect anyway; memory must stay bounded
MAX_QUEUE = 1024
#: active bandwidth probe size: above the monitor's 64 KiB floor, small enough
#: to take well under a second on a 10 Mbit/s edge link
DEFAULT_PROBE_BYTES = 1 << 20
#: outgoing entries kept for addresses that are neither a member, a pending
#: joiner, a join seed nor a cut link ("strangers": a node at another epoch,
#: one just removed, or a forged sender address whose Ping got an Ack).  An
#: LRU: the least recently used is dropped (its sender cancelled) past this.
#: The machine itself remembers no more stranger addresses than this, so an
#: entry beyond it could never be addressed again anyway (issue 15: 20,000
#: forged Pings grew the map by one entry each, kept for good).
MAX_STRANGER_PEERS = STRANGERS
#: a stranger's entry with no sender running and unused this long is dropped
#: (memory goes back down after a flood; a legitimate peer's entry is simply
#: made again on its next message)
STRANGER_TTL = 30.0
#: how often idle strangers are swept
PEER_SWEEP_INTERVAL = 5.0
#: after a peer closed our connection and the dial again was reset (not
#: refused), the one retry waits this long: a killed process's listening
#: socket outlives it by a moment
REDIAL_AFTER_RESET_S = 0.02


def dial_error(exc: BaseException) -> str:
    """A failed dial, as a user reads it."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    if isinstance(exc, AuthError) and not isinstance(exc, TimeoutError):
        return str(exc)  # says which (e.g. "server refused the connection: wrong cluster secret")
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


_fault_injection_default = False


def enable_fault_injection(on: bool = True) -> None:
    """Process-wide default of ``Agent(allow_fault_injection=None)``.

    For test harnesses whose agents are built deep inside the strategy (the
    scenario workload, started by the scenario runner on loopback, where a
    link cut is a ``LinkFault`` request).  Never call it in production: any
    holder of the cluster secret could then cut this node's links.
    """
    global _fault_injection_default
    _fault_injection_default = bool(on)


class _Peer:
    """The outgoing side towards one address: a queue and a sender task."""

    def __init__(self, addr: str):
        self.addr = addr
        self.queue: deque[object] = deque(maxlen=MAX_QUEUE)
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.node = ""  # last node id seen for this address
        self.down_until = 0.0  # after a failed connect, drop instead of redialing
        self.last_used = 0.0  # loop time of the last message queued

    def idle(self) -> bool:
        return self.task is None or self.task.done()

    def drop(self) -> None:
        """Forget this peer: its queue, and its sender if one runs."""
        self.queue.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _peer_hung_up(conn: object) -> bool:
    """Has the peer closed (or reset) our outgoing connection?  Messages are
    one-way, so nothing is ever read on it after the handshake: an EOF or an
    error pending on its reader means the other end is gone.  Checked before
    each write (a write to a half-closed socket succeeds and is lost)."""
    if getattr(conn, "closed", False):
        return True
    reader = getattr(conn, "_reader", None)
    if reader is None:
        return False
    try:
        return bool(reader.at_eof() or reader.exception() is not None)
    except Exception:  # noqa: BLE001 - a reader of another shape: assume it is fine
        return False


#: seconds the agent's tasks get to end after a stop before they are abandoned
_SHUTDOWN_GRACE = 3.0

class Agent:
    """A node's membership agent (see the module docstring).

    ``bind`` is ``host:port`` (port 0: the OS picks; read ``addr`` after
    :meth:`start`).  ``node_id`` defaults to the bound address.  ``membership``
    is the protocol's timing (``None``: ``local`` on a loopback bind, else
    ``lan``: :func:`~chaos_lightning.membership.config.default_preset`).  ``meta`` is
    published in this node's :class:`Member` (e.g. its store endpoint).
    """

    def __init__(
        self,
        *,
        bind: str = "127.0.0.1:0",
        node_id: str | None = None,
        secret: bytes | str | None = None,
        membership: Config | None = None,
        meta: dict[str, str] | None = None,
        allow_fault_injection: bool | None = None,
    ):
        self._bind_host, self._bind_port = parse_hostport(bind, allow_port0=True)
        #: serve ``LinkFault`` requests from the network (tests and scenario
        #: runs only; None: the process default, off unless
        #: :func:`enable_fault_injection` was called).  Off, a request is
        #: answered ``LinkFaultRefused`` and :func:`link_fault` raises
        #: ``PermissionError``.  :meth:`block` (in-process) is always allowed.
        self.allow_fault_injection = (
            _fault_injection_default if allow_fault_injection is None else bool(allow_fault_injection)
        )
        self._node_id = node_id
        self._secret = load_secret(secret)
        # no timing given: local on loopback, lan on any other address
        self.config = membership if membership is not None else PRESETS[default_preset(self._bind_host)]
        self._meta = dict(meta or {})
        self.addr = ""
        self.machine: Membership | None = None
        self.monitor: Monitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._peers: dict[str, _Peer] = {}
        #: the addresses of ``_peers`` that were strangers when last used,
        #: least recently used first (see MAX_STRANGER_PEERS)
        self._stranger_lru: dict[str, None] = {}
        self.max_stranger_peers = MAX_STRANGER_PEERS
        self.stranger_ttl = STRANGER_TTL
        self._sweep: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._cond = threading.Condition()
        self._view: View | None = None
        self._phase = Phase.IDLE
        self._removed: ev.Removed | None = None
        self._subscribers: list[Callable[[object], None]] = []
        self._stopped = False
        self._blocked: dict[str, bool] = {}  # addresses whose link we cut
        self._seeds: tuple[str, ...] = ()  # the contacts of the last join
        self._seed_errors: dict[str, str] = {}  # seed -> why its last dial failed (while joining)
        self._seeds_reported = False
        self._seeds_refused: dict[str, bool] = {}  # seeds whose last dial was refused (none reached since)
        #: what the process above reports of its training, shown in the status:
        #: a callable returning ``{"step": N, "ended": bool, "checkpoint": path
        #: or None}`` (called on the agent's thread at each status request) or
        #: None.  A joiner asks its view's members whether the cluster has trained.
        self.training: Callable[[], dict | None] | None = None
        #: wall-clock seconds the machine spent per decision (Proposed events)
        self.decisions: list[tuple[float, float, str]] = []

    # ------------------------------------------------------------------ life
    @property
    def node_id(self) -> str:
        return self._node_id or self.addr

    def start(self, peers: list[str] | tuple[str, ...] | None = (), timeout: float = 10.0) -> "Agent":
        """Bind and start the thread; then found a cluster (``peers`` empty)
        or ask to join through ``peers``; ``peers=None`` only binds (call
        :meth:`join` later).  Returns once listening; use :meth:`wait_view`
        to wait for membership."""
        if self._thread is not None:
            raise RuntimeError("agent already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(peers, ready, failure), name="chaos-agent", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"agent did not start listening on {self._bind_host}:{self._bind_port} in {timeout}s")
        if failure:
            self._thread.join(1.0)
            raise failure[0]
        return self

    def _run(self, peers: list[str], ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        quiet_accept_errors(loop, log)
        try:
            loop.run_until_complete(self._boot(peers))
        except BaseException as exc:  # bind errors, insecure bind: report to start()
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _boot(self, peers: list[str] | tuple[str, ...] | None) -> None:
        self._server = await start_server(
            self._bind_host, self._bind_port, self._serve, secret=self._secret, log=log
        )
        sock = self._server.sockets[0].getsockname()
        self.addr = format_hostport(self._bind_host, sock[1])
        me = Member(
            self.node_id,
            self.addr,
            tuple(sorted(self._meta.items())),
            # a boot timestamp as the first incarnation: a process restarted
            # under the same id outranks gossip about its predecessor
            int(time.time() * 1000),
        )
        import random

        self.machine = Membership(me, self.config, rng=random.Random())
        self.monitor = Monitor(self.node_id)
        self._sweep = asyncio.get_running_loop().call_later(PEER_SWEEP_INTERVAL, self._sweep_peers)
        if peers is not None:
            self._join(list(peers))

    def join(self, peers: list[str] | tuple[str, ...] = ()) -> None:
        """Found a cluster (no ``peers``) or ask to join through them."""
        self._call(lambda: self._join(list(peers)))

    def _join(self, peers: list[str]) -> None:
        now = self._now()
        contacts = [p for p in peers if p and p != self.addr]
        self._seeds, self._seed_errors, self._seeds_reported = tuple(contacts), {}, False
        self._seeds_refused = {}
        if contacts:
            self._feed(lambda: self.machine.join(contacts, now))
        else:
            self._feed(lambda: self.machine.bootstrap(now))

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
        if self._server is not None:
            self._server.close()
        for peer in self._peers.values():
            if peer.task is not None:
                peer.task.cancel()
        # Cancel in rounds until every task has ended (bounded: a task that
        # swallows its cancellation must not keep the thread, and the
        # process's exit, waiting).  Rounds, not one cancel: on Python 3.10 and
        # 3.11 ``asyncio.wait_for`` loses a cancellation that arrives as its
        # inner await completes, and the task goes on into its next await (seen:
        # a sender back in its 30-s idle wait after the stop, then destroyed
        # pending with the loop closed under it).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SHUTDOWN_GRACE
        while True:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
            if not tasks:
                return
            left = deadline - loop.time()
            if left <= 0:
                log.warning("%s: %d task(s) still running %.0f s after the stop; abandoned: %s", self.node_id,
                            len(tasks), _SHUTDOWN_GRACE, [t.get_coro() for t in tasks])
                return
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=min(left, 0.2))

    def stop(self) -> None:
        """Stop at once, without leaving (to the others this looks like a
        crash).  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
            if self._thread.is_alive():
                log.warning("%s: agent thread still closing after 5 s; not waiting longer", self.node_id)
        with self._cond:
            self._cond.notify_all()

    close = stop

    def mark_synced(self) -> None:
        """This process completed a state sync: it holds the trained state.

        Thread-safe and quick (posted to the agent's loop); idempotent.  A
        learner (a joiner admitted after the cluster trained) becomes a
        voter by the next view change; until then it does not count in any
        quorum, so joiners that crash right after their admission cannot
        stall the members.  Call it at the end of every successful state
        sync (a no-op after the first); a process that rejoined as a new
        incarnation must call it again."""
        if self._loop is None or self._stopped or self.machine is None:
            return
        self._call(lambda: self._feed(lambda: self.machine.mark_synced(self._now())))

    def suspect(self, node_ids: list[str] | tuple[str, ...] | str) -> None:
        """The data plane saw a collective with these peers fail: probe them
        now (direct, then indirect) rather than at their turn (issue 14).

        Thread-safe and quick (posted to the agent's loop), for the training
        thread: call it when an all-reduce fails with a reset or a timeout.
        Naming every peer of the group is fine: a live one answers its probe
        and nothing changes; a dead one's address refuses the connect, which
        confirms its failure at once (the view without it commits one round
        later).  The machine rate-limits suspicions, so calling it on every
        failed collective costs no probe storm.  Ids that are not members
        (or this node) are ignored."""
        if isinstance(node_ids, str):
            node_ids = (node_ids,)
        nodes = tuple(n for n in node_ids if n and n != self.node_id)
        if not nodes or self._loop is None or self._stopped or self.machine is None:
            return

        def run() -> None:
            m = self.machine
            for n in nodes:
                self._feed(lambda: m.suspect(n, self._now()))

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to probe
            self._call(run)

    @property
    def learner(self) -> bool:
        """Is this node a learner of its view (admitted, not yet voting)?"""
        v = self._view
        return v is not None and v.is_learner(self.node_id)

    def leave_soon(self) -> None:
        """Ask to leave gracefully and return at once (no wait for the view):
        one hand-off to the agent's loop, with no lock, so a signal handler
        may call it.  :meth:`leave` afterwards waits for the view."""
        if self._loop is None or self._stopped:
            return
        self._call(lambda: self._feed(lambda: self.machine.leave(self._now())))

    def leave(self, timeout: float = 10.0) -> bool:
        """Leave gracefully; True once a view without us committed."""
        if self._loop is None or self._stopped:
            return False
        self.leave_soon()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._phase is not Phase.LEFT and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return self._phase is Phase.LEFT

    # ------------------------------------------------------------------ API
    def view(self) -> View | None:
        with self._cond:
            return self._view

    @property
    def phase(self) -> Phase:
        return self._phase

    def rejoin(self) -> None:
        """After a leave (or a removal without automatic rejoin): ask to be let
        in again as a new incarnation (``Membership.rejoin``)."""
        self._call(lambda: self._feed(lambda: self.machine.rejoin(self._now())))

    def rejoining(self) -> bool:
        """Removed (declared failed while alive, or stepped aside: see
        :meth:`rejoin`) and asking to be let in again: the wait for a view
        with this node goes on."""
        return self._phase is Phase.JOINING and self._removed is not None

    @property
    def removed(self) -> ev.Removed | None:
        """The last ``Removed`` event, cleared when we are a member again."""
        return self._removed

    def wait_view(self, after_epoch: int = 0, timeout: float = 10.0, *, member: bool = True) -> View | None:
        """The first committed view newer than ``after_epoch`` (containing
        this node if ``member``), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                v = self._view
                if v is not None and v.epoch > after_epoch and (not member or self.node_id in v):
                    return v
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return None
                self._cond.wait(left)

    def subscribe(self, callback: Callable[[object], None]) -> Callable[[], None]:
        """``callback(event)`` for every membership event, called on the
        agent thread: keep it quick.  Returns the unsubscribe function."""
        with self._cond:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def snapshot(self) -> dict:
        """The monitor's snapshot plus membership state (plain data)."""
        return self._call(self._snapshot, wait=True)

    def block(self, addr: str) -> None:
        """Cut this node's link to the agent at ``addr``: drop everything sent
        to it or received from it, as a failed cable would.  A fault injector
        for loopback demos and tests (on one host there is no cable to pull;
        the namespace testbed cuts real veth links).  Apply it at both ends."""
        self._call(lambda: self._set_blocked(addr, True), wait=True)

    def unblock(self, addr: str) -> None:
        self._call(lambda: self._set_blocked(addr, False), wait=True)

    def _set_blocked(self, addr: str, on: bool) -> None:
        if on:
            self._blocked[addr] = True
        else:
            self._blocked.pop(addr, None)
        log.info("%s: link to %s %s", self.node_id, addr, "cut" if on else "restored")

    def probe_bandwidth(self, peer_addr: str, nbytes: int = DEFAULT_PROBE_BYTES, timeout: float = 30.0) -> float:
        """Actively measure our upload to ``peer_addr``; bytes/s (also fed to the monitor)."""
        fut = asyncio.run_coroutine_threadsafe(self._probe_bandwidth(peer_addr, nbytes, timeout), self._loop)
        return fut.result(timeout + 5.0)

    # ------------------------------------------------------------------ loop side
    def _now(self) -> float:
        return self._loop.time()  # monotonic, and what call_at() expects

    def _call(self, fn: Callable[[], object], wait: bool = False) -> object:
        loop = self._loop
        if loop is None or self._stopped:
            raise RuntimeError("agent is not running")
        if threading.current_thread() is self._thread:
            return fn()
        if not wait:
            loop.call_soon_threadsafe(fn)
            return None

        async def run() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10.0)

    def _apply(self, out: Output) -> None:
        """Carry out what the machine asked for: send, report, re-arm the timer."""
        m = self.machine
        for node, addr, msg in out.messages:
            if not addr:
                continue  # no address known (the machine's view will supply one)
            self._enqueue(addr, node, Envelope(self.node_id, self.addr, msg))
        for peer, rtt in out.rtt:
            self.monitor.record_rtt(peer, rtt)
        if out.events:
            self._publish(out.events)
        with self._cond:
            changed = self._phase is not m.phase
            self._phase = m.phase
            if changed:
                self._cond.notify_all()
        self._arm_timer()

    def _publish(self, events: list[object]) -> None:
        # event by event, state first and then subscribers: whoever sees a
        # view through view()/wait_view() has been told every event before it
        with self._cond:
            subs = list(self._subscribers)
        for e in events:
            self._record(e)
            for cb in subs:
                try:
                    cb(e)
                except Exception:
                    log.exception("membership event subscriber failed on %s", e)

    def _record(self, e: object) -> None:
        if isinstance(e, ev.ViewChanged):
            self.monitor.set_view(e.view)
            log.info("%s: view %s", self.node_id, e.view.describe())
            with self._cond:
                self._view = e.view
                self._removed = None
                self._cond.notify_all()
        elif isinstance(e, ev.Removed):
            log.warning("%s: removed from the cluster (%s) at epoch %d",
                        self.node_id, "left" if e.graceful else "declared failed", e.view.epoch)
            with self._cond:
                self._removed = e
                self._cond.notify_all()
        elif isinstance(e, ev.QuorumLost):
            # once per loss: the machine reports the transition, not the state
            if e.all_voters_dead:
                log.warning("chaos: every voter of epoch %d is proven dead (%d of %d): no member holding the trained "
                            "state is left", e.epoch, e.proven_dead, e.voters)
            elif e.allow_minority:
                log.warning("chaos: this node is in a minority (%d of %d reachable); continuing anyway "
                            "(allow_minority: if this is a partition, the other side may go on too)",
                            e.reachable, e.voters)
            else:
                log.warning("chaos: this node is in a minority (%d of %d reachable); waiting for the majority "
                            "to return", e.reachable, e.voters)
        elif isinstance(e, ev.QuorumRegained):
            log.info("chaos: the majority of epoch %d is reachable again", e.epoch)
        elif isinstance(e, (ev.MemberFailed, ev.LinkDown, ev.LinkUp)):
            log.info("%s: %s", self.node_id, e)
        elif isinstance(e, ev.Proposed):
            log.debug("%s: proposed %s (%s)", self.node_id, e.view.describe(), e.reason)
        elif isinstance(e, ev.Held):  # the size policy's decisions, each with its reason
            log.info("chaos: size policy: holding %s as a standby (%s)", e.node, e.reason)
        elif isinstance(e, ev.JoinExpired):
            log.info("chaos: the pending join of %s expired (not heard asking for %gs: a standby gone while it "
                     "waited)", e.node, e.after_s)
        elif isinstance(e, ev.Retire):
            log.warning("chaos: size policy: this node retires (%s); leaving at the next step boundary", e.reason)

    def _arm_timer(self) -> None:
        m = self.machine
        deadline = m.next_deadline()
        if deadline == float("inf") or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        t0 = time.perf_counter()
        out = self.machine.tick(self._now())
        self._note_decisions(out, t0)
        self._apply(out)

    def _feed(self, call: Callable[[], Output]) -> None:
        """One input to the machine (``call`` makes it), its decisions timed
        and noted (every path that can make the machine propose, not only
        the tick: a refused connection now proposes at once), its output applied."""
        t0 = time.perf_counter()
        out = call()
        self._note_decisions(out, t0)
        self._apply(out)

    def _note_decisions(self, out: Output, t0: float) -> None:
        for e in out.events:
            if isinstance(e, ev.Proposed):
                self.decisions.append((time.time(), (time.perf_counter() - t0) * 1e6, e.reason))

    # ------------------------------------------------------------------ sending
    def _known(self, addr: str, node: str) -> bool:
        """Whether ``addr`` (of ``node``) is a member, a pending joiner, a
        join seed or a cut link: an entry kept whatever its age.  O(1): it
        runs for every message sent."""
        if addr in self._blocked or addr in self._seeds:
            return True
        m = self.machine
        if not node or m is None:
            return False
        return (m.view is not None and node in m.view) or node in m.gossip.joins

    def _enqueue(self, addr: str, node: str, msg: object) -> None:
        peer = self._peers.get(addr)
        if peer is None:
            peer = self._peers[addr] = _Peer(addr)
        if node:
            peer.node = node
        peer.last_used = self._now()
        if self._known(addr, peer.node):
            self._stranger_lru.pop(addr, None)
        else:
            lru = self._stranger_lru
            lru.pop(addr, None)
            lru[addr] = None
            if len(lru) > self.max_stranger_peers:
                self._evict_strangers()
        if self._now() < peer.down_until or addr in self._blocked:
            self._hint(peer)  # the last dial failed moments ago: a datagram lost
            return
        peer.queue.append(msg)
        peer.wakeup.set()
        if peer.task is None or peer.task.done():
            peer.task = asyncio.ensure_future(self._sender(peer))

    def _evict_strangers(self) -> None:
        """Drop least recently used strangers until the LRU is within its cap
        (an entry that has since become known only leaves the LRU)."""
        lru = self._stranger_lru
        while len(lru) > max(1, self.max_stranger_peers):  # never the entry being used now
            addr = next(iter(lru))
            del lru[addr]
            peer = self._peers.get(addr)
            if peer is not None and not self._known(addr, peer.node):
                del self._peers[addr]
                peer.drop()

    def _sweep_peers(self) -> None:
        """Every PEER_SWEEP_INTERVAL: drop the entries of addresses that are
        not known (see :meth:`_known`; a departed member's included) whose
        sender has ended and that were not used for ``stranger_ttl``."""
        self._sweep = self._loop.call_later(PEER_SWEEP_INTERVAL, self._sweep_peers)
        now = self._now()
        for addr, peer in list(self._peers.items()):
            if (peer.idle() and now - peer.last_used >= self.stranger_ttl and now >= peer.down_until
                    and not self._known(addr, peer.node)):
                del self._peers[addr]
                self._stranger_lru.pop(addr, None)

    def _seed_failed(self, addr: str, exc: BaseException) -> None:
        """While joining: remember why a seed could not be dialled; once every
        seed has failed, say so in one line (the join goes on trying: a seed
        may still be starting)."""
        if addr not in self._seeds or self._phase is not Phase.JOINING:
            return
        self._seed_errors[addr] = dial_error(exc)
        if isinstance(exc, ConnectionRefusedError):
            self._seeds_refused[addr] = True
        if not self._seeds_reported and set(self._seed_errors) >= set(self._seeds):
            self._seeds_reported = True
            log.warning(
                "%s: no seed answers: %s; still trying until the join timeout (check CHAOS_PEERS and that a member "
                "runs there; if the fit has ended there is nothing left to join)", self.node_id, self.seed_errors(),
            )

    def seeds_gone(self) -> bool:
        """While joining: every seed's last dial was refused (nothing listens
        at any of them) and none has been reached since.  A warm standby
        waits without a join timeout; this is how it tells that the cluster
        it waits for has ended (the strategy's ``standby.py``)."""
        return (self._phase is Phase.JOINING and bool(self._seeds)
                and all(a in self._seeds_refused for a in self._seeds))

    def seed_errors(self) -> str:
        """Why each seed of the current join could not be dialled, in one line ("" if none failed)."""
        return ", ".join(f"{a} ({self._seed_errors[a]})" for a in self._seeds if a in self._seed_errors)

    def _hint(self, peer: _Peer) -> None:
        if peer.node and self.machine is not None:
            self._feed(lambda: self.machine.hint_unreachable(peer.node, self._now()))

    def _refused(self, peer: _Peer) -> None:
        """A connect to ``peer.addr`` was refused: the process that listened
        there is gone (the machine also probes it at once, as for a hint)."""
        if self.machine is not None:
            self._feed(lambda: self.machine.peer_refused(peer.node, peer.addr, self._now()))

    async def _sender(self, peer: _Peer) -> None:
        """Keep one authenticated connection to ``peer`` and drain its queue."""
        conn = None
        cfg = self.config
        hung_up = reset_retried = False  # dialling again because the peer closed our connection
        try:
            host, port = parse_hostport(peer.addr)
            while True:
                if not peer.queue:
                    peer.wakeup.clear()
                    try:
                        # an idle connection is closed after a while: a
                        # 1,000-node cluster must not hold 1,000 sockets each
                        await asyncio.wait_for(peer.wakeup.wait(), 30.0)
                    except asyncio.TimeoutError:
                        return
                    continue
                if conn is None:
                    try:
                        # a connect gets the probe timeout: past it, the probe
                        # has failed anyway and the message is worthless
                        conn = await open_connection(
                            host, port, secret=self._secret, timeout=max(cfg.probe_timeout * 4, 0.5)
                        )
                        self._seeds_refused.pop(peer.addr, None)  # reached: it listens again
                        hung_up = reset_retried = False
                    except (OSError, WireError, TimeoutError) as exc:
                        log.debug("%s: cannot reach %s: %s", self.node_id, peer.addr, exc)
                        if hung_up and isinstance(exc, ConnectionResetError) and not reset_retried:
                            # the peer closed our connection, and its port took
                            # the new one and reset it: a process being torn down
                            # (a kill -9) still holds its listening socket for a
                            # moment; a moment later its host refuses the dial,
                            # proof of death (measured: 1 kill in 12 met this
                            # and waited a probe period more, 206-381 ms)
                            reset_retried = True
                            await asyncio.sleep(REDIAL_AFTER_RESET_S)
                            continue
                        self._seed_failed(peer.addr, exc)
                        peer.queue.clear()
                        peer.down_until = self._now() + cfg.probe_interval / 2
                        if isinstance(exc, ConnectionRefusedError):
                            self._refused(peer)  # nothing listens there: proof of death
                        else:
                            self._hint(peer)
                        return
                if _peer_hung_up(conn):
                    # the peer closed its end (a kill -9 closes every socket
                    # of the process at once): a write would vanish into a
                    # half-closed socket, so dial again now, which a dead
                    # peer's host refuses (proof of death) within a round trip
                    log.debug("%s: %s closed our connection; dialling again", self.node_id, peer.addr)
                    conn.close()
                    conn = None
                    hung_up = True
                    continue
                msg = peer.queue.popleft()
                try:
                    await asyncio.wait_for(conn.send(msg), max(cfg.probe_timeout * 4, 0.5))
                except (OSError, WireError, asyncio.TimeoutError) as exc:
                    log.debug("%s: lost connection to %s: %s", self.node_id, peer.addr, exc)
                    conn.close()
                    conn = None
                    peer.queue.clear()
                    self._hint(peer)
                    return
        finally:
            if conn is not None:
                with contextlib.suppress(RuntimeError):  # abandoned at the stop: the loop may be closed
                    conn.close()

    # ------------------------------------------------------------------ receiving
    async def _serve(self, conn) -> None:
        src = ""
        try:
            while True:
                msg = await conn.recv()
                if isinstance(msg, Envelope):
                    src = msg.src
                    if msg.src_addr in self._blocked:
                        continue
                    if self.machine is None:
                        continue
                    t0 = time.perf_counter()
                    out = self.machine.receive(msg.src, msg.src_addr, msg.body, self._now())
                    self._note_decisions(out, t0)
                    self._apply(out)
                elif isinstance(msg, StatusRequest):
                    await conn.send(StatusReply(msgpack.packb(self._snapshot())))
                elif isinstance(msg, LinkFault):
                    if not self.allow_fault_injection:
                        log.warning("%s: refused a link fault request from %s: fault injection is off",
                                    self.node_id, conn.peer)
                        await conn.send(LinkFaultRefused(
                            f"fault injection is off on {self.node_id} (start the agent with "
                            "allow_fault_injection=True: tests and scenario runs only)"
                        ))
                        return
                    self._set_blocked(msg.peer_addr, msg.down)
                    await conn.send(LinkFaultDone(tuple(sorted(self._blocked))))
                elif isinstance(msg, BandwidthProbe):
                    t0 = time.perf_counter()
                    blob = await conn.recv()
                    took = time.perf_counter() - t0
                    if not isinstance(blob, (bytes, bytearray)) or len(blob) != msg.nbytes:
                        raise WireError(f"bandwidth probe announced {msg.nbytes} bytes, got something else")
                    await conn.send(BandwidthReply(took))
                else:
                    raise WireError(f"unexpected message {type(msg).__name__} on the agent port")
        except ConnectionClosed:
            # the peer hung up: a crash closes its sockets at once, so probe it now
            if src and self.machine is not None and not self._stopped:
                self._feed(lambda: self.machine.hint_unreachable(src, self._now()))
            raise

    # ------------------------------------------------------------------ status, probes
    def _snapshot(self) -> dict:
        snap = self.monitor.snapshot()
        m = self.machine
        snap["membership"] = {
            "node": self.node_id,
            "addr": self.addr,
            "phase": m.phase.value,
            "quorate": m.quorate,
            "learner": m.learner,
            "coordinator": m.coordinator(),
            "incarnation": m._inc,
        }
        try:
            snap["training"] = self.training() if self.training is not None else None
        except Exception as exc:  # noqa: BLE001 - the status must answer whatever the process above does
            snap["training"] = None
            log.debug("%s: no training report: %s", self.node_id, exc)
        return snap

    async def _probe_bandwidth(self, peer_addr: str, nbytes: int, timeout: float) -> float:
        host, port = parse_hostport(peer_addr)
        conn = await open_connection(host, port, secret=self._secret, timeout=timeout)
        try:
            payload = bytes(nbytes)
            t0 = time.perf_counter()
            await conn.send(BandwidthProbe(nbytes))
            await conn.send_blob(payload)
            reply = await asyncio.wait_for(conn.recv(), timeout)
            took = time.perf_counter() - t0
        finally:
            await conn.aclose()
        if not isinstance(reply, BandwidthReply):
            raise WireError(f"unexpected reply to a bandwidth probe: {type(reply).__name__}")
        peer = self._node_for(peer_addr)
        rtt = self.monitor.links.rtt(peer) if peer else None
        bw = estimate_bandwidth(nbytes, took, rtt or 0.0)
        self.monitor.record_transfer(peer or peer_addr, nbytes, took, "up")
        return bw

    def _node_for(self, addr: str) -> str:
        v = self._view
        if v is not None:
            for mem in v.members:
                if mem.addr == addr:
                    return mem.id
        return ""


async def query_status(addr: str, *, secret: bytes | str | None = None, timeout: float = 5.0) -> dict:
    """Ask the agent at ``addr`` for its snapshot (``chaos-run status``)."""
    host, port = parse_hostport(addr)
    conn = await open_connection(host, port, secret=load_secret(secret), timeout=timeout)
    try:
        await conn.send(StatusRequest())
        reply = await asyncio.wait_for(conn.recv(), timeout)
    finally:
        await conn.aclose()
    if not isinstance(reply, StatusReply):
        raise WireError(f"unexpected reply to a status request: {type(reply).__name__}")
    return msgpack.unpackb(reply.snapshot, raw=False, strict_map_key=False)


def status(addr: str, *, secret: bytes | str | None = None, timeout: float = 5.0) -> dict:
    """Blocking :func:`query_status`."""
    return asyncio.run(query_status(addr, secret=secret, timeout=timeout))


async def request_link_fault(
    addr: str, peer_addr: str, down: bool, *, secret: bytes | str | None = None, timeout: float = 5.0
) -> list[str]:
    """Make the agent at ``addr`` cut (``down``) or restore its link to the
    agent at ``peer_addr`` (:meth:`Agent.block`; apply it at both ends).
    Authenticated like every connection, and served only by an agent started
    with ``allow_fault_injection`` (else ``PermissionError``, an ``OSError``).
    Returns the addresses cut at ``addr`` now."""
    host, port = parse_hostport(addr)
    conn = await open_connection(host, port, secret=load_secret(secret), timeout=timeout)
    try:
        await conn.send(LinkFault(peer_addr, down))
        reply = await asyncio.wait_for(conn.recv(), timeout)
    finally:
        await conn.aclose()
    if isinstance(reply, LinkFaultRefused):
        raise PermissionError(f"the agent at {addr} refused the link fault: {reply.reason}")
    if not isinstance(reply, LinkFaultDone):
        raise WireError(f"unexpected reply to a link fault request: {type(reply).__name__}")
    return list(reply.blocked)


def link_fault(addr: str, peer_addr: str, down: bool, *, secret: bytes | str | None = None, timeout: float = 5.0) -> list[str]:
    """Blocking :func:`request_link_fault`."""
    return asyncio.run(request_link_fault(addr, peer_addr, down, secret=secret, timeout=timeout))


__all__ = ["Agent", "enable_fault_injection", "query_status", "status", "link_fault", "request_link_fault", "KIND_BLOB"]
