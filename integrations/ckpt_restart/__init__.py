"""The checkpoint-restart baseline (Pollux-like): torchrun + etcd rendezvous + Lightning ``strategy="ddp"``.

DESIGN.md's first baseline.  torchrun's elastic agent (``--rdzv-backend
etcd-v2`` against a real etcd server with the v2 API enabled) restarts every
worker of every node whenever a node joins (``num_nodes_waiting() > 0``) or a
worker fails; each new worker resumes with ``Trainer.fit(ckpt_path="last")``
from the latest periodic ``ModelCheckpoint``.  :mod:`.worker` is the training
script torchrun runs; ``benchmarks/_ckpt_restart.py`` starts the etcd server
and the agents, makes the events and measures them (docs/baselines_ckpt_restart.md).

Needs ``python-etcd`` (torch's etcd rendezvous imports ``etcd``, the v2
client; without it torch falls back to a stub that raises).  Importing this
package imports nothing.
"""

from __future__ import annotations
