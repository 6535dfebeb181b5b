"""ChaosStrategy: ``Trainer(strategy="chaos")``, elastic data parallelism in place.

Role in the whole: the layer users touch.  It reads like a list of the places
where elasticity enters Lightning; everything else is inherited from
``DDPStrategy`` or delegated to the layers below:

* membership and per-epoch stores: :mod:`chaos_lightning.rendezvous`;
* the process group, switched in place and abortable:
  :class:`~chaos_lightning.strategy.process_group.ElasticProcessGroup`;
* which samples each rank trains: :class:`~chaos_lightning.strategy.sampler.ElasticSampler`.

Process model: one process per device, started by the user's own command; no
Lightning launcher.  The first committed view with at least ``min_nodes``
members starts training; every member builds the process group of that
view's epoch from the rendezvous store.

Per step (no DDP wrapper): after backward, one bucketed all-reduce carries
each rank's gradients multiplied by its sample count, plus control values:
the sample count, the newest view epoch this rank knows, and one leave flag
per rank (so every rank knows who leaves).  Gradients are divided by the total sample count (uneven
and empty batches average correctly), and the control values tell every rank,
at the same step and without an extra round trip, whether a switch is due.

At a step boundary (``on_train_batch_end``) a due switch happens: leavers
leave; the others wait for a committed view that excludes them (and, after a
failed step, one newer than the failed group's), build its group, and agree
again if two survivors picked different views (the group init times out and
they retry on a newer view).  A step whose all-reduce failed or was abandoned
(the membership layer reported a member failed) applies no update on any
survivor that noticed; survivors reconcile after the switch: if some did
complete the step, their parameters and optimizer state are broadcast to the
others, so replicas stay bit-identical, and the sampler commits or returns the
step's samples accordingly.

Joiners warm up first and ask to join at train start; the members pause at
the step boundary and the joiners pull the live state from up to
``max_sources`` of them in parallel (:mod:`chaos_lightning.replication`:
bandwidth-aware shards, re-fetch on a dead source or a bad checksum).  Gradient clipping acts on the averaged
gradient, as under DDP.  What is still missing is listed in docs/strategy.md.
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
import torch.distributed as dist
from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.loggers.utilities import _log_hyperparams
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.view import View
from chaos_lightning.rendezvous import create as create_rendezvous
from chaos_lightning.replication.neighbors import DEFAULT_MAX_SOURCES, Source, choose_sources
from chaos_lightning.replication.snapshot import Snapshot
from chaos_lightning.replication.transfer import PullError, PullResult, ShardServer, pull
from chaos_lightning.strategy.process_group import CollectiveError, CollectiveFailed, ElasticProcessGroup
from chaos_lightning.wire import load_secret
from chaos_lightning.strategy.sampler import ElasticBatchSampler, ElasticSampler, Ledger
from chaos_lightning.strategy.state import UnsupportedState, broadcast_tree, pack_tree, unpack_tree
from chaos_lightning.strategy.trace import Trace

log = logging.getLogger("chaos_lightning.strategy")

#: Member meta key holding the address of the node's shard server.
REPL_META_KEY = "repl"
#: rank_zero_only's rank before the join: any rank above 0 turns Lightning's
#: rank-zero writers into no-ops (``rank_zero_experiment`` tests ``rank > 0``).
_NOT_YET_RANKED = 1


class ChaosEnvironment(ClusterEnvironment):
    """Rank and world size follow the committed view; processes are the user's."""

    def __init__(self) -> None:
        self._rank = 0
        self._world = 1

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"  # unused: process groups come from the rendezvous store

    @property
    def main_port(self) -> int:
        return 0

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self._world

    def set_world_size(self, size: int) -> None:
        self._world = size

    def global_rank(self) -> int:
        return self._rank

    def set_global_rank(self, rank: int) -> None:
        self._rank = rank

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))  # device index on this host

    def node_rank(self) -> int:
        return self._rank


