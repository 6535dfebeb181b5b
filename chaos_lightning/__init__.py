"""chaos_lightning: elastic, self-healing data-parallel training for PyTorch Lightning.

Layers (imports point downward only): ``wire`` (framing, schema, auth),
``membership`` (peer negotiation, sans-IO), ``monitor``, ``rendezvous``,
``replication``, ``strategy``.  See ``DESIGN.md``.
"""

__version__ = "0.1.0"
