"""Making replicas identical after a group change: the state, its pull and its broadcast.

Role in the whole: :mod:`.sync` decides (purely) who holds the freshest
state and how it travels; this module carries the decision out on the
current group.  What "the state" is lives here too (:func:`training_state`):
everything a replica must share to continue bit-identically: its tensors
(parameters and buffers), the sampler's cursor, the commit count, and what
the strategy adds (:class:`~.elastic.ElasticMember`: optimizer, scheduler and
precision state; for Lightning also callback state, the loop's progress and
the run's output folders).

Two ways the state travels (the plan says which):

* **pull** (a join): the holders publish a snapshot on their shard server
  and wait at the step boundary; each newcomer pulls it from up to
  ``max_sources`` of them at once (:mod:`chaos_lightning.replication`:
  bandwidth-aware shards, re-fetch on a dead source or a bad checksum).  The
  holders' idle time is the pull;
* **broadcast** (the very start, or survivors of a step that committed on
  some of them only): parameters and buffers in place, then one state tree.

Every collective here is abortable: a member failing meanwhile raises
:class:`~.process_group.CollectiveError`, and the strategy tries again on the
next view.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from chaos_lightning.replication.neighbors import Holder, choose_sources
from chaos_lightning.replication.snapshot import Snapshot, shard_checksums
from chaos_lightning.replication.transfer import PullError, PullResult, ShardServer, pull
from chaos_lightning.strategy.shadow import Background
from chaos_lightning.strategy.trace import progress
from chaos_lightning.strategy.process_group import CollectiveFailed
from chaos_lightning.strategy.state import broadcast_tree, pack_tree, unpack_tree
from chaos_lightning.strategy.sync import Claim, Freshness, SyncAction, SyncPlan, plan_sync

if TYPE_CHECKING:  # the strategy imports us
    from chaos_lightning.monitor import Monitor
    from chaos_lightning.strategy.elastic import ElasticMember

log = logging.getLogger("chaos_lightning.strategy")

#: Member meta key holding the address of the node's shard server.
REPL_META_KEY = "repl"

#: A newcomer tries to pull the state this many times (each time from the
#: holders not tried yet, else from the same after ``PULL_RETRY_S`` times the
#: attempt number), all within one join timeout; then it gives up and leaves.
PULL_ATTEMPTS = 3
PULL_RETRY_S = 0.2


class PullFailed(CollectiveFailed):
    """This newcomer could not pull the state from any holder: it must leave
    (the members train on in the view without it)."""


class StepNotFinished(CollectiveFailed):
    """Some ranks of the new group hold an unfinished step and others do not
    (one applied it, or is new): every rank regroups, and the ranks that
    held it count it as failed (:data:`~.sync.SyncAction.RETRY`)."""


class NewcomerFailed(CollectiveFailed):
    """A newcomer of the group could not pull the state: the members wait
    for the view without it (it leaves, or the detector removes it)."""


def _cut_from(monitor: Monitor | None, me: str) -> set[str]:
    """Members whose direct link to ``me`` the latest committed view marks down."""
    if monitor is None or monitor.view is None:
        return set()
    topology = monitor.topology()
    if me not in topology:
        return set()
    return {n for n in topology.nodes if n != me and not topology.reachable(me, n)}


def training_state(member: ElasticMember, *, light: bool = False) -> dict[str, Any]:
    """Everything but parameters and buffers that replicas must share
    (``light``: without the optimizers' state tensors, which a stop-free
    joiner pulls behind the members' steps)."""
    return {"sampler": member.elastic_sampler.state_dict(), "commits": member.commits, "ended": member.ended,
            "host": member.light_replica_state() if light else member.replica_state()}


def load_training_state(member: ElasticMember, state: dict[str, Any]) -> None:
    # the sampler first: the host's loop progress is measured against it
    member.elastic_sampler.load_state_dict(state["sampler"])
    member.commits = state["commits"]
    member.ended = state["ended"]
    member.load_replica_state(state["host"])


#: A joiner refuses a snapshot larger than ``PULL_SLACK`` times its own model's
#: parameters and buffers plus ``PULL_EXTRA`` bytes, before allocating anything
#: (a source's manifest must not decide how much memory the joiner reserves).
#: 4x covers the replica once plus an optimizer keeping up to three tensors
#: per parameter (Adam with amsgrad: exp_avg, exp_avg_sq, max_exp_avg_sq);
#: 64 MiB covers the loop, scheduler, callback and sampler state.
PULL_SLACK = 4
PULL_EXTRA = 64 * 2**20


def pull_bound(tensors: list[torch.Tensor]) -> int:
    """The largest snapshot a joiner whose model holds ``tensors`` accepts (see :data:`PULL_SLACK`)."""
    return PULL_SLACK * sum(t.numel() * t.element_size() for t in tensors) + PULL_EXTRA


class StateSync:
    """This node's side of every state sync: its shard server and the last pull."""

    def __init__(self, *, secret: bytes | None, max_sources: int, join_timeout: float) -> None:
        self._secret = secret
        self._max_sources = max_sources
        self._join_timeout = join_timeout
        self._server: ShardServer | None = None
        self.last_pull: PullResult | None = None  # a joiner's state transfer, for logs and benchmarks
        #: the last sync loaded another member's state here (kept when the
        #: sync fails after that: this replica holds the members' state then)
        self.received = False
        self.plan: SyncPlan | None = None  # the last sync's plan
        #: stop-free join (docs/join.md): the ranks of the group that train as
        #: shadows since the last sync; on such a shadow, its pull in flight;
        #: on a holder, the copy it serves until the shadows caught up
        self.shadows: tuple[int, ...] = ()
        self.shadow_pull: Background | None = None
        self._serving_copy = False
        self._copying: Background | None = None  # a holder's copy of its state, made behind the first step

    @property
    def server(self) -> ShardServer | None:
        return self._server

    def serve(self, host: str) -> str:
        """Start the shard server every node runs; its ``host:port`` (for the member's meta)."""
        self._server = ShardServer()
        served = self._server.start((host, 0), secret=self._secret)
        return f"{served[0]}:{served[1]}"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def sync(self, member: ElasticMember, freshness: Freshness, *, stale: bool, shadow_ok: bool = False) -> SyncPlan:
        """Claims in one collective, then the plan every rank derives from them, carried out.

        ``shadow_ok``: this rank can take part in a stop-free join (the
        option is on and its host can record and replay optimizer steps); a
        pull runs stop-free only when every rank says so (one flag per rank
        beside the claims) and no newcomer would be rank 0 (rank 0 writes the
        logs and checkpoints and sources the buffers)."""
        self.received = False
        self.end_shadow()
        rank, world = member.global_rank, member.world_size
        claims = torch.zeros(Claim.SLOTS * world + world, dtype=torch.int64)
        claims[: Claim.SLOTS * world] = torch.tensor(Claim.of(freshness, member.commits).encode(rank, world))
        claims[Claim.SLOTS * world + rank] = int(shadow_ok)
        member.collective(claims)
        values = claims.tolist()
        decoded = Claim.decode_all(values[: Claim.SLOTS * world])
        plan = self.plan = plan_sync(decoded, rank, stale=stale)
        log.info("chaos: state sync %s: %s", [(c.commits, int(c.freshness)) for c in decoded], plan.action.value)
        if plan.action is SyncAction.RETRY:
            raise StepNotFinished("ranks finishing a failed step met ranks that were not: regrouping")
        if plan.action is SyncAction.PULL:
            newcomers = tuple(r for r in range(world) if r not in plan.holders)
            if all(values[Claim.SLOTS * world:]) and 0 not in newcomers:
                self._shadow_state(member, plan.holders, newcomers)
            else:
                self._pull_state(member, plan.holders)
        elif plan.action is SyncAction.BROADCAST:
            self._broadcast_state(member, plan)
        return plan

    # ---------------------------------------------------------------- broadcast
    def _broadcast_state(self, member: ElasticMember, plan: SyncPlan) -> None:
        rank = member.global_rank
        try:
            with torch.no_grad():
                for t in member.replica_tensors():
                    dist.broadcast(t.data, plan.source)
            mine = training_state(member) if rank == plan.source else None
            state = broadcast_tree(mine, plan.source, rank)
        except RuntimeError as exc:  # gloo: a peer reset the connection
            raise CollectiveFailed(f"state broadcast: {exc}") from exc
        if rank != plan.source:
            member.adopt_shared(state["host"])
        if not plan.receive:
            return
        if plan.adopt_aborted_step and member.ledger is not None:
            # the step we aborted did commit at the source: record its blocks
            # (one per micro-batch of the window, still laid out for the old
            # world, as at the source when it committed)
            sampler = member.elastic_sampler
            for j in range(member.window.last):
                member.ledger.record(sampler.epoch, sampler.block(j))
        # the loop's counters too: a newcomer's are the members', and one that
        # aborted the step the source committed counts that step as applied
        load_training_state(member, state)
        self.received = True

    # ---------------------------------------------------------------- pull
    def _pull_state(self, member: ElasticMember, holders: tuple[int, ...]) -> None:
        """Holders publish a snapshot of the full state on their shard server
        and wait; newcomers pull it from several of them at once.

        The holders are replicas, so each can serve every shard; they are
        paused at this step boundary until every newcomer reports, so the
        snapshot is served straight from the live tensors (no copy) and cannot
        change under the transfer.
        """
        holding = member.global_rank in holders
        rank, world = member.global_rank, member.world_size
        pulled: tuple[PullResult, dict[str, str]] | None = None
        try:
            if holding:
                meta, tensors = pack_tree(
                    {"module": [t.detach() for t in member.replica_tensors()], "training": training_state(member)}
                )
                tensors = [t.contiguous() for t in tensors]
                self._server.expect()  # a newcomer asking before the publish below waits for it
                # each holder checksums its share of the shards (a holder used
                # to checksum them all: 89 ms at 203 MB); one sum gives all
                mine = shard_checksums(tensors, holders.index(rank), len(holders))
            count = torch.tensor([len(mine) if holding else 0], dtype=torch.int64)
            member.collective(count)  # every holder is ready to publish; the shard count
            crcs = torch.zeros(int(count.item()) // len(holders), dtype=torch.int64)
            if holding:
                crcs += torch.tensor(mine, dtype=torch.int64)
            member.collective(crcs)
            if holding:
                snapshot = Snapshot(meta, tensors, crcs=crcs.tolist())
                self._server.publish(snapshot)
                log.info(
                    "chaos: serving the state (%.1f MB, %d shards) to %d newcomer(s)",
                    snapshot.manifest.total_bytes / 1e6, len(snapshot.manifest.shards), world - len(holders),
                )
            ok = 1
            if not holding:
                pulled = self._pull_from(member, [member.member_at(r) for r in holders])
                ok = 1 if pulled is not None else 0
            # one flag per rank: everyone learns who could not pull
            flags = torch.zeros(world, dtype=torch.int64)
            flags[rank] = ok
            # holders wait here for the pull: bounded by the join timeout,
            # ended at once if a member fails
            member.collective(flags, timeout=self._join_timeout)
        finally:
            # A holder serves the snapshot until it trains again (:meth:`done`),
            # not only until these flags: its tensors do not change meanwhile,
            # so if a member fails during the pull, a newcomer's pull in flight
            # completes from the holders left and the next view needs no second
            # transfer (before, every holder retracted at the failure and the
            # newcomer pulled the whole state again).
            if pulled is not None:
                # the bytes are here: the holders went back to training at the
                # flags, and the copy into place is this node's own time (issue
                # 13: it was inside the members' wait).  Loaded also when the
                # flags failed: this replica then holds the members' state
                # (StateSync.received), as when it loaded before them.
                self._load_pulled(member, *pulled)
        failed = [r for r in range(world) if flags[r].item() == 0]
        if not failed:
            return
        if rank in failed:
            raise PullFailed(f"could not pull the training state from {len(holders)} member(s) "
                             f"after {PULL_ATTEMPTS} attempt(s)")
        nodes = [member.group.trainers[r] for r in failed]
        log.warning("chaos: newcomer(s) %s could not pull the state; they leave, and the members train on "
                    "without them", nodes)
        raise NewcomerFailed(f"newcomer(s) {nodes} could not pull the state")

    def done(self) -> None:
        """This member is about to train again: stop serving the snapshot a
        pull published (its tensors change from now on).  The one place a
        live snapshot is retracted; every sync ends here before training.  A
        stop-free join's copy stays served until :meth:`end_shadow`."""
        if self._server is not None and not self._serving_copy:
            self._server.retract()

    # ---------------------------------------------------------------- stop-free join
    def _shadow_state(self, member: ElasticMember, holders: tuple[int, ...], newcomers: tuple[int, ...]) -> None:
        """A stop-free join: the holders publish a *copy* of the state (they
        train on from here), the first holder broadcasts the small state, and
        each newcomer loads it, starts its pull in the background and trains
        as a shadow (:mod:`.shadow`) until it has caught up."""
        rank = member.global_rank
        holding = rank in holders
        t0 = time.monotonic()
        if holding:
            # The copy (a clone and its checksums: 0.2-0.4 s at 203 MB here)
            # is made on another thread while this member starts its next
            # step; the step waits for it before anything can change the
            # tensors (:meth:`copied`, before the gradient all-reduce).  A
            # pull asking meanwhile waits for the copy to be published.
            meta, tensors = pack_tree(
                {"module": [t.detach() for t in member.replica_tensors()], "training": training_state(member)}
            )
            self._server.expect()
            self._serving_copy = True
            server, count = self._server, len(newcomers)

            def copy() -> bool:
                t1 = time.monotonic()
                with torch.no_grad():
                    snapshot = Snapshot(meta, [t.clone() for t in tensors])
                if self._server is server and self._serving_copy:  # not retracted meanwhile
                    server.publish(snapshot)
                log.info("chaos: serving a copy of the state (%.1f MB, %d shards, copied in %.3fs) to %d shadow(s)",
                         snapshot.manifest.total_bytes / 1e6, len(snapshot.manifest.shards), time.monotonic() - t1,
                         count)
                return True

            self._copying = Background(copy, "the copy of the state for a joiner")
        try:
            member.collective(torch.ones(1))  # every holder is copying (a pull waits for its copy)
            mine = training_state(member, light=True) if rank == holders[0] else None
            state = broadcast_tree(mine, holders[0], rank)
        except RuntimeError as exc:  # gloo: a peer reset the connection
            raise CollectiveFailed(f"state broadcast: {exc}") from exc
        self.shadows = newcomers
        member.trace.emit("shadow_switch", holders=len(holders), shadows=list(newcomers),
                          switch_s=time.monotonic() - t0)
        if holding:
            member.adopt_shared(state["host"])
            return
        load_training_state(member, state)
        sources = [member.member_at(r) for r in holders]
        self.shadow_pull = Background(lambda: self._pull_from(member, sources))

    def copied(self) -> None:
        """Before anything may change this holder's tensors: its copy for a
        stop-free joiner is done (a no-op when none is being made)."""
        copying, self._copying = self._copying, None
        if copying is not None and not copying.wait(300.0):
            raise RuntimeError("chaos: the copy of the state for a joiner did not finish in 300s")

    def end_shadow(self) -> None:
        """The shadows caught up, or the group changes: stop serving the copy
        and forget the pull (one still in flight finishes unread)."""
        self.copied()
        if self._serving_copy and self._server is not None:
            self._server.retract()
        self._serving_copy = False
        self.shadows = ()
        self.shadow_pull = None

    def take_pulled(self, member: ElasticMember, pulled: tuple[PullResult, dict[str, str]]) -> dict[str, Any]:
        """A finished background pull's state tree (recorded like a pull)."""
        result, node_of = pulled
        self._record_pull(member, result, node_of, load_s=0.0)
        return unpack_tree(result.meta, result.tensors)

    def _pull_from(self, member: ElasticMember, holders: list[Any]) -> tuple[PullResult, dict[str, str]] | None:
        """The state pulled from ``holders`` (several at once, on the
        bandwidth-aware plan, retried on others) and which node each source
        address is; None if every attempt failed.  Not loaded yet."""
        candidates = [Holder(m.id, dict(m.meta).get(REPL_META_KEY, "")) for m in holders]
        candidates = [c for c in candidates if c.addr]
        monitor = member.monitor
        estimates = monitor.links.estimates() if monitor is not None else {}
        chosen, rates = choose_sources(candidates, estimates, self._max_sources, _cut_from(monitor, member.node_id))
        with progress(f"chaos: pulling the state from {len(chosen)} member(s)", unit="B", unit_scale=True,
                      unit_divisor=1024) as bar:

            def on_progress(received: int, total: int) -> None:
                bar.total = total
                bar.update(received - bar.n)

            result = None
            # every attempt together, inside the members' wait for the flags (join timeout)
            deadline = time.monotonic() + 0.9 * self._join_timeout
            tried: set[str] = set()
            for attempt in range(1, PULL_ATTEMPTS + 1):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    result = pull(
                        [c.addr for c in chosen], self._secret, rates=rates, timeout=left,
                        on_progress=on_progress, max_bytes=pull_bound(member.replica_tensors()),
                    )
                    break
                except PullError as exc:
                    log.error("chaos: could not pull the state from %s (attempt %d of %d): %s",
                              [c.node for c in chosen], attempt, PULL_ATTEMPTS, exc)
                tried |= {c.addr for c in chosen}
                # next: the holders not tried yet, else the same again after a moment
                untried = [c for c in candidates if c.addr not in tried]
                if untried:
                    chosen, rates = choose_sources(untried, estimates, self._max_sources,
                                                   _cut_from(monitor, member.node_id))
                elif attempt < PULL_ATTEMPTS:
                    time.sleep(min(PULL_RETRY_S * attempt, max(0.0, deadline - time.monotonic())))
            if result is None:
                return None
        return result, {c.addr: c.node for c in chosen}

    def _load_pulled(self, member: ElasticMember, result: PullResult, node_of: dict[str, str]) -> None:
        t0 = time.monotonic()
        state = unpack_tree(result.meta, result.tensors)
        with torch.no_grad():
            for dst, src in zip(member.replica_tensors(), state["module"], strict=True):
                dst.copy_(src)
        load_training_state(member, state["training"])
        self.received = True
        self._record_pull(member, result, node_of, load_s=time.monotonic() - t0)

    def _record_pull(self, member: ElasticMember, result: PullResult, node_of: dict[str, str], *,
                     load_s: float) -> None:
        self.last_pull = result
        monitor = member.monitor
        if monitor is not None:
            for report in result.sources:
                if report.bytes and report.seconds and report.addr in node_of:
                    monitor.record_transfer(node_of[report.addr], report.bytes, report.seconds, "down")
        log.info("chaos: pulled %.1f MB from %d members in %.3fs", result.total_bytes / 1e6, len(node_of), result.seconds)
        member.trace.emit(
            "pull", bytes=result.total_bytes, seconds=result.seconds, load_s=load_s,
            sources=[{"node": node_of.get(r.addr, r.addr), "bytes": r.bytes, "seconds": r.seconds} for r in result.sources],
        )
