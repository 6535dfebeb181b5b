"""ChaosFabricStrategy: ``Fabric(strategy="chaos")``, elasticity for a Fabric training loop.

Role in the whole: the Fabric twin of :mod:`.strategy`.  Both are an
:class:`~.elastic.ElasticMember` (one member per process, the same step,
decision and state sync); this one finds the step in a loop the user wrote:

* ``fabric.launch()`` binds and starts the agent (no join yet);
* ``fabric.setup(model, optimizer[, scheduler=])``: no DDP wrapper (the
  gradients are reduced at the optimizer step); the modules, the optimizer
  and the scheduler are the replica;
* ``fabric.setup_dataloaders(train_loader, ...)``: the *first* loader set up
  is the training loader and draws from the elastic sampler (exactly once
  per epoch, across views); the others are returned unsharded, so every
  member evaluates all of them;
* the first ``iter()`` of the training loader (or of :meth:`~ChaosFabricStrategy.epochs`)
  joins: the node waits for ``min_nodes``, forms the group and takes the
  state of the members that trained;
* ``optimizer.step()`` is the step: it reduces the gradients of every batch
  drawn since the last step (gradient accumulation needs nothing else;
  ``fabric.no_backward_sync`` is accepted and changes nothing), together with
  the control record, in one launch; a failed reduction applies no update
  (:attr:`~.elastic.ElasticMember.step_applied` is False);
* the next ``next()`` on the training loader is the step boundary: the
  user's loop body has finished the step (scheduler step, logging), so a
  switch of views and a newcomer's state transfer happen there.  After a
  leave (SIGTERM) the loader yields nothing more.

The rule a user keeps: loop over ``fabric.strategy.epochs(max_epochs)`` (a
joiner arrives mid-fit, so its epochs are the cluster's), step once per
batch (or per window of accumulated batches, the epoch's last batch closing
a window: ``len(train_loader)`` follows the layout), and read
``fabric.strategy.global_step`` for a step count that travels with the state.
docs/compatibility.md lists what else is covered.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.strategy import Strategy
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from typing_extensions import override

from chaos_lightning.config import NodeConfig
from chaos_lightning.strategy import _lightning_internals as internals
from chaos_lightning.strategy import collectives
from chaos_lightning.strategy.devices import child_options, launcher_for
from chaos_lightning.strategy.elastic import ElasticMember
from chaos_lightning.strategy.environment import ChaosEnvironment
from chaos_lightning.strategy.process import take_sigterm
from chaos_lightning.strategy.sampler import StaleLayoutError, elastic_dataloader
from chaos_lightning.strategy.switch import Action, Decision

log = logging.getLogger("chaos_lightning.strategy")

__all__ = ["ChaosFabricStrategy"]

#: rank_zero_only's rank before the join (as in :mod:`.strategy`): nobody is rank 0 yet
_NOT_YET_RANKED = 1


def _set_rank_zero(rank: int) -> None:
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    rank_zero_only.rank = utils_rank_zero_only.rank = rank


class _NoSync:
    """``fabric.no_backward_sync``: nothing to skip, gradients are reduced at the optimizer step."""

    def no_backward_sync(self, module: Any, enabled: bool) -> AbstractContextManager:
        return nullcontext()


class ElasticLoader:
    """The training loader: batches of the elastic sampler, re-planned at every view switch.

    Not a ``DataLoader`` on purpose: Fabric's wrapper calls ``set_epoch`` on
    the samplers it finds at every ``iter()``; the epoch is the cluster's,
    and a joiner's first ``iter()`` must continue it, not restart epoch 0.
    """

    def __init__(self, strategy: ChaosFabricStrategy, loader: DataLoader) -> None:
        self._strategy = strategy
        self._loader = loader
        self._yielded = 0  # batches this pass over the epoch has given the user

    def __len__(self) -> int:
        """This pass's batches: those given so far plus those not drawn yet
        under the current layout (a view switch mid-epoch changes it), so
        ``i + 1 == len(loader)`` holds exactly at the epoch's last batch."""
        s = self._strategy
        return self._yielded + s.elastic_sampler.steps_remaining() - s._pending

    def __iter__(self) -> Iterator[Any]:
        s = self._strategy
        self._yielded = 0
        s._ensure_joined()
        s._at_boundary()
        sampler = s.elastic_sampler
        if s._done:
            return
        if sampler.steps_remaining() == 0 and s._pending == 0:
            sampler.set_epoch(sampler.epoch + 1)  # a plain ``for epoch in range(...)`` loop: the next epoch
        while True:
            generation = sampler.generation
            try:
                for batch in self._loader:
                    s._pending += 1
                    self._yielded += 1
                    s._step_starts()  # the user's step computes until its optimizer step (a SIGTERM there leaves now)
                    yield batch
                    s._at_boundary()
                    if s._done:
                        return
                    if sampler.generation != generation:
                        break  # a new layout (a switch, a failed step): plan again from the cursor
                else:
                    if s._pending:
                        raise RuntimeError(
                            f"chaos (Fabric): the epoch ended with {s._pending} batch(es) drawn since the last "
                            "optimizer.step(); with gradient accumulation, step at the epoch's last batch too "
                            "(stepping = (i + 1) % N == 0 or i + 1 == len(train_loader))"
                        )
                    return
            except StaleLayoutError:
                continue  # prefetching workers met the new layout first


