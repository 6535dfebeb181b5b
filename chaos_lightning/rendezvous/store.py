"""Per-epoch process-group stores, hosted by the members themselves, behind the cluster secret.

Role: :class:`StoreHost` is this node's key-value store server (the one
``init_process_group`` rendezvouses on when this node is rank 0 of a view);
:class:`WireStore` is a real ``torch.distributed.Store`` (a Python subclass,
called by gloo through torch's store trampoline) that talks to a host over
the project's wire layer; :func:`epoch_store` gives the store of one view's
process group.

Every node starts its host when it starts (so hosting costs nothing at switch
time) and advertises ``host:port`` as member meta ``"store"``.  The process
group of epoch ``e`` rendezvouses on the rank-0 member's host under
``chaos/epoch/<e>/``: a fresh prefix per epoch because
``destroy_process_group`` resets gloo's group counter and its keys would
otherwise collide with the previous epoch's (see docs/design.md).  If the
rank-0 member dies while the group forms, ``init_process_group`` fails and
the next view names another host; no node is special.

Why not ``TCPStore``: its server listens on every interface with no
authentication; measured here, a client without the secret could
``list_keys()``, store 256 MiB of junk and rewrite the next epoch's keys so
``init_process_group`` failed on every rank.  This store keeps the design's
rule "nothing answers without the secret": connections go through
:func:`chaos_lightning.wire.start_server` / ``open_connection`` (HMAC
challenge-response with the cluster secret, whatever the wire layer adds to
it), the server binds only the address asked for (one address: a name is
resolved to its first address, so port 0 means one port), and without a
secret only loopback (:func:`chaos_lightning.wire.check_bind_allowed`).

Bounds (the host keeps serving whatever a client sends): a value of at most
``max_value`` bytes (1 MiB by default; gloo stores a few hundred bytes per
rank), at most ``max_bytes`` held in all (64 MiB), keys of at most 4 KiB, at
most 4,096 keys per request and 1,024 pending waits per connection.  Breaking
one is answered with a clear error (the client raises ``DistStoreError``
with it), one log line, and the connection closed; nothing stored changes.
Old epochs' keys are dropped as newer ones arrive (:data:`KEEP_EPOCHS`), so
a long run's view switches never fill the host.
Garbage, truncated frames and a wrong or missing secret are refused by the
wire layer with one log line each.  A quiet connection is closed by the
wire layer's idle bound, except when a wait was pending as its last frame
came (the wait itself is bounded; clients close idle connections after 30 s).

Semantics are ``TCPStore``'s: ``get`` and ``wait`` block until the keys
exist or the timeout passes, then raise ``torch.distributed.DistStoreError``
("wait timeout after ...ms"), as torch's stores do, so callers' handling
is unchanged; the host enforces the timeout, the client adds 2 s of grace
only against a host that stopped answering.  A host that cannot be reached
(refused, unreachable, wrong secret) raises ``DistNetworkError``.

Threads: the host runs its own asyncio loop on a daemon thread rather than
inside the agent, because the etcd backend has no agent, the host starts
before the agent binds, and a burst of rendezvous traffic must not delay the
agent's failure-detector probes.  Clients share one daemon loop thread per
process; a call from any thread (gloo's included) blocks that thread, with
the GIL released, until the reply.  A client connects on construction (a
wrong secret fails at ``epoch_store``), closes its connection after 30 s
without requests and reconnects on the next one, so the stores of old epochs
hold no sockets.  Each client is kept alive until :meth:`WireStore.close`:
torch holds the C++ half of a Python store (inside ``PrefixStore`` and the
process group) without a reference to the Python half, and a collected Python
half makes every later call fail with "Not implemented" (measured on torch
2.13); what stays behind per epoch is one small idle object.

Cost (``python benchmarks/store_init.py``: 3-rank gloo ``init_process_group``,
median of 20, 2 shared cores, loopback, torch 2.13.0+cpu, two runs): the rank
that arrives last (store + gloo cost without waiting for others) 8.0-8.6 ms
here against 1.4 ms with ``TCPStore``; the slowest rank 16-17.5 ms against
5-11 ms.  Gloo makes 7 store round trips per rank (``set``, then ``wait`` and
``get`` per rank), each 0.5-1 ms through three Python event loops on a loaded
machine against about 0.1 ms for TCPStore's C++ client; it is paid once per
membership switch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import timedelta

import torch.distributed as dist

from chaos_lightning.membership.view import View
from chaos_lightning.rendezvous import store_messages as sm
from chaos_lightning.wire import (
    Connection,
    WireError,
    check_bind_allowed,
    load_secret,
    open_connection,
    start_server,
)
from chaos_lightning.wire.addr import format_hostport, parse_hostport
from chaos_lightning.wire.frames import DEFAULT_MAX_FRAME

log = logging.getLogger("chaos_lightning.rendezvous.store")

STORE_META_KEY = "store"

#: Defaults of the host's bounds (see the module docstring).
DEFAULT_MAX_VALUE = 2**20
DEFAULT_MAX_BYTES = 64 * 2**20
MAX_KEY = 4096
MAX_KEYS_PER_REQUEST = 4096
#: the most sibling keys a get's reply carries (GetRequest.siblings), and
#: their bytes in all: a gloo address is a few hundred bytes, and a reply
#: must stay far under the client's frame limit
MAX_SIBLINGS = 256
MAX_SIBLING_BYTES = 256 * 1024
MAX_PENDING_PER_CONNECTION = 1024
#: What one stored entry costs beyond its key and value bytes (dict slot, objects):
#: counted so that a flood of empty values is bounded too.
ENTRY_OVERHEAD = 64
#: The longest wait a client may ask for (torch's "no timeout" included): every wait is bounded.
MAX_WAIT_MS = 24 * 3600 * 1000

#: Keys are grouped by epoch under this prefix (see :func:`epoch_store`).
EPOCH_PREFIX = "chaos/epoch/"
#: When the first key of epoch ``e`` arrives, the keys of every epoch
#: ``<= e - KEEP_EPOCHS`` are dropped (so this epoch and the KEEP_EPOCHS - 1
#: before it stay).  Why that is safe: process groups are formed in epoch
#: order; a member that writes epoch ``e``'s keys has finished with (formed
#: or abandoned) its groups of earlier epochs, and torch reads a group's keys
#: only while the group forms (gloo's addresses, the init barrier).  The only
#: reader an old epoch's keys can still have is a straggler (stopped, slow)
#: still forming a group several views out of date: that group can no longer
#: form anyway, since its other members have moved on, so its wait times out
#: (DistStoreError, as when a rank is missing) and it regroups on the newest
#: view, as it would have without the pruning.  Four rather than two leaves
#: room for views committed back to back while one group forms (a join
#: followed at once by a failure).  Without it a long run's keys, a few
#: hundred bytes per rank per view switch, would grow to ``max_bytes`` and
#: make a later group's init fail with "store full".
KEEP_EPOCHS = 4

#: Extra time a client waits for a reply beyond the timeout the host enforces.
_REPLY_GRACE_S = 2.0
#: seconds between two looks at a client's ``cancelled`` while a call waits
#: (a 50-ms reaction costs nothing next to gloo's own rendezvous round trips)
CANCEL_POLL_S = 0.05
#: A client's idle connection is closed after this long (reopened on the next request).
_IDLE_CLOSE_S = 30.0
#: A stranger's handshake holds a socket at most this long.
_HANDSHAKE_TIMEOUT_S = 5.0


def _seconds(timeout: timedelta | float | None, default: float) -> float:
    if timeout is None:
        return default
    s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    # torch's kNoTimeout is 0: "forever" becomes the longest bounded wait
    return MAX_WAIT_MS / 1000 if s <= 0 else s


def _as_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    # torch's Python callers pass str (e.g. _store_based_barrier); C++ callers bytes
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class StoreRefused(WireError):
    """A store client broke a bound or the protocol; its connection is closed."""


class _Refusal(Exception):
    """Internal: a request breaks a bound; answered with ``REFUSED``, then the connection closes."""


# --------------------------------------------------------------------------- server


class _Waiter:
    __slots__ = ("keys", "future")

    def __init__(self, keys: tuple[str, ...], future: asyncio.Future) -> None:
        self.keys = keys
        self.future = future


class _Table:
    """The keys and values, and who waits for which key.  Touched only on the host's loop,
    so every request is atomic without locks."""

    def __init__(self, max_value: int, max_bytes: int) -> None:
        self.max_value = max_value
        self.max_bytes = max_bytes
        self.data: dict[str, bytes] = {}
        self.nbytes = 0
        self._waiters: dict[str, set[_Waiter]] = {}
        #: epoch -> its keys held (keys under ``EPOCH_PREFIX<e>/`` only)
        self._epochs: dict[int, set[str]] = {}
        self.newest_epoch = -1
        self.pruned_keys = 0  # counted for tests and the log

    @staticmethod
    def _epoch_of(key: str) -> int | None:
        if not key.startswith(EPOCH_PREFIX):
            return None
        digits, sep, _ = key[len(EPOCH_PREFIX):].partition("/")
        if not sep or not digits.isdigit() or len(digits) > 19:
            return None
        return int(digits)

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key.encode("utf-8")) + len(value) + ENTRY_OVERHEAD

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_value:
            raise _Refusal(f"value of {len(value)} bytes for key {key[:100]!r} exceeds the store's limit of "
                           f"{self.max_value} bytes")
        old = self.data.get(key)
        total = self.nbytes + self._size(key, value) - (0 if old is None else self._size(key, old))
        if total > self.max_bytes:
            raise _Refusal(f"store full: storing key {key[:100]!r} would hold {total} bytes, "
                           f"over the limit of {self.max_bytes}")
        # a key of an epoch already pruned (a straggler's) is still stored, not
        # refused: a process whose node later joins a cluster founded anew counts
        # epochs from 1 again, and its host must go on serving them
        epoch = self._epoch_of(key)
        self.data[key] = value
        self.nbytes = total
        if epoch is not None:
            self._epochs.setdefault(epoch, set()).add(key)
            if epoch > self.newest_epoch:
                self.newest_epoch = epoch
                self._prune(epoch - KEEP_EPOCHS)
        self._wake(key)

    def _prune(self, upto: int) -> None:
        """Drop the keys of every epoch ``<= upto`` (see KEEP_EPOCHS)."""
        old = [e for e in self._epochs if e <= upto]
        n = 0
        for e in old:
            for k in self._epochs.pop(e):
                n += self.delete(k, _index=False)
        if n:
            self.pruned_keys += n
            log.debug("store: dropped %d key(s) of epochs <= %d (now at epoch %d)", n, upto, self.newest_epoch)

    def siblings(self, key: str, most: int) -> tuple[tuple[str, bytes], ...]:
        """Up to ``most`` other keys of ``key``'s directory (its epoch's keys
        only) whose last part is a number, with their values: gloo's ranks'
        addresses, which each rank then reads one by one."""
        if most <= 0:
            return ()
        epoch = self._epoch_of(key)
        keys = self._epochs.get(epoch) if epoch is not None else None
        if not keys:
            return ()
        folder = key[:key.rfind("/") + 1]
        out: list[tuple[str, bytes]] = []
        size = 0
        for k in sorted(keys):
            if k == key or not k.startswith(folder) or not k[len(folder):].isdigit():
                continue
            value = self.data[k]
            size += len(k) + len(value)
            if len(out) >= min(most, MAX_SIBLINGS) or size > MAX_SIBLING_BYTES:
                break
            out.append((k, value))
        return tuple(out)

    def delete(self, key: str, _index: bool = True) -> bool:
        old = self.data.pop(key, None)
        if old is None:
            return False
        self.nbytes -= self._size(key, old)
        if _index:
            epoch = self._epoch_of(key)
            keys = self._epochs.get(epoch) if epoch is not None else None
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._epochs[epoch]
        return True

    def _wake(self, key: str) -> None:
        for w in self._waiters.pop(key, ()):
            if w.future.done():
                continue
            missing = [k for k in w.keys if k not in self.data]
            if not missing:
                w.future.set_result(None)
            else:  # one of its keys was deleted meanwhile: keep waiting for it
                for k in missing:
                    self._waiters.setdefault(k, set()).add(w)

    async def wait(self, keys: tuple[str, ...], timeout_s: float) -> bool:
        """True once every key exists, False after ``timeout_s``."""
        missing = [k for k in keys if k not in self.data]
        if not missing:
            return True
        w = _Waiter(keys, asyncio.get_running_loop().create_future())
        for k in missing:
            self._waiters.setdefault(k, set()).add(w)
        try:
            await asyncio.wait_for(w.future, timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            for k in keys:
                ws = self._waiters.get(k)
                if ws is not None:
                    ws.discard(w)
                    if not ws:
                        del self._waiters[k]


class StoreHost:
    """This node's process-group store server, behind the cluster secret.

    ``host`` is the one address it listens on (port 0: the OS picks, see
    :attr:`port`); ``secret`` (bytes, or ``None``: loopback only) is the
    cluster secret every client must prove.  ``timeout`` bounds the start-up
    (and, capped at 5 s, each client's handshake).  Serves on a daemon thread
    until :meth:`close`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: timedelta = timedelta(seconds=30),
        *,
        secret: bytes | str | None,
        max_value: int = DEFAULT_MAX_VALUE,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.host = host
        self._secret = load_secret(secret)
        check_bind_allowed(host, self._secret)  # before any thread: a clear error in the caller
        self._table = _Table(max_value, max_bytes)
        # a frame can always carry the largest value with its key and request around it,
        # so an oversized value gets a clear answer rather than a dropped frame
        self._max_frame = max(DEFAULT_MAX_FRAME, max_value + MAX_KEY + 1024)
        self._handshake_timeout = min(_HANDSHAKE_TIMEOUT_S, _seconds(timeout, _HANDSHAKE_TIMEOUT_S))
        self._conns: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(port, started), name=f"chaos-store-host-{host}", daemon=True
        )
        self._thread.start()
        try:
            self.port: int = started.result(_seconds(timeout, 30.0))
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def sockname(self) -> tuple:
        """The listening socket's address (what it is bound to)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()

    # -- the host's thread --------------------------------------------------
    def _run(self, port: int, started: concurrent.futures.Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            try:
                self._server = loop.run_until_complete(self._listen(port))
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(self._server.sockets[0].getsockname()[1])
            loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _listen(self, port: int) -> asyncio.AbstractServer:
        # One address only: asyncio would bind every address a name resolves to
        # (localhost: 127.0.0.1 and ::1), each on its own port when port is 0.
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve the store's bind address {self.host!r}")
        addr = infos[0][4][0]
        return await start_server(
            addr, port, self._serve, secret=self._secret, max_frame=self._max_frame,
            handshake_timeout=self._handshake_timeout, log=log,
        )

    async def _serve(self, conn: Connection) -> None:
        pending: set[asyncio.Task] = set()
        self._conns.add(conn)
        idle_bound = getattr(conn, "idle_timeout", None)
        try:
            while True:
                # A client blocked in wait/get sends nothing for as long as its
                # timeout (up to the PG timeout): no idle bound while one is pending.
                # Otherwise the wire layer's bound applies (clients close idle
                # connections after 30 s themselves).
                conn.idle_timeout = None if pending else idle_bound
                msg = await conn.recv()
                if not isinstance(msg, sm.REQUESTS):
                    what = "a blob" if isinstance(msg, bytes) else f"a {type(msg).__name__} message"
                    raise StoreRefused(f"sent {what} to the process-group store")
                try:
                    reply = self._apply(msg, conn, pending)
                except _Refusal as exc:
                    # the client learns why; then the connection goes (start_server logs one line)
                    await conn.send(sm.StoreError(msg.rid, sm.REFUSED, str(exc)))
                    raise StoreRefused(str(exc)) from None
                if reply is not None:
                    await conn.send(reply)
        finally:
            for t in pending:
                t.cancel()
            self._conns.discard(conn)

    @staticmethod
    def _check_keys(keys: Iterable[str]) -> tuple[str, ...]:
        keys = tuple(keys)
        if len(keys) > MAX_KEYS_PER_REQUEST:
            raise _Refusal(f"{len(keys)} keys in one request, over the limit of {MAX_KEYS_PER_REQUEST}")
        for k in keys:
            if len(k) > MAX_KEY or len(k.encode("utf-8")) > MAX_KEY:
                raise _Refusal(f"key of {len(k.encode('utf-8'))} bytes exceeds the limit of {MAX_KEY}")
        return keys

    def _apply(self, msg: object, conn: Connection, pending: set[asyncio.Task]) -> object | None:
        """The reply to a request, or None when a task will send it (a blocking wait)."""
        t = self._table
        if isinstance(msg, sm.SetRequest):
            self._check_keys((msg.key,))
            t.put(msg.key, msg.value)
            return sm.Done(msg.rid)
        if isinstance(msg, sm.GetRequest):
            self._check_keys((msg.key,))
            if msg.key in t.data:
                return sm.ValueReply(msg.rid, t.data[msg.key], t.siblings(msg.key, msg.siblings))
            return self._later(self._get(conn, msg), pending)
        if isinstance(msg, sm.AddRequest):
            self._check_keys((msg.key,))
            old = t.data.get(msg.key, b"0")
            try:
                value = int(old) + msg.amount
            except ValueError:
                return sm.StoreError(msg.rid, sm.INVALID, f"add: the value of {msg.key[:100]!r} is not an integer")
            t.put(msg.key, str(value).encode())
            return sm.IntReply(msg.rid, value)
        if isinstance(msg, sm.CompareSetRequest):
            # TCPStore's rule: a missing key matches an empty expected value; the
            # reply is the value now held (or ``expected`` if the key is missing)
            self._check_keys((msg.key,))
            current = t.data.get(msg.key)
            if (current is None and not msg.expected) or current == msg.expected:
                t.put(msg.key, msg.desired)
                return sm.ValueReply(msg.rid, msg.desired)
            return sm.ValueReply(msg.rid, msg.expected if current is None else current)
        if isinstance(msg, sm.WaitRequest):
            keys = self._check_keys(msg.keys)
            if all(k in t.data for k in keys):
                return sm.Done(msg.rid)
            return self._later(self._wait(conn, msg, keys), pending)
        if isinstance(msg, sm.CheckRequest):
            keys = self._check_keys(msg.keys)
            return sm.BoolReply(msg.rid, all(k in t.data for k in keys))
        if isinstance(msg, sm.DeleteRequest):
            self._check_keys((msg.key,))
            return sm.BoolReply(msg.rid, t.delete(msg.key))
        assert isinstance(msg, sm.NumKeysRequest)
        return sm.IntReply(msg.rid, len(t.data))

    @staticmethod
    def _later(job: Coroutine[object, object, None], pending: set[asyncio.Task]) -> None:
        """Run a blocking request as its own task, so the connection keeps serving."""
        if len(pending) >= MAX_PENDING_PER_CONNECTION:
            job.close()
            raise _Refusal(f"over {MAX_PENDING_PER_CONNECTION} pending waits on one connection")
        task = asyncio.get_running_loop().create_task(job)
        pending.add(task)
        task.add_done_callback(pending.discard)
        return None

    @staticmethod
    def _timeout_s(timeout_ms: int) -> float:
        return min(max(timeout_ms, 0), MAX_WAIT_MS) / 1000

    async def _get(self, conn: Connection, msg: sm.GetRequest) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s(msg.timeout_ms)
        # loop: the key may be deleted between the wake-up and this read
        while msg.key not in self._table.data:
            left = deadline - loop.time()
            if left <= 0 or not await self._table.wait((msg.key,), left):
                await self._send_quietly(conn, sm.StoreError(
                    msg.rid, sm.TIMEOUT, f"wait timeout after {msg.timeout_ms}ms, keys: {msg.key}"))
                return
        await self._send_quietly(conn, sm.ValueReply(msg.rid, self._table.data[msg.key],
                                                     self._table.siblings(msg.key, msg.siblings)))

    async def _wait(self, conn: Connection, msg: sm.WaitRequest, keys: tuple[str, ...]) -> None:
        if await self._table.wait(keys, self._timeout_s(msg.timeout_ms)):
            reply: object = sm.Done(msg.rid)
        else:
            missing = [k for k in keys if k not in self._table.data]
            reply = sm.StoreError(msg.rid, sm.TIMEOUT, f"wait timeout after {msg.timeout_ms}ms, keys: {missing}")
        await self._send_quietly(conn, reply)

    @staticmethod
    async def _send_quietly(conn: Connection, reply: object) -> None:
        try:
            await conn.send(reply)
        except (WireError, OSError):
            pass  # the client went away while waiting: nothing to tell

    def close(self) -> None:
        """Stop serving and close every client connection; idempotent, bounded."""
        loop = self._loop
        if loop.is_closed() or not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass  # the loop already ended
        self._thread.join(5)


# --------------------------------------------------------------------------- client


class _ClientLoop:
    """The one asyncio loop (daemon thread) all store clients of this process share."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _pid = 0

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            # a forked child has the loop object but not its thread: start its own
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="chaos-store-client", daemon=True)
                thread.start()
                cls._loop, cls._thread, cls._pid = loop, thread, os.getpid()
            return cls._loop

    @classmethod
    def on_loop_thread(cls) -> bool:
        return cls._thread is not None and threading.current_thread() is cls._thread