class ChaosStrategy(DDPStrategy):
    """Elastic DDP over peer-negotiated views (see the module docstring).

    Arguments default to the environment: ``CHAOS_BACKEND`` (``peer``),
    ``CHAOS_BIND`` (``127.0.0.1:0``), ``CHAOS_PEERS`` (empty: found the
    cluster), ``CHAOS_SECRET``, ``CHAOS_PRESET`` (``local``),
    ``CHAOS_MIN_NODES`` (1), ``CHAOS_GLOBAL_BATCH_SIZE`` (unset: the
    DataLoader's batch size per node; set: that many samples per step, split
    over the current world), ``CHAOS_MAX_SOURCES`` (8: how many members a
    joiner pulls the state from at once).  ``collective_timeout`` bounds every collective
    (the membership layer usually ends a stuck one much sooner).
    """

    strategy_name = "chaos"

    def __init__(
        self,
        *,
        backend: str | None = None,
        bind: str | None = None,
        peers: str | list[str] | None = None,
        secret: str | bytes | None = None,
        preset: str | None = None,
        min_nodes: int | None = None,
        global_batch_size: int | None = None,
        max_sources: int | None = None,
        join_timeout: float = 120.0,
        collective_timeout: float = 30.0,
        switch_timeout: float = 5.0,
        sideline_timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            cluster_environment=ChaosEnvironment(),
            process_group_backend="gloo",
            timeout=timedelta(seconds=collective_timeout),
            **kwargs,
        )
        env = os.environ
        if isinstance(peers, str) or peers is None:
            peers = [p.strip() for p in (peers if peers is not None else env.get("CHAOS_PEERS", "")).split(",") if p.strip()]
        self._rdv_args = dict(
            backend=backend or env.get("CHAOS_BACKEND", "peer"),
            bind=bind or env.get("CHAOS_BIND", "127.0.0.1:0"),
            peers=peers,
            secret=secret,
            preset=preset or env.get("CHAOS_PRESET", "local"),
            etcd_endpoints=env.get("CHAOS_ETCD_ENDPOINTS", "127.0.0.1:2379"),  # the etcd baseline only
        )
        self._min_nodes = int(min_nodes if min_nodes is not None else env.get("CHAOS_MIN_NODES", "1"))
        if global_batch_size is None and env.get("CHAOS_GLOBAL_BATCH_SIZE"):
            global_batch_size = int(env["CHAOS_GLOBAL_BATCH_SIZE"])
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"chaos: global_batch_size must be >= 1, got {global_batch_size}")
        self._global_batch_size = global_batch_size
        self._max_sources = int(max_sources if max_sources is not None else env.get("CHAOS_MAX_SOURCES", DEFAULT_MAX_SOURCES))
        self._secret = load_secret(secret)
        self._server: ShardServer | None = None
        self.last_pull: PullResult | None = None  # a joiner's state transfer, for logs and benchmarks
        self._restored_sampler_state: dict[str, Any] | None = None  # from a checkpoint (ckpt_path)
        self._join_timeout = join_timeout
        self._collective_timeout = collective_timeout
        self._switch_timeout = switch_timeout
        self._sideline_timeout = sideline_timeout
        # a member whose link to an older trainer is down trains no more
        # until the link is back, then takes the state like a newcomer
        self._sidelined_since: float | None = None
        # sidelined, or declared failed (a SIGSTOP, a partition) and rejoined:
        # what this replica holds is behind the members'
        self._stale = False
        self._orphaned = False  # came back stale to nobody to take the state from
        self._trace = Trace.from_env()  # CHAOS_TRACE: this node's timeline as JSON lines
        self._pg = ElasticProcessGroup()
        self._rdv = None
        self._view: View | None = None
        self._trainers: tuple[str, ...] = ()
        self._abort = threading.Event()
        self._group_lock = threading.Lock()  # _trainers and _abort, against the agent thread
        self._leave_requested = False
        self._left = False
        self._block_sync = False
        self._control: tuple[float, float, tuple[int, ...]] = (0.0, 0.0, ())  # summed samples and epochs; ranks leaving
        self._step_failed = False
        self._commits = 0  # steps committed since fit began (a joiner takes the members' count)
        self._received = False  # the last state sync loaded another member's state here
        self._gbuf: torch.Tensor | None = None  # flat gradients + control values, reused across steps
        # gradient accumulation: micro-batches of the current window already
        # done (their gradients wait for the window's one all-reduce), and
        # whether the last backward synced (the window's end)
        self._micro = 0
        self._synced = False
        self._window = 1  # micro-batches of the last synced window
        self.elastic_sampler: ElasticSampler | None = None
        self.ledger: Ledger | None = None
        self.events: list[dict[str, Any]] = []  # view changes with timings, for logs and tests

    # ---------------------------------------------------------------- launch
    def _configure_launcher(self) -> None:
        self._launcher = None  # the user starts one process per device

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        if self._view is not None:
            self.cluster_environment.set_global_rank(self._trainers.index(self.node_id))
            self.cluster_environment.set_world_size(len(self._trainers))
        rank_zero_only.rank = self.global_rank

    @property
    def node_id(self) -> str:
        return self._rdv.node_id if self._rdv is not None else ""

    def setup_distributed(self) -> None:
        """Only bind: a node asks to join once it is warm (model, optimizer
        and data set up, at train start), so members pause for the state
        transfer and the group rebuild, not for our imports.  Until then
        there is no process group, and Lightning's setup collectives are
        no-ops."""
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        # every node serves the state to joiners (replication layer); its
        # address travels in the member's meta
        host = self._rdv_args["bind"].rsplit(":", 1)[0]
        _pin_gloo_interface(host.strip("[]"))
        self._server = ShardServer()
        served = self._server.start((host, 0), secret=self._secret)
        self._rdv = create_rendezvous(**self._rdv_args, meta={REPL_META_KEY: f"{served[0]}:{served[1]}"})
        self._rdv.subscribe(self._on_membership_event)
        self._install_signal_handler()
        self._trace.node = self.node_id
        if self._trace.enabled:
            import psutil

            self._trace.emit("start", proc_start=psutil.Process().create_time(), bind=self._rdv_args["bind"])
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
        t0 = time.monotonic()
        deadline = t0 + self._join_timeout
        self._trace.emit("join_request")
        view = self._rdv.join(self._join_timeout)
        if view.size < self._min_nodes:
            with _progress(f"chaos: waiting for min_nodes={self._min_nodes}", total=self._min_nodes, unit="node") as bar:
                while view.size < self._min_nodes:
                    bar.n = view.size
                    bar.refresh()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(
                            f"chaos: {view.size} of min_nodes={self._min_nodes} nodes after {self._join_timeout}s"
                        )
                    view = self._rdv.next_view(view.epoch, min(left, 1.0)) or view
        if self._restored_sampler_state is not None and self.elastic_sampler is not None:
            # resumed from a checkpoint (ckpt_path): its cursor, whatever the
            # world size that wrote it; the sync below spreads it
            self.elastic_sampler.load_state_dict(self._restored_sampler_state)
            self._restored_sampler_state = None
        view = self._rebuild(
            trainer, view, lambda v: self.node_id in v.connected() and len(v.connected()) >= self._min_nodes, 0, deadline
        )
        self.elastic_sampler.reconfigure(self.global_rank, self.world_size)
        _reset_epoch_length(trainer, self.elastic_sampler, new_epoch=True)
        _reset_val_dataloaders(trainer)
        if self.global_rank == 0 and trainer.enable_autolog_hparams:
            _log_hyperparams(trainer)  # what Lightning skipped at setup, where the run's folder is
        took = time.monotonic() - t0
        self.events.append({"epoch": view.epoch, "world": self.world_size, "stall_s": took, "joined": True})
        self._trace_group(took, joined=True, failed_step=False)
        log.info("chaos: training in epoch %d with world %d", view.epoch, self.world_size)
        self._log_view(trainer, took)

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
                        self._trace.emit("sidelined", epoch=view.epoch, down_links=[list(p) for p in view.down_links])
                        bar = _progress("chaos: sidelined (a link is down), waiting for it")
                        bar.__enter__()
                    deadline = max(deadline, self._sidelined_since + self._sideline_timeout)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chaos: no usable view after {self._join_timeout}s")
                view = self._rdv.next_view(view.epoch if view is not None else 0, min(left, 1.0)) or view
                if bar is not None:
                    bar.refresh()
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)

    def _install_signal_handler(self) -> None:
        """Called at setup and again at train start, because Lightning's
        signal connector installs its own SIGTERM handler in between and would
        chain ours behind one that ends fit with SIGTERMException."""
        if threading.current_thread() is not threading.main_thread():
            return

        # SIGTERM means "leave gracefully".  Lightning's own handler (installed
        # just before, it raises SIGTERMException and ends fit with an error)
        # is replaced, not chained.
        def on_sigterm(signum: int, frame: Any) -> None:
            log.info("chaos: SIGTERM, leaving at the next step boundary")
            self.request_leave()

        signal.signal(signal.SIGTERM, on_sigterm)

    def request_leave(self) -> None:
        """Leave gracefully at the next step boundary (fit then returns)."""
        self._leave_requested = True

    def _on_membership_event(self, event: object) -> None:
        # Agent thread: only flags.  Any news that a member we train with is
        # gone ends a collective waiting on it (no gloo timeout).  The node
        # that confirmed a failure hears MemberFailed before the commit; the
        # others hear only the committed view without it (measured: one
        # survivor of a SIGSTOP then waited out the 30 s collective timeout).
        if isinstance(event, ev.ViewChanged):
            v = event.view
            self._trace.emit("view_committed", epoch=v.epoch, members=list(v.ids), down_links=[list(p) for p in v.down_links])
        if not isinstance(event, (ev.MemberFailed, ev.ViewChanged, ev.Removed)):
            return
        with self._group_lock:
            if isinstance(event, ev.Removed) and not event.graceful and self._trainers:
                log.warning("chaos: this node was declared failed in epoch %d; rejoining", event.view.epoch)
                self._trace.emit("removed", epoch=event.view.epoch)
                self._stale = True
            trainers = set(self._trainers)
            # a down link between two trainers leaves one out of the next
            # group: on real links the collective would hang on it
            gone = {event.node} if isinstance(event, ev.MemberFailed) else trainers - set(event.view.connected())
            if gone & trainers:
                self._abort.set()

    def _build_group(self, view: View, trainers: tuple[str, ...]) -> None:
        rank = trainers.index(self.node_id)
        # the PG timeout also bounds every gloo op of the group, so it is the
        # collective timeout, not a short init bound (a slow step would fail)
        store = self._rdv.store(view, timeout=self._switch_timeout)
        self._pg.switch(rank, len(trainers), store, self._collective_timeout)
        with self._group_lock:
            self._abort.clear()
            self._view, self._trainers = view, trainers
            # news that arrived while the group formed (one of its members
            # already gone) must still end its first collective
            if set(trainers) - set(self._rdv.current_view().ids):
                self._abort.set()
        self.set_world_ranks()

    # ---------------------------------------------------------------- model
    def setup_environment(self) -> None:
        # Here, not in setup(): Lightning restores callback state from
        # ``ckpt_path`` before it calls the strategy's setup.
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and not any(isinstance(c, ChaosCallback) for c in trainer.callbacks):
            # first, so a step is committed before any other callback's
            # on_train_batch_end (ModelCheckpoint must save the committed cursor)
            trainer.callbacks.insert(0, ChaosCallback(self))
        super().setup_environment()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # no DDP wrapper: gradients are synced in post_backward

    def configure_ddp(self) -> None:
        self.model = self.lightning_module  # replicas are made equal at start_training

    def _broadcast_module_state(self, src: int) -> None:
        with torch.no_grad():
            for t in list(self.lightning_module.parameters()) + list(self.lightning_module.buffers()):
                dist.broadcast(t.data, src)

    @contextmanager
    def block_backward_sync(self):  # type: ignore[override]
        self._block_sync = True
        try:
            yield None
        finally:
            self._block_sync = False

    # ---------------------------------------------------------------- Lightning's own collectives
    # Lightning reduces logged metrics (``sync_dist``), waits at barriers and
    # broadcasts small objects (ModelCheckpoint's paths) outside the training
    # step.  They run on the current group, abortable like the gradient
    # all-reduce: a member that fails meanwhile makes them return the local
    # value (logged) instead of raising in the middle of validation, and the
    # broken group makes the next training step fail and switch views.
    _REDUCE_OPS = {
        "mean": ("SUM", True), "avg": ("SUM", True), "sum": ("SUM", False), "max": ("MAX", False), "min": ("MIN", False),
    }

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if not isinstance(tensor, torch.Tensor) or self._pg.group is None or group is not None:
            return super().reduce(tensor, group, reduce_op)
        name = reduce_op.lower() if isinstance(reduce_op, str) else None
        if name is None:
            ops = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}
            name = next((n for op, n in ops.items() if reduce_op == op), None)
        if name not in self._REDUCE_OPS:
            return super().reduce(tensor, group, reduce_op)
        op, mean = self._REDUCE_OPS[name]
        result = tensor.clone() if tensor.is_floating_point() or not mean else tensor.float()
        try:
            self._pg.all_reduce(result, abort=self._abort, timeout=self._collective_timeout, op=getattr(dist.ReduceOp, op))
        except CollectiveError as exc:
            log.warning("chaos: metric reduction failed (%s); using this rank's value", exc)
            return tensor
        return result / self.world_size if mean else result

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._pg.group is None:
            return
        try:
            self._pg.all_reduce(torch.zeros(1), abort=self._abort, timeout=self._collective_timeout)
        except CollectiveError as exc:
            log.warning("chaos: barrier failed (%s)", exc)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Small tensor-free objects go as msgpack over an abortable all-reduce
        (no pickle); anything else takes Lightning's pickled path."""
        if self._pg.group is None:
            return obj
        data = b""
        if self.global_rank == src:
            try:
                data, tensors = pack_tree(obj)
                data = data if not tensors else b""
            except UnsupportedState:
                data = b""
        try:
            size = torch.tensor([len(data) if self.global_rank == src else 0], dtype=torch.int64)
            self._pg.all_reduce(size, abort=self._abort, timeout=self._collective_timeout)
            if int(size.item()) == 0:
                return super().broadcast(obj, src)
            buf = torch.zeros(int(size.item()), dtype=torch.uint8)
            if self.global_rank == src:
                buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self._pg.all_reduce(buf, abort=self._abort, timeout=self._collective_timeout)
        except CollectiveError as exc:
            log.warning("chaos: broadcast failed (%s); keeping this rank's value", exc)
            return obj
        return unpack_tree(bytes(buf.numpy().tobytes()), [])

    # ---------------------------------------------------------------- data
    def process_dataloader(self, dataloader: object) -> object:
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        # the training loader is processed while fitting outside the sanity
        # check and validation (Lightning does not pass the stage here)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if not fitting or trainer.sanity_checking or trainer.validating or not isinstance(dataloader, DataLoader):
            return dataloader
        if isinstance(dataloader.batch_sampler, ElasticBatchSampler):
            return dataloader
        batch_size = dataloader.batch_size
        if batch_size is None:
            raise ValueError("chaos: the training DataLoader needs a batch_size (the per-rank batch)")
        sequential = isinstance(dataloader.sampler, torch.utils.data.SequentialSampler)
        shuffle = bool(getattr(dataloader.sampler, "shuffle", not sequential))
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        # per-rank batch fixed (the DataLoader's), or the global batch fixed
        # and split over the current world
        sizes = {"global_batch_size": self._global_batch_size} if self._global_batch_size else {"batch_size": batch_size}
        sampler = ElasticSampler(
            dataloader.dataset, rank=self.global_rank, world_size=self.world_size, shuffle=shuffle, seed=seed, **sizes
        )
        self.elastic_sampler = sampler
        self.ledger = Ledger(sampler.num_samples)
        return DataLoader(
            dataloader.dataset,
            batch_sampler=ElasticBatchSampler(sampler, pad_empty=True),
            num_workers=dataloader.num_workers,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
        )

    # ---------------------------------------------------------------- gradients
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if self._block_sync or self.elastic_sampler is None:
            return
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        # The samples this rank's accumulated gradient covers (every micro-batch
        # of the window) and all ranks' together: both follow from the shared
        # layout, so the weight n / total is known before the reduction and
        # the summed result is already the mean over the window's samples.
        sampler = self.elastic_sampler
        window = range(self._micro + 1)
        n = float(sum(len(sampler.batch_for(j)) for j in window))
        total = float(sum(len(sampler.block(j)) for j in window))
        self._synced = True
        epoch = float(self._rdv.current_view().epoch)
        # One copy into a persistent buffer, weighted and reduced in place,
        # and the gradients become views of it.  Measured on a 1.4 M-parameter
        # MLP (cProfile, 600 steps): per-parameter temporaries, a cat, a
        # private clone and copies back cost 3.0 ms of CPU per step; a cat
        # into a fresh buffer still 1.35 ms, because backward has just taken
        # the memory the last buffer freed, so every step's 5.5 MB is a new
        # mapping to fault in (the same cat in a loop that frees and
        # reallocates: 0.20 ms).  After a failure the buffer is dropped, never
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
        # control values: samples, view epoch, then one leave flag per rank
        # (who leaves is known at the boundary without another round trip)
        control = self._control_size()
        flat[-control:].zero_()
        flat[-control] = n
        flat[-control + 1] = epoch
        if self._leave_requested:
            flat[-control + 2 + self.global_rank] = 1.0
        flat[:-control].mul_(n / total if total > 0 else 0.0)
        try:
            self._pg.all_reduce(flat, abort=self._abort, timeout=self._collective_timeout, in_place=True)
        except CollectiveError as exc:
            # No gradient, no update: the optimizer skips parameters whose
            # grad is None (raising instead would break Lightning's closure).
            log.warning("chaos: gradient all-reduce failed (%s); the step applies no update", exc)
            self._step_failed = True
            self._gbuf = None
            for p in params:
                p.grad = None
            return
        values = flat[-control:].tolist()
        summed, epochs = values[0], values[1]
        leavers = tuple(i for i, f in enumerate(values[2:]) if f > 0.5)
        if summed != total:
            # every rank derives its share from the same layout; a mismatch is a bug
            log.error("chaos: ranks trained %g samples, the layout says %g", summed, total)
        self._control = (summed, epochs, leavers)
        offset = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                p.grad = flat[offset : offset + k].view_as(p).to(p.dtype)  # a view when dtypes match
                offset += k

    def _control_size(self) -> int:
        """Control values at the end of the gradient buffer: samples, epoch, a leave flag per rank."""
        return 2 + len(self._trainers)

    def _grad_buffer(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The flat gradient buffer (plus the control values), reused across steps."""
        numel = sum(p.numel() for p in params) + self._control_size()
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
        if not self._synced:
            # a micro-step of gradient accumulation: nothing synced, nothing
            # to commit or decide until the window's last micro-batch
            self._micro += 1
            return
        self._window, self._micro, self._synced = self._micro + 1, 0, False
        failed, self._step_failed = self._step_failed, False
        total, epochs, leavers = self._control
        leaves = len(leavers)
        if not failed:
            for _ in range(self._window):  # one optimizer step trained the window's blocks
                trained = sampler.commit_step()
                self.ledger.record(sampler.epoch, trained)
            self._commits += 1
            if self._trace.enabled:  # the per-step path: not even the arguments without a trace
                self._trace.emit("step", step=trainer.global_step, samples=int(total), world=self.world_size)
        else:
            self._trace.emit("step_failed", step=trainer.global_step)
        due = failed or leaves > 0 or epochs != len(self._trainers) * self._view.epoch
        if not due:
            return
        if not failed and leaves == 0 and sampler.steps_remaining() == 0:
            # A newer view (a join) at the epoch's last step: switch at the
            # next epoch's first step instead.  A joiner handed an exhausted
            # epoch would end fit at once ("No training batches"), and the
            # members' end-of-epoch validation runs on the group it started
            # on.  Shared values only, so every member decides alike; a
            # failure hidden in that view fails the next step and switches then.
            return
        t0 = time.monotonic()
        exclude: set[str] = set()
        newer = failed
        if not failed and leaves > 0:
            exclude = {self._trainers[i] for i in leavers}
            if self.node_id in exclude:
                self._leave(trainer)
                return
        self._switch(trainer, exclude, failed, t0, newer)

    def _leave(self, trainer: Any) -> None:
        # the view without us first: the members wait for it, not for our
        # group's teardown (measured 90 ms at 9 processes on 2 cores)
        self._rdv.leave(30.0)
        self._pg.close()
        self._left = True
        self._trace.emit("left", step=trainer.global_step)
        trainer.should_stop = True
        log.info("chaos: left the cluster at global step %d", trainer.global_step)

    def _switch(self, trainer: Any, exclude: set[str], failed: bool, t0: float, newer: bool | None = None) -> None:
        old_epoch = self._view.epoch
        newer = failed if newer is None else newer

        def usable(v: View) -> bool:
            if v.epoch < old_epoch or exclude & set(v.ids) or self.node_id not in v.connected():
                return False
            return v.epoch > old_epoch or not newer  # a broken group is never rebuilt as is

        deadline = time.monotonic() + self._join_timeout
        view = self._rebuild(trainer, self._rdv.current_view(), usable, 1 if failed else 2, deadline)
        self.elastic_sampler.reconfigure(self.global_rank, self.world_size)
        _reset_epoch_length(trainer, self.elastic_sampler)
        _reset_val_dataloaders(trainer)
        took = time.monotonic() - t0
        if self._orphaned:
            # back from the sideline, and no member left that trained on:
            # training again from our stale state would repeat samples
            log.error("chaos: no member holds the training state any more (they finished or failed); ending fit")
            self._trace.emit("orphaned", epoch=view.epoch)
            trainer.should_stop = True
            return
        self.events.append({"epoch": view.epoch, "world": self.world_size, "stall_s": took, "failed_step": failed})
        log.info("chaos: switched to epoch %d, world %d, in %.3fs", view.epoch, self.world_size, took)
        self._trace_group(took, joined=False, failed_step=failed)
        self._log_view(trainer, took)

    def _trace_group(self, stall_s: float, *, joined: bool, failed_step: bool) -> None:
        switch = self._pg.last_switch
        self._trace.emit(
            "trainers", epoch=self._view.epoch, world=self.world_size, trainers=list(self._trainers), stall_s=stall_s,
            joined=joined, failed_step=failed_step, group_init_s=switch.init_s if switch is not None else None,
        )

    def _log_view(self, trainer: Any, stall_s: float) -> None:
        """Every view this node trains in goes to the loggers (rank 0 of the view writes)."""
        metrics = {
            "chaos/world_size": float(self.world_size), "chaos/view_epoch": float(self._view.epoch), "chaos/stall_s": stall_s,
        }
        if self.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, trainer.global_step)

    def _rebuild(self, trainer: Any, view: View | None, usable: Callable[[View], bool], code: int, deadline: float) -> View:
        """Form the group of the first usable view and make replicas identical
        in it; if a member fails during the state sync (a joiner dies
        mid-transfer, a source dies before the end), try again on a newer view."""
        floor = -1
        while True:
            view = self._form_group(view, lambda v: usable(v) and v.epoch > floor, deadline)
            if self._stale:
                code = 0  # the others trained on without us: take the state like a newcomer
                if self.ledger is not None and self.elastic_sampler is not None:
                    # our commits since the members last heard from us may not be
                    # theirs (a step we applied that they aborted): the epoch's
                    # record is theirs from here on, not ours
                    self.ledger.forget(self.elastic_sampler.epoch)
            try:
                self._sync_state(trainer, code)
                self._sidelined_since = None
                self._stale = False
                return view
            except CollectiveError as exc:
                log.warning("chaos: state sync in epoch %d failed (%s); waiting for the next view", view.epoch, exc)
                floor = view.epoch
                if code == 0 and self._received:
                    code = 2  # we hold the members' state now, whatever failed after

    def _collective(self, tensor: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        return self._pg.all_reduce(tensor, abort=self._abort, timeout=timeout or self._collective_timeout)

    def _sync_state(self, trainer: Any, code: int) -> None:
        """Make every replica identical after a group change.

        ``code``: 2 = trained and applied the last step, 1 = trained but
        aborted the last step (it committed elsewhere, maybe), 0 = no state
        yet (a newcomer, a member back from the sideline or from being
        declared failed, or everyone at the very start).  With it goes the
        count of steps this replica committed: a failure can strike while
        some members have committed a step and others aborted it, and the
        ones that committed may even abort the next (measured: a kill -9
        left two survivors one step ahead of the third, all with code 1, and
        their sample layouts disagreed from then on).  So the freshest
        replicas are those with the most commits, then the highest code;
        they hold the state and the others receive it.

        When only code-0 ranks receive (a join), they pull it from up to
        ``max_sources`` holders in parallel (:meth:`_pull_state`, the
        replication layer).  Otherwise (the very start, or survivors of a
        step that committed on some of them only) the lowest holder
        broadcasts: parameters and buffers in place, then one state tree
        (:mod:`.state`).  Nothing is sent when all are equally fresh.  Raises
        :class:`CollectiveError` if a member fails meanwhile.
        """
        self._received = False
        info = torch.zeros(2 * self.world_size)
        info[2 * self.global_rank] = float(code)
        info[2 * self.global_rank + 1] = float(self._commits if code > 0 else -1)
        self._collective(info)
        values = [int(v) for v in info.tolist()]
        keys = [(values[2 * r + 1], values[2 * r]) for r in range(self.world_size)]  # (commits, code)
        best_key = max(keys)
        best = best_key[1]
        log.info("chaos: state sync (commits, code) per rank: %s", keys)
        if best > 0 and min(keys) == best_key:
            return
        if best == 0 and self._stale:
            self._orphaned = True  # nobody here trained on: nothing to take (_switch ends fit)
            return
        if best > 0 and all(k == best_key or k[1] == 0 for k in keys):
            self._pull_state(trainer, [r for r, k in enumerate(keys) if k == best_key])
            return
        src = keys.index(best_key)
        mine = keys[self.global_rank]
        receiving = self.global_rank != src and mine < best_key
        try:
            self._broadcast_module_state(src)
            state = broadcast_tree(self._training_state(trainer) if self.global_rank == src else None, src, self.global_rank)
        except RuntimeError as exc:  # gloo: a peer reset the connection
            raise CollectiveFailed(f"state broadcast: {exc}") from exc
        if self.global_rank != src:
            _adopt_output_paths(trainer, state["paths"])
        if not receiving:
            return
        sampler = self.elastic_sampler
        if code == 1 and best_key[0] - mine[0] == 1:
            # the step we aborted did commit elsewhere: record its blocks (one
            # per micro-batch of the window, still laid out for the old world,
            # as on src when it committed)
            for j in range(self._window):
                self.ledger.record(sampler.epoch, sampler.block(j))
        self._load_training_state(trainer, state, progress=code == 0)
        if code > 0 and trainer.global_step != state["step"]:
            # the holders tried one step more than we did (the one they
            # aborted after committing ours): count steps as they do
            _load_step(trainer, state["step"])
        self._received = True

    def _pull_state(self, trainer: Any, holders: list[int]) -> None:
        """Holders publish a snapshot of the full state on their shard server
        and wait; newcomers pull it from several of them at once.

        The holders are replicas, so each can serve every shard; they are
        paused at this step boundary until every newcomer reports, so the
        snapshot is served straight from the live tensors (no copy) and cannot
        change under the transfer.  The holders' idle time is the pull.
        """
        holding = self.global_rank in holders
        if holding:
            meta, tensors = pack_tree(self._full_state(trainer))
            snapshot = Snapshot(meta, tensors)
            self._server.publish(snapshot)
            log.info(
                "chaos: serving the state (%.1f MB, %d shards) to %d newcomer(s)",
                snapshot.manifest.total_bytes / 1e6, len(snapshot.manifest.shards), self.world_size - len(holders),
            )
        try:
            self._collective(torch.ones(1))  # every snapshot is published
            ok = 1.0
            if not holding:
                ok = 1.0 if self._pull_from([self._view.member(self._trainers[r]) for r in holders], trainer) else 0.0
            flags = torch.tensor([ok])
            # holders wait here for the pull: bounded by the join timeout,
            # ended at once if a member fails
            self._collective(flags, timeout=self._join_timeout)
        finally:
            if holding:
                self._server.retract()
        if flags.item() < self.world_size:
            raise CollectiveFailed("a newcomer could not pull the state")

    def _pull_from(self, holders: list[Any], trainer: Any) -> bool:
        candidates = [Source(m.id, dict(m.meta).get(REPL_META_KEY, "")) for m in holders]
        candidates = [c for c in candidates if c.addr]
        monitor = getattr(getattr(self._rdv, "agent", None), "monitor", None)
        estimates = monitor.links.estimates() if monitor is not None else {}
        chosen, rates = choose_sources(candidates, estimates, self._max_sources)
        desc = f"chaos: pulling the state from {len(chosen)} member(s)"
        with _progress(desc, unit="B", unit_scale=True, unit_divisor=1024) as bar:

            def progress(received: int, total: int) -> None:
                bar.total = total
                bar.update(received - bar.n)

            try:
                result = pull(
                    [c.addr for c in chosen], self._secret, rates=rates, timeout=self._join_timeout, on_progress=progress
                )
            except PullError as exc:
                log.error("chaos: could not pull the state from %s: %s", [c.node for c in chosen], exc)
                return False
        self._load_full_state(trainer, unpack_tree(result.meta, result.tensors))
        self._received = True
        self.last_pull = result
        node_of = {c.addr: c.node for c in chosen}
        if monitor is not None:
            for report in result.sources:
                if report.bytes and report.seconds and report.addr in node_of:
                    monitor.record_transfer(node_of[report.addr], report.bytes, report.seconds, "down")
        log.info(
            "chaos: pulled %.1f MB from %d members in %.3fs", result.total_bytes / 1e6, len(chosen), result.seconds
        )
        self._trace.emit(
            "pull", bytes=result.total_bytes, seconds=result.seconds,
            sources=[{"node": node_of.get(r.addr, r.addr), "bytes": r.bytes, "seconds": r.seconds} for r in result.sources],
        )
        return True

    def _full_state(self, trainer: Any) -> dict[str, Any]:
        module = self.lightning_module
        return {
            "module": [t.detach() for t in list(module.parameters()) + list(module.buffers())],
            "training": self._training_state(trainer),
        }

    def _load_full_state(self, trainer: Any, state: dict[str, Any]) -> None:
        module = self.lightning_module
        with torch.no_grad():
            for dst, src in zip(list(module.parameters()) + list(module.buffers()), state["module"], strict=True):
                dst.copy_(src)
        self._load_training_state(trainer, state["training"], progress=True)

    def _training_state(self, trainer: Any) -> dict[str, Any]:
        """Everything but parameters and buffers that replicas must share."""
        loop = trainer.fit_loop
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [cfg.scheduler.state_dict() for cfg in self.lr_scheduler_configs],
            "precision": self.precision_plugin.state_dict(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks if not isinstance(cb, ChaosCallback)},
            "sampler": self.elastic_sampler.state_dict(),
            "epoch": loop.epoch_progress.current.completed,
            "step": trainer.global_step,
            "commits": self._commits,
            "paths": {
                "log_versions": [getattr(lg, "_version", None) for lg in trainer.loggers],
                "checkpoint_dirs": [cb.dirpath for cb in trainer.checkpoint_callbacks],
            },
        }

    def _load_training_state(self, trainer: Any, state: dict[str, Any], progress: bool) -> None:
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        for cfg, sched_state in zip(self.lr_scheduler_configs, state["schedulers"], strict=True):
            cfg.scheduler.load_state_dict(sched_state)
        if state["precision"]:
            self.precision_plugin.load_state_dict(state["precision"])
        callbacks = state["callbacks"]
        for cb in trainer.callbacks:
            if cb.state_key in callbacks and callbacks[cb.state_key]:
                cb.load_state_dict(callbacks[cb.state_key])
        self.elastic_sampler.load_state_dict(state["sampler"])
        self._commits = state["commits"]
        _adopt_output_paths(trainer, state["paths"])
        if progress:
            _load_progress(trainer, state["epoch"], state["step"])

    # ---------------------------------------------------------------- teardown
    def teardown(self) -> None:
        module = self.lightning_module
        step = module.trainer.global_step if module is not None and module._trainer is not None else None
        super().teardown()
        self._trace.emit("done", step=step)
        if not self._left and self._rdv is not None:
            self._pg.close()
        if self._rdv is not None:
            self._rdv.close()
            self._rdv = None
        if self._server is not None:
            self._server.close()
            self._server = None
        self._trace.close()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "chaos" not in strategy_registry:
            strategy_registry.register("chaos", cls, description="elastic, self-healing data parallel (chaos_lightning)")


class ChaosCallback(Callback):
    """Puts the strategy's step boundary where Lightning has finished a step
    and not yet fetched the next batch (``on_train_batch_end``), and keeps
    the sampler's cursor in checkpoints."""

    def __init__(self, strategy: ChaosStrategy) -> None:
        self._strategy = strategy
        self._shown_world: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._shown_world = None  # Lightning cleared its metrics for this run
        if isinstance(trainer.strategy, ChaosStrategy):
            trainer.strategy._install_signal_handler()
            # Lightning broadcasts a SIGTERM flag from rank 0 before every
            # step: a collective we cannot abort (a hung peer stalled the
            # survivors for the full 30 s PG timeout, measured) and an extra
            # round trip per step.  SIGTERM is ours here (leave at the next
            # boundary, carried in the gradient all-reduce), so drop it.
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
            trainer.strategy.start_training(trainer)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's cursor, so ``ckpt_path`` resumes mid-epoch with exactly-once intact."""
        sampler = self._strategy.elastic_sampler
        return {"sampler": sampler.state_dict()} if sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the dataloaders exist: the
        # strategy applies this once it has its sampler (at train start).
        if "sampler" in state_dict:
            self._strategy._restored_sampler_state = state_dict["sampler"]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, ChaosStrategy) and strategy.elastic_sampler is not None:
            _reset_epoch_length(trainer, strategy.elastic_sampler, new_epoch=True)

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


