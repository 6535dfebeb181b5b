"""Strategy layer: where elasticity enters Lightning.

Layer 6 of chaos_lightning (see DESIGN.md).  ``ChaosStrategy`` (a Lightning
``DDPStrategy`` subclass) switches the process group between agreed views at
step boundaries without restarting the process; :mod:`.sampler` holds the
elastic sampler that keeps every sample of an epoch trained exactly once
across those switches.
"""
