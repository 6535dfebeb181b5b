"""The stop-free join's joiner side: train as a shadow, pull behind, catch up by replay.

Role in the whole: with ``stop_free_join`` (docs/join.md), the switch that
admits a joiner moves only the small state (the loop, sampler, schedulers,
scaler, callbacks, the optimizers' hyperparameters); the holders *copy* the
parameters and optimizer state into a snapshot at that boundary and train
on.  The joiner trains in lockstep as a *shadow*: a rank with zero weight
whose own parameters are wrong, while a :class:`Background` thread fetches
the copy (and, on each holder, another makes it).  :class:`StepLog` records the exact input of every ``optimizer.step``
it takes meanwhile (the averaged gradients after clipping and unscaling,
and each group's hyperparameters) and applies none.  Once the copy has
arrived, :meth:`StepLog.catch_up` loads it and replays the recorded steps through the raw optimizers: the
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

__all__ = ["Background", "StepLog", "param_digest"]

_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

#: digests fit one int64 slot of the summed control record with room to spare
DIGEST_BITS = 40


def param_digest(params: list[torch.Tensor]) -> int:
    """A digest of the parameters' exact bit patterns (order-sensitive), in
    ``[1, 2**DIGEST_BITS)``: the integer sum of each tensor's bits (as
    64-bit words where its bytes allow), folded.  Integer sums wrap the same
    way in any order, so every rank holding the same bits gets the same
    digest; one pass over the parameters (3 ms at 67 MB here)."""
    h = 0
    with torch.no_grad():
        for p in params:
            t = p.detach().reshape(-1)
            if t.numel() == 0:
                continue
            if (t.numel() * t.element_size()) % 8 == 0 and t.data_ptr() % 8 == 0:
                bits = t.view(torch.int64)  # no widening copy: about 10x faster than int32 -> int64
            else:
                bits = t.view(_INT_OF_SIZE[t.element_size()])
            h = (h * 1_000_003 + int(bits.sum(dtype=torch.int64))) % (1 << 61)
    return h % ((1 << DIGEST_BITS) - 1) + 1


class Background:
    """Work on its own thread (a shadow's pull, a holder's copy):
    :meth:`result` once it is done.

    ``fetch`` returns its result, or None if it failed; an exception counts
    as a failure (logged)."""

    def __init__(self, fetch: Callable[[], Any], what: str = "the background state pull") -> None:
        self._fetch = fetch
        self._what = what
        self._result: Any = None
        self._done = threading.Event()
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-shadow", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fetch()
        except Exception:  # noqa: BLE001 - reported as a failed pull, in the log
            log.exception("chaos: %s failed", self._what)
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

    While it records, each optimizer's ``step`` is replaced on the instance
    by one that runs the closure (Lightning's forward, backward, our
    all-reduce, clipping and unscaling all run inside ``step``), records the
    gradients it would apply and the groups' hyperparameters, and applies
    nothing: a shadow's own update would be thrown away at the catch-up, and
    skipping it spares the shadow the optimizer's work and memory (Adam's
    moments) while its pull runs.  A step without a closure (the AMP
    scaler's) records as well; a step the scaler skips calls no ``step``, so
    it records nothing, as it changes nothing on the members.  Whatever
    ``step`` the instance had (an LR scheduler wraps it) is put back before
    the replay.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.records: list[tuple[int, list[torch.Tensor | None], list[dict[str, Any]]]] = []
        self.bytes = 0
        self._saved = [(opt, opt.__dict__.get("step")) for opt in self.optimizers]
        for index, opt in enumerate(self.optimizers):
            opt.step = self._recording_step(index, opt)  # type: ignore[method-assign]

    def close(self) -> None:
        """Stop recording (each optimizer steps for real again) and drop the log."""
        for opt, previous in self._saved:
            if previous is None:
                opt.__dict__.pop("step", None)
            else:
                opt.step = previous  # type: ignore[method-assign]
        self._saved = []
        self.records = []
        self.bytes = 0

    @property
    def steps(self) -> int:
        return len(self.records)

    def _recording_step(self, index: int, optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._record(index, optimizer)
            optimizer._opt_called = True  # type: ignore[attr-defined] - what an LR scheduler checks
            return loss

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined] - no "step overridden" warning
        return step

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
        records, replayed = self.records, len(self.records)
        self.close()  # the real steps from here on
        for index, grads, hypers in records:
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
        for opt, hypers in zip(self.optimizers, live_hypers, strict=True):
            for group, h in zip(opt.param_groups, hypers, strict=True):
                group.update(h)
        return replayed
