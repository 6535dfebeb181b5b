"""This process as a member of the cluster: what both flavours of strategy share.

Role in the whole: ``Trainer(strategy="chaos")`` (:mod:`.strategy`) and
``Fabric(strategy="chaos")`` (:mod:`.fabric`) train the same way: one member
per process, no DDP wrapper, one launch per step that reduces the weighted
gradients with the control record (:class:`.switch.Control`), and at the step
boundary the same decision (:func:`.switch.decide`) on every member: train
on, leave, or switch views and make the replicas identical again
(:mod:`.state_sync`).  :class:`ElasticMember` holds that machinery; the two
strategies differ only in where the step boundary is (Lightning's
``on_train_batch_end``, Fabric's ``optimizer.step()``) and in what a replica
is beyond its tensors, the sampler and the commit count:

* :meth:`ElasticMember.replica_tensors`: parameters and buffers, in one
  order on every member (:meth:`~ElasticMember.replica_buffers`: the
  buffers alone, kept rank 0's at every step, :mod:`.buffers`);
* :meth:`ElasticMember.replica_state` / :meth:`~ElasticMember.load_replica_state`:
  the rest of the state (optimizers, schedulers, precision; for Lightning the
  callbacks, the loop's progress and the run's folders);
* :meth:`ElasticMember.adopt_shared`: what a member that already holds the
  state still takes from the source (Lightning: the run's folders).

It is a mixin so the strategies keep the attributes users and tests read
(``strategy.commits``, ``strategy.ledger``, ``strategy.step_applied``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from chaos_lightning.config import NodeConfig
from chaos_lightning.membership.view import View
from chaos_lightning.strategy import collectives
from chaos_lightning.strategy.buffers import BufferSync
from chaos_lightning.strategy.process import freeze_heap, pin_gloo_interface, sigterm_ends_wait, take_sigterm
from chaos_lightning.strategy.gradients import GradientBuffer
from chaos_lightning.strategy.group import ElasticGroup, VotersGone
from chaos_lightning.strategy.process_group import CollectiveError
from chaos_lightning.strategy.sampler import ElasticSampler, Ledger
from chaos_lightning.strategy.shadow import StepLog, param_digest
from chaos_lightning.strategy.shares import ShareBalancer
from chaos_lightning.strategy.state_sync import REPL_META_KEY, NewcomerFailed, PullFailed, StateSync, StepNotFinished
from chaos_lightning.strategy.switch import Action, Control, Decision, Window, adoptable, decide, usable_for_switch
from chaos_lightning.strategy.sync import Freshness, SyncAction
from chaos_lightning.strategy.trace import Trace

log = logging.getLogger("chaos_lightning.strategy")

__all__ = ["ElasticMember"]


class ElasticMember:
    """The cluster side of a chaos strategy (see the module docstring)."""

    # ---------------------------------------------------------------- what the host provides
    def replica_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def replica_buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def replica_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_replica_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def adopt_shared(self, state: dict[str, Any]) -> None:
        """A broadcast's state seen by a member that keeps its own replica."""

    def grad_scaler(self) -> Any:
        """The gradient scaler that will step this step's optimizer, if any
        (fp16 AMP): a failed reduction then leaves non-finite gradients."""
        return None

    def last_checkpoint(self) -> str | None:
        """Where the run's newest checkpoint is, if the host knows (for the
        error a node gets when nobody holding the state is left)."""
        return None

    # a host that can train a stop-free joiner as a shadow (docs/join.md) provides:
    def shadow_capable(self) -> bool:
        """Whether this host can record and replay its optimizer steps."""
        return False

    def light_replica_state(self) -> dict[str, Any]:
        """:meth:`replica_state` without the optimizers' state tensors (their
        hyperparameters stay): what a shadow loads at the switch."""
        raise NotImplementedError

    def shadow_optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def replica_params(self) -> list[torch.Tensor]:
        """The parameters: the first tensors of :meth:`replica_tensors`."""
        raise NotImplementedError

    def pulled_optimizer_states(self, host_state: dict[str, Any]) -> list[dict[str, Any]]:
        """The optimizers' state dicts inside a pulled :meth:`replica_state`."""
        raise NotImplementedError

    def evaluating(self) -> bool:
        """The host runs evaluation now (Lightning: validation inside fit)."""
        return False

    def finishes_steps(self) -> bool:
        """Whether a step whose gradient reduction failed may be finished in
        the next group (:meth:`_finish_step`): the host reduces once per
        optimizer step, so the gradients it holds are the step's whole input
        (Lightning: automatic optimization; manual optimization may step
        several optimizers between reductions)."""
        return False

    def must_catch_up(self) -> bool:
        """A shadow must hold the exact state before the next step: the host
        adds its own reasons (Lightning: a validation due now)."""
        return False

    # and, from the Lightning strategy it mixes into: ``set_world_ranks()``
    # (ranks from ``self.group`` after a group forms), ``global_rank``, ``world_size``

    # ---------------------------------------------------------------- set up
    def _init_member(self, config: NodeConfig) -> None:
        self.config = config
        self._sync = StateSync(secret=config.secret, max_sources=config.max_sources, join_timeout=config.join_timeout)
        self.trace = Trace(config.trace)  # this node's timeline as JSON lines
        self.group = ElasticGroup(config, self.trace)
        self.metrics_exporter: Any = None  # this node's Prometheus endpoint (chaos_lightning.metrics), when configured
        self._orphaned = False  # came back stale to nobody to take the state from
        self._leave_requested = False
        #: inside a training step, before its gradient reduction (a SIGTERM
        #: there leaves at once: :meth:`_on_sigterm`); set by the host
        self._in_step = False
        #: this node asked for the view without it inside a step (SIGTERM)
        self._leaving_early = False
        #: a SIGTERM came outside a step's compute: ask at the next step's start
        self._leave_next_step = False
        self.left = False
        #: the fit is over: set on the members by the end-of-fit handover, and
        #: on a newcomer by the state it took there (its fit ends at once)
        self.ended = False
        self._control: Control | None = None  # the last step's summed record; None after a failed step
        self.step_applied = True  # False in the end hooks of a failed step: no update, counted nowhere
        self.commits = 0  # steps committed since fit began (a joiner takes the members' count)
        self.window = Window()  # gradient accumulation
        self._grads = GradientBuffer()
        self._buffers = BufferSync()
        self.elastic_sampler: ElasticSampler | None = None
        self.ledger: Ledger | None = None
        self.events: list[dict[str, Any]] = []  # view changes with timings, for logs and tests
        #: at the join: what the view's members said they had trained (their
        #: agents' status), None if nothing; a joiner that finds nobody left
        #: holding that state stops instead of starting again from scratch
        self._cluster_trained: dict[str, Any] | None = None
        # the stop-free join (docs/join.md): on a shadow, its optimizer steps
        # recorded since the switch and whether it caught up; on every rank,
        # whether the sampler must be laid out again at this boundary
        # (shadows promoted).  While shadows train, every step carries every
        # rank's parameter digest (3 ms at 67 MB)
        self._step_log: StepLog | None = None
        self._caught_up = False
        self.relayout_due = False
        self._shadow_failed = False  # this shadow's pull failed: it leaves, then raises
        self._no_shadow_next = False  # the next sync pulls at the boundary (a digest disagreed)
        #: between a switch that admitted a newcomer and the next batch: the
        #: members are still in the batch that ended (its end hooks: a
        #: ModelCheckpoint save with its broadcast and barrier), which the
        #: newcomer, starting at the next batch, never runs.  Their
        #: collectives then stay local (:meth:`_local_only`)
        self.newcomer_window = False
        # adaptive shares (CHAOS_SHARES=adaptive, .shares): the decisions from
        # every rank's busy time, the end of this rank's last reduction (None:
        # the next step is not measured), the weights the next boundary lays
        # out (None: nothing due) and this window's samples per rank
        self._balancer = ShareBalancer(straggler=config.straggler) if self.config.shares == "adaptive" else None
        self._busy_since: float | None = None
        self.shares_due: tuple[int, ...] | None = None
        #: this member was named a straggler (:meth:`_balance`): its leave at
        #: the next boundary is a step-down, after which it stands by
        #: (:meth:`_stand_by`); how many times it has stepped down
        self.stepping_down = False
        self.step_downs = 0
        #: the last committed steps' wall time and slowest busy time, seconds
        #: (what a candidate reads from the status to judge its link)
        self._step_walls: deque[float] = deque(maxlen=9)
        self._step_busy: deque[float] = deque(maxlen=9)
        self._last_boundary: float | None = None
        #: a failed step finished in the next group (:meth:`_finish_step`):
        #: the ranks of the layout it ran under whose samples go back to the
        #: epoch (committed at the boundary), and the switch's time (recorded
        #: at once), for the host, which lays the sampler out for the new
        #: group at the boundary and hands the run's logs to its rank 0
        self._finished_without: tuple[int, ...] | None = None
        self.finished_switch_s: float | None = None

    def rebind(self, bind: str) -> None:
        """Listen at ``bind`` instead (before :meth:`_open_member`: the
        launcher of ``devices=N`` fixes the first process's port)."""
        self.config = dataclasses.replace(self.config, bind=bind)
        self.group.config = self.config

    def _open_member(self) -> None:
        """Serve the state, bind and start the agent (no join yet); SIGTERM leaves."""
        host = self.config.bind_host
        pin_gloo_interface(host)
        if self.config.metrics:  # before the agent, so it sees the first views; prometheus_client only when on
            from chaos_lightning.metrics import start_metrics

            self.metrics_exporter = start_metrics(self.config.metrics, secret=self.config.secret, trace=self.trace,
                                                  monitor=lambda: self.monitor, port_offset=getattr(self, "local_rank", 0))
        served = self._sync.serve(host)  # every node serves the state; its address rides in the member's meta
        self.group.open({REPL_META_KEY: served})
        agent = getattr(self.group.rdv, "agent", None)
        if agent is not None:
            agent.training = self._training_report
        take_sigterm(self._on_sigterm)
        self.trace.node = self.node_id
        if self.trace.enabled:
            import psutil

            self.trace.emit("start", proc_start=psutil.Process().create_time(), bind=self.config.bind)

    def _adopt_sampler(self, sampler: ElasticSampler) -> None:
        self.elastic_sampler = sampler
        self.ledger = Ledger(sampler.num_samples) if self.config.record_samples else None

    # ---------------------------------------------------------------- what the state sync reads
    @property
    def node_id(self) -> str:
        return self.group.node_id

    @property
    def monitor(self) -> Any:
        """The agent's cluster monitor (link estimates), if the backend has one."""
        return getattr(getattr(self.group.rdv, "agent", None), "monitor", None)

    @property
    def shard_server(self) -> Any:
        return self._sync.server

    def member_at(self, rank: int) -> Any:
        return self.group.member_at(rank)

    def collective(self, tensor: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """An abortable all-reduce on the current group."""
        return self.group.all_reduce(tensor, timeout)

    # ---------------------------------------------------------------- the user's collectives
    def _local_only(self, what: str) -> bool:
        """In the rest of a batch whose end admitted a newcomer
        (:attr:`newcomer_window`), a collective would meet the newcomer's
        next gradient all-reduce instead of its own (gloo aborts the process
        on the size mismatch, measured: SIGABRT of a member and the joiner):
        it stays on this member, and this says so once."""
        if not self.newcomer_window:
            return False
        if not getattr(self, "_said_local", False):
            log.info("chaos: %s at the end of the batch where a newcomer joined stays on this member "
                     "(the newcomer starts at the next batch)", what)
            self._said_local = True
        return True

    def _user_reduce(self, tensor: Any, reduce_op: Any, fallback: Callable[[], Any]) -> Any:
        """A metric reduction on the current group (abortable: this rank's
        value if a member fails meanwhile); ``fallback`` for what we do not carry.
        A shadow's value (computed on a replica not yet the members') is left
        out: a mean is over the other ranks."""
        name = collectives.reduce_op_name(reduce_op)
        g = self.group
        if isinstance(tensor, torch.Tensor) and self._local_only("a reduction"):
            return tensor
        if not isinstance(tensor, torch.Tensor) or g.pg.group is None or name is None:
            return fallback()
        # a shadow counts only once it caught up, and then in evaluation alone
        # (its training batch is a stand-in: another rank's)
        absent = (self.is_shadow and not (self._caught_up and self.evaluating())) if self._sync.shadows else None
        return collectives.reduce(g.pg, tensor, name, g.abort, self.config.collective_timeout, absent=absent)

    def _user_gather(self, tensor: Any, sync_grads: bool, fallback: Callable[[], Any]) -> Any:
        """``all_gather`` on the current group (abortable, with ``sync_grads``
        too); ``fallback`` for what we do not carry (non-tensors)."""
        g = self.group
        if g.pg.group is None:
            return tensor.unsqueeze(0) if isinstance(tensor, torch.Tensor) else fallback()
        if not isinstance(tensor, torch.Tensor):
            return fallback()
        if self._local_only("an all_gather"):
            # every row this member's: the newcomer has no row of this batch
            return torch.stack([tensor] * self.world_size)
        if sync_grads:
            return collectives.all_gather_with_grad(g.pg, tensor, g.abort, self.config.collective_timeout)
        return collectives.all_gather(g.pg, tensor, g.abort, self.config.collective_timeout)

    def _user_barrier(self) -> None:
        if self.group.pg.group is not None and not self._local_only("a barrier"):
            collectives.barrier(self.group.pg, self.group.abort, self.config.collective_timeout)

    def _user_broadcast(self, obj: Any, src: int) -> Any:
        """msgpack-able objects go as msgpack over an abortable all-reduce; anything
        else raises ``BroadcastRefused`` on every rank: never Lightning's pickled
        path (see :mod:`.collectives`).  Alone, nothing crosses the network, but
        the object is checked all the same, so a fit that works alone does not
        start failing when a second node joins."""
        if self.group.pg.group is None or self._local_only("a broadcast"):
            collectives.pack_object(obj)
            return obj
        return collectives.broadcast_object(self.group.pg, obj, src, self.group.abort, self.config.collective_timeout)

    # ---------------------------------------------------------------- joining
    def _join_cluster(self, deadline: float) -> None:
        """Join, wait for ``min_nodes``, form the group and take the state of
        whoever has trained (if anyone)."""
        cfg = self.config
        self._wait_for_a_link_that_keeps_pace()
        self.trace.emit("join_request")
        from chaos_lightning.strategy.standby import retire_hook

        self.group.rdv.subscribe(retire_hook(self.request_leave))  # above max_nodes: leave at a step boundary
        view = self.group.join(cfg.min_nodes, deadline)
        if cfg.standby:  # admitted after an unbounded wait (standby.py): the join's bound starts now
            deadline = time.monotonic() + cfg.join_timeout
        self._cluster_trained = self._ask_what_was_trained(view)

        def usable(v: View) -> bool:
            return self.node_id in v.connected() and len(v.connected()) >= cfg.min_nodes

        self._rebuild(view, usable, Freshness.NONE, deadline)

    def _wait_for_a_link_that_keeps_pace(self) -> None:
        """Admission by link (with adaptive shares and ``CHAOS_STRAGGLER``):
        before asking to join a cluster that trains, measure this node's
        upload to its seeds and, from the step and busy times the members
        report, predict their step with this node in it
        (:func:`~.shares.link_admission`).  Slower by more than the
        fraction: wait as a standby, measured again every
        ``CHAOS_STRAGGLER_RETRY`` seconds (SIGTERM ends the wait: exit 143).
        A cluster not training yet, or with no figures, is joined at once."""
        agent = getattr(self.group.rdv, "agent", None)
        if agent is None or self._balancer is None or self.config.straggler <= 0 or not self.config.peers:
            return
        grad_bytes = sum(p.numel() * p.element_size() for p in self.replica_params() if p.requires_grad)
        held = False
        with sigterm_ends_wait("waiting as a standby for a link that keeps pace"):
            if self.config.standby:  # a warm standby judges its link against a cluster that trains
                from chaos_lightning.strategy.standby import wait_for_training

                wait_for_training(self.config.peers, self.config.secret)
            while True:
                verdict = self._link_verdict(agent, grad_bytes)
                if verdict is None or verdict[0]:
                    if held:
                        log.info("chaos: this node's link keeps pace now (%s): asking to join", verdict[1] if verdict else
                                 "no figures from the cluster")
                        self.trace.emit("link_admitted", why=verdict[1] if verdict else None)
                    return
                if not held:
                    log.warning("chaos: waiting as a standby: %s, more than CHAOS_STRAGGLER=%g slower; measured "
                                "again every %.0fs", verdict[1], self.config.straggler, self.config.straggler_retry)
                    self.trace.emit("held_by_link", why=verdict[1])
                held = True
                time.sleep(self.config.straggler_retry)

    def _link_verdict(self, agent: Any, grad_bytes: int) -> tuple[bool, str] | None:
        """(admit, why) from the first seed that reports a training step and
        this node's slowest measured upload to up to two seeds; None when no
        seed reports figures (the cluster is forming, or ended)."""
        from chaos_lightning.agent import status
        from chaos_lightning.strategy.shares import link_admission

        report: dict[str, Any] | None = None
        measured: list[float] = []
        for seed in self.config.peers:
            try:
                if report is None:
                    got = status(seed, secret=self.config.secret, timeout=2.0).get("training")
                    if isinstance(got, dict) and got.get("step_s") and got.get("busy_s") and not got.get("ended"):
                        report = got
                if len(measured) < 2:
                    measured.append(agent.probe_bandwidth(seed, min(max(grad_bytes, 1 << 16), 1 << 20), timeout=10.0))
            except Exception as exc:  # noqa: BLE001 - a seed that does not answer says nothing of the link
                log.debug("chaos: no status or probe from %s: %s", seed, exc)
            if report is not None and len(measured) >= 2:
                break
        if report is None or not measured:
            return None
        bandwidth = min(measured)
        ok, predicted = link_admission(report["step_s"], report["busy_s"], int(report.get("world") or 1),
                                       grad_bytes, bandwidth, self.config.straggler)
        why = (f"the members' step {report['step_s'] * 1e3:.0f} ms would take about {predicted * 1e3:.0f} ms with "
               f"this node's upload of {bandwidth * 8 / 1e6:.1f} Mbit/s for {grad_bytes / 1e6:.1f} MB of gradients")
        return ok, why

    def _ask_what_was_trained(self, view: View, most: int = 3) -> dict[str, Any] | None:
        """The furthest training any of (up to ``most``) other members of
        ``view`` reports through its agent's status; None if none has trained
        (the very start) or none answers."""
        from chaos_lightning.agent import status

        if getattr(self.group.rdv, "agent", None) is None:
            return None  # a backend with no agents (etcd)
        best: dict[str, Any] | None = None
        saved: tuple[int, str] | None = None  # the newest checkpoint any of them names, and its step
        for node in [n for n in view.ids if n != self.node_id][:most]:
            try:
                report = status(view.member(node).addr, secret=self.config.secret, timeout=1.0).get("training")
            except Exception as exc:  # noqa: BLE001 - a status that fails never blocks a join
                log.debug("chaos: no status from %s: %s", node, exc)
                continue
            if isinstance(report, dict) and int(report.get("step", 0)) > 0:
                if best is None or report["step"] > best["step"] or report.get("ended"):
                    best = {**report, "node": node}
                if report.get("checkpoint") and (saved is None or report["step"] > saved[0]):
                    saved = (report["step"], report["checkpoint"])
        if best is not None and not best.get("checkpoint") and saved is not None:
            # the furthest report named none (a member between its commit and
            # its save, a synced learner): another member's is still the way back
            best["checkpoint"] = saved[1]
        return best

    def _training_report(self) -> dict[str, Any] | None:
        """What a joiner asks the view's members (:meth:`_ask_what_was_trained`),
        through the agent's status: called on the agent's thread, it only reads."""
        if self.commits <= 0:
            return None
        walls, busy = sorted(self._step_walls), sorted(self._step_busy)
        return {"step": self.commits, "ended": self.ended, "checkpoint": self.last_checkpoint(),
                "world": len(self.group.trainers), "step_s": walls[len(walls) // 2] if walls else None,
                "busy_s": busy[len(busy) // 2] if busy else None}

    def _joined_without_state(self) -> bool:
        """After the join: this node holds no trained state though the
        members it joined had trained (they all finished or failed before it
        received theirs).  If they had finished, a warning and True (the fit
        ends here, trained by them); else a clear error, not a fresh start."""
        if not self._orphaned:
            return False
        seen = self._cluster_trained or {}
        step, ckpt = seen.get("step"), seen.get("checkpoint")
        if seen.get("ended"):
            log.warning("chaos: joined as the fit ended (global step %s): nothing left to train, and the members "
                        "exited before this node received their state%s", step, f"; checkpoint: {ckpt}" if ckpt else "")
            self.trace.emit("joined_ended", step=step)
            self.ended = True
            return True
        self.trace.emit("orphaned", epoch=self.group.view.epoch if self.group.view is not None else None)
        raise RuntimeError(
            f"chaos: no member holding the training state is left (the cluster had trained to global step {step}; "
            "its members failed before this node received the state). Not starting again from random weights: "
            + (f"resume the run from its last checkpoint ({ckpt})" if ckpt else "resume the run from a checkpoint")
            + " with ckpt_path=, or start a new run"
        )

    # ---------------------------------------------------------------- the step
    def _reduce_gradients(self, params: list[torch.nn.Parameter], window: range) -> bool:
        """Weight this rank's gradients by its share of the window's samples
        and reduce them with the control record and rank 0's buffers in one
        launch; False (no gradients, the buffers of the last sync) if the
        reduction failed."""
        entered = time.monotonic()  # this rank's busy time ends here (the waits below are not its speed)
        self._in_step = False  # this rank's part is about to be sent (see _on_sigterm)
        self._sync.copied()  # a holder's copy for a stop-free joiner is done before the update can change anything
        sampler = self.elastic_sampler
        # The samples this rank's accumulated gradient covers (every micro-batch
        # of the window) and all ranks' together: both follow from the shared
        # layout, so the weight n / total is known before the reduction and
        # the summed result is already the mean over the window's samples.
        n = sum(len(sampler.batch_for(j)) for j in window)
        total = sum(len(sampler.block(j)) for j in window)
        flat = self._grads.gather(params, n / total if total > 0 else 0.0)
        g = self.group
        known = g.known(g.rdv.current_view())  # kept: the view a decision to adopt it names (switch.adoptable)
        ready = self.global_rank not in self._sync.shadows or self._caught_up
        control = torch.tensor(
            Control.local(rank=self.global_rank, world=len(g.trainers), samples=n, epoch=known.epoch,
                          leaving=self._leave_requested, ready=ready, keeps=g.keeps(known),
                          digest=param_digest(params) if self._sync.shadows else 0,
                          busy_us=self._busy_us(entered)),
            dtype=torch.int64,
        )
        buffers = self.replica_buffers()
        shared = self._buffers.outgoing(buffers, rank0=self.global_rank == 0)
        if self._leaving_early:
            # our view's commit (its Removed sets the abort flag) comes in
            # milliseconds: wait for it instead of sending our part, so no
            # rank can complete the step without us and every rank fails it
            # alike (the others then finish it: FINISH, not RETRY).  If it
            # does not come, the flag rides this reduction: the lockstep leave.
            g.abort.wait(min(self.config.leave_timeout, self.config.collective_timeout / 2))
        try:
            # one launch, every buffer in flight: the step's one round trip
            g.pg.all_reduce_in_place([flat, control, *shared], abort=g.abort, timeout=self.config.collective_timeout)
        except CollectiveError as exc:
            if self._leaving_early:  # our own view ended the step: the others finish it
                log.info("chaos: left inside the step (%s); the others finish it without this node's samples", exc)
            else:
                g.suspect_peers(exc)  # a reset is evidence: probe the peers now (issue 14)
                if self._may_finish(params) and self._finish_step(params, window, exc):
                    return True
                log.warning("chaos: gradient all-reduce failed (%s); the step applies no update", exc)
            self._control = None
            self._busy_since = None
            self._grads.drop(params, nonfinite=self.grad_scaler() is not None)
            if buffers and not self._buffers.restore(buffers):
                log.warning("chaos: no synced copy of the module buffers to restore after the failed step")
            return False
        self._control = Control.decode(control.tolist())
        self._busy_since = time.monotonic() if self._balancer is not None else None
        if self._control.samples != total:
            # every rank derives its share from the same layout; a mismatch is a bug
            log.error("chaos: ranks trained %d samples, the layout says %d", self._control.samples, total)
        self._grads.scatter(params, flat)
        self._buffers.incoming(buffers, shared)
        return True

    def _may_finish(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether this failed step may be finished in the next group: the
        option is on, the host reduces once per step, no shadow trains (its
        catch-up replays whole steps), and the gradients are still ours (not
        views of the buffer the failed reduction owns)."""
        return (self.config.finish_failed_steps and self.finishes_steps() and not self._sync.shadows
                and not self._grads.holds_grads(params))

    def _finish_step(self, params: list[torch.nn.Parameter], window: range, exc: BaseException) -> bool:
        """The step's gradient reduction failed: form the next group here,
        inside the step, and reduce the survivors' gradients of this step
        again in it, so the step is applied and none of its compute is lost
        (issue 14: a ``kill -9`` costs its detection and a group, not a whole
        step again).  True if the step is now reduced; False (nothing
        changed but the group) if it cannot be finished: the caller fails
        the step as before.

        Every rank of the new group must be finishing the same step, or none
        does: the state sync's claims say so (:data:`Freshness.PENDING`).
        Each rank's gradient covers its samples under the layout the step
        ran under; the ranks that left take theirs with them, so the
        survivors' weights are their samples over the survivors' total, the
        sample-weighted mean the step would have had without those ranks,
        and the lost ranks' samples go back to the epoch at the commit."""
        sampler, g = self.elastic_sampler, self.group
        old_trainers, old_rank = tuple(g.trainers), self.global_rank
        counts = [sum(len(sampler.batch_for(j, r)) for j in window) for r in range(len(old_trainers))]
        buffers = self.replica_buffers()
        # this step's forward moved the buffers (batch norm statistics); a
        # switch must start from the replicas' common copy (its snapshot is
        # what a failure restores), and rank 0's moved ones go to everyone
        moved = [b.detach().clone() for b in buffers]
        if buffers and not self._buffers.restore(buffers):
            return False
        t0 = time.monotonic()
        log.warning("chaos: gradient all-reduce failed (%s); finishing the step in the next group", exc)
        self._grads.forget()  # an abandoned op may still write into the old buffer
        self._sync.plan = None
        try:
            self._switch(Decision(Action.SWITCH, newer=True), finishing=True)
        except StepNotFinished as why:
            log.warning("chaos: the step cannot be finished in the next group (%s); it applies no update", why)
            return False
        plan = self._sync.plan
        if self._orphaned or plan is None or plan.action is not SyncAction.FINISH:
            return False  # no group formed (every voter gone): the step boundary says what follows
        trainers = g.trainers
        if not set(trainers) <= set(old_trainers):  # FINISH means every claim was this step's
            raise RuntimeError(f"chaos: finishing a step with {trainers} that ran on {old_trainers}")
        lost = tuple(r for r, node in enumerate(old_trainers) if node not in trainers)
        total = sum(c for r, c in enumerate(counts) if r not in lost)
        if total == 0:  # every sample of the step was on the ranks gone: nothing to apply (every rank alike)
            return False
        n = counts[old_rank]
        flat = self._grads.gather(params, n / total)
        control = torch.tensor(
            Control.local(rank=self.global_rank, world=len(trainers), samples=n,
                          epoch=g.known(g.rdv.current_view()).epoch, leaving=self._leave_requested, ready=True),
            dtype=torch.int64,
        )
        with torch.no_grad():
            for b, m in zip(buffers, moved, strict=True):
                b.copy_(m)
        shared = self._buffers.outgoing(buffers, rank0=self.global_rank == 0)
        try:
            g.pg.all_reduce_in_place([flat, control, *shared], abort=g.abort, timeout=self.config.collective_timeout)
        except CollectiveError as again:
            g.suspect_peers(again)
            self._grads.forget()
            log.warning("chaos: finishing the step failed too (%s)", again)
            return False
        self._control = Control.decode(control.tolist())
        if self._control.samples != total:
            log.error("chaos: ranks finished the step with %d samples, the layout says %d", self._control.samples, total)
        self._grads.scatter(params, flat)
        self._buffers.incoming(buffers, shared)
        self._busy_since = None  # this step's time is no measure of anyone's speed
        self._finished_without = lost
        self.finished_switch_s = took = time.monotonic() - t0
        # recorded now, not at the boundary: this step is the group's first
        # (a timeline reads the first step after the group's record)
        self._record_switch(took, joined=False, failed_step=True, finished=True)
        gone = [old_trainers[r] for r in lost]
        log.info("chaos: finished the step in epoch %d with world %d (%.3fs); %s", g.view.epoch, len(trainers), took,
                 f"the samples of {gone} go back to the epoch" if gone else "every rank's gradient is in it")
        self.trace.emit("step_finished", epoch=g.view.epoch, world=len(trainers), lost=gone, took_s=took)
        return True

    def _settle_step(self, steps: int, global_step: int) -> Decision:
        """At a step boundary after ``steps`` micro-batches: commit the step's
        samples (or not, if its reduction failed) and decide what comes next."""
        sampler = self.elastic_sampler
        control, self._control = self._control, None
        lost, self._finished_without = self._finished_without, None
        failed = control is None
        self.step_applied = not failed
        # each rank's samples of the window, from the layout before the commit
        # moves it (not of a step finished in another group: nobody's speed)
        samples = (self._window_samples(steps) if self._balancer is not None and not failed and lost is None
                   else None)
        if not failed:
            now = time.monotonic()
            if self._last_boundary is not None:
                self._step_walls.append(now - self._last_boundary)
                if max(control.busy) > 0:
                    self._step_busy.append(max(control.busy) / 1e6)
            self._last_boundary = now
            self._buffers.commit()
            # one optimizer step trained the window's blocks (of a step finished
            # in the next group, without the lost ranks' slices: they go back)
            trained = sampler.commit_steps(steps, lost or ())
            if self.ledger is not None:
                self.ledger.record(sampler.epoch, trained)
            self.commits += 1
            if self.trace.enabled:  # the per-step path: not even the arguments without a trace
                self.trace.emit("step", step=global_step, samples=control.samples, world=self.world_size)
        else:
            self.trace.emit("step_failed", step=global_step)
        if failed and self._leaving_early:
            # this node asked to leave inside the step: its own view ended the
            # step here, and the others finish it without our samples
            return Decision(Action.LEAVE, exclude=(self.global_rank,))
        decision = decide(
            failed=failed, control=control, world=len(self.group.trainers), view_epoch=self.group.view.epoch,
            rank=self.global_rank, steps_remaining=sampler.steps_remaining(),
        )
        epoch = adoptable(decision, control, self.group.view.epoch)
        if epoch is not None and self.group.adopt(epoch):
            decision = Decision(Action.STAY)  # the same trainers in a newer view: the group stays as it is
        if self._sync.shadows and decision.action in (Action.STAY, Action.DEFER):
            return self._shadow_boundary(control) or decision
        if samples is not None and decision.action is Action.STAY:
            self._balance(samples, control)
        return decision

    # ---------------------------------------------------------------- adaptive shares
    def _busy_us(self, entered: float) -> int:
        """This rank's busy time since its last reduction, µs (0: not measured)."""
        if self._balancer is None or self._busy_since is None:
            return 0
        return max(1, int((entered - self._busy_since) * 1e6))

    def _window_samples(self, steps: int) -> list[int]:
        sampler = self.elastic_sampler
        per_rank = [0] * len(self.group.trainers)
        for j in range(steps):
            for r, part in enumerate(sampler.step_slices(j)):
                per_rank[r] += len(part)
        return per_rank

    def _balance(self, samples: list[int], control: Control) -> None:
        """A committed step's busy times, the same on every rank: new weights
        for the next boundary when the predicted step gets enough shorter."""
        members = [r for r in range(len(samples)) if r not in self._sync.shadows]
        weights = self._balancer.observe(samples, control.busy, members)
        slow, self._balancer.step_down = self._balancer.step_down, None
        if slow is not None:
            self._step_down(*slow, members=len(members))
        if weights is None:
            return
        self.shares_due = weights
        now, then = self._balancer.predicted
        log.info("chaos: shares follow the measured speeds (samples/s per rank %s): a step's busy time "
                 "%.0f ms -> about %.0f ms", [round(x, 1) for x in self._balancer.rates], now * 1e3, then * 1e3)

    def _step_down(self, rank: int, with_s: float, without_s: float, *, members: int) -> None:
        """Every rank alike: the balancer named ``rank`` a straggler.  It
        leaves at the next boundary (the lockstep leave) and stands by; the
        others log why.  Never below ``min_nodes``, and one at a time (the
        view change starts the measurements again)."""
        node = self.group.trainers[rank]
        if members - 1 < max(1, self.config.min_nodes):
            log.info("chaos: %s (rank %d) slows the group (a step %.0f ms with it, about %.0f ms without) but stays: "
                     "min_nodes=%d", node, rank, with_s * 1e3, without_s * 1e3, self.config.min_nodes)
            return
        log.warning("chaos: %s (rank %d) steps down to a standby: a step's busy time is %.0f ms with it at its "
                    "best share and about %.0f ms without it, more than CHAOS_STRAGGLER=%g slower for %d steps in "
                    "a row", node, rank, with_s * 1e3, without_s * 1e3, self.config.straggler,
                    self._balancer.patience)
        self.trace.emit("step_down", node=node, rank=rank, with_ms=round(with_s * 1e3, 1),
                        without_ms=round(without_s * 1e3, 1), reason="straggler")
        if rank == self.global_rank and not self._leave_requested:
            self.stepping_down = True
            self.request_leave()

    def _stand_by(self) -> bool:
        """After a step-down's leave: wait off the group, then ask to join
        again as a newcomer (to be measured again) and take the members'
        state.  True once this node trains again; False if the cluster's
        fit ended (or every member is gone) meanwhile: this node's replica
        then stays the one it left with.  SIGTERM ends the wait (exit 143).

        The wait is :attr:`NodeConfig.straggler_retry` seconds, doubled at
        each step-down of this process (at most 16x), so a node slow for
        good costs the group a join and a few measured steps ever less
        often, and one slowed for a while (another job on its host) comes
        back.  Held by the size policy on its return (a standby took its
        seat), it waits as a standby does, without a bound."""
        from chaos_lightning.strategy.standby import ClusterWatch

        g = self.group
        self.stepping_down = False
        self._leave_requested = False
        self.step_downs += 1
        seeds = [m.addr for m in g.view.members if m.id != self.node_id and m.addr]
        wait = self.config.straggler_retry * min(16, 2 ** (self.step_downs - 1))
        g.leave()  # the view without us first, then our group
        g.stale = True  # the members train on: our replica falls behind
        self.trace.emit("standing_by", step=self.commits, wait_s=wait)
        log.warning("chaos: this node stepped down at global step %d; it stands by for %.0fs, then asks to join "
                    "again (its speed is measured again then)", self.commits, wait)
        agent = g.rdv.agent
        cluster = ClusterWatch(seeds, self.config.secret)
        with g.pg.presence.inside(), sigterm_ends_wait("standing by after a step-down"):
            if not cluster.wait(wait):
                return self._stood_by_to_the_end()
            # the agent keeps the last view that held us until a newer one does
            gone = agent.removed.view.epoch if agent.removed is not None else g.view.epoch
            agent.rejoin()
            t0 = time.monotonic()
            while (view := agent.wait_view(gone, 1.0, member=True)) is None:
                if not cluster.running():
                    return self._stood_by_to_the_end()
        log.info("chaos: back in the cluster in epoch %d after %.1fs as a standby", view.epoch, time.monotonic() - t0)
        self.trace.emit("back", epoch=view.epoch)
        me = self.node_id
        try:
            self._rebuild(view, lambda v: me in v.connected(), Freshness.NONE,
                          time.monotonic() + self.config.join_timeout)
        except TimeoutError:
            if cluster.running():
                raise
            return self._stood_by_to_the_end()  # admitted as the members finished: nobody formed the group
        return True

    def _stood_by_to_the_end(self) -> bool:
        self.left = True
        log.warning("chaos: the cluster's fit ended while this node stood by; its replica is the one of global "
                    "step %d (the members' final state is theirs and in their checkpoints)", self.commits)
        self.trace.emit("left", step=self.commits)
        return False

    def _lay_out(self, weights: tuple[int, ...] | None = None) -> None:
        """Re-split what remains of the epoch over the current group: equal
        shares (a view change, shadows promoted: the measurements start
        again) or ``weights``."""
        self.elastic_sampler.reconfigure(self.global_rank, self.world_size, self._sync.shadows, weights)
        self.shares_due = None
        self._busy_since = None
        self._last_boundary = None  # the next step starts after this relayout
        if weights is None:  # other members: their steps are not these
            self._step_walls.clear()
            self._step_busy.clear()
        if self._balancer is None:
            return
        if weights is None:
            self._balancer.reset()
            return
        shares = [self.elastic_sampler.per_rank_batch_size(r) for r in range(self.world_size)]  # of a full block
        self.trace.emit("shares", samples=shares, rates=list(self._balancer.rates), weights=list(weights),
                        reason="measured speeds")
        log.info("chaos: samples per rank per step now %s", shares)

    # ---------------------------------------------------------------- the stop-free join
    @property
    def is_shadow(self) -> bool:
        """This rank trains as a shadow: in lockstep, with weight 0, its own
        state not yet the members' (docs/join.md)."""
        return self.global_rank in self._sync.shadows

    def _shadow_boundary(self, control: Control) -> Decision | None:
        """At a successful step's boundary while shadows train (every rank
        alike, from the summed record): promote them once every rank's
        parameter digest agrees; after a disagreement, regroup with a pull at
        the boundary.  A shadow catches up here when its pull has arrived."""
        if all(control.ready):
            # every shadow had caught up before this step: its digest, taken
            # at the reduce (the parameters after the previous step on every
            # rank), must be the members'
            if len(set(control.digests)) == 1:
                self._promote_shadows(control.digests[0])
                return None
            log.warning("chaos: after catch-up the replicas differ (parameter digests %s): the parameters change "
                        "outside optimizer.step; the joiner takes the state at this boundary instead",
                        list(control.digests))
            self.trace.emit("shadow_mismatch", digests=list(control.digests))
            self._no_shadow_next = True
            self.group.regroup_reason = "the joiner takes the state with a pull (the replicas differ after catch-up)"
            return Decision(Action.SWITCH, newer=True)  # the same members regrouped; the pull stops them once
        if self.is_shadow and not self._caught_up:
            self._try_catch_up()
        return None

    def _try_catch_up(self, *, must: bool = False) -> None:
        """Load the pulled state and replay the recorded steps, if the pull
        is done, or must be now (``must``, the log is full, the epoch ends,
        the host says so): then wait for it, bounded below the collective
        timeout the members wait in.  A pull that failed: leave (the members
        train on)."""
        pull, steps = self._sync.shadow_pull, self._step_log
        if pull is None or steps is None:
            return
        must = (must or steps.steps >= self.config.catch_up_steps or self.elastic_sampler.steps_remaining() == 0
                or self.must_catch_up())
        if not pull.done():
            if not must:
                return
            wait = max(1.0, 0.8 * self.config.collective_timeout)
            log.info("chaos: waiting up to %.0fs for the state pull (%d steps behind)", wait, steps.steps)
            if not pull.wait(wait):
                raise RuntimeError(f"chaos: this node could not pull the training state within {wait:.0f}s while it "
                                   "had to catch up; it stops, and the members train on without it")
        pulled = pull.result()
        if pulled is None:
            log.error("chaos: this shadow could not pull the training state; it leaves, and the members train on")
            self.trace.emit("pull_failed", epoch=self.group.view.epoch)
            if must:
                raise RuntimeError("chaos: this node could not join: no member served the training state "
                                   "(see the log lines above); the members train on without it")
            self._shadow_failed = True
            self.request_leave()
            return
        t0 = time.monotonic()
        self._step_log = None
        self._caught_up = True  # ready from the next step: the digests say whether the replay made it exact
        try:
            state = self._sync.take_pulled(self, pulled)
            params = self.replica_params()
            replayed = steps.catch_up(params, state["module"][: len(params)],
                                      self.pulled_optimizer_states(state["training"]["host"]))
        except Exception:  # noqa: BLE001 - a replay the optimizer refuses: the digests will disagree
            log.exception("chaos: the catch-up failed; every rank will see the replicas differ, and this node "
                          "takes the state at that boundary instead")
            steps.close()
            return
        took = time.monotonic() - t0
        log.info("chaos: caught up: pulled in %.3fs, replayed %d step(s) in %.3fs", pull.seconds or 0.0, replayed, took)
        self.trace.emit("caught_up", replayed=replayed, pull_s=pull.seconds, replay_s=took)

    def _catch_up_before_the_end(self) -> None:
        """The fit ends here: a shadow that has not caught up does so now, so
        the replica it leaves behind is the members'."""
        if self.is_shadow and not self._caught_up:
            with self.group.pg.presence.inside():
                self._try_catch_up(must=True)

    def _promote_shadows(self, digest: int) -> None:
        """Every rank's parameters agree: the shadows contribute from the next step."""
        shadows = self._sync.shadows
        was_shadow = self.is_shadow
        self._sync.end_shadow()  # holders stop serving their copy
        self._caught_up = False
        self.relayout_due = True
        self.trace.emit("shadows_promoted", shadows=list(shadows), digest=digest)
        if was_shadow:
            self._sync.received = True
            log.info("chaos: this node's replica equals the members' (digest %x); it trains its share from the "
                     "next step", digest)
            if (agent := getattr(self.group.rdv, "agent", None)) is not None:
                agent.mark_synced()  # a learner votes from the next view on

    def _end_shadow_here(self) -> None:
        """The group changes while shadows train: a shadow drops its log (the
        next sync treats it as a newcomer again)."""
        if self._step_log is not None:
            self._step_log.close()
            self._step_log = None
        self._caught_up = False

    def _switch(self, decision: Decision, *, finishing: bool = False) -> None:
        """Form the group of a view newer than this one (``decision`` says
        which ranks it must exclude) and make replicas identical in it
        (``finishing``: from inside a failed step, which this rank holds to
        finish there; :class:`StepNotFinished` if the group cannot)."""
        old_epoch, exclude, me = self.group.view.epoch, {self.group.trainers[r] for r in decision.exclude}, self.node_id
        trainers = set(self.group.trainers)

        def usable(v: View) -> bool:
            # news: the membership layer said a member of the group failed (it
            # set the abort flag), so the view without it is the one to form
            ok = usable_for_switch(
                epoch=v.epoch, ids=set(v.ids), connected=v.connected(), me=me, old_epoch=old_epoch, exclude=exclude,
                newer=decision.newer, news=self.group.abort.is_set(),
            )
            if ok and finishing and (self.group.stale or not set(v.connected()) <= trainers):
                # a newcomer (a standby admitted as a member died, a member
                # back from the sideline) holds no unfinished step, and the
                # others trained on without this node if it was sidelined or
                # removed meanwhile: the claims would differ and every rank
                # regroup (RETRY), so the step fails here, before a group is
                # formed for nothing
                raise StepNotFinished(
                    f"this node was sidelined or removed before epoch {v.epoch}" if self.group.stale
                    else f"epoch {v.epoch} brings {sorted(set(v.connected()) - trainers)} in")
            return ok

        deadline = time.monotonic() + self.config.join_timeout
        freshness = Freshness.APPLIED if self.step_applied else Freshness.ABORTED
        if self.is_shadow:
            freshness = Freshness.NONE  # it never held the members' state: it takes it again
        if finishing:
            freshness = Freshness.PENDING
        self._rebuild(self.group.rdv.current_view(), usable, freshness, deadline, shadow_ok=not finishing)

    @property
    def admitted_newcomer(self) -> bool:
        """The last state sync brought a newcomer (or a stale member) in."""
        plan = self._sync.plan
        return plan is not None and plan.admits

    # ---------------------------------------------------------------- groups
    def _rebuild(self, view: View | None, usable: Callable[[View], bool], freshness: Freshness,
                 deadline: float, *, shadow_ok: bool = True) -> View:
        """Form the group of the first usable view and make replicas identical
        in it; if a member fails during the state sync (a joiner dies
        mid-transfer, a source dies before the end), try again on a newer view.
        ``shadow_ok``: a joiner may come in stop-free (when configured)."""
        self._end_shadow_here()
        shadow_ok = (shadow_ok and self.config.stop_free_join and self.shadow_capable()
                     and not self._no_shadow_next)
        self._no_shadow_next = False
        with self.group.pg.presence.inside():  # bounded waits of ours, never "stuck in user code"
            return self._rebuild_in(view, usable, freshness, deadline, shadow_ok)

    def _rebuild_in(self, view: View | None, usable: Callable[[View], bool], freshness: Freshness,
                    deadline: float, shadow_ok: bool) -> View:
        floor = -1
        while True:
            try:
                view = self.group.form(view, lambda v: usable(v) and v.epoch > floor, deadline)
            except VotersGone:
                if self._cluster_trained is None and not self.group.stale and self.commits > 0:
                    raise  # we hold trained state ourselves (synced, not promoted yet): nothing clearer to say
                self._orphaned = True  # _joined_without_state says what the cluster had trained
                return view
            self.set_world_ranks()
            # a rank finishing its step claims it whatever happened to it: if
            # the others trained on, the claims differ and it regroups (RETRY)
            # to sync at its step boundary, never here inside the step
            stale = self.group.stale and freshness is not Freshness.PENDING
            if stale:
                freshness = Freshness.NONE  # the others trained on without us: take the state like a newcomer
                if self.ledger is not None and self.elastic_sampler is not None:
                    # our commits since the members last heard from us may not be
                    # theirs (a step we applied that they aborted): the epoch's
                    # record is theirs from here on, not ours
                    self.ledger.forget(self.elastic_sampler.epoch)
            # a joiner told by the members that they had trained, finding
            # nobody with state in its group, must not take that for the start
            orphan_if_alone = stale or (freshness is Freshness.NONE and self._cluster_trained is not None)
            synced = time.perf_counter()
            try:
                plan = self._sync.sync(self, freshness, stale=orphan_if_alone, shadow_ok=shadow_ok)
                self.group.phases["sync_s"] = time.perf_counter() - synced
            except PullFailed as exc:
                # every holder refused or was unreachable, a bounded number of
                # times: leave, so the members train on in the view without us
                # (they wait for it), and say why
                self.trace.emit("pull_failed", epoch=view.epoch)
                self._leave_cluster(self.commits)
                raise RuntimeError(
                    f"chaos: this node could not join: {exc} (see the log lines above for each source's error); "
                    "it left the cluster, whose members train on without it"
                ) from exc
            except CollectiveError as exc:
                if isinstance(exc, StepNotFinished) and freshness is Freshness.PENDING:
                    raise  # to _finish_step: the step fails, and this rank regroups at its boundary
                # a newcomer that could not pull leaves (or is removed), and a
                # member reported failed is removed: wait for that view.  A
                # failure with no membership change may regroup the same view.
                waits = isinstance(exc, NewcomerFailed) or self.group.abort.is_set()
                log.warning("chaos: state sync in epoch %d failed (%s); %s", view.epoch, exc,
                            "waiting for the next view" if waits else "regrouping or waiting for the next view")
                floor = view.epoch if waits else view.epoch - 1
                if freshness is Freshness.NONE and self._sync.received:
                    freshness = Freshness.APPLIED  # we hold the members' state now, whatever failed after
                continue
            self._orphaned = plan.action is SyncAction.ORPHANED
            if self.is_shadow:
                # a stop-free joiner: it trains in lockstep from here and
                # catches up behind (a learner until then)
                self._cluster_trained = None
                self._step_log = StepLog(self.shadow_optimizers())
            elif not self._orphaned:
                self._cluster_trained = None  # this replica holds the state now
                if (agent := getattr(self.group.rdv, "agent", None)) is not None:
                    agent.mark_synced()  # a learner votes from the next view on (issue 14)
            self._buffers.snapshot(self.replica_buffers())  # identical everywhere now: what a failed step restores
            self._sync.done()  # training changes the tensors again: nothing of theirs stays served
            self.group.settled()
            return view

    def _record_switch(self, took: float, *, joined: bool, failed_step: bool, finished: bool = False) -> None:
        """Record, trace and log a group this node now trains in (``finished``:
        formed inside a failed step, which it then finished)."""
        epoch, world = self.group.view.epoch, self.world_size
        self.events.append({"epoch": epoch, "world": world, "stall_s": took, **(
            {"joined": True} if joined else {"failed_step": failed_step}), **({"finished_step": True} if finished else {}),
            **({"ahead": True} if "ahead_wait_s" in self.group.phases else {})})
        log.info("chaos: training in epoch %d with world %d (%.3fs)", epoch, world, took)
        if joined and self.config.gc_freeze:
            freeze_heap()
        switch = self.group.pg.last_switch
        self.trace.emit(
            "trainers", epoch=epoch, world=world, trainers=list(self.group.trainers), stall_s=took, joined=joined,
            failed_step=failed_step, group_init_s=switch.init_s if switch is not None else None,
            phases={k: round(v, 4) for k, v in self.group.phases.items()},
            **({"finished_step": True} if finished else {}),
        )

    # ---------------------------------------------------------------- the end
    def _hand_over_at_end(self) -> None:
        """The fit has ended here.  A node admitted to the cluster after the
        last step's all-reduce would wait for a group that never forms (and
        then find nobody and start from scratch alone).  One small all-reduce
        gives every member the newest view any of them has seen; if it is
        newer than the group's, the members form its group once more and the
        newcomers take the final state, marked :attr:`ended`: their fit ends
        at once, as replicas of the members'."""
        g = self.group
        if self.ended or self.left or self._orphaned or g.pg.group is None or g.view is None:
            return
        self._catch_up_before_the_end()
        self.ended = True  # a node admitted from here on learns from the status that the fit has ended
        # with shadows in the group, each rank's parameter digest rides along
        # (as its max and the max of its negation): a shadow that caught up
        # in the last step has no later boundary where the digests would be
        # compared, so a replay that missed a change made outside
        # optimizer.step would otherwise end the fit as a different replica
        digest = param_digest(self.replica_params()) if self._sync.shadows else 0
        newest = torch.tensor([g.rdv.current_view().epoch, digest, -digest], dtype=torch.int64)
        try:
            g.pg.all_reduce(newest, abort=g.abort, timeout=self.config.collective_timeout, op=dist.ReduceOp.MAX)
        except CollectiveError as exc:
            log.info("chaos: the end-of-fit look for newcomers failed (%s); closing", exc)
            return
        epoch, me = int(newest[0].item()), self.node_id
        if int(newest[1].item()) != -int(newest[2].item()):
            log.warning("chaos: as the fit ended the replicas differ (a shadow's replay missed a change made outside "
                        "optimizer.step); the joiner takes the final state")
            self.trace.emit("shadow_mismatch", at_end=True)
            self._no_shadow_next = True
            self.group.regroup_reason = "the joiner takes the final state with a pull (the replicas differ)"
            try:
                self._switch(Decision(Action.SWITCH, newer=True))  # the same members regrouped, with a pull
            except (CollectiveError, TimeoutError, RuntimeError) as exc:
                log.warning("chaos: the end-of-fit state sync failed (%s); closing", exc)
                return
        if epoch <= g.view.epoch:
            return
        t0 = time.monotonic()
        try:
            self._rebuild(g.rdv.current_view(), lambda v: v.epoch >= epoch and me in v.connected(), Freshness.APPLIED,
                          t0 + self.config.join_timeout, shadow_ok=False)  # nothing left to catch up on
        except (CollectiveError, TimeoutError, RuntimeError) as exc:
            log.warning("chaos: the end-of-fit handover to newcomers failed (%s); closing", exc)
            return
        if self.admitted_newcomer:
            log.info("chaos: the fit ended as node(s) joined; they took the final state (%.3fs)", time.monotonic() - t0)

    def _joined_at_the_end(self) -> bool:
        """After the join: the state came from members whose fit had ended (logged)."""
        if self.ended:
            log.warning("chaos: joined as the fit ended (global step %d): nothing left to train; this node holds "
                        "the final state", self.commits)
            self.trace.emit("joined_ended", step=self.commits)
        return self.ended

    # ---------------------------------------------------------------- leaving
    def request_leave(self) -> None:
        """Leave gracefully at the next step boundary."""
        self._leave_requested = True

    def _on_sigterm(self) -> None:
        """SIGTERM (a signal handler: no lock may be taken here): leave.

        Where the others can finish a step without this node
        (:meth:`_may_finish`'s conditions, which every rank shares), this
        node asks for the view without it inside a step's compute, before
        the step's gradient reduction: now, if the SIGTERM came there, else
        at the start of the next step (:meth:`_step_starts`).  The commit
        ends that step's all-reduce on every rank; the others finish the
        step in the group without us, our samples of it going back to the
        epoch, and we leave at its boundary (issue 14).  The lockstep leave
        instead trained the rest of this step and one more (the leave flag
        rides the next reduction) and only then built the group without us:
        measured at 8 nodes on 2 cores, SIGTERM -> first step without the
        leaver 0.30-0.42 s.

        Why not during the reduction or after it: a view that commits while
        the all-reduce is in flight lets it complete on some ranks and fail
        on others (measured: 3 of 8 ranks applied the step, every rank then
        regrouped and took the state by broadcast, 0.49 s), and one that
        commits at the boundary would cut the validation or checkpoint save
        that may run there.  For the same reason the leaver, reaching its
        reduction before the view committed, waits for the commit instead of
        sending its part (:meth:`_reduce_gradients`).  Elsewhere (the etcd
        backend, manual optimization, a shadow) the lockstep leave, as
        before."""
        self.request_leave()
        if self._leaving_early or not self._may_leave_early():
            log.info("chaos: SIGTERM, leaving at the next step boundary")
        elif self._in_step:
            self._leave_now()
        else:
            self._leave_next_step = True
            log.info("chaos: SIGTERM: leaving at the start of the next step")

    def _step_starts(self) -> None:
        """A training step's compute starts (the host calls this)."""
        self._in_step = True
        if self._leave_next_step:
            self._leave_next_step = False
            if not self._leaving_early and self._may_leave_early():
                self._leave_now()

    def _leave_now(self) -> None:
        self._leaving_early = True
        self.group.rdv.agent.leave_soon()
        log.info("chaos: SIGTERM: leaving inside this step; the others finish it without this node")

    def _may_leave_early(self) -> bool:
        return (getattr(self.group.rdv, "agent", None) is not None and self.config.finish_failed_steps
                and self.finishes_steps() and not self._sync.shadows and not self.stepping_down
                and self.group.pg.group is not None and len(self.group.trainers) > 1)

    def _leave_cluster(self, global_step: int) -> None:
        self.group.leave()
        self.left = True
        self.trace.emit("left", step=global_step, early=self._leaving_early)
        log.info("chaos: left the cluster at global step %d", global_step)

    def _close_member(self, global_step: int | None) -> None:
        self.trace.emit("done", step=global_step)
        self.group.close(left=self.left)
        self._sync.close()
        self.trace.close()
        if self.metrics_exporter is not None:
            self.metrics_exporter.close()
