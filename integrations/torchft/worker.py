"""One TorchFT replica group (of one process) training the scenario workload.

``python -m chaos_lightning.integrations.torchft.worker --lighthouse URL --replica-id ID --events PATH [options]``

The training loop is torchft's own recipe (README "Using the Manager",
``train_ddp.py``): a ``ProcessGroupGloo``, a ``Manager`` with
``min_replica_size=1`` and the default checkpoint transport (HTTP), the model
wrapped in ``torchft.DistributedDataParallel``, Adam wrapped in
``torchft.Optimizer``; each step ``optimizer.zero_grad()`` starts the quorum
(asynchronously, overlapped with the step), ``loss.backward()`` all-reduces
through the Manager, ``optimizer.step()`` steps Adam only if
``Manager.should_commit()``.  The model and data are the scenario workload's
(:mod:`chaos_lightning.scenario.workload`): ``MLP(hidden).net``, Adam lr 1e-3,
``Synthetic(samples)``, ``batch_size`` per replica, and ``step_sleep`` seconds
of stand-in compute per step, before the forward pass as in
``MLP.training_step``.  One intra-op thread (``torch.set_num_threads(1)``), as
the workload.

What it writes (JSON lines, ``time.time()`` wall clock, flushed per line):

``start``  process create time (psutil), and when the interpreter reached us
``imported``  after ``import torch``, ``import torchft``, and the workload
``built``  model, optimizer and Manager built: the first quorum is asked next
``step``  every step: ``t0``/``t1`` (start/end), ``step`` (Manager step after
    it), ``commit`` (should_commit), ``part`` (this replica's gradients were
    in the all-reduce: ``Manager.is_participating()``, false on a healing
    step), ``qid`` (quorum id), ``n`` (participants), ``world`` (replicas in
    the quorum, healing ones included), ``heal`` (this step healed)
``state``  once: bytes of parameters + Adam state
``recv`` / ``send``  each checkpoint fetched / staged by torchft's transport:
    ``t0``, ``t1``, ``bytes`` (the recv is the healing transfer)
``exit``  on the way out, with the reason

It stops after ``--max-seconds``, when ``--stop`` appears, or when its parent
dies; the benchmark kills it anyway (``kill -9`` is one of the events).
"""

from __future__ import annotations

import time

_T_MAIN = time.time()  # the interpreter reached this module (stdlib only so far)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402


class Events:
    """Append-only JSON lines, one ``write`` per event, flushed at once."""

    def __init__(self, path: Path, replica_id: str) -> None:
        self.f = open(path, "a", buffering=1)
        self.rid = replica_id

    def __call__(self, ev: str, **fields: object) -> None:
        fields.setdefault("t", time.time())
        self.f.write(json.dumps({"ev": ev, "rid": self.rid, **fields}) + "\n")
        self.f.flush()