class ChaosFabricStrategy(ElasticMember, DDPStrategy):
    """Elastic data parallelism for Fabric (see the module docstring).

    Takes the options of :class:`~chaos_lightning.strategy.strategy.ChaosStrategy`
    (``bind``, ``peers``, ``secret``, ``min_nodes``, ``global_batch_size``,
    ...; unset ones from the ``CHAOS_*`` environment), by keyword.
    """

    strategy_name = "chaos"

    def __init__(self, **options: Any) -> None:
        cfg = NodeConfig.resolve(**child_options(options))
        super().__init__(
            cluster_environment=ChaosEnvironment(), process_group_backend="gloo",
            timeout=timedelta(seconds=cfg.collective_timeout),
        )
        self._init_member(cfg)
        self._backward_sync_control = _NoSync()  # type: ignore[assignment]
        self._modules: list[torch.nn.Module] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._tracked: dict[str, Any] = {}  # name -> object with state_dict/load_state_dict
        self._loader: ElasticLoader | None = None
        self._joined = False
        self._pending = 0  # batches drawn from the training loader since the last step
        self._due: Decision | None = None  # a switch decided at the step, made at the boundary
        self._done = False  # left, orphaned or closed: the loops end
        self._closed = False
        self._epochs_used = False
        self._reduced: bool | None = None  # this step's gradients reduced early (for clipping): did it succeed
        self._loggers: list[Any] | None = None  # the Fabric's loggers, found at the join

    # ---------------------------------------------------------------- what a replica is
    @override
    def finishes_steps(self) -> bool:
        # one reduction per optimizer step, but LBFGS evaluates its closure (a backward) several times
        return self._optimizer is not None and not isinstance(self._optimizer, torch.optim.LBFGS)

    @override
    def replica_tensors(self) -> list[torch.Tensor]:
        return [t for m in self._modules for t in (*m.parameters(), *m.buffers())]

    @override
    def replica_params(self) -> list[torch.Tensor]:
        return [p for m in self._modules for p in m.parameters()]

    @override
    def replica_buffers(self) -> list[torch.Tensor]:
        return [b for m in self._modules for b in m.buffers()]

    @override
    def replica_state(self) -> dict[str, Any]:
        return {
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "precision": self.precision.state_dict(),
            "tracked": {name: obj.state_dict() for name, obj in self._tracked.items()},
            # resolved by the sender: a later rank 0 writes into the run's version folder
            "log_versions": internals.logger_versions(self._fabric_loggers()),
        }

    @override
    def load_replica_state(self, state: dict[str, Any]) -> None:
        if self._optimizer is not None and state["optimizer"] is not None:
            self._optimizer.load_state_dict(state["optimizer"])
        if state["precision"]:
            self.precision.load_state_dict(state["precision"])
        missing = set(self._tracked) - set(state["tracked"])
        if missing:
            raise RuntimeError(f"chaos: the members track no state named {sorted(missing)}; track the same objects on every node")
        for name, obj in self._tracked.items():
            obj.load_state_dict(state["tracked"][name])
        self.adopt_shared(state)

    @override
    def adopt_shared(self, state: dict[str, Any]) -> None:
        internals.adopt_logger_versions(self._fabric_loggers(), state.get("log_versions", []))

    def _fabric_loggers(self) -> list[Any]:
        if self._loggers is None:
            self._loggers = internals.fabric_loggers(self)
        return self._loggers

    def _now_training(self, took: float, *, joined: bool, failed_step: bool, recorded: bool = False) -> None:
        """Record a group this node trains in (``recorded``: its switch is in
        the record already: a step finished in it); as its rank 0, continue
        the run's logs."""
        if not recorded:
            self._record_switch(took, joined=joined, failed_step=failed_step)
        if self.global_rank == 0:
            internals.continue_logs(self._fabric_loggers())

    def track(self, name: str, obj: Any) -> None:
        """Make ``obj`` (anything with ``state_dict``/``load_state_dict``: an
        LR scheduler stepped by hand, an EMA, a metric) part of the replica
        that a joiner receives.  Every node tracks the same names."""
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"chaos: {name!r} has no state_dict/load_state_dict")
        self._tracked[name] = obj

    # ---------------------------------------------------------------- ranks and launch
    @override
    def _configure_launcher(self) -> None:
        self._launcher = launcher_for(self)

    @override
    def _set_world_ranks(self) -> None:
        self.set_world_ranks()

    def set_world_ranks(self) -> None:
        if self.group.view is not None and self.group.trainers:
            self.cluster_environment.set_global_rank(self.group.rank)
            self.cluster_environment.set_world_size(len(self.group.trainers))
            _set_rank_zero(self.global_rank)
        else:
            _set_rank_zero(_NOT_YET_RANKED)  # until the join nobody knows who rank 0 is

    @property
    @override
    def distributed_sampler_kwargs(self) -> None:  # type: ignore[override]
        return None  # Fabric keeps its DistributedSampler out; the training loader is ours

    @override
    def setup_environment(self) -> None:
        Strategy.setup_environment(self)  # the device; no process group until the join
        self._open_member()
        self.set_world_ranks()
        atexit.register(self.close)

    # ---------------------------------------------------------------- model, optimizer, data
    @override
    def setup_module_and_optimizers(self, module: torch.nn.Module, optimizers: list[Any], scheduler: Any = None) -> Any:
        module, optimizers, scheduler = super().setup_module_and_optimizers(module, optimizers, scheduler)
        if scheduler is not None:
            self.track("scheduler", scheduler)
        return module, optimizers, scheduler

    @override
    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self._modules.append(module)  # no DDP wrapper: gradients are reduced at the optimizer step
        collectives.route_metric_sync(module, collectives.metric_sync_fn(self))  # torchmetrics: abortable sync
        return module

    @override
    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise ValueError(
                "chaos (Fabric): one optimizer per training step: give one optimizer parameter groups for every "
                "model, or use Trainer(strategy='chaos') with manual optimization for several"
            )
        self._optimizer = optimizer
        return optimizer

    @override
    def process_dataloader(self, dataloader: DataLoader) -> Any:
        if self._loader is not None or not isinstance(dataloader, DataLoader):
            return dataloader  # evaluation loaders: every member sees all of it
        loader = elastic_dataloader(dataloader, rank=self.global_rank, world_size=self.world_size,
                                    global_batch_size=self.config.global_batch_size)
        self._adopt_sampler(loader.batch_sampler.sampler)
        self._loader = ElasticLoader(self, loader)
        return self._loader

    # ---------------------------------------------------------------- the loop
    @property
    def global_step(self) -> int:
        """Optimizer steps applied since the fit began (a joiner takes the members' count)."""
        return self.commits

    @property
    def current_epoch(self) -> int:
        return self.elastic_sampler.epoch if self.elastic_sampler is not None else 0

    def epochs(self, max_epochs: int) -> Iterator[int]:
        """The cluster's epochs up to ``max_epochs`` (exclusive): a joiner's
        first is the members' current one.  Joins on the first ``next()``."""
        self._epochs_used = True
        self._ensure_joined()
        while True:
            self._at_boundary()
            sampler = self.elastic_sampler
            if self._done:
                return
            if sampler.steps_remaining() == 0 and self._pending == 0:
                sampler.set_epoch(sampler.epoch + 1)
            if sampler.epoch >= max_epochs:
                self._hand_over_at_end()
                return
            yield sampler.epoch

    def _ensure_joined(self) -> None:
        if self._joined:
            return
        if self.elastic_sampler is None or not self._modules:
            raise RuntimeError(
                "chaos (Fabric): set up the model and optimizer (fabric.setup) and the training loader "
                "(fabric.setup_dataloaders) before the training loop starts"
            )
        take_sigterm(self._on_sigterm)
        t0 = time.monotonic()
        self._join_cluster(t0 + self.config.join_timeout)
        self._joined = True
        if self._joined_without_state():  # raises unless the members had finished
            self._done = True
            _set_rank_zero(_NOT_YET_RANKED)  # nothing of the run is here: write nothing
            return
        self._done = self._joined_at_the_end()
        self._lay_out()
        self._now_training(time.monotonic() - t0, joined=True, failed_step=False)
        if self.elastic_sampler.epoch > 0 and not self._epochs_used:
            log.warning(
                "chaos: joined in the cluster's epoch %d; loop over fabric.strategy.epochs(max_epochs) "
                "so this node ends with the members", self.elastic_sampler.epoch,
            )

    def _reduce_step(self, optimizer: Any) -> bool:
        """Reduce this step's gradients (once: clipping may have done it); whether it succeeded."""
        if self._reduced is None:
            self._ensure_joined()
            if self._pending == 0:
                raise RuntimeError(
                    "chaos (Fabric): an optimizer step with no batch drawn from the training loader since the last step"
                )
            params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            self._reduced = self._reduce_gradients(params, range(self._pending))
        return self._reduced

    @override
    def clip_gradients_norm(self, module: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Clip the reduced gradients (what every replica applies), as DDP does."""
        self._reduce_step(optimizer)
        return super().clip_gradients_norm(module, optimizer, *args, **kwargs)

    @override
    def clip_gradients_value(self, module: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        self._reduce_step(optimizer)
        return super().clip_gradients_value(module, optimizer, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """The training step: reduce, apply (if the reduction succeeded), commit, decide."""
        if self._done:
            return None
        out = self.precision.optimizer_step(optimizer, **kwargs) if self._reduce_step(optimizer) else None
        steps, self._pending, self._reduced = self._pending, 0, None
        decision = self._settle_step(steps, self.commits)
        if self.finished_switch_s is not None:
            # the step finished in the next group: lay the sampler out for it
            # and take the run's logs over (as its rank 0) now, before the
            # loop body logs this step
            took, self.finished_switch_s = self.finished_switch_s, None
            self._lay_out()
            self._now_training(took, joined=False, failed_step=True, recorded=True)
        if decision.action is Action.LEAVE:
            internals.hand_over_logs(self._fabric_loggers())  # written while still the one writing
            if self.stepping_down:  # a straggler: it stands by at the next batch, then rejoins
                self._due = decision
                return out
            self._leave_cluster(self.commits)
            self._done = True
            self.set_world_ranks()
        elif decision.action is Action.SWITCH:
            self._due = decision  # after the user's loop body, at the next batch
        return out

    def _at_boundary(self) -> None:
        """Between two steps (the training loader's next batch): make a due switch."""
        decision, self._due = self._due, None
        if decision is None:
            if self.shares_due is not None:  # adaptive shares: the loader plans again (a new generation)
                self._lay_out(self.shares_due)
            return
        t0 = time.monotonic()
        failed = not self.step_applied
        if decision.action is Action.LEAVE:  # a step-down (see optimizer_step)
            if not self._stand_by():
                self._done = True
                self.set_world_ranks()
                return
            failed = False
        else:
            self._switch(decision)
        self._lay_out()
        if self._orphaned:
            log.error("chaos: no member holds the training state any more (they finished or failed); stopping")
            self.trace.emit("orphaned", epoch=self.group.view.epoch)
            self._done = True
            return
        self._now_training(time.monotonic() - t0, joined=False, failed_step=failed)

    # ---------------------------------------------------------------- collectives
    @override
    def all_reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if not collectives.ours(group):
            return super().all_reduce(tensor, group, reduce_op)
        return self._user_reduce(tensor, reduce_op, lambda: super(ChaosFabricStrategy, self).all_reduce(tensor, None, reduce_op))

    @override
    def all_gather(self, tensor: Any, group: Any = None, sync_grads: bool = False) -> Any:
        if not collectives.ours(group):
            return super().all_gather(tensor, group, sync_grads)
        def lightnings() -> Any:
            return super(ChaosFabricStrategy, self).all_gather(tensor, None, sync_grads)

        return self._user_gather(tensor, sync_grads, lightnings)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._user_barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._user_broadcast(obj, src)  # msgpack only (BroadcastRefused, a TypeError, otherwise)

    # ---------------------------------------------------------------- the end
    def close(self) -> None:
        """Leave the cluster's agent and servers (at exit; idempotent)."""
        if self._closed:
            return
        self._closed = self._done = True
        self._close_member(self.commits)

    @override
    def teardown(self) -> None:
        self.close()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "chaos" not in strategy_registry:
            strategy_registry.register("chaos", cls, description="elastic, self-healing data parallel (chaos_lightning)")


def _register() -> None:
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    ChaosFabricStrategy.register_strategies(STRATEGY_REGISTRY)


_register()
