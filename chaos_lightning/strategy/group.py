"""This node's place in the cluster: the rendezvous, the view it trains in, its process group.

Role in the whole: the strategy trains in one *group* at a time, the
connected members of a committed view, in the process group of that view's
epoch (:class:`~.process_group.ElasticProcessGroup`, switched in place).
This module forms that group, follows membership news on the agent's thread
and turns news of a lost member into an abort of whatever collective waits
on it, so no survivor waits out a gloo timeout.  It knows nothing of
Lightning, models or samples: shared by both Lightning flavours.

Threads: the agent thread calls :meth:`ElasticGroup._on_event` (flags only,
under a lock); the watchdog thread (:meth:`ElasticGroup.watch`) only reads,
and leaves the cluster for a training thread stuck in user code; everything
else runs on the training thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from chaos_lightning.config import NodeConfig
from chaos_lightning.membership import events as ev
from chaos_lightning.membership.view import View
from chaos_lightning.rendezvous import create as create_rendezvous
from chaos_lightning.strategy.process import sigterm_ends_wait
from chaos_lightning.strategy.trace import progress
from chaos_lightning.strategy.process_group import CollectiveAborted, CollectiveError, ElasticProcessGroup
from chaos_lightning.strategy.trace import Trace

log = logging.getLogger("chaos_lightning.strategy")

__all__ = ["ElasticGroup"]

#: seconds between two looks at a regroup barrier (:meth:`ElasticGroup._regroup`)
REGROUP_POLL_S = 0.02
#: longest single wait for every trainer to come to form a group, between two
#: looks at whether a newer view superseded it (:meth:`ElasticGroup._meet`)
MEET_SLICE_S = 1.0
#: views a rank keeps of those it reported in control records (:meth:`ElasticGroup.known`)
KEEP_REPORTED = 8
#: seconds between two looks of the watchdog at the training thread (:meth:`ElasticGroup.watch`)
WATCH_PERIOD_S = 1.0
#: the watchdog looks for peers waiting on this node once its training thread
#: has been in user code this long (it takes a collective timeout for theirs to fail)
WATCH_LOOK_AFTER_S = 2.0


@dataclass
class _Ahead:
    """A group built on a helper thread for a view that only takes members
    out of this node's group (:meth:`ElasticGroup._build_ahead`)."""

    view: View
    trainers: tuple[str, ...]
    done: threading.Event = field(default_factory=threading.Event)
    store: Any = None
    backend: Any = None  # the gloo backend, connected, for ElasticProcessGroup.switch(prebuilt=)
    error: BaseException | None = None
    phases: dict[str, float] = field(default_factory=dict)
    dropped: bool = False  # nobody will take it: the thread discards what it built


class VotersGone(RuntimeError):
    """Every voter of this node's view is proven dead (``QuorumLost.all_voters_dead``):
    no view can come, and no member holding the trained state is left."""


