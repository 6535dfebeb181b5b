"""A worker for test_rendezvous_store.py: join, build the epoch's gloo group
from the rendezvous store, all-reduce, report, and (on request) rebuild for the
next epoch after a member left.  Prints JSON lines."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from chaos_lightning.rendezvous import create
from _say import say  # one whole line per record (tests/_say.py)


def group_sum(rdv, view) -> float:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(
        "gloo", store=rdv.store(view, timeout=20), rank=view.rank(rdv.node_id), world_size=view.size,
        timeout=timedelta(seconds=20),
    )
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t.item())


def main() -> None:
    backend, peers, etcd, expect, role = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    rdv = create(backend, peers=[p for p in peers.split(",") if p], etcd_endpoints=etcd)
    say(event="ready", addr=getattr(rdv, "addr", rdv.node_id))
    view = rdv.join(30)
    while view.size < expect:
        view = rdv.next_view(view.epoch, 30) or view
    say(event="sum", epoch=view.epoch, value=group_sum(rdv, view))
    if role == "leaver":
        sys.stdin.readline()
        dist.destroy_process_group()
        rdv.leave(15)
        say(event="left")
    else:
        while view.size >= expect:
            view = rdv.next_view(view.epoch, 30) or view
        say(event="sum", epoch=view.epoch, value=group_sum(rdv, view))
    if dist.is_initialized():
        dist.destroy_process_group()
    rdv.close()


if __name__ == "__main__":
    main()
