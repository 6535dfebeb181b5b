"""ChaosStrategy: ``Trainer(strategy="chaos")``, elastic data parallelism in place.

Role in the whole: the layer users touch.  It reads like a list of the places
where elasticity enters Lightning; each hook carries ``@override`` and
delegates:

* the node's settings: :class:`chaos_lightning.config.NodeConfig`, resolved once;
* membership and per-epoch stores: :mod:`chaos_lightning.rendezvous`;
* the process group, switched in place and abortable: :mod:`.process_group`;
* which samples each rank trains: :mod:`.sampler`;
* the per-step control record and the switch decision: :mod:`.switch` (pure);
* who holds the freshest state after a switch: :mod:`.sync` (pure), carried
  out by :mod:`.state_sync` (multi-source pull or broadcast);
* Lightning's own collectives on the elastic group: :mod:`.collectives`;
* every private Lightning attribute: :mod:`._lightning_internals`.

Process model: one process per device, started by the user's own command; no
Lightning launcher.  The first committed view with at least ``min_nodes``
members starts training; every member builds the process group of that
view's epoch from the rendezvous store.

Per step (no DDP wrapper): after backward, one launch reduces each rank's
gradients multiplied by its sample count, together with the integer control
record (:class:`.switch.Control`).  At the step boundary
(``on_train_batch_end``) every member decides alike from the summed record
(:func:`.switch.decide`): train on, leave, or switch to a newer view.  A
step whose all-reduce failed applies no update on the ranks that saw it fail;
after the switch the replicas are made identical again (:mod:`.sync`) and
the sampler commits or returns the step's samples accordingly.  What is still
missing is listed in docs/strategy.md; docs/architecture.md follows a join
and a failed step through these modules.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from typing_extensions import override

from chaos_lightning.config import NodeConfig
from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config as MembershipConfig
from chaos_lightning.membership.view import View
from chaos_lightning.rendezvous import create as create_rendezvous
from chaos_lightning.strategy import _lightning_internals as internals
from chaos_lightning.strategy import collectives
from chaos_lightning.strategy.environment import ChaosEnvironment, pin_gloo_interface, progress
from chaos_lightning.strategy.process_group import CollectiveError, ElasticProcessGroup
from chaos_lightning.strategy.sampler import ElasticBatchSampler, ElasticSampler, Ledger
from chaos_lightning.strategy.state_sync import REPL_META_KEY, StateSync
from chaos_lightning.strategy.switch import Action, Control, Window, decide, usable_for_switch
from chaos_lightning.strategy.sync import Freshness, SyncAction
from chaos_lightning.strategy.trace import Trace

log = logging.getLogger("chaos_lightning.strategy")

#: rank_zero_only's rank before the join: any rank above 0 turns Lightning's
#: rank-zero writers into no-ops (``rank_zero_experiment`` tests ``rank > 0``).
_NOT_YET_RANKED = 1


class ChaosStrategy(DDPStrategy):
    """Elastic DDP over peer-negotiated views (see the module docstring).

    Every argument left ``None`` comes from the ``CHAOS_*`` environment, else
    its default (:class:`~chaos_lightning.config.NodeConfig` lists them):
    ``membership`` takes a :class:`chaos_lightning.membership.config.Config`
    (``Config.preset("lan", probe_interval=0.3)``) or a preset name
    (``preset`` is the same, by its older name).  ``record_samples`` keeps
    the ledger of every trained sample (:attr:`ledger`, for exactly-once
    checks; memory grows with the samples trained).
    """

    strategy_name = "chaos"

    def __init__(
        self,
        *,
        backend: str | None = None,
        bind: str | None = None,
        peers: str | list[str] | None = None,
        secret: str | bytes | None = None,
        membership: MembershipConfig | str | None = None,
        preset: str | None = None,
        min_nodes: int | None = None,
        global_batch_size: int | None = None,
        max_sources: int | None = None,
        join_timeout: float | None = None,
        collective_timeout: float | None = None,
        switch_timeout: float | None = None,
        sideline_timeout: float | None = None,
        record_samples: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if membership is not None and preset is not None:
            raise ValueError("chaos: give membership or preset, not both")
        self.config = cfg = NodeConfig.resolve(
            backend=backend, bind=bind, peers=peers, secret=secret, membership=membership if preset is None else preset,
            min_nodes=min_nodes, global_batch_size=global_batch_size, max_sources=max_sources, join_timeout=join_timeout,
            collective_timeout=collective_timeout, switch_timeout=switch_timeout, sideline_timeout=sideline_timeout,
            record_samples=record_samples,
        )
        super().__init__(
            cluster_environment=ChaosEnvironment(), process_group_backend="gloo",
            timeout=timedelta(seconds=cfg.collective_timeout), **kwargs,
        )
        self._sync = StateSync(secret=cfg.secret, max_sources=cfg.max_sources, join_timeout=cfg.join_timeout)
        self._restored_sampler_state: dict[str, Any] | None = None  # from a checkpoint (ckpt_path)
        self.trace = Trace(cfg.trace)  # this node's timeline as JSON lines
        self._pg = ElasticProcessGroup()
        self._rdv: Any = None
        self._view: View | None = None
        self._trainers: tuple[str, ...] = ()
        self._abort = threading.Event()
        self._group_lock = threading.Lock()  # _trainers and _abort, against the agent thread
        # Standing of this replica: sidelined (a link to an older trainer is
        # down; since when), or stale (sidelined, or declared failed and
        # rejoined: what it holds is behind the members'), or orphaned (came
        # back stale to nobody to take the state from).
        self._sidelined_since: float | None = None
        self._stale = False
        self._orphaned = False
        self._leave_requested = False
        self.left = False
        self._block_sync = False
        self._control: Control | None = None  # the last step's summed record; None after a failed step
        self.commits = 0  # steps committed since fit began (a joiner takes the members' count)
        self.window = Window()  # gradient accumulation
        self._gbuf: torch.Tensor | None = None  # flat gradients, reused across steps
        self.elastic_sampler: ElasticSampler | None = None
        self.ledger: Ledger | None = None
        self.events: list[dict[str, Any]] = []  # view changes with timings, for logs and tests

    # ---------------------------------------------------------------- what the state sync reads
    @property
    def node_id(self) -> str:
        return self._rdv.node_id if self._rdv is not None else ""

    @property
    def monitor(self) -> Any:
        """The agent's cluster monitor (link estimates), if the backend has one."""
        return getattr(getattr(self._rdv, "agent", None), "monitor", None)

    @property
    def shard_server(self) -> Any:
        return self._sync.server

    @property
    def last_pull(self) -> Any:
        """A joiner's state transfer (:class:`~chaos_lightning.replication.transfer.PullResult`)."""
        return self._sync.last_pull

    def member_at(self, rank: int) -> Any:
        return self._view.member(self._trainers[rank])

    def collective(self, tensor: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """An abortable all-reduce on the current group."""
        return self._pg.all_reduce(tensor, abort=self._abort, timeout=timeout or self.config.collective_timeout)

    # ---------------------------------------------------------------- launch
    @override
    def _configure_launcher(self) -> None:
        self._launcher = None  # the user starts one process per device

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def set_world_ranks(self) -> None:
        if self._view is not None:
            self.cluster_environment.set_global_rank(self._trainers.index(self.node_id))
            self.cluster_environment.set_world_size(len(self._trainers))
        rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        # Here, not in setup(): Lightning restores callback state from
        # ``ckpt_path`` before it calls the strategy's setup.
        trainer = internals.trainer_of(self.lightning_module)
        if trainer is not None and not any(isinstance(c, ChaosCallback) for c in trainer.callbacks):
            # first, so a step is committed before any other callback's
            # on_train_batch_end (ModelCheckpoint must save the committed cursor)
            trainer.callbacks.insert(0, ChaosCallback(self))
        super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        """Only bind: a node asks to join once it is warm (model, optimizer
        and data set up, at train start), so members pause for the state
        transfer and the group rebuild, not for our imports.  Until then
        there is no process group, and Lightning's setup collectives are
        no-ops."""
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        host = self.config.bind_host
        pin_gloo_interface(host)
        served = self._sync.serve(host)  # every node serves the state; its address rides in the member's meta
        self._rdv = create_rendezvous(**self.config.rendezvous_kwargs(), meta={REPL_META_KEY: served})
        self._rdv.subscribe(self._on_membership_event)
        self._install_signal_handler()
        self.trace.node = self.node_id
        if self.trace.enabled:
            import psutil

            self.trace.emit("start", proc_start=psutil.Process().create_time(), bind=self.config.bind)
        # Until the join nobody knows who rank 0 is.  Lightning's rank-zero
        # writers (the logger's folder and hparams.yaml at setup) would run on
        # every node, and nodes sharing a root dir would each make a version
        # folder (measured: a stray version_1, and a founder that picked
        # version_1 when the other node was first).  Hold them off; rank 0
        # logs the hyperparameters once the view is known (start_training).
        rank_zero_only.rank = _NOT_YET_RANKED

    def start_training(self, trainer: Any) -> None:
        """Join, wait for ``min_nodes``, form the group, take the state of
        whoever has trained (if anyone): called at train start."""
        gone = internals.missing(trainer)
        if gone:
            log.error("chaos: this Lightning lacks internals the strategy writes: %s (tested: %s)", gone, internals.TESTED)
        internals.drop_sigterm_broadcast(trainer)
        t0 = time.monotonic()
        cfg = self.config
        deadline = t0 + cfg.join_timeout
        self.trace.emit("join_request")
        view = self._rdv.join(cfg.join_timeout)
        if view.size < cfg.min_nodes:
            with progress(f"chaos: waiting for min_nodes={cfg.min_nodes}", total=cfg.min_nodes, unit="node") as bar:
                while view.size < cfg.min_nodes:
                    bar.n = view.size
                    bar.refresh()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"chaos: {view.size} of min_nodes={cfg.min_nodes} nodes after {cfg.join_timeout}s")
                    view = self._rdv.next_view(view.epoch, min(left, 1.0)) or view
        if self._restored_sampler_state is not None and self.elastic_sampler is not None:
            # resumed from a checkpoint (ckpt_path): its cursor, whatever the
            # world size that wrote it; the sync below spreads it
            self.elastic_sampler.load_state_dict(self._restored_sampler_state)
            self._restored_sampler_state = None

        def usable(v: View) -> bool:
            return self.node_id in v.connected() and len(v.connected()) >= cfg.min_nodes

        view = self._rebuild(trainer, view, usable, Freshness.NONE, deadline)
        self._relayout(trainer, new_epoch=True)
        if self.global_rank == 0 and trainer.enable_autolog_hparams:
            internals.log_hyperparams(trainer)  # what Lightning skipped at setup, where the run's folder is
        self._switched(trainer, time.monotonic() - t0, joined=True, failed_step=False)

    # ---------------------------------------------------------------- model
    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # no DDP wrapper: gradients are synced in post_backward

    @override
    def configure_ddp(self) -> None:
        self.model = self.lightning_module  # replicas are made equal at start_training

    @contextmanager
    @override
    def block_backward_sync(self):  # type: ignore[no-untyped-def]
        self._block_sync = True
        try:
            yield None
        finally:
            self._block_sync = False

    # ---------------------------------------------------------------- Lightning's own collectives
    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        name = collectives.reduce_op_name(reduce_op)
        if not isinstance(tensor, torch.Tensor) or self._pg.group is None or group is not None or name is None:
            return super().reduce(tensor, group, reduce_op)
        return collectives.reduce(self._pg, tensor, name, self._abort, self.config.collective_timeout)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._pg.group is not None:
            collectives.barrier(self._pg, self._abort, self.config.collective_timeout)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Small tensor-free objects go as msgpack over an abortable all-reduce
        (no pickle); anything else takes Lightning's pickled path."""
        if self._pg.group is None:
            return obj
        try:
            return collectives.broadcast_object(self._pg, obj, src, self._abort, self.config.collective_timeout)
        except collectives.NotCarried:
            return super().broadcast(obj, src)

    # ---------------------------------------------------------------- data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = internals.trainer_of(self.lightning_module)
        # the training loader is processed while fitting outside the sanity
        # check and validation (Lightning does not pass the stage here)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if not fitting or trainer.sanity_checking or trainer.validating or not isinstance(dataloader, DataLoader):
            return dataloader
        if isinstance(dataloader.batch_sampler, ElasticBatchSampler):
            return dataloader
        if dataloader.batch_size is None:
            raise ValueError("chaos: the training DataLoader needs a batch_size (the per-rank batch)")
        sequential = isinstance(dataloader.sampler, torch.utils.data.SequentialSampler)
        shuffle = bool(getattr(dataloader.sampler, "shuffle", not sequential))
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what seed_everything set, as Lightning's own samplers read it
        # per-rank batch fixed (the DataLoader's), or the global batch fixed and split over the current world
        gbs = self.config.global_batch_size
        sizes = {"global_batch_size": gbs} if gbs else {"batch_size": dataloader.batch_size}
        sampler = ElasticSampler(
            dataloader.dataset, rank=self.global_rank, world_size=self.world_size, shuffle=shuffle, seed=seed, **sizes
        )
        self.elastic_sampler = sampler
        self.ledger = Ledger(sampler.num_samples) if self.config.record_samples else None
        return DataLoader(
            dataloader.dataset, batch_sampler=ElasticBatchSampler(sampler, pad_empty=True),
            num_workers=dataloader.num_workers, collate_fn=dataloader.collate_fn, pin_memory=dataloader.pin_memory,
        )

    # ---------------------------------------------------------------- gradients
    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if self._block_sync or self.elastic_sampler is None:
            return
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        # The samples this rank's accumulated gradient covers (every micro-batch
        # of the window) and all ranks' together: both follow from the shared
        # layout, so the weight n / total is known before the reduction and
        # the summed result is already the mean over the window's samples.
        sampler = self.elastic_sampler
        window = self.window.reduced()
        n = sum(len(sampler.batch_for(j)) for j in window)
        total = sum(len(sampler.block(j)) for j in window)
        # One copy into a persistent buffer, weighted and reduced in place,
        # and the gradients become views of it.  Measured on a 1.4 M-parameter
        # MLP (cProfile, 600 steps): per-parameter temporaries, a cat, a
        # private clone and copies back cost 3.0 ms of CPU per step; a cat
        # into a fresh buffer still 1.35 ms, because backward has just taken
        # the memory the last buffer freed, so every step's 5.5 MB is a new
        # mapping to fault in.  After a failure the buffer is dropped, never
        # reused: an abandoned op may still write into it.
        flat = self._grad_buffer(params)
        offset = 0
        for p in params:
            k = p.numel()
            dst = flat[offset : offset + k]
            if p.grad is None:
                dst.zero_()
            elif p.grad.data_ptr() != dst.data_ptr():  # already our view after zero_grad(set_to_none=False)
                dst.copy_(p.grad.reshape(-1))
            offset += k
        flat.mul_(n / total if total > 0 else 0.0)
        world = len(self._trainers)
        control = torch.tensor(
            Control.local(rank=self.global_rank, world=world, samples=n, epoch=self._rdv.current_view().epoch,
                          leaving=self._leave_requested),
            dtype=torch.int64,
        )
        try:
            # one launch, two buffers in flight: the step's one round trip
            self._pg.all_reduce_in_place([flat, control], abort=self._abort, timeout=self.config.collective_timeout)
        except CollectiveError as exc:
            # No gradient, no update: the optimizer skips parameters whose
            # grad is None (raising instead would break Lightning's closure).
            log.warning("chaos: gradient all-reduce failed (%s); the step applies no update", exc)
            self._control = None
            self._gbuf = None
            for p in params:
                p.grad = None
            return
        self._control = Control.decode(control.tolist())
        if self._control.samples != total:
            # every rank derives its share from the same layout; a mismatch is a bug
            log.error("chaos: ranks trained %d samples, the layout says %d", self._control.samples, total)
        offset = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                p.grad = flat[offset : offset + k].view_as(p).to(p.dtype)  # a view when dtypes match
                offset += k

    def _grad_buffer(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        numel = sum(p.numel() for p in params)
        ref = params[0]
        buf = self._gbuf
        if buf is None or buf.numel() != numel or buf.dtype != ref.dtype or buf.device != ref.device:
            buf = self._gbuf = torch.empty(numel, dtype=ref.dtype, device=ref.device)
        return buf

    # ---------------------------------------------------------------- step boundary
    def on_step_boundary(self, trainer: Any) -> None:
        """Commit the step's samples and switch views if one is due (called by
        the companion callback's ``on_train_batch_end``)."""
        sampler = self.elastic_sampler
        if sampler is None:
            return
        steps = self.window.boundary()
        if steps is None:
            return  # a micro-step of gradient accumulation: nothing synced yet
        control, self._control = self._control, None
        failed = control is None
        if not failed:
            for _ in range(steps):  # one optimizer step trained the window's blocks
                trained = sampler.commit_step()
                if self.ledger is not None:
                    self.ledger.record(sampler.epoch, trained)
            self.commits += 1
            if self.trace.enabled:  # the per-step path: not even the arguments without a trace
                self.trace.emit("step", step=trainer.global_step, samples=control.samples, world=self.world_size)
        else:
            self.trace.emit("step_failed", step=trainer.global_step)
        decision = decide(
            failed=failed, control=control, world=len(self._trainers), view_epoch=self._view.epoch,
            rank=self.global_rank, steps_remaining=sampler.steps_remaining(),
        )
        if decision.action in (Action.STAY, Action.DEFER):
            return
        if decision.action is Action.LEAVE:
            self._leave(trainer)
            return
        t0 = time.monotonic()
        old_epoch, exclude, me = self._view.epoch, {self._trainers[r] for r in decision.exclude}, self.node_id

        def usable(v: View) -> bool:
            return usable_for_switch(
                epoch=v.epoch, ids=set(v.ids), connected=v.connected(), me=me, old_epoch=old_epoch, exclude=exclude,
                newer=decision.newer,
            )

        deadline = time.monotonic() + self.config.join_timeout
        freshness = Freshness.ABORTED if failed else Freshness.APPLIED
        self._rebuild(trainer, self._rdv.current_view(), usable, freshness, deadline)
        self._relayout(trainer, new_epoch=False)
        if self._orphaned:
            # back from the sideline, and no member left that trained on:
            # training again from our stale state would repeat samples
            log.error("chaos: no member holds the training state any more (they finished or failed); ending fit")
            self.trace.emit("orphaned", epoch=self._view.epoch)
            trainer.should_stop = True
            return
        self._switched(trainer, time.monotonic() - t0, joined=False, failed_step=failed)

    def _relayout(self, trainer: Any, *, new_epoch: bool) -> None:
        self.elastic_sampler.reconfigure(self.global_rank, self.world_size)
        internals.set_epoch_length(trainer, self.elastic_sampler.steps_remaining(), new_epoch=new_epoch)
        internals.reset_val_dataloaders(trainer)

    def _leave(self, trainer: Any) -> None:
        # the view without us first: the members wait for it, not for our
        # group's teardown (measured 90 ms at 9 processes on 2 cores)
        self._rdv.leave(self.config.leave_timeout)
        self._pg.close()
        self.left = True
        self.trace.emit("left", step=trainer.global_step)
        trainer.should_stop = True
        log.info("chaos: left the cluster at global step %d", trainer.global_step)

    def _switched(self, trainer: Any, took: float, *, joined: bool, failed_step: bool) -> None:
        """Record, trace and log a group this node now trains in."""
        epoch, world = self._view.epoch, self.world_size
        self.events.append({"epoch": epoch, "world": world, "stall_s": took, **(
            {"joined": True} if joined else {"failed_step": failed_step})})
        log.info("chaos: training in epoch %d with world %d (%.3fs)", epoch, world, took)
        switch = self._pg.last_switch
        self.trace.emit(
            "trainers", epoch=epoch, world=world, trainers=list(self._trainers), stall_s=took, joined=joined,
            failed_step=failed_step, group_init_s=switch.init_s if switch is not None else None,
        )
        if self.global_rank == 0:  # every view goes to the loggers, written by its rank 0
            metrics = {"chaos/world_size": float(world), "chaos/view_epoch": float(epoch), "chaos/stall_s": took}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, trainer.global_step)

    # ---------------------------------------------------------------- groups
    def _rebuild(self, trainer: Any, view: View | None, usable: Callable[[View], bool], freshness: Freshness,
                 deadline: float) -> View:
        """Form the group of the first usable view and make replicas identical
        in it; if a member fails during the state sync (a joiner dies
        mid-transfer, a source dies before the end), try again on a newer view."""
        floor = -1
        while True:
            view = self._form_group(view, lambda v: usable(v) and v.epoch > floor, deadline)
            if self._stale:
                freshness = Freshness.NONE  # the others trained on without us: take the state like a newcomer
                if self.ledger is not None and self.elastic_sampler is not None:
                    # our commits since the members last heard from us may not be
                    # theirs (a step we applied that they aborted): the epoch's
                    # record is theirs from here on, not ours
                    self.ledger.forget(self.elastic_sampler.epoch)
            try:
                plan = self._sync.sync(self, trainer, freshness, stale=self._stale)
            except CollectiveError as exc:
                log.warning("chaos: state sync in epoch %d failed (%s); waiting for the next view", view.epoch, exc)
                floor = view.epoch
                if freshness is Freshness.NONE and self._sync.received:
                    freshness = Freshness.APPLIED  # we hold the members' state now, whatever failed after
                continue
            self._orphaned = plan.action is SyncAction.ORPHANED
            self._sidelined_since = None
            self._stale = False
            return view

    def _form_group(self, view: View | None, usable: Callable[[View], bool], deadline: float) -> View:
        """Build the group of the first usable view; members that picked
        different views fail to meet (bounded) and retry on a newer one.

        A view that keeps this node as a member but not among its connected
        members (a link of ours is down) sidelines it: no training, and a
        longer wait (``sideline_timeout``) for the view that brings it back.
        """
        bar = None
        try:
            while True:
                if view is not None and usable(view):
                    try:
                        self._build_group(view, view.connected())
                        return view
                    except Exception as exc:
                        log.info("chaos: group of epoch %d did not form (%s); waiting for a newer view", view.epoch, exc)
                if view is not None and self.node_id in view and self.node_id not in view.connected():
                    if self._sidelined_since is None:
                        self._sidelined_since = time.monotonic()
                        self._stale = True
                        log.warning("chaos: sidelined in epoch %d: down links %s", view.epoch, list(view.down_links))
                        self.trace.emit("sidelined", epoch=view.epoch, down_links=[list(p) for p in view.down_links])
                        bar = progress("chaos: sidelined (a link is down), waiting for it")
                        bar.__enter__()
                    deadline = max(deadline, self._sidelined_since + self.config.sideline_timeout)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chaos: no usable view after {self.config.join_timeout}s")
                view = self._rdv.next_view(view.epoch if view is not None else 0, min(left, 1.0)) or view
                if bar is not None:
                    bar.refresh()
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)

    def _build_group(self, view: View, trainers: tuple[str, ...]) -> None:
        rank = trainers.index(self.node_id)
        # the PG timeout also bounds every gloo op of the group, so it is the
        # collective timeout, not a short init bound (a slow step would fail)
        store = self._rdv.store(view, timeout=self.config.switch_timeout)
        self._pg.switch(rank, len(trainers), store, self.config.collective_timeout)
        with self._group_lock:
            self._abort.clear()
            self._view, self._trainers = view, trainers
            # news that arrived while the group formed (one of its members
            # already gone) must still end its first collective
            if set(trainers) - set(self._rdv.current_view().ids):
                self._abort.set()
        self.set_world_ranks()

    def _on_membership_event(self, event: object) -> None:
        # Agent thread: only flags.  Any news that a member we train with is
        # gone ends a collective waiting on it (no gloo timeout).  The node
        # that confirmed a failure hears MemberFailed before the commit; the
        # others hear only the committed view without it (measured: one
        # survivor of a SIGSTOP then waited out the 30 s collective timeout).
        if isinstance(event, ev.ViewChanged):
            v = event.view
            self.trace.emit("view_committed", epoch=v.epoch, members=list(v.ids), down_links=[list(p) for p in v.down_links])
        if not isinstance(event, (ev.MemberFailed, ev.ViewChanged, ev.Removed)):
            return
        with self._group_lock:
            if isinstance(event, ev.Removed) and not event.graceful and self._trainers:
                log.warning("chaos: this node was declared failed in epoch %d; rejoining", event.view.epoch)
                self.trace.emit("removed", epoch=event.view.epoch)
                self._stale = True
            trainers = set(self._trainers)
            # a down link between two trainers leaves one out of the next
            # group: on real links the collective would hang on it
            gone = {event.node} if isinstance(event, ev.MemberFailed) else trainers - set(event.view.connected())
            if gone & trainers:
                self._abort.set()

    # ---------------------------------------------------------------- leaving
    def _install_signal_handler(self) -> None:
        """Called at setup and again at train start, because Lightning's
        signal connector installs its own SIGTERM handler in between and would
        chain ours behind one that ends fit with SIGTERMException."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum: int, frame: Any) -> None:  # replaces Lightning's, not chained
            log.info("chaos: SIGTERM, leaving at the next step boundary")
            self.request_leave()

        signal.signal(signal.SIGTERM, on_sigterm)

    def request_leave(self) -> None:
        """Leave gracefully at the next step boundary (fit then returns)."""
        self._leave_requested = True

    @override
    def teardown(self) -> None:
        trainer = internals.trainer_of(self.lightning_module)
        step = trainer.global_step if trainer is not None else None
        super().teardown()
        self.trace.emit("done", step=step)
        if not self.left and self._rdv is not None:
            self._pg.close()
        if self._rdv is not None:
            self._rdv.close()
            self._rdv = None
        self._sync.close()
        self.trace.close()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "chaos" not in strategy_registry:
            strategy_registry.register("chaos", cls, description="elastic, self-healing data parallel (chaos_lightning)")


class ChaosCallback(Callback):
    """Puts the strategy's step boundary where Lightning has finished a step
    and not yet fetched the next batch (``on_train_batch_end``), and keeps
    the sampler's cursor in checkpoints."""

    #: not part of the state a joiner receives: the sampler travels on its own
    chaos_owned = True

    def __init__(self, strategy: ChaosStrategy) -> None:
        self._strategy = strategy
        self._shown_world: float | None = None

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._shown_world = None  # Lightning cleared its metrics for this run
        if isinstance(trainer.strategy, ChaosStrategy):
            trainer.strategy._install_signal_handler()
            trainer.strategy.start_training(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The sampler's cursor, so ``ckpt_path`` resumes mid-epoch with exactly-once intact."""
        sampler = self._strategy.elastic_sampler
        return {"sampler": sampler.state_dict()} if sampler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the dataloaders exist: the
        # strategy applies this once it has its sampler (at train start).
        if "sampler" in state_dict:
            self._strategy._restored_sampler_state = state_dict["sampler"]

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, ChaosStrategy) and strategy.elastic_sampler is not None:
            internals.set_epoch_length(trainer, strategy.elastic_sampler.steps_remaining(), new_epoch=True)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, ChaosStrategy):
            strategy.on_step_boundary(trainer)
            # the world size on the progress bar, logged when it changes
            # (Lightning keeps the last value shown; logging costs every step)
            world = float(strategy.world_size)
            if world != self._shown_world:
                pl_module.log("world", world, prog_bar=True, on_step=True, on_epoch=False)
                self._shown_world = world


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    ChaosStrategy.register_strategies(StrategyRegistry)


_register()