#: Every open client: torch keeps only the C++ half of a Python store alive
#: (see the module docstring), so the Python half is kept here until close().
_LIVE: set[WireStore] = set()
_LIVE_LOCK = threading.Lock()


class WireStore(dist.Store):
    """A ``torch.distributed.Store`` served by a :class:`StoreHost`, over the authenticated wire.

    Works wherever torch takes a store (``init_process_group(store=...)``,
    ``PrefixStore``, ``ProcessGroupGloo``).  ``timeout`` is the store's
    timeout (``get`` and ``wait`` without one, and every reply).  Thread-safe.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        secret: bytes | str | None,
        timeout: timedelta = timedelta(seconds=30),
        connect: bool = True,
        cancelled: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.set_timeout(timeout)
        #: asked every CANCEL_POLL_S while a call waits: a reason ends the call
        #: at once with ``DistStoreError`` (a group formation whose view a newer
        #: one superseded must not wait out the store timeout for a dead rank's key)
        self._cancelled = cancelled
        self._host, self._port = host, port
        self._secret = load_secret(secret)
        self._endpoint = format_hostport(host, port)
        self._loop = _ClientLoop.get()
        # the rest is touched only on the client loop
        self._conn: Connection | None = None
        self._connecting: asyncio.Future | None = None
        # rid -> (reply future, the connection the request went out on)
        self._replies: dict[int, tuple[asyncio.Future, Connection]] = {}
        self._next_rid = 0
        self._idle: asyncio.TimerHandle | None = None
        self._closed = False
        #: per calling thread: (key, value) a one-key ``wait`` fetched, for the
        #: ``get`` of that key right after it (:meth:`wait`)
        self._fetched = threading.local()
        with _LIVE_LOCK:
            _LIVE.add(self)
        if connect:
            try:
                self._call(self._connected(), self._timeout_s())
            except BaseException:
                self.close()
                raise

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _timeout_s(self) -> float:
        return _seconds(self.timeout, 300.0)

    # -- the client loop ------------------------------------------------------
    async def _connected(self) -> Connection:
        if self._closed:
            raise dist.DistStoreError(f"the store client of {self._endpoint} is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            # shielded: one caller's cancellation must not cancel the others' connect
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> Connection:
        try:
            conn = await open_connection(self._host, self._port, secret=self._secret, timeout=self._timeout_s())
        except (OSError, WireError) as exc:  # TimeoutError is an OSError
            raise dist.DistNetworkError(f"cannot use the process-group store at {self._endpoint}: {exc}") from exc
        self._conn = conn
        asyncio.ensure_future(self._read(conn))
        return conn

    async def _read(self, conn: Connection) -> None:
        why = "closed"
        try:
            while True:
                msg = await conn.recv()
                entry = self._replies.get(getattr(msg, "rid", -1))
                if entry is not None and not entry[0].done():
                    entry[0].set_result(msg)
        except (WireError, OSError) as exc:
            why = str(exc) or type(exc).__name__
        finally:
            if self._conn is conn:
                self._conn = None
            conn.close()
            lost = dist.DistNetworkError(f"connection to the process-group store at {self._endpoint} lost: {why}")
            for fut, sent_on in list(self._replies.values()):
                # only requests sent on this connection (a reconnect's are newer)
                if sent_on is conn and not fut.done():
                    fut.set_exception(lost)

    async def _roundtrip(self, make: Callable[[int], object], reply_timeout: float) -> object:
        conn = await self._connected()
        self._next_rid += 1
        rid = self._next_rid
        fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = (fut, conn)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            try:
                await conn.send(make(rid))
            except (WireError, OSError) as exc:  # e.g. FrameTooLarge, refused before sending
                raise dist.DistStoreError(f"process-group store at {self._endpoint}: {exc}") from exc
            try:
                reply = await asyncio.wait_for(fut, reply_timeout)
            except asyncio.TimeoutError:
                raise dist.DistStoreError(
                    f"no reply from the process-group store at {self._endpoint} within {reply_timeout:g}s"
                ) from None
        finally:
            self._replies.pop(rid, None)
            if not self._replies and self._conn is not None:
                self._idle = asyncio.get_running_loop().call_later(_IDLE_CLOSE_S, self._close_idle)
        if isinstance(reply, sm.StoreError):
            if reply.kind == sm.REFUSED and self._conn is conn:
                # the host closes this connection after a refusal: drop it now, so
                # the next request reconnects instead of racing the host's close
                self._conn = None
                conn.close()
            raise dist.DistStoreError(f"process-group store at {self._endpoint}: {reply.reason}")
        return reply

    def _close_idle(self) -> None:
        self._idle = None
        if not self._replies and self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- any thread -----------------------------------------------------------
    def _call(self, coro: Coroutine[object, object, object], bound: float) -> object:
        if _ClientLoop.on_loop_thread():
            coro.close()
            raise RuntimeError("a WireStore cannot be used from its own event loop thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        # the coroutine bounds itself; this deadline is the last resort if the loop stalls
        deadline = time.monotonic() + bound + 2 * _REPLY_GRACE_S
        while True:
            left = deadline - time.monotonic()
            try:
                return fut.result(max(0.0, min(left, CANCEL_POLL_S) if self._cancelled is not None else left))
            except concurrent.futures.TimeoutError:
                reason = self._cancelled() if self._cancelled is not None else None
                if reason is None and time.monotonic() < deadline:
                    continue
                fut.cancel()
                if reason is not None:
                    raise dist.DistStoreError(f"process-group store at {self._endpoint}: cancelled ({reason})") from None
                raise dist.DistStoreError(f"process-group store at {self._endpoint}: no answer within {bound:g}s") from None

    def _request(self, make: Callable[[int], object], wait_s: float = 0.0) -> object:
        self._fetched.cache = None  # any other call on this thread ends what a wait fetched for it
        reply_timeout = (wait_s if wait_s else self._timeout_s()) + _REPLY_GRACE_S
        return self._call(self._roundtrip(make, reply_timeout), reply_timeout + self._timeout_s())

    @staticmethod
    def _ms(seconds: float) -> int:
        return min(int(seconds * 1000), MAX_WAIT_MS)

    # -- torch.distributed.Store ----------------------------------------------
    def set(self, key: str, value: bytes | str) -> None:
        value = _as_bytes(value)
        self._request(lambda rid: sm.SetRequest(rid, key, value))

    def get(self, key: str) -> bytes:
        cache = getattr(self._fetched, "cache", None)
        if cache and key in cache:
            return cache.pop(key)
        t = self._timeout_s()
        reply = self._request(lambda rid: sm.GetRequest(rid, key, self._ms(t)), t)
        assert isinstance(reply, sm.ValueReply)
        return reply.value

    def add(self, key: str, amount: int) -> int:
        reply = self._request(lambda rid: sm.AddRequest(rid, key, int(amount)))
        assert isinstance(reply, sm.IntReply)
        return reply.value

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        expected, desired = _as_bytes(expected), _as_bytes(desired)
        reply = self._request(lambda rid: sm.CompareSetRequest(rid, key, expected, desired))
        assert isinstance(reply, sm.ValueReply)
        return reply.value

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        """Block until every key exists.

        One key is waited for by reading it (a ``get`` blocks the same way,
        with the same timeout and error), together with the keys beside it
        named by a number that exist already, and what was read is kept for
        this thread's next waits and gets, until it calls anything else.
        Why: gloo's rendezvous (measured on torch 2.13: ``set`` of its own
        address under ``<prefix>/<rank>``, then ``wait`` and ``get`` of every
        rank's, in rank order) cost each rank two round trips per rank
        (17 at 8 ranks), then one (9) with the value kept, and now about
        two: the ranks set their addresses together (they come from the
        meet), so the first read finds most of them.  A key read with
        the first one cannot change before it is used: gloo's keys are set
        once per group, under a prefix of their own."""
        t = _seconds(timeout, self._timeout_s())
        keys = tuple(keys)
        if len(keys) == 1:
            key = keys[0]
            cache = getattr(self._fetched, "cache", None)
            if cache and key in cache:
                return
            reply = self._request(lambda rid: sm.GetRequest(rid, key, self._ms(t), MAX_SIBLINGS), t)
            assert isinstance(reply, sm.ValueReply)
            self._fetched.cache = {**(cache or {}), **dict(reply.siblings), key: reply.value}
            return
        self._request(lambda rid: sm.WaitRequest(rid, keys, self._ms(t)), t)

    def check(self, keys: list[str]) -> bool:
        keys = tuple(keys)
        reply = self._request(lambda rid: sm.CheckRequest(rid, keys))
        assert isinstance(reply, sm.BoolReply)
        return reply.value

    def delete_key(self, key: str) -> bool:
        reply = self._request(lambda rid: sm.DeleteRequest(rid, key))
        assert isinstance(reply, sm.BoolReply)
        return reply.value

    def num_keys(self) -> int:
        reply = self._request(lambda rid: sm.NumKeysRequest(rid))
        assert isinstance(reply, sm.IntReply)
        return reply.value

    # torch's trampoline looks up the C++ names for these two (measured on 2.13:
    # PrefixStore.delete_key/num_keys call Python "deleteKey"/"getNumKeys")
    deleteKey = delete_key  # noqa: N815
    getNumKeys = num_keys  # noqa: N815

    def clone(self) -> WireStore:
        """Another client of the same host (its own connection, opened on first use)."""
        return WireStore(self._host, self._port, secret=self._secret, timeout=self.timeout, connect=False,
                         cancelled=self._cancelled)

    def close(self) -> None:
        """Close the connection; later calls raise ``DistStoreError``.  Idempotent."""
        with _LIVE_LOCK:
            _LIVE.discard(self)

        async def shut() -> None:
            self._closed = True
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if _ClientLoop.on_loop_thread() or self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass

    def __repr__(self) -> str:
        return f"<WireStore {self._endpoint}>"


def epoch_store(
    view: View,
    timeout: timedelta = timedelta(seconds=30),
    *,
    secret: bytes | str | None,
    cancelled: Callable[[], str | None] | None = None,
) -> dist.Store:
    """The store for ``view``'s process group: rank 0's host, epoch-prefixed.

    ``secret`` is the cluster secret (``None``: loopback only).  ``cancelled``
    (see :class:`WireStore`) ends a waiting call early with a reason.  Raises
    ``DistNetworkError`` if rank 0's host cannot be reached or refuses the secret.
    """
    if not view.members:
        raise ValueError("an empty view has no store")
    host0 = view.members[0]
    endpoint = host0.get(STORE_META_KEY)
    if not endpoint:
        raise ValueError(f"member {host0.id} published no {STORE_META_KEY!r} endpoint")
    host, port = parse_hostport(endpoint)
    client = WireStore(host, port, secret=secret, timeout=timeout, cancelled=cancelled)
    return dist.PrefixStore(f"chaos/epoch/{view.epoch}/", client)