def _reset_epoch_length(trainer: Any, sampler: ElasticSampler, new_epoch: bool = False) -> None:
    """Make Lightning's epoch as long as the sampler's remaining steps."""
    fit_loop = trainer.fit_loop
    remaining = sampler.steps_remaining()
    combined = fit_loop._combined_loader
    if combined is None:
        return
    combined.limits = [remaining]
    epoch_loop = fit_loop.epoch_loop
    # a new epoch counts from 0, except when Lightning resumes one mid-way
    # from a checkpoint: it keeps the batches already done in the counter
    ready = epoch_loop.batch_progress.current.ready if (not new_epoch or epoch_loop.restarting) else 0
    if not new_epoch and fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)  # drop batches planned under the old layout
    fit_loop.max_batches = ready + remaining
    if not new_epoch:
        # The fetcher flagged the step it served as the epoch's last under the
        # old plan; Lightning ends the epoch on that flag alone.  A failed last
        # step puts its samples back, so the epoch goes on (measured: without
        # this, a failed last window lost its 16 samples from the epoch).
        epoch_loop.batch_progress.is_last_batch = remaining == 0
    interval = trainer.val_check_interval
    if isinstance(interval, float) and trainer.val_check_batch is not None and trainer.val_check_batch != float("inf"):
        # a fraction of the epoch, as Lightning computes it at setup, but of
        # the epoch's current length
        trainer.val_check_batch = max(1, int(fit_loop.max_batches * interval))


