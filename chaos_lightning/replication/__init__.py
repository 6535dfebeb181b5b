"""Layer 5, replication: how a joiner gets the live training state.

State snapshot, sharding, the bandwidth-aware shard scheduler
(:mod:`chaos_lightning.replication.scheduler`), the parallel multi-source pull,
checksums, and re-scheduling when a source dies or is slow.  Imports point
downward only (wire, membership, monitor).
"""