class ElasticGroup:
    """The current group and how this node stands in the cluster.

    ``stale``: what this replica holds is behind the members' (it was
    sidelined, or declared failed and rejoined); the next state sync treats
    it like a newcomer.  ``sidelined_since``: a link of ours to another
    trainer is down, so the view keeps us as a member but not among its
    connected members; we do not train until a view brings us back.
    """

    def __init__(self, config: NodeConfig, trace: Trace) -> None:
        self.config = config
        self.trace = trace
        self.pg = ElasticProcessGroup()
        self.rdv: Any = None
        self.view: View | None = None
        self.trainers: tuple[str, ...] = ()
        self.abort = threading.Event()  # set: the current group's collectives end at once
        self._lock = threading.Lock()  # trainers and abort, against the agent thread
        self.sidelined_since: float | None = None
        self.stale = False
        #: the epoch whose voters are all proven dead (we are a learner): no newer view can come
        self.voters_gone: int | None = None
        #: (view epoch, generation) of the last group built or tried: building
        #: the same epoch again is a regroup (:meth:`_regroup`)
        self._attempt: tuple[int, int] | None = None
        #: why the next build of the same epoch regroups on purpose (the
        #: strategy sets it: replicas that differ after a shadow's catch-up);
        #: None: a collective failed.  Only for the log line; cleared by the
        #: next group formed or regrouped
        self.regroup_reason: str | None = None
        #: generation of the current group within its view (0: the view's first)
        self.generation = 0
        #: set while this node cannot reach a majority of its view's voters (the
        #: agent's QuorumLost, until QuorumRegained): a wait for a view shows it
        self.minority: ev.QuorumLost | None = None
        #: the views this rank reported in control records, by epoch (:meth:`known`)
        self._reported: dict[int, View] = {}
        #: set by the watchdog when it took this node out of the cluster for a
        #: training thread stuck in user code; the thread, back, rejoins (:meth:`form`)
        self.fenced = False
        self._watching = threading.Event()  # set: the watchdog stops
        self._watchdog: threading.Thread | None = None
        self._needed: str | None = None  # why the others wait for us, seen while the thread is away
        self._back_from_fence = False  # rejoining after the watchdog's leave, until a group forms
        self._looks: dict[int, Any] = {}  # the watchdog's store clients, by view epoch
        #: where the last :meth:`form` spent its time, by phase (seconds): the
        #: wait for a usable view, the store's connect, the wait for every
        #: trainer to come (:meth:`_meet`), gloo's init; with a group built
        #: ahead, ``ahead_wait_s``: what the training thread still waited for
        #: it (the other phases then ran on the helper thread).  Traced with each switch.
        self.phases: dict[str, float] = {}
        #: the group being built ahead, or built and not yet taken (:meth:`_build_ahead`)
        self._ahead: _Ahead | None = None
        #: the newest epoch whose group this node built or began to build, ahead or not
        self._claimed = -1
        self._closing = False  # set by close(): no group is built ahead any more
        self._helpers: list[threading.Thread] = []  # threads building ahead (close waits for them)

    def open(self, meta: dict[str, str]) -> None:
        """Bind and start the agent (no join yet), and the watchdog."""
        self.rdv = create_rendezvous(**self.config.rendezvous_kwargs(), meta=meta)
        self.rdv.subscribe(self._on_event)
        if getattr(self.rdv, "agent", None) is not None:  # the peer backend: an agent to step aside with
            self._watchdog = threading.Thread(target=self.watch, name="chaos-watchdog", daemon=True)
            self._watchdog.start()

    # ---------------------------------------------------------------- the watchdog
    @property
    def fence_after(self) -> float:
        """Seconds a training thread may stay in user code while the others
        wait for it before this node steps out of the cluster: half the join
        timeout, so the fence lands while the others still wait (their
        regroup and group formation give up at the join timeout)."""
        return self.config.join_timeout / 2

    def watch(self) -> None:
        """The watchdog thread: a training thread stuck in user code (a
        deadlock, a hung I/O call) while its agent thread answers every probe
        is never evicted by the membership layer, and the others' collectives
        fail and their regroup waits for it until the join timeout ends the
        job (issue 14).  When the others are known to wait for this node
        (:meth:`_waited_for`) and its training thread has been away from the
        strategy's code for :attr:`fence_after` seconds, the node leaves the
        cluster on the thread's behalf, so the others train on; if the
        thread comes back, it rejoins as a newcomer (:meth:`form`)."""
        while not self._watching.wait(WATCH_PERIOD_S):
            try:
                self._check_stuck()
            except Exception as exc:  # noqa: BLE001 - a look that failed (a store gone) is tried again
                log.debug("chaos: watchdog: %s", exc)

    def _check_stuck(self) -> None:
        away = self.pg.presence.away_for()
        if away < WATCH_LOOK_AFTER_S or self.fenced or self.rdv is None:
            self._needed = None  # back in our code (or never away long): evidence of an earlier absence is void
            self._close_looks()
            return
        with self._lock:
            view, trainers, generation = self.view, self.trainers, self.generation
        if view is None or len(trainers) < 2 or self.node_id not in trainers:
            return
        if self._needed is None:
            self._needed = self._waited_for(view, generation)
        if self._needed is None or away < self.fence_after:
            return  # nobody waits (every member in a long validation, say), or not long enough yet
        self.fenced = True
        self._close_looks()
        log.warning("chaos: the training thread has been in user code for %.0fs (blocked or deadlocked) while %s: "
                    "this node leaves the cluster so the others train on, and rejoins if the thread comes back",
                    away, self._needed)
        self.trace.emit("fenced", epoch=view.epoch, away_s=round(away, 3))
        with self._lock:
            self.abort.set()  # the thread, back, fails its step at once and rejoins
        self.rdv.agent.leave(self.config.leave_timeout)

    def _waited_for(self, view: View, generation: int) -> str | None:
        """Why the others are waiting for this node's training thread right
        now, or None.  Only what they do says so, never our own absence: the
        others regroup our group's view (their collective with us failed), or
        they are counted in to form a newer view's group that holds us (or
        gave up doing so after a collective timeout: they then wait for a
        newer view, which nobody proposes while our agent answers).  (A
        newer view alone is no evidence: every member may be in the same long
        validation when a joiner is admitted or a member dies.)  Seen once
        while the thread is away, it holds until the thread is back."""
        newest = self._look(view, "regroup/gen", read=True)
        if newest is not None and newest > generation:
            return f"the others regroup epoch {view.epoch} (generation {newest}) and wait for this node"
        current = self.rdv.current_view()
        if current is not None and current.epoch > view.epoch and self.node_id in current:
            present = self._look(current, "meet/present", read=False)
            if present:
                return f"{present} trainer(s) wait to form the group of epoch {current.epoch}, which holds this node"
            if self._look(current, "meet/gave_up", read=False):
                # they waited a collective timeout for us and now wait for a newer view
                return f"the others gave up forming the group of epoch {current.epoch}, which holds this node, without it"
        return None

    def _look(self, view: View, key: str, *, read: bool) -> int | None:
        """The integer at ``key`` of ``view``'s store (None if unset), through a
        client kept while the thread is away (one look a second)."""
        store = self._looks.get(view.epoch)
        if store is None:
            store = self._looks[view.epoch] = self.rdv.store(view, timeout=self.config.switch_timeout)
        if not store.check([key]):
            return None
        return int(store.get(key)) if read else int(store.add(key, 0))

    def _close_looks(self) -> None:
        for store in self._looks.values():
            try:
                getattr(store, "underlying_store", store).close()
            except Exception:  # noqa: BLE001 - its host may be gone
                pass
        self._looks.clear()

    def _come_back(self) -> None:
        """The training thread is back after the watchdog took the node out:
        ask to be let in again (a new incarnation) and sync like a newcomer."""
        self.fenced = False
        self.stale = True
        self._back_from_fence = True
        log.warning("chaos: the training thread is back after this node left the cluster for it; rejoining")
        self.trace.emit("fence_rejoin")
        self.rdv.agent.rejoin()

    def join(self, min_nodes: int, deadline: float) -> View:
        """Ask to join, then wait for a view of at least ``min_nodes``;
        SIGTERM ends either wait (:func:`sigterm_ends_wait`)."""
        seeds = ", ".join(self.config.peers) or "none: founding the cluster"
        log.info("chaos: waiting to join (seeds: %s; join timeout %gs)", seeds, self.config.join_timeout)
        with sigterm_ends_wait("waiting to join"):
            if self.config.standby:  # held by the size policy: no join timeout (standby.py)
                from chaos_lightning.strategy.standby import wait_as_standby

                view = wait_as_standby(self.rdv, seeds=self.config.peers, secret=self.config.secret)
                deadline = time.monotonic() + self.config.join_timeout  # the join's bound starts at admission
            else:
                view = self.rdv.join(self.config.join_timeout)
            if view.size >= min_nodes:
                return view
            with sigterm_ends_wait(f"waiting for min_nodes={min_nodes}"), progress(
                f"chaos: waiting for min_nodes={min_nodes}", total=min_nodes, unit="node"
            ) as bar:
                while view.size < min_nodes:
                    bar.n = view.size
                    bar.refresh()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"chaos: {view.size} of min_nodes={min_nodes} nodes after {self.config.join_timeout}s")
                    view = self.rdv.next_view(view.epoch, min(left, 1.0)) or view
        return view

    @property
    def node_id(self) -> str:
        return self.rdv.node_id if self.rdv is not None else ""

    @property
    def rank(self) -> int:
        return self.trainers.index(self.node_id)

    def member_at(self, rank: int) -> Any:
        return self.view.member(self.trainers[rank])

    def all_reduce(self, tensor: Any, timeout: float | None = None) -> Any:
        """An abortable all-reduce on the current group; a failure makes the
        group's peers suspects (:meth:`suspect_peers`) before it is raised."""
        try:
            return self.pg.all_reduce(tensor, abort=self.abort, timeout=timeout or self.config.collective_timeout)
        except CollectiveError as exc:
            self.suspect_peers(exc)
            raise

    def suspect_peers(self, exc: BaseException | None = None) -> None:
        """A collective on the current group failed: tell the membership layer
        its peers are suspect, so it probes them now instead of at their turn
        (issue 14: a peer's reset is evidence; a dead peer's address refuses
        the probe, which confirms its death at once, and the view without it
        commits one round later instead of a probe period plus the
        suspicion timeout).

        All the group's peers are named (gloo's error does not say which
        rank reset reliably): a live one answers its probe and nothing
        changes, and the agent rate-limits suspicions.  Not after an abort
        (the membership layer raised it: it knows already), and a no-op on a
        rendezvous backend without an agent (etcd).  Never raises: this runs
        in the failure path of a step."""
        if isinstance(exc, CollectiveAborted):
            return
        agent = getattr(self.rdv, "agent", None)
        suspect = getattr(agent, "suspect", None)
        if suspect is None:
            return
        with self._lock:
            peers = tuple(t for t in self.trainers if t != self.node_id)
        if not peers:
            return
        try:
            suspect(peers)
        except Exception as err:  # noqa: BLE001 - evidence is optional; the step's failure path must go on
            log.debug("chaos: could not report suspects %s: %s", peers, err)
            return
        self.trace.emit("suspect", peers=list(peers))

    def settled(self) -> None:
        """The replicas of the group are identical again: no longer stale or sidelined."""
        self.sidelined_since = None
        self.stale = False

    def form(self, view: View | None, usable: Callable[[View], bool], deadline: float) -> View:
        """Build the group of the first usable view; members that picked
        different views fail to meet (bounded) and retry on a newer one.

        A view that keeps this node as a member but not among its connected
        members sidelines it: no training, and a longer wait
        (``sideline_timeout``) for the view that brings it back.
        """
        if self.fenced:
            self._come_back()
            view = None  # the views before are those that let us go
        bar = None
        started = time.perf_counter()
        try:
            while True:
                if view is not None and usable(view):
                    try:
                        self.phases = {"view_s": time.perf_counter() - started}
                        self._build(view, view.connected(), deadline)
                        self._back_from_fence = False
                        return view
                    except Exception as exc:
                        log.info("chaos: group of epoch %d did not form (%s); waiting for a newer view", view.epoch, exc)
                if view is not None and self.node_id in view and self.node_id not in view.connected():
                    if self.sidelined_since is None:
                        self.sidelined_since = time.monotonic()
                        self.stale = True
                        log.warning("chaos: sidelined in epoch %d: down links %s", view.epoch, list(view.down_links))
                        self.trace.emit("sidelined", epoch=view.epoch, down_links=[list(p) for p in view.down_links])
                        bar = progress("chaos: sidelined (a link is down), waiting for it")
                        bar.__enter__()
                    deadline = max(deadline, self.sidelined_since + self.config.sideline_timeout)
                if self.voters_gone is not None and (view is None or view.epoch <= self.voters_gone):
                    raise VotersGone(f"every voter of epoch {self.voters_gone} is proven dead")
                lost = self.minority
                if lost is not None and bar is None:
                    # the agent said it once in the log; the bar says it for as long as it lasts
                    self.trace.emit("minority", epoch=lost.epoch, reachable=lost.reachable, voters=lost.voters)
                    bar = progress(f"chaos: in a minority ({lost.reachable} of {lost.voters} voters reachable), "
                                   "waiting for the majority")
                    bar.__enter__()
                left = deadline - time.monotonic()
                if left <= 0:
                    if self._back_from_fence:
                        raise TimeoutError(
                            f"chaos: no usable view after {self.config.join_timeout}s: this node left the cluster "
                            "while its training thread was stuck, and nobody let it back in (the members may "
                            "have finished the fit or exited)")
                    raise TimeoutError(f"chaos: no usable view after {self.config.join_timeout}s")
                view = self.rdv.next_view(view.epoch if view is not None else 0, min(left, 1.0)) or view
                if bar is not None:
                    bar.refresh()
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)

    def _build(self, view: View, trainers: tuple[str, ...], deadline: float) -> None:
        ahead = self._claim(view)
        if ahead is not None:
            self._install_ahead(ahead, view, trainers)
            return
        # the PG timeout also bounds every gloo op of the group, so it is the
        # collective timeout, not a short init bound (a slow step would fail)
        t0 = time.perf_counter()
        store = self.rdv.store(view, timeout=self.config.switch_timeout, cancelled=lambda: self._superseded(view))
        t1 = time.perf_counter()
        generation = 0
        if self._attempt is not None and self._attempt[0] == view.epoch:
            generation = self._regroup(store, view, trainers, self._attempt[1], deadline)
            store = dist.PrefixStore(f"regroup/{generation}/", store)
        self._attempt = (view.epoch, generation)
        if generation == 0:
            self._meet(store, view, len(trainers))
        t2 = time.perf_counter()
        self.pg.switch(trainers.index(self.node_id), len(trainers), store, self.config.collective_timeout)
        self.phases.update(store_s=t1 - t0, meet_s=t2 - t1, init_s=time.perf_counter() - t2)
        self._formed(view, trainers, generation)

    def _formed(self, view: View, trainers: tuple[str, ...], generation: int) -> None:
        self.regroup_reason = None
        with self._lock:
            self.abort.clear()
            self.view, self.trainers = view, trainers
            self.generation = generation
            # news that arrived while the group formed (one of its members
            # already gone) must still end its first collective
            if set(trainers) - set(self.rdv.current_view().ids):
                self.abort.set()

    # ------------------------------------------------------------ groups built ahead
    def _claim(self, view: View) -> _Ahead | None:
        """The training thread is about to build ``view``'s group: no helper
        starts one for it from now on; the one built ahead, if any."""
        with self._lock:
            self._claimed = max(self._claimed, view.epoch)
            ahead = self._ahead
            if ahead is None or ahead.view.epoch > view.epoch:
                return None
            self._ahead = None
            if ahead.view.epoch == view.epoch:
                return ahead
            self._drop(ahead)  # an older view's: superseded
            return None

    def _install_ahead(self, ahead: _Ahead, view: View, trainers: tuple[str, ...]) -> None:
        """Install the group a helper built (or is building) for ``view``:
        wait for the helper (bounded: its meet and gloo's rendezvous are each
        bounded by the collective timeout), then register its backend as the
        default group.  A helper that failed fails this build, as a failed
        build here would (the next try of the epoch regroups it)."""
        self._attempt = (view.epoch, 0)
        waited = time.perf_counter()
        bound = 2 * self.config.collective_timeout + self.config.switch_timeout
        if not ahead.done.wait(bound):
            with self._lock:
                self._drop(ahead)
            raise RuntimeError(f"the group of epoch {view.epoch} built ahead did not form within {bound:g}s")
        if ahead.error is not None:
            raise RuntimeError(f"building the group of epoch {view.epoch} ahead failed: {ahead.error}") from ahead.error
        if ahead.trainers != trainers:  # one view, one set of connected members: never seen
            with self._lock:
                self._drop(ahead)
            raise RuntimeError(f"the group of epoch {view.epoch} was built ahead for {ahead.trainers}, not {trainers}")
        backend, ahead.backend = ahead.backend, None
        self.pg.switch(trainers.index(self.node_id), len(trainers), ahead.store, self.config.collective_timeout,
                       prebuilt=backend)
        self.phases.update(ahead.phases, ahead_wait_s=time.perf_counter() - waited)
        self._formed(view, trainers, 0)

    def _maybe_build_ahead(self, view: View) -> None:
        """Agent thread, on a committed view: if it only takes members out of
        this node's group (a leave, a death: nobody new, nobody to pull from),
        build its group on a helper thread now, while the training thread
        still computes its step (issue 14: the group's store, meet and gloo
        init, 90-130 ms at 8 nodes on 2 cores, were paid after the step's
        reduction failed).  The training thread takes it at the switch
        (:meth:`_build`).  A rank that does not build ahead builds at its
        switch on the same keys, and they meet (:meth:`_meet` first, here too)."""
        if not self.config.groups_ahead or getattr(self.rdv, "agent", None) is None:
            return
        me = self.node_id
        with self._lock:
            current = self.view
            if (self._closing or current is None or view.epoch <= max(current.epoch, self._claimed)
                    or me not in self.trainers):
                return
            trainers = tuple(view.connected())
            if me not in trainers or not set(trainers) < set(self.trainers):
                return
            if any(view.member(n) != current.member(n) for n in trainers):
                return  # a member restarted under its id: a newcomer to sync
            if self._ahead is not None:
                self._drop(self._ahead)  # an older view's, superseded
            self._claimed = view.epoch
            ahead = self._ahead = _Ahead(view, trainers)
            thread = threading.Thread(target=self._build_ahead, args=(ahead,),
                                      name=f"chaos-group-ahead-{view.epoch}", daemon=True)
            self._helpers = [t for t in self._helpers if t.is_alive()] + [thread]
            thread.start()

    def _build_ahead(self, ahead: _Ahead) -> None:
        """Helper thread: the group of ``ahead.view``, as :meth:`_build`
        builds generation 0 (store, meet, gloo), with gloo's rendezvous off
        the training thread (the GIL released)."""
        view, trainers = ahead.view, ahead.trainers
        try:
            t0 = time.perf_counter()
            store = self.rdv.store(view, timeout=self.config.switch_timeout, cancelled=lambda: self._superseded(view))
            t1 = time.perf_counter()
            self._meet(store, view, len(trainers))
            t2 = time.perf_counter()
            backend = self.pg.build_ahead(trainers.index(self.node_id), len(trainers), store,
                                          self.config.collective_timeout)
            ahead.store, ahead.backend = store, backend
            ahead.phases = {"store_s": t1 - t0, "meet_s": t2 - t1, "init_s": time.perf_counter() - t2}
        except BaseException as exc:  # noqa: BLE001 - the training thread reads it (or nobody does)
            ahead.error = exc
            log.debug("chaos: building the group of epoch %d ahead failed: %s", view.epoch, exc)
        with self._lock:
            ahead.done.set()
            if ahead.dropped:
                self._discard(ahead)

    def _drop(self, ahead: _Ahead) -> None:
        """(Under the lock.)  Nobody will take ``ahead``'s group: discard it
        now if built, else the helper does when it ends."""
        ahead.dropped = True
        if self._ahead is ahead:
            self._ahead = None
        if ahead.done.is_set():
            self._discard(ahead)

    def _discard(self, ahead: _Ahead) -> None:
        backend, ahead.backend = ahead.backend, None
        if backend is not None:
            self.pg.discard(backend)

    def _meet(self, store: Any, view: View, world: int) -> None:
        """Enter gloo's rendezvous only when every trainer of ``view`` is
        forming its group *now*.

        Why: ranks that tried to form a view's group and gave up (a newer
        view committed) leave their addresses in its store.  A rank that
        learns of that view late (back from a partition) finds every key,
        enters gloo's connect, and waits there for peers that left long ago:
        in C++, past the store's cancel hook and past the PG timeout
        (measured by the long soak: ``gloo::transport::tcp::Pair::
        waitUntilConnected`` for good, and every other member then waited
        for it; docs/results/soak/seed0-200events-hang.md).  So each rank
        counts itself in on the store and out again when it gives up, and
        waits (cancellable, bounded by the collective timeout) until the
        count holds every trainer.

        The rank whose count completes it says so under ``meet/all``; the
        others wait for that key on the store host (no polling: a poll every
        5 ms from each rank loaded the host's process, a member's, while it
        trained, once groups were built ahead during the step).  The key is
        set only when every trainer was counted in at once, so it never lets
        a late rank into a rendezvous the others left."""
        key = "meet/present"
        present = store.add(key, 1)
        deadline = time.monotonic() + self.config.collective_timeout
        try:
            if present >= world:
                store.set("meet/all", b"1")
                return
            while True:
                reason = self._superseded(view)
                if reason is not None:
                    raise RuntimeError(f"{reason} (left the group's rendezvous with {store.add(key, 0)} of {world} there)")
                left = deadline - time.monotonic()
                if left <= 0:
                    try:  # for good: a trainer that never came may be stuck (its watchdog reads this)
                        store.add("meet/gave_up", 1)
                    except Exception:  # noqa: BLE001 - the store may be gone with its host
                        pass
                    raise RuntimeError(f"{store.add(key, 0)} of {world} trainers came to form the group of "
                                       f"epoch {view.epoch}")
                try:
                    # the store's cancel hook (a newer view) ends the wait too
                    store.wait(["meet/all"], timedelta(seconds=min(left, MEET_SLICE_S)))
                    return
                except dist.DistStoreError:
                    continue  # a slice ran out, or the wait was cancelled: look again
        except BaseException:
            try:
                store.add(key, -1)  # best effort: we are not there any more
            except Exception:  # noqa: BLE001 - the store may be gone with its host
                pass
            raise

    def _superseded(self, view: View) -> str | None:
        """Why the group of ``view`` is no longer worth forming (a newer view
        committed), or None.  Asked by the store while gloo's rendezvous
        waits: measured by the soak (docs/results/soak), a rejoin's view that
        still listed a member killed a moment before kept every survivor
        waiting the full switch timeout (30 s) for the dead rank's key, though
        the view without it had committed 0.4 s later."""
        rdv = self.rdv
        if rdv is None or self._closing:  # a helper building ahead as the node closes
            return "this node is closing"
        current = rdv.current_view()
        if current is not None and current.epoch > view.epoch:
            return f"epoch {current.epoch} committed while the group of epoch {view.epoch} formed"
        # removed by a newer view (one without us, so never our current one):
        # the soak's node back from a partition learnt the view that still
        # held it in the same millisecond as its removal
        removed = getattr(getattr(rdv, "agent", None), "removed", None)
        if removed is not None and removed.view.epoch > view.epoch:
            return f"this node was removed in epoch {removed.view.epoch} while the group of epoch {view.epoch} formed"
        return None

    def _regroup(self, store: Any, view: View, trainers: tuple[str, ...], last: int, deadline: float) -> int:
        """The same view's group once more, under a fresh generation, once
        every trainer of it is there; the generation.

        Why: a collective can fail with no membership change at all (a rank
        paused past the collective timeout by a slow checkpoint write or a GC
        pause, and not evicted: its agent thread kept answering).  No newer
        view will come, and the broken group cannot be used again (its gloo
        ops are left pending, its store keys spent).  So the members rebuild
        the view's group on fresh keys (``regroup/<g>/`` under the epoch's
        prefix), and the paused rank joins them when it resumes (its own
        step fails on the broken group, so it regroups too).

        How the generation is agreed without the membership layer: on the
        view's store (rank 0's host), ``regroup/gen`` only grows, by
        compare-and-set from the generation this rank last tried; a rank
        that arrives late reads the newer one.  Then a store barrier: nobody
        enters gloo's rendezvous (bounded by the collective timeout) before
        every trainer is at the same generation, so a late rank never finds
        the others timed out of it and chasing a newer one.  The barrier
        gives up as soon as a newer view commits (a member did die: its
        group is the one to form) and at ``deadline``.
        """
        expected = str(last) if last else ""  # a missing key matches "": generation 0 was never written
        generation = int(store.compare_set("regroup/gen", expected, str(last + 1)))
        self._attempt = (view.epoch, generation)  # a retry bumps from here
        why, self.regroup_reason = self.regroup_reason, None
        if why is None:
            log.warning("chaos: the group of epoch %d failed with no membership change; regrouping its %d members "
                        "(generation %d)", view.epoch, len(trainers), generation)
        else:
            log.info("chaos: regrouping the %d members of epoch %d (generation %d): %s", len(trainers), view.epoch,
                     generation, why)
        self.trace.emit("regroup", epoch=view.epoch, generation=generation)
        arrived = store.add(f"regroup/{generation}/arrived", 1)
        # Not the abort flag: it belongs to the group that failed and stays
        # set until a group forms, so news from before this regroup would end
        # every try at once (measured by the soak's healed 2|3 partition: 64
        # generations in 64 s, then "no usable view after 120 s" on the
        # healed side).  A member that did fail leaves the view: the newer
        # view's commit (fast on a proven death) ends the wait below.
        while arrived < len(trainers):
            current = self.rdv.current_view()
            if current is not None and current.epoch > view.epoch:
                raise RuntimeError(f"epoch {current.epoch} committed while regrouping epoch {view.epoch}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"regroup of epoch {view.epoch}: {arrived} of {len(trainers)} members came")
            now = int(store.get("regroup/gen"))
            if now != generation:  # a rank whose try failed (a store error) bumped it: meet there
                generation = now
                self._attempt = (view.epoch, generation)
                arrived = store.add(f"regroup/{generation}/arrived", 1)
                continue
            time.sleep(REGROUP_POLL_S)
            arrived = store.add(f"regroup/{generation}/arrived", 0)
        return generation

    def known(self, view: View) -> View:
        """Keep ``view``, which this rank reports in a step's control record
        (the few newest): a decision to adopt it (:meth:`adopt`) names it by
        its epoch, and by then the agent may have committed a newer one."""
        with self._lock:
            if view.epoch not in self._reported:
                self._reported[view.epoch] = view
                for old in sorted(self._reported)[:-KEEP_REPORTED]:
                    del self._reported[old]
        return view

    def keeps(self, view: View) -> bool:
        """Whether ``view`` (the newest this rank knows) would keep the group
        as it is: nothing newer than the group's, or a newer view whose
        connected members are the group's trainers, in the same order and
        the same processes (each rank reports this in the step's control
        record: :func:`.switch.decide` then waits for the ranks to agree on
        the epoch instead of rebuilding the group)."""
        with self._lock:
            return self.view is not None and (view.epoch <= self.view.epoch or self._keeps(view))

    def _keeps(self, view: View) -> bool:
        if tuple(view.connected()) != tuple(self.trainers):
            return False
        # the same processes, not only the same names: a node restarted
        # under its id is a new incarnation, outside this process group
        return all(view.member(n) == self.view.member(n) for n in self.trainers)

    def adopt(self, epoch: int) -> bool:
        """Take the view of ``epoch`` (reported by every rank of the group)
        as this group's own if its trainers are the group's, in the same
        order: no new process group, no state sync (issue 13: the learner
        promotion after every join rebuilt the group for nothing).  Every
        rank holds the same view for an epoch, so every rank decides alike."""
        with self._lock:
            view = self._reported.get(epoch)
            if view is None or self.view is None or view.epoch <= self.view.epoch or not self._keeps(view):
                return False
            self.view = view
            # the group is this epoch's now: a failure with no membership
            # change regroups it (a fresh generation, every rank alike), as
            # it would a group built for the epoch
            self._attempt = (view.epoch, self.generation)
        self.trace.emit(
            "trainers", epoch=view.epoch, world=len(self.trainers), trainers=list(self.trainers), stall_s=0.0,
            joined=False, failed_step=False, group_init_s=0.0, adopted=True,
        )
        log.info("chaos: view epoch %d keeps the group's %d trainers: training on in the same group",
                 view.epoch, len(self.trainers))
        return True

    def _on_event(self, event: object) -> None:
        # Agent thread: only flags.  A committed view without a member we
        # train with ends a collective waiting on it (no gloo timeout).  Not
        # this node's own MemberFailed: that is its conclusion, not the
        # cluster's (measured at 8 nodes on 2 cores: one rank confirmed a
        # busy member failed at start-up, the others refuted it, no view
        # changed, and that rank left the step's all-reduce alone while the
        # other seven waited in it the 30 s collective timeout).  A real
        # death commits one round after its confirmation, and the commit
        # ends every rank's collective at once.  (Nor QuorumLost: it may be
        # regained with no view change, and a rank that left the collective
        # would then wait for a newer view while the others regroup the same
        # one and wait for it.)
        if isinstance(event, ev.ViewChanged):
            v = event.view
            self.trace.emit("view_committed", epoch=v.epoch, members=list(v.ids), down_links=[list(p) for p in v.down_links])
            self._maybe_build_ahead(v)
        if isinstance(event, ev.QuorumLost) and not event.all_voters_dead and not event.allow_minority:
            self.minority = event
        elif isinstance(event, (ev.QuorumRegained, ev.Removed)) or (
                isinstance(event, ev.ViewChanged) and self.node_id in event.view):
            # regained, or a view that holds us (a rejoin sets the quorum flag
            # back without a QuorumRegained), or out of that view: no longer waiting in it
            self.minority = None
        if isinstance(event, ev.QuorumLost) and event.all_voters_dead:
            self.voters_gone = event.epoch
            self.abort.set()
            return
        if not isinstance(event, (ev.ViewChanged, ev.Removed)):
            return
        with self._lock:
            if isinstance(event, ev.Removed) and not event.graceful and self.trainers:
                log.warning("chaos: this node was declared failed in epoch %d; rejoining", event.view.epoch)
                self.trace.emit("removed", epoch=event.view.epoch)
                self.stale = True
            trainers = set(self.trainers)
            # a down link between two trainers leaves one out of the next
            # group: on real links the collective would hang on it
            if trainers - set(event.view.connected()):
                self.abort.set()

    def leave(self) -> None:
        """Leave gracefully: the view without us first (the members wait for
        it, not for our group's teardown: measured 90 ms at 9 processes on 2
        cores), then the group."""
        self.rdv.leave(self.config.leave_timeout)
        self.pg.close()

    def close(self, *, left: bool) -> None:
        with self._lock:
            self._closing = True
            if self._ahead is not None:
                self._drop(self._ahead)
            helpers, self._helpers = self._helpers, []
        # measured: a helper still inside gloo's rendezvous (which calls back
        # into the Python store) as the interpreter exited crashed the process
        # (SIGSEGV, 1 node in 8 runs of 8 nodes: the view without a member
        # that had finished its fit committed as this one finished too).
        # _superseded now says "closing": a helper's meet and store waits end
        # within a poll, and it is waited for here.
        bound = time.monotonic() + self.config.switch_timeout
        for thread in helpers:
            thread.join(max(0.0, bound - time.monotonic()))
            if thread.is_alive():
                log.warning("chaos: %s is still forming a group as this node closes", thread.name)
        self._watching.set()
        if self._watchdog is not None:
            self._watchdog.join(WATCH_PERIOD_S + self.config.switch_timeout)  # a look in progress is bounded
            self._watchdog = None
        self._close_looks()
        if self.rdv is None:
            return
        if not left:
            self.pg.close()
        self.rdv.close()
        self.rdv = None