def _pin_gloo_interface(host: str) -> None:
    """Make gloo use the interface of the address we bind.

    Gloo picks its address from the host name unless ``GLOO_SOCKET_IFNAME``
    names an interface; inside a network namespace (or on a host whose name
    resolves to loopback) the name gave an address the peers cannot reach
    (measured on the testbed: "connectFullMesh failed ... Connection
    refused", and no group ever formed).  A user's own setting wins.
    """
    import ipaddress

    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return  # a host name: leave it to gloo
    if ip.is_loopback or ip.is_unspecified:
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == str(ip) for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def _progress(desc: str, **kwargs: Any) -> Any:
    """A progress display on stderr for a wait or transfer that may take a
    while: tqdm (Lightning's own dependency), shown only once it has lasted
    two seconds, and gone when done."""
    from tqdm import tqdm

    return tqdm(desc=desc, delay=2.0, leave=False, dynamic_ncols=True, mininterval=1.0, **kwargs)


def _reset_val_dataloaders(trainer: Any) -> None:
    """Lightning builds the validation loader once, with the ``DistributedSampler``
    of the world at that time; drop it so the next validation builds one for
    the current world (every member evaluates its share, ``sync_dist`` reduces
    over the current members)."""
    trainer.fit_loop.epoch_loop.val_loop._combined_loader = None


