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
the sampler commits or returns the step's samples accordingly.
docs/architecture.md follows a join and a failed step through these modules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from typing_extensions import override

from chaos_lightning.config import NodeConfig
from chaos_lightning.membership.config import Config as MembershipConfig
from chaos_lightning.membership.view import View
from chaos_lightning.strategy import _lightning_internals as internals
from chaos_lightning.strategy import collectives
from chaos_lightning.strategy.boundary import ChaosCallback
from chaos_lightning.strategy.environment import ChaosEnvironment, pin_gloo_interface, take_sigterm
from chaos_lightning.strategy.gradients import GradientBuffer
from chaos_lightning.strategy.group import ElasticGroup
from chaos_lightning.strategy.process_group import CollectiveError
from chaos_lightning.strategy.sampler import ElasticBatchSampler, ElasticSampler, Ledger, elastic_dataloader
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
        self.restored_sampler_state: dict[str, Any] | None = None  # from a checkpoint (ckpt_path)
        self.trace = Trace(cfg.trace)  # this node's timeline as JSON lines
        self.group = ElasticGroup(cfg, self.trace)
        self._orphaned = False  # came back stale to nobody to take the state from
        self._leave_requested = False
        self.left = False
        self._block_sync = False
        self._control: Control | None = None  # the last step's summed record; None after a failed step
        self.step_applied = True  # False in the end hooks of a failed step: no update, counted nowhere
        self._counted: dict[str, Any] | None = None  # the loop's step counts at the last boundary
        self._lr_before: list[Any] | None = None  # step schedulers' state when this step failed
        self.commits = 0  # steps committed since fit began (a joiner takes the members' count)
        self.window = Window()  # gradient accumulation
        self._grads = GradientBuffer()
        self.elastic_sampler: ElasticSampler | None = None
        self.ledger: Ledger | None = None
        self.events: list[dict[str, Any]] = []  # view changes with timings, for logs and tests

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

    # ---------------------------------------------------------------- launch
    @override
    def _configure_launcher(self) -> None:
        from chaos_lightning.strategy.devices import launcher_for

        self._launcher = launcher_for(self)  # None: the user starts one process per device

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def set_world_ranks(self) -> None:
        if self.group.view is not None:
            self.cluster_environment.set_global_rank(self.group.rank)
            self.cluster_environment.set_world_size(len(self.group.trainers))
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
        self.group.open({REPL_META_KEY: served})
        take_sigterm(self.request_leave)
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
        take_sigterm(self.request_leave)
        t0 = time.monotonic()
        cfg = self.config
        deadline = t0 + cfg.join_timeout
        self.trace.emit("join_request")
        view = self.group.join(cfg.min_nodes, deadline)
        if self.restored_sampler_state is not None and self.elastic_sampler is not None:
            # resumed from a checkpoint (ckpt_path): its cursor, whatever the
            # world size that wrote it; the sync below spreads it
            self.elastic_sampler.load_state_dict(self.restored_sampler_state)
            self.restored_sampler_state = None

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
        g = self.group
        if not isinstance(tensor, torch.Tensor) or g.pg.group is None or group is not None or name is None:
            return super().reduce(tensor, group, reduce_op)
        return collectives.reduce(g.pg, tensor, name, g.abort, self.config.collective_timeout)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.group.pg.group is not None:
            collectives.barrier(self.group.pg, self.group.abort, self.config.collective_timeout)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Small tensor-free objects go as msgpack over an abortable all-reduce
        (no pickle); anything else takes Lightning's pickled path."""
        if self.group.pg.group is None:
            return obj
        try:
            return collectives.broadcast_object(self.group.pg, obj, src, self.group.abort, self.config.collective_timeout)
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
        loader = elastic_dataloader(dataloader, rank=self.global_rank, world_size=self.world_size,
                                    global_batch_size=self.config.global_batch_size)
        self.elastic_sampler = sampler = loader.batch_sampler.sampler
        self.ledger = Ledger(sampler.num_samples) if self.config.record_samples else None
        return loader

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
        flat = self._grads.gather(params, n / total if total > 0 else 0.0)
        g = self.group
        control = torch.tensor(
            Control.local(rank=self.global_rank, world=len(g.trainers), samples=n, epoch=g.rdv.current_view().epoch,
                          leaving=self._leave_requested),
            dtype=torch.int64,
        )
        try:
            # one launch, two buffers in flight: the step's one round trip
            g.pg.all_reduce_in_place([flat, control], abort=g.abort, timeout=self.config.collective_timeout)
        except CollectiveError as exc:
            log.warning("chaos: gradient all-reduce failed (%s); the step applies no update", exc)
            self._control = None
            if self._lr_before is None:
                self._lr_before = internals.scheduler_states(internals.trainer_of(self.lightning_module))
            self._grads.drop(params)
            return
        self._control = Control.decode(control.tolist())
        if self._control.samples != total:
            # every rank derives its share from the same layout; a mismatch is a bug
            log.error("chaos: ranks trained %d samples, the layout says %d", self._control.samples, total)
        self._grads.scatter(params, flat)

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
        self.step_applied = not failed
        if not failed:
            for _ in range(steps):  # one optimizer step trained the window's blocks
                trained = sampler.commit_step()
                if self.ledger is not None:
                    self.ledger.record(sampler.epoch, trained)
            self.commits += 1
            if self.trace.enabled:  # the per-step path: not even the arguments without a trace
                self.trace.emit("step", step=trainer.global_step, samples=control.samples, world=self.world_size)
            self._counted = internals.step_counters(trainer)
        else:
            self.trace.emit("step_failed", step=trainer.global_step)
            internals.uncount_step(trainer, self._counted, self._lr_before or [])
        self._lr_before = None
        decision = decide(
            failed=failed, control=control, world=len(self.group.trainers), view_epoch=self.group.view.epoch,
            rank=self.global_rank, steps_remaining=sampler.steps_remaining(),
        )
        if decision.action in (Action.STAY, Action.DEFER):
            return
        if decision.action is Action.LEAVE:
            self._leave(trainer)
            return
        t0 = time.monotonic()
        old_epoch, exclude, me = self.group.view.epoch, {self.group.trainers[r] for r in decision.exclude}, self.node_id

        def usable(v: View) -> bool:
            return usable_for_switch(
                epoch=v.epoch, ids=set(v.ids), connected=v.connected(), me=me, old_epoch=old_epoch, exclude=exclude,
                newer=decision.newer,
            )

        deadline = time.monotonic() + self.config.join_timeout
        freshness = Freshness.ABORTED if failed else Freshness.APPLIED
        self._rebuild(trainer, self.group.rdv.current_view(), usable, freshness, deadline)
        self._relayout(trainer, new_epoch=False)
        if self._sync.plan.admits and internals.skip_next_validation(trainer):  # a newcomer starts at the next batch
            log.warning("chaos: the validation due at step %d is skipped: a newcomer joined there", trainer.global_step)
        if self._orphaned:
            # back from the sideline, and no member left that trained on:
            # training again from our stale state would repeat samples
            log.error("chaos: no member holds the training state any more (they finished or failed); ending fit")
            self.trace.emit("orphaned", epoch=self.group.view.epoch)
            trainer.should_stop = True
            return
        self._switched(trainer, time.monotonic() - t0, joined=False, failed_step=failed)

    def _relayout(self, trainer: Any, *, new_epoch: bool) -> None:
        self.elastic_sampler.reconfigure(self.global_rank, self.world_size)
        internals.set_epoch_length(trainer, self.elastic_sampler.steps_remaining(), new_epoch=new_epoch)
        internals.reset_val_dataloaders(trainer)

    def _leave(self, trainer: Any) -> None:
        internals.hand_over_logs(trainer)
        self.group.leave()
        rank_zero_only.rank = _NOT_YET_RANKED  # the run's logs and checkpoints are the members' from here on
        self.cluster_environment.set_global_rank(_NOT_YET_RANKED)
        self.left = True
        self.trace.emit("left", step=trainer.global_step)
        trainer.should_stop = True
        log.info("chaos: left the cluster at global step %d", trainer.global_step)

    def _switched(self, trainer: Any, took: float, *, joined: bool, failed_step: bool) -> None:
        """Record, trace and log a group this node now trains in."""
        self._counted = internals.step_counters(trainer)  # what a failed step is counted back to
        epoch, world = self.group.view.epoch, self.world_size
        self.events.append({"epoch": epoch, "world": world, "stall_s": took, **(
            {"joined": True} if joined else {"failed_step": failed_step})})
        log.info("chaos: training in epoch %d with world %d (%.3fs)", epoch, world, took)
        switch = self.group.pg.last_switch
        self.trace.emit(
            "trainers", epoch=epoch, world=world, trainers=list(self.group.trainers), stall_s=took, joined=joined,
            failed_step=failed_step, group_init_s=switch.init_s if switch is not None else None,
        )
        if self.global_rank == 0:  # every view goes to the loggers, written by its rank 0
            internals.continue_logs(trainer)
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
            view = self.group.form(view, lambda v: usable(v) and v.epoch > floor, deadline)
            self.set_world_ranks()
            stale = self.group.stale
            if stale:
                freshness = Freshness.NONE  # the others trained on without us: take the state like a newcomer
                if self.ledger is not None and self.elastic_sampler is not None:
                    # our commits since the members last heard from us may not be
                    # theirs (a step we applied that they aborted): the epoch's
                    # record is theirs from here on, not ours
                    self.ledger.forget(self.elastic_sampler.epoch)
            try:
                plan = self._sync.sync(self, trainer, freshness, stale=stale)
            except CollectiveError as exc:
                log.warning("chaos: state sync in epoch %d failed (%s); waiting for the next view", view.epoch, exc)
                floor = view.epoch
                if freshness is Freshness.NONE and self._sync.received:
                    freshness = Freshness.APPLIED  # we hold the members' state now, whatever failed after
                continue
            self._orphaned = plan.action is SyncAction.ORPHANED
            self.group.settled()
            return view

    # ---------------------------------------------------------------- leaving
    def request_leave(self) -> None:
        """Leave gracefully at the next step boundary (fit then returns)."""
        self._leave_requested = True

    @override
    def teardown(self) -> None:
        trainer = internals.trainer_of(self.lightning_module)
        step = trainer.global_step if trainer is not None else None
        super().teardown()
        self.trace.emit("done", step=step)
        self.group.close(left=self.left)
        self._sync.close()
        self.trace.close()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "chaos" not in strategy_registry:
            strategy_registry.register("chaos", cls, description="elastic, self-healing data parallel (chaos_lightning)")


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    ChaosStrategy.register_strategies(StrategyRegistry)


_register()
