"""Warm standbys: the join path of a process that waits outside a full cluster.

Role in the whole: a standby (``CHAOS_STANDBY=1``, started by ``chaos-run
--standby N``) runs the user's script like any node: imports, model and data
loaders are built before ``trainer.fit``, so all of that is off the critical
path when a member dies.  In ``fit`` it asks to join like any joiner; the
cluster's size policy (``membership/policy.py``) holds it as a pending join
while the view is at its ``target_nodes``, and admits it with the view that
removes a failed or leaving member.  From there it joins exactly as a joiner
does (group formation, the multi-source state pull, the exactly-once and
bit-identical guarantees): this module only replaces the *bounded* wait for
the first view (``CHAOS_JOIN_TIMEOUT``) with an unbounded one, since being
held is the standby's job, not a failure.

A standby asks to join only once the cluster *trains* (a seed's agent status
reports a step, :func:`wait_for_training`).  Why: admission takes whoever
asks while a view has room, and a cluster being founded has room for the
nodes started to found it.  A standby that asked then (measured: it reached
``fit`` before the second node of ``chaos-run --nodes 2 --standby 1`` when
that node's imports were slower) took that node's seat; the node, held as a
surplus joiner with an ordinary, bounded join, exited 1 after
``CHAOS_JOIN_TIMEOUT`` before its first step, and the cluster had no standby
left.  A cluster trains only once its ``min_nodes`` founders are members, so
from then on every seat a standby can take is a vacancy (or room below a
``target_nodes`` above the founders).  The price: a standby never stands in
for a founder that never starts (the founders' join timeout reports that).

Both waits still end, with one clear line:

* SIGTERM: exit 143 at once (:func:`sigterm_ends_wait`; there is nothing to
  leave: the standby holds no slot, and its pending join is harmless);
* the cluster ended: every seed refused our connection (nothing listens at
  any of them) for :data:`CLUSTER_GONE_S` seconds in a row: a
  :class:`StandbyOrphaned` error naming the seeds.  Seeds should therefore
  list several members (the launcher passes every address it started).

It also owns the strategy's answer to the policy's other rule: a member told
to retire (:class:`~chaos_lightning.membership.events.Retire`, above
``max_nodes``) leaves gracefully at its next step boundary
(:func:`retire_hook`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.view import View
from chaos_lightning.rendezvous.base import RendezvousClosed, RendezvousError
from chaos_lightning.strategy.process import sigterm_ends_wait

log = logging.getLogger(__name__)

#: seconds every seed must refuse us before a standby concludes that the
#: cluster is gone: long enough for a member restarted at the same address
#: by its launcher (measured: ~5-9 s of Python start-up on these machines),
#: short against a standby's useful life
CLUSTER_GONE_S = 10.0

#: seconds per slice of the wait (SIGTERM and the seeds are checked between slices)
POLL_S = 1.0


class StandbyOrphaned(RuntimeError):
    """The cluster a standby waited for has ended (no seed listens any more)."""


def wait_for_training(seeds: Sequence[str], secret: Any, *, gone_after: float = CLUSTER_GONE_S,
                      poll: float = POLL_S, ask: Callable[..., dict] | None = None) -> str:
    """Wait, without a timeout, until one of ``seeds`` reports (agent status,
    ``training.step`` > 0) that the cluster trains; that seed is returned.
    :class:`StandbyOrphaned` once every seed refused connections for
    ``gone_after`` seconds in a row.  ``ask``: the status query (a test's stand-in
    for :func:`chaos_lightning.agent.status`)."""
    watch = ClusterWatch(seeds, secret, gone_after=gone_after, poll=poll, ask=ask)
    log.info("chaos: warm standby: waiting for the cluster to train before asking to join (seeds: %s)",
             ", ".join(seeds))
    while True:
        reports, refused = watch.look()
        for seed in seeds:
            if int(reports.get(seed, {}).get("step", 0)) > 0:
                return seed
        if watch.gone:
            raise StandbyOrphaned(
                "chaos: the cluster this standby waited for has ended (or never started): no seed listens "
                f"({', '.join(f'{a} ({why})' for a, why in refused.items())}) for {gone_after:g}s")
        time.sleep(poll)


def wait_as_standby(rdv: Any, *, seeds: Sequence[str] = (), secret: Any = None, gone_after: float = CLUSTER_GONE_S,
                    poll: float = POLL_S) -> View:
    """Once the cluster trains (:func:`wait_for_training` on ``seeds``; skipped
    without seeds or without an agent, e.g. the etcd backend), ask to join
    through ``rdv`` and wait, without a timeout, for the view that admits
    this node; the first view that lists it is returned."""
    agent = getattr(rdv, "agent", None)
    with sigterm_ends_wait("waiting as a warm standby"):
        if seeds and agent is not None:
            wait_for_training(seeds, secret, gone_after=gone_after, poll=poll)
        log.info("chaos: warm standby: waiting to be admitted (held while the cluster is at its size target)")
        t0 = time.monotonic()
        gone_since: float | None = None
        while True:
            try:
                view = rdv.join(poll)
            except RendezvousClosed:
                raise
            except RendezvousError:
                view = None  # held (or a seed still starting): wait on
            if view is not None:
                log.info("chaos: warm standby admitted in view %s after %.1fs", view.describe(), time.monotonic() - t0)
                return view
            now = time.monotonic()
            if agent is not None and agent.seeds_gone():
                gone_since = gone_since if gone_since is not None else now
                if now - gone_since >= gone_after:
                    raise StandbyOrphaned(
                        f"chaos: the cluster this standby waited for has ended: no seed listens any more "
                        f"({agent.seed_errors()}) for {gone_after:g}s")
            else:
                gone_since = None


class ClusterWatch:
    """Whether the cluster a node stands outside of still trains, from its
    members' agent status: ended when one reports that its fit has ended,
    or when every one has refused our connection (nothing listens) for
    ``gone_after`` seconds in a row.  For a member that stepped down
    (``strategy/elastic.py``: ``_stand_by``).  ``ask``: the status query (a
    test's stand-in for :func:`chaos_lightning.agent.status`); ``clock``
    and ``sleep`` likewise."""

    def __init__(self, seeds: Sequence[str], secret: Any, *, gone_after: float = CLUSTER_GONE_S,
                 poll: float = POLL_S, ask: Callable[..., dict] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if ask is None:
            from chaos_lightning.agent import status as ask
        self.seeds, self.secret, self.gone_after, self.poll = list(seeds), secret, gone_after, poll
        self._ask, self._clock, self._sleep = ask, clock, sleep
        self._gone_since: float | None = None
        #: every seed has refused our connection for ``gone_after`` seconds (as of the last look)
        self.gone = False

    def look(self) -> tuple[dict[str, dict], dict[str, str]]:
        """One look at every seed: the training reports of those that
        answered, and why each refused (connection refused: nothing listens);
        :attr:`gone` says whether every seed has refused for ``gone_after``."""
        reports: dict[str, dict] = {}
        refused: dict[str, str] = {}
        for seed in self.seeds:
            try:
                report = self._ask(seed, secret=self.secret, timeout=self.poll).get("training")
            except ConnectionRefusedError as exc:
                refused[seed] = f"connection refused: {exc.strerror or exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - starting, busy, timed out: look again
                log.debug("chaos: no status from %s: %s", seed, exc)
                continue
            if isinstance(report, dict):
                reports[seed] = report
        now = self._clock()
        if self.seeds and len(refused) == len(self.seeds):
            self._gone_since = now if self._gone_since is None else self._gone_since
        else:
            self._gone_since = None
        self.gone = self._gone_since is not None and now - self._gone_since >= self.gone_after
        return reports, refused

    def running(self) -> bool:
        """One look at every seed: False once the cluster has ended."""
        reports, _ = self.look()
        return not self.gone and not any(r.get("ended") for r in reports.values())

    def wait(self, seconds: float) -> bool:
        """Look every :attr:`poll` seconds for ``seconds``: False as soon as
        the cluster has ended, True when the time is up and it still trains."""
        end = self._clock() + seconds
        while self.running():
            left = end - self._clock()
            if left <= 0:
                return True
            self._sleep(min(self.poll, left))
        return False


def retire_hook(request_leave: Callable[[], None]) -> Callable[[object], None]:
    """A membership-event subscriber: on :class:`~ev.Retire` (this member is
    above the cluster's ``max_nodes``), ask for a graceful leave at the next
    step boundary, once.  Called on the agent's thread: it only sets a flag."""
    told = []

    def on_event(event: object) -> None:
        if isinstance(event, ev.Retire) and not told:
            told.append(True)
            request_leave()

    return on_event