def _nbytes(obj: object) -> int:
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_lightning.integrations.torchft.worker",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--lighthouse", required=True, help="Lighthouse URL, http://127.0.0.1:PORT")
    p.add_argument("--replica-id", required=True, help="this replica group's id (ends with its number)")
    p.add_argument("--group", type=int, default=0, help="replica group number (the data shard)")
    p.add_argument("--groups", type=int, default=8, help="max replica groups (torchft DistributedSampler)")
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--stop", type=Path, default=None, help="exit when this file exists")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--pg-timeout", type=float, default=5.0, help="gloo timeout, s (torchft's train_ddp.py: 5)")
    p.add_argument("--timeout", type=float, default=30.0, help="Manager timeout, s (train_ddp.py: 30)")
    p.add_argument("--quorum-timeout", type=float, default=60.0, help="Manager quorum timeout, s (default 60)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="hard bound on this process's life")
    args = p.parse_args(argv)

    events = Events(args.events, args.replica_id)
    import psutil

    events("start", create_time=psutil.Process().create_time(), main=_T_MAIN, pid=os.getpid())
    deadline = _T_MAIN + args.max_seconds
    parent = os.getppid()

    import torch

    t_torch = time.time()
    import torchft
    from torchft.checkpointing import HTTPTransport

    t_torchft = time.time()
    from chaos_lightning.scenario.workload import MLP, Synthetic

    events("imported", torch=t_torch, torchft=t_torchft)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    class TimedHTTPTransport(HTTPTransport):
        """torchft's default transport, timed: the recv is the healing transfer."""

        def send_checkpoint(self, dst_ranks, step, state_dict, timeout):  # type: ignore[no-untyped-def]
            t0 = time.time()
            super().send_checkpoint(dst_ranks, step, state_dict, timeout)
            events("send", t0=t0, t1=time.time(), dst=list(dst_ranks), step=step)

        def recv_checkpoint(self, src_rank, metadata, step, timeout):  # type: ignore[no-untyped-def]
            t0 = time.time()
            out = super().recv_checkpoint(src_rank, metadata, step, timeout)
            events("recv", t0=t0, t1=time.time(), src=src_rank, step=step, bytes=_nbytes(out))
            return out

    class DistributedDataParallel(torchft.DistributedDataParallel):
        """torchft's DDP wrapper with its comm hook's error path fixed (torchft 0.2.0 bug).

        When the all-reduce fails (a peer was ``kill -9``-ed: gloo "Connection
        reset by peer"), ``_ManagedWork.wait()`` records the error with
        ``Manager.report_error`` and returns False, as designed -- but
        ``ddp._comm_hook`` then asserts ``fut._fut`` (never set on that path),
        and for the following buckets ``Manager.allreduce`` returns a
        ``_DummyWork`` whose plain future has no ``_fut`` at all: either way the
        *survivor* dies with AssertionError/AttributeError in ``backward()``.
        Here such a bucket completes with its (discarded) buffer instead; the
        recorded error makes ``should_commit`` return False, which is
        torchft's intended behaviour ("errors are swallowed and recorded").
        The success path is unchanged.
        """

        @staticmethod
        def _comm_hook(state, bucket):  # type: ignore[no-untyped-def]
            work = state.allreduce(bucket.buffer())
            work.wait()
            fut = work.get_future()
            inner = getattr(fut, "_fut", None)
            if inner is None:
                done: torch.futures.Future = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done
            return inner

    dataset = Synthetic(args.samples)
    sampler = torchft.DistributedSampler(dataset, replica_rank=args.group, num_replica_groups=args.groups,
                                         group_rank=0, num_replicas=1, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)

    net = MLP(hidden=args.hidden).net
    # the same seed everywhere: every replica starts from identical weights, as the
    # workload's seed_everything(0) does; torchft's init_sync heals the joiner anyway
    pg = torchft.ProcessGroupGloo(timeout=timedelta(seconds=args.pg_timeout))
    timeout = timedelta(seconds=args.timeout)
    transport = TimedHTTPTransport(timeout=timeout, num_chunks=0)

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=args.timeout))
    manager = torchft.Manager(
        pg=pg, min_replica_size=1, load_state_dict=load_state_dict, state_dict=state_dict,
        replica_id=args.replica_id, store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=args.lighthouse, hostname="127.0.0.1", timeout=timeout,
        quorum_timeout=timedelta(seconds=args.quorum_timeout), connect_timeout=timedelta(seconds=10),
        checkpoint_transport=transport,
    )
    model = DistributedDataParallel(manager, net)
    optimizer = torchft.Optimizer(manager, torch.optim.Adam(model.parameters(), lr=1e-3))
    events("built")

    reason = "deadline"
    state_written = False
    try:
        while time.time() < deadline:
            for x, y in loader:
                if time.time() >= deadline:
                    break
                if args.stop is not None and args.stop.exists():
                    reason = "stop"
                    raise StopIteration
                if os.getppid() != parent:
                    reason = "orphaned"
                    raise StopIteration
                t0 = time.time()
                before = manager.current_step()
                optimizer.zero_grad()  # starts the (async) quorum
                time.sleep(args.step_sleep)  # stand-in compute, as MLP.training_step
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()  # all-reduce through the Manager (waits for the quorum)
                part = manager.is_participating()
                heal = manager._healing
                optimizer.step()  # should_commit, then Adam.step only if committed
                t1 = time.time()
                commit = manager.current_step() > before
                events("step", t0=t0, t1=t1, step=manager.current_step(), commit=commit, part=part and commit,
                       heal=heal, qid=manager._quorum_id, n=manager.num_participants(), world=pg.size(),
                       loss=round(float(loss), 5))
                if commit and not state_written and optimizer.state:
                    state_written = True
                    events("state", bytes=_nbytes(list(net.parameters())) + _nbytes(optimizer.state_dict()["state"]))
    except StopIteration:
        pass
    finally:
        events("exit", reason=reason)
        manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
