"""The stop-free join's joiner side: train as a shadow, pull behind, catch up by replay.

Role in the whole: with ``stop_free_join`` (docs/join.md), the switch that
admits a joiner moves only the small state (the loop, sampler, schedulers,
scaler, callbacks, the optimizers' hyperparameters); the holders *copy* the
parameters and optimizer state into a snapshot at that boundary and train
on.  The joiner trains in lockstep as a *shadow*: a rank with zero weight
whose own parameters are wrong, while :class:`BackgroundPull` fetches the
copy.  :class:`StepLog` records the exact input of every ``optimizer.step``
it takes meanwhile (the averaged gradients after clipping and unscaling, and
each group's hyperparameters).  Once the copy has arrived, :meth:`StepLog.catch_up`
loads it and replays the recorded steps through the raw optimizers: the
replica is then the members', bit for bit, which every rank checks with
:func:`param_digest` before the shadow contributes (``elastic.ElasticMember``
drives the protocol; the decisions ride the step's control record).

Memory: the log holds one copy of the gradients per step behind (the
parameter bytes, a third of the state with Adam), at most ``catch_up_steps``
of them; past that the joiner waits for its pull.

What this module never does: collectives.  It is the joiner's local work.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("chaos_lightning.strategy")

__all__ = ["BackgroundPull", "StepLog", "param_digest"]

_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

#: digests fit one int64 slot of the summed control record with room to spare
DIGEST_BITS = 40


def param_digest(params: list[torch.Tensor]) -> int:
    """A digest of the parameters' exact bit patterns (order-sensitive), in
    ``[1, 2**DIGEST_BITS)``: the integer sum of each tensor's bits, folded.
    Integer sums wrap the same way in any order, so every rank holding the
    same bits gets the same digest; one pass over the parameters (about
    10 ms at 67 MB here)."""
    h = 0
    with torch.no_grad():
        for p in params:
            t = p.detach().reshape(-1)
            if t.numel() == 0:
                continue
            bits = t.view(_INT_OF_SIZE[t.element_size()])
            h = (h * 1_000_003 + int(bits.sum(dtype=torch.int64))) % (1 << 61)
    return h % ((1 << DIGEST_BITS) - 1) + 1


class BackgroundPull:
    """A pull running in a thread: :meth:`result` once it is done.

    ``fetch`` returns what it pulled, or None if every attempt failed; an
    exception counts as a failure (logged)."""

    def __init__(self, fetch: Callable[[], Any]) -> None:
        self._fetch = fetch
        self._result: Any = None
        self._done = threading.Event()
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-shadow-pull", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fetch()
        except Exception:  # noqa: BLE001 - reported as a failed pull, in the log
            log.exception("chaos: the background state pull failed")
            self._result = None
        finally:
            self.seconds = time.monotonic() - self.started
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def result(self) -> Any:
        """What the pull fetched (None: it failed); only once :meth:`done`."""
        if not self._done.is_set():
            raise RuntimeError("the background pull is still running")
        return self._result


class StepLog:
    """Every ``optimizer.step`` input of the shadow steps, and their replay.

    A step pre-hook on each optimizer records the gradients the step is about
    to apply and the groups' hyperparameters.  Lightning steps with a closure
    (forward, backward, our all-reduce, clipping, unscaling all run inside
    ``step``), so the hook wraps the closure and records after it; a step
    without one (the AMP scaler's) is recorded at once.  A step the scaler
    skips calls no ``optimizer.step``, so it records nothing, as it changes
    nothing on the members.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.records: list[tuple[int, list[torch.Tensor | None], list[dict[str, Any]]]] = []
        self.bytes = 0
        self._paused = False
        self._handles = [opt.register_step_pre_hook(self._hook(i)) for i, opt in enumerate(self.optimizers)]

    def close(self) -> None:
        """Stop recording and drop the log."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.records = []
        self.bytes = 0

    @property
    def steps(self) -> int:
        return len(self.records)

    def _hook(self, index: int) -> Callable[..., Any]:
        def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._paused:
                return None
            # ``args`` starts with the optimizer itself (torch passes the
            # wrapped method's arguments); a positional closure follows it
            if "closure" in kwargs and kwargs["closure"] is not None:
                closure, where = kwargs["closure"], "kw"
            elif len(args) > 1 and args[1] is not None:
                closure, where = args[1], "arg"
            else:
                self._record(index, optimizer)
                return None

            def recording() -> Any:
                out = closure()
                self._record(index, optimizer)
                return out

            if where == "kw":
                return args, {**kwargs, "closure": recording}
            return (args[0], recording, *args[2:]), kwargs

        return hook

    def _record(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        grads: list[torch.Tensor | None] = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    g = None if p.grad is None else p.grad.detach().clone()
                    grads.append(g)
                    if g is not None:
                        self.bytes += g.numel() * g.element_size()
        hypers = [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]
        self.records.append((index, grads, hypers))

    def catch_up(self, params: list[torch.Tensor], values: list[torch.Tensor],
                 optimizer_states: list[dict[str, Any]]) -> int:
        """Load the pulled parameters and optimizer states (as of the switch
        that admitted this shadow), replay every recorded step, and put the
        live hyperparameters back (the schedulers have moved them since).
        Returns the steps replayed; the log is empty afterwards and recording
        stops (this replica is exact from here on)."""
        live_hypers = [[{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
                       for opt in self.optimizers]
        with torch.no_grad():
            for dst, src in zip(params, values, strict=True):
                dst.copy_(src)
        for opt, state in zip(self.optimizers, optimizer_states, strict=True):
            opt.load_state_dict(state)
        replayed = len(self.records)
        self._paused = True
        try:
            for index, grads, hypers in self.records:
                opt = self.optimizers[index]
                owned = [p for group in opt.param_groups for p in group["params"]]
                kept = [p.grad for p in owned]
                for p, g in zip(owned, grads, strict=True):
                    p.grad = g
                for group, h in zip(opt.param_groups, hypers, strict=True):
                    group.update(h)
                opt.step()
                for p, g in zip(owned, kept, strict=True):
                    p.grad = g
        finally:
            self._paused = False
        for opt, hypers in zip(self.optimizers, live_hypers, strict=True):
            for group, h in zip(opt.param_groups, hypers, strict=True):
                group.update(h)
        self.close()
        return replayed