def _adopt_output_paths(trainer: Any, paths: dict[str, Any]) -> None:
    """Log version and checkpoint folders as the sender has them.

    Lightning picks them at setup, when every node still believes it is rank
    0 (there is no group before the join) and its broadcast of the checkpoint
    folder is a no-op: two nodes sharing a root dir picked ``version_0`` and
    ``version_1``.  Whoever is rank 0 later must write where the run writes.
    """
    versions, dirs = paths["log_versions"], paths["checkpoint_dirs"]
    if len(versions) == len(trainer.loggers):
        for logger, version in zip(trainer.loggers, versions):
            if version is not None and hasattr(logger, "_version") and logger._version != version:
                logger._version = version
                if hasattr(logger, "_experiment"):
                    logger._experiment = None  # reopened in the adopted folder when next used
    if len(dirs) == len(trainer.checkpoint_callbacks):
        for cb, dirpath in zip(trainer.checkpoint_callbacks, dirs):
            if dirpath is not None:
                cb.dirpath = dirpath


def _load_progress(trainer: Any, epoch: int, global_step: int) -> None:
    """A newcomer continues the members' loop: same epoch, same global step.
    (Its epoch is as long as the steps the members have left in it.)"""
    fit_loop = trainer.fit_loop
    for tracker in (fit_loop.epoch_progress.current, fit_loop.epoch_progress.total):
        tracker.ready = tracker.started = tracker.processed = tracker.completed = epoch
    _load_step(trainer, global_step)


def _load_step(trainer: Any, global_step: int) -> None:
    """Lightning's global step (the optimizer steps tried, failed ones included)."""
    fit_loop = trainer.fit_loop
    step = fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    step.ready = step.completed = global_step
    fit_loop.epoch_loop._batches_that_stepped = global_step
