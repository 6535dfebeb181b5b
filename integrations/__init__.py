"""Integrations: chaos_lightning's adapters to systems outside it.

Installed as ``chaos_lightning.integrations`` (a setuptools ``package-dir``
mapping in ``pyproject.toml``) so the core package never imports from here:
the layers under ``chaos_lightning/`` point downward only, and what lives here
exists for comparison or interoperability (the etcd rendezvous baseline today;
a torchrun rendezvous plugin and other frameworks later).  Each integration
imports its third-party client lazily, so importing this package costs nothing.
"""

from __future__ import annotations
