"""ChaosStrategy: ``Trainer(strategy="chaos")``, elastic data parallelism in place.

Role in the whole: the layer users touch.  It reads like a list of the places
where elasticity enters Lightning; each hook carries ``@override`` and
delegates, most of it to :class:`.elastic.ElasticMember` (the machinery it
shares with ``Fabric(strategy="chaos")``, :mod:`.fabric`):

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
from chaos_lightning.strategy import collectives
from chaos_lightning.strategy import _lightning_internals as internals
from chaos_lightning.strategy.boundary import ChaosCallback
from chaos_lightning.strategy.devices import child_options, launcher_for
from chaos_lightning.strategy.elastic import ElasticMember
from chaos_lightning.strategy.environment import ChaosEnvironment
from chaos_lightning.strategy.process import take_sigterm
from chaos_lightning.strategy.sampler import ElasticBatchSampler, elastic_dataloader
from chaos_lightning.strategy.switch import Action

log = logging.getLogger("chaos_lightning.strategy")

#: rank_zero_only's rank before the join: any rank above 0 turns Lightning's
#: rank-zero writers into no-ops (``rank_zero_experiment`` tests ``rank > 0``).
_NOT_YET_RANKED = 1


class ChaosStrategy(ElasticMember, DDPStrategy):
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
        encrypt: bool | None = None,
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
        stop_free_join: bool | None = None,
        catch_up_steps: int | None = None,
        finish_failed_steps: bool | None = None,
        groups_ahead: bool | None = None,
        shares: str | None = None,
        straggler: float | None = None,
        straggler_retry: float | None = None,
        metrics: str | None = None,
        gc_freeze: bool | None = None,
        target_nodes: int | None = None,
        max_nodes: int | None = None,
        standby: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if membership is not None and preset is not None:
            raise ValueError("chaos: give membership or preset, not both")
        self.config = cfg = NodeConfig.resolve(**child_options(dict(
            backend=backend, bind=bind, peers=peers, secret=secret, encrypt=encrypt,
            membership=membership if preset is None else preset,
            min_nodes=min_nodes, global_batch_size=global_batch_size, max_sources=max_sources, join_timeout=join_timeout,
            collective_timeout=collective_timeout, switch_timeout=switch_timeout, sideline_timeout=sideline_timeout,
            record_samples=record_samples, stop_free_join=stop_free_join, catch_up_steps=catch_up_steps,
            finish_failed_steps=finish_failed_steps, groups_ahead=groups_ahead,
            shares=shares, straggler=straggler, straggler_retry=straggler_retry, metrics=metrics, gc_freeze=gc_freeze, target_nodes=target_nodes, max_nodes=max_nodes, standby=standby,
        )))
        super().__init__(
            cluster_environment=ChaosEnvironment(), process_group_backend="gloo",
            timeout=timedelta(seconds=cfg.collective_timeout), **kwargs,
        )
        self._init_member(cfg)
        self.restored_sampler_state: dict[str, Any] | None = None  # from a checkpoint (ckpt_path)
        self._block_sync = False
        self._counted: dict[str, Any] | None = None  # the loop's step counts at the last boundary
        self._lr_before: list[Any] | None = None  # step schedulers' state when this step failed
        self._scaler_before: dict[str, Any] | None = None  # the gradient scaler's state when this step failed
        # Manual optimization may reduce gradients more than once in a batch
        # (a GAN: one manual_backward per optimizer).  If a later reduction
        # fails, the optimizer steps taken after the earlier ones are undone
        # from this journal, so the batch leaves no trace and is trained again.
        self._journal: list[_Undo] = []
        self._reductions = 0  # this batch's reductions so far
        self._most_reductions = 0  # the most any batch made: a step after fewer may be followed by another

    # ---------------------------------------------------------------- what a replica is (ElasticMember)
    def _trainer(self) -> Any:
        return internals.trainer_of(self.lightning_module)

    @override
    def replica_tensors(self) -> list[torch.Tensor]:
        module = self.lightning_module
        return list(module.parameters()) + list(module.buffers())

    @override
    def replica_buffers(self) -> list[torch.Tensor]:
        return list(self.lightning_module.buffers())

    @override
    def replica_state(self) -> dict[str, Any]:
        trainer = self._trainer()
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [cfg.scheduler.state_dict() for cfg in self.lr_scheduler_configs],
            "precision": self.precision_plugin.state_dict(),
            # the strategy's own callback keeps only the sampler, which travels on its own
            "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks if not getattr(cb, "chaos_owned", False)},
            "loop": internals.loop_progress(trainer),
            "step": trainer.global_step,
            "paths": internals.output_paths(trainer),
        }

    @override
    def load_replica_state(self, state: dict[str, Any]) -> None:
        trainer = self._trainer()
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        for cfg, sched_state in zip(self.lr_scheduler_configs, state["schedulers"], strict=True):
            cfg.scheduler.load_state_dict(sched_state)
        if state["precision"]:
            self.precision_plugin.load_state_dict(state["precision"])
        # the run's folders first: ModelCheckpoint's state names its dirpath and
        # is only restored in full (best score, top-k) where the dirpath matches
        internals.adopt_output_paths(trainer, state["paths"])
        callbacks = state["callbacks"]
        for cb in trainer.callbacks:
            if callbacks.get(cb.state_key):
                cb.load_state_dict(callbacks[cb.state_key])
        internals.load_loop_progress(trainer, state["loop"], remaining=self.elastic_sampler.steps_remaining)

    @override
    def adopt_shared(self, state: dict[str, Any]) -> None:
        internals.adopt_output_paths(self._trainer(), state["paths"])

    # ---------------------------------------------------------------- the stop-free join (ElasticMember)
    @override
    def shadow_capable(self) -> bool:
        # LBFGS evaluates its closure several times inside one step: a
        # recorded gradient is not what it applies, and its step needs a closure
        return bool(self.optimizers) and not any(isinstance(o, torch.optim.LBFGS) for o in self.optimizers)

    @override
    def light_replica_state(self) -> dict[str, Any]:
        state = self.replica_state()
        state["optimizers"] = [{"state": {}, "param_groups": s["param_groups"]} for s in state["optimizers"]]
        return state

    @override
    def shadow_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers)

    @override
    def replica_params(self) -> list[torch.Tensor]:
        return list(self.lightning_module.parameters())

    @override
    def pulled_optimizer_states(self, host_state: dict[str, Any]) -> list[dict[str, Any]]:
        return host_state["optimizers"]

    @override
    def finishes_steps(self) -> bool:
        # one reduction per optimizer step: automatic optimization, and not
        # LBFGS (its step evaluates the closure, so reduces, several times)
        module = self.lightning_module
        return (module is not None and module.automatic_optimization
                and not any(isinstance(o, torch.optim.LBFGS) for o in self.optimizers))

    @override
    def evaluating(self) -> bool:
        trainer = self._trainer()
        return trainer is not None and bool(trainer.validating or trainer.sanity_checking)

    @override
    def must_catch_up(self) -> bool:
        """A validation runs after this batch, or the fit stops (max_steps,
        an early stop already decided)."""
        trainer = self._trainer()
        if trainer is None:
            return False
        last = trainer.should_stop or (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        return last or internals.validation_due(trainer)

    @override
    def grad_scaler(self) -> Any:
        return getattr(self.precision_plugin, "scaler", None)

    @override
    def last_checkpoint(self) -> str | None:
        trainer = self._trainer()
        for cb in trainer.checkpoint_callbacks if trainer is not None else ():
            path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
            if path:
                return path
        return None

    # ---------------------------------------------------------------- launch
    @override
    def _configure_launcher(self) -> None:
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
            from chaos_lightning.strategy.loggers import LogClusterMetrics

            trainer.callbacks.insert(1, LogClusterMetrics(self))  # views, stalls, shares to trainer.loggers
        if trainer is not None:
            internals.defer_cli_config(trainer)  # LightningCLI's config.yaml: once, after the join
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
        self._open_member()
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
        take_sigterm(self._on_sigterm)
        t0 = time.monotonic()
        if self.restored_sampler_state is not None and self.elastic_sampler is not None:
            # resumed from a checkpoint (ckpt_path): its cursor, whatever the
            # world size that wrote it; the state sync spreads it
            self.elastic_sampler.load_state_dict(self.restored_sampler_state)
            self.restored_sampler_state = None
        self._join_cluster(t0 + self.config.join_timeout)
        if self._joined_without_state():  # raises unless the members had finished
            # nothing of the run is here: no logs, no checkpoints, no training
            rank_zero_only.rank = _NOT_YET_RANKED
            self.cluster_environment.set_global_rank(_NOT_YET_RANKED)
            trainer.should_stop = True
            return
        if self._joined_at_the_end():
            trainer.should_stop = True
        self._relayout(trainer, new_epoch=True)
        collectives.route_metric_sync(self.lightning_module, collectives.metric_sync_fn(self))
        if self.global_rank == 0 and trainer.enable_autolog_hparams:
            internals.log_hyperparams(trainer)  # what Lightning skipped at setup, where the run's folder is
        internals.save_cli_config(trainer, rank0=self.global_rank == 0)  # held at setup: written once per run
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
        if not collectives.ours(group):
            return super().reduce(tensor, group, reduce_op)
        return self._user_reduce(tensor, reduce_op, lambda: super(ChaosStrategy, self).reduce(tensor, None, reduce_op))

    @override
    def all_gather(self, tensor: Any, group: Any = None, sync_grads: bool = False) -> Any:
        if not collectives.ours(group):
            return super().all_gather(tensor, group, sync_grads)
        return self._user_gather(tensor, sync_grads, lambda: super(ChaosStrategy, self).all_gather(tensor, None, sync_grads))

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._user_barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._user_broadcast(obj, src)  # msgpack only: never DDPStrategy's pickled broadcast

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
        self._adopt_sampler(loader.batch_sampler.sampler)
        return loader

    # ---------------------------------------------------------------- gradients
    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if self._block_sync or self.elastic_sampler is None:
            return
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        self._reductions += 1
        if self._reduce_gradients(params, self.window.reduced()):
            return
        if self._journal:
            log.warning("chaos: a later gradient reduction of this batch failed: undoing its %d optimizer step(s)",
                        len(self._journal))
            for undo in reversed(self._journal):
                undo.apply()
            if self._journal[0].scaler_state is not None:
                self._scaler_before = self._journal[0].scaler_state  # as the batch began
            self._journal.clear()
        if self._lr_before is None:
            self._lr_before = internals.scheduler_states(internals.trainer_of(self.lightning_module))
        scaler = self.grad_scaler()
        if scaler is not None and self._scaler_before is None:
            self._scaler_before = scaler.state_dict()  # the skipped step's back-off is undone at the boundary

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._may_be_followed():
            scaler = self.grad_scaler()
            self._journal.append(_Undo(optimizer, scaler.state_dict() if scaler is not None else None))
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _may_be_followed(self) -> bool:
        """A manual-optimization step that another reduction may follow in this
        batch: every step of the first batch; later, any step after fewer
        reductions than the most a batch has made.  Not after a failed
        reduction (its gradients are gone: the step changes nothing)."""
        module = self.lightning_module
        if module is None or module.automatic_optimization or self._reductions == 0 or self._control is None:
            return False
        return self._most_reductions == 0 or self._reductions < self._most_reductions

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
        self._in_step = False
        self._most_reductions = max(self._most_reductions, self._reductions)
        self._reductions = 0
        self._journal.clear()
        decision = self._settle_step(steps, trainer.global_step)
        if self.finished_switch_s is not None:  # the step finished in the next group: lay it out for it
            took, self.finished_switch_s = self.finished_switch_s, None
            self._relayout(trainer, new_epoch=False)
            self._switched(trainer, took, joined=False, failed_step=True, recorded=True)
        if self.relayout_due:  # stop-free joiners caught up: they train their share from the next step
            self.relayout_due = False
            self._relayout(trainer, new_epoch=False)
        elif self.shares_due is not None:  # adaptive shares: the next step splits the batch by speed
            self._relayout(trainer, new_epoch=False, weights=self.shares_due)
        if self.step_applied:
            self._counted = internals.step_counters(trainer)
        else:
            internals.uncount_step(trainer, self._counted, self._lr_before or [])
            if self._scaler_before is not None:
                self.grad_scaler().load_state_dict(self._scaler_before)
        self._lr_before = self._scaler_before = None
        if decision.action in (Action.STAY, Action.DEFER):
            return
        if decision.action is Action.LEAVE and self.stepping_down:  # a straggler: it stands by, then rejoins
            internals.hand_over_logs(trainer.loggers)
            t0 = time.monotonic()
            if not self._stand_by():
                trainer.should_stop = True
                return
            failed = False
        elif decision.action is Action.LEAVE:
            self._leave(trainer)
            if self._shadow_failed:
                raise RuntimeError("chaos: this node could not join: it could not pull the training state (see the "
                                   "log lines above); it left the cluster, whose members train on without it")
            return
        else:
            t0 = time.monotonic()
            failed = not self.step_applied
            self._switch(decision)
        self._relayout(trainer, new_epoch=False)
        if self.admitted_newcomer:
            # a newcomer starts at the next batch: the rest of this one (its
            # end hooks) is the members' alone
            self.newcomer_window = True
            if internals.skip_next_validation(trainer):
                log.warning("chaos: the validation due at step %d is skipped: a newcomer joined there",
                            trainer.global_step)
        if self._orphaned:
            # back from the sideline, and no member left that trained on:
            # training again from our stale state would repeat samples
            log.error("chaos: no member holds the training state any more (they finished or failed); ending fit")
            self.trace.emit("orphaned", epoch=self.group.view.epoch)
            trainer.should_stop = True
            return
        self._switched(trainer, time.monotonic() - t0, joined=False, failed_step=failed)

    def _relayout(self, trainer: Any, *, new_epoch: bool, weights: tuple[int, ...] | None = None) -> None:
        self._lay_out(weights)
        internals.set_epoch_length(trainer, self.elastic_sampler.steps_remaining(), new_epoch=new_epoch)
        if weights is None:  # the members changed (new shares keep them): validate over the current ones
            internals.reset_val_dataloaders(trainer)

    def _leave(self, trainer: Any) -> None:
        internals.hand_over_logs(trainer.loggers)
        self._leave_cluster(trainer.global_step)
        rank_zero_only.rank = _NOT_YET_RANKED  # the run's logs and checkpoints are the members' from here on
        self.cluster_environment.set_global_rank(_NOT_YET_RANKED)
        trainer.should_stop = True

    def _switched(self, trainer: Any, took: float, *, joined: bool, failed_step: bool, recorded: bool = False) -> None:
        """Record, trace and log a group this node now trains in (``recorded``:
        its switch is in the record already: a step finished in it)."""
        self._counted = internals.step_counters(trainer)  # what a failed step is counted back to
        if not recorded:
            self._record_switch(took, joined=joined, failed_step=failed_step)
        epoch, world = self.group.view.epoch, self.world_size
        if self.global_rank == 0:  # every view goes to the loggers, written by its rank 0
            internals.continue_logs(trainer.loggers)
            metrics = {"chaos/world_size": float(world), "chaos/view_epoch": float(epoch), "chaos/stall_s": took}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, trainer.global_step)

    def on_batch_start(self) -> None:
        """A batch starts (the companion callback's ``on_train_batch_start``):
        every member of the group, newcomers included, is in it."""
        self.newcomer_window = False
        self._step_starts()

    @override
    def on_train_end(self) -> None:
        self.newcomer_window = False
        self._hand_over_at_end()  # after every callback's on_train_end

    @override
    def teardown(self) -> None:
        trainer = internals.trainer_of(self.lightning_module)
        step = trainer.global_step if trainer is not None else None
        super().teardown()
        self._close_member(step)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "chaos" not in strategy_registry:
            strategy_registry.register("chaos", cls, description="elastic, self-healing data parallel (chaos_lightning)")


class _Undo:
    """An optimizer's parameters and state before its step, to put back."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler_state: dict[str, Any] | None) -> None:
        import copy

        self.optimizer = optimizer
        self.scaler_state = scaler_state  # the gradient scaler's, put back at the step boundary
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.params]
        self.state = copy.deepcopy(optimizer.state_dict())

    def apply(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values, strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(self.state)


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    ChaosStrategy.register_strategies(StrategyRegistry)


_register()
