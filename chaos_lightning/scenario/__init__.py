"""Scripted churn scenarios: a timeline of joins, leaves, crashes, stops and
link faults played against real training processes, and a report of the
design's metrics (``python -m chaos_lightning.scenario``, ``chaos-run scenario``).

- :mod:`.timeline`: the timeline file format and its parser;
- :mod:`.workload`: the training job every node runs (plain Lightning, ``strategy="chaos"``);
- :mod:`.runner`: starts the nodes (loopback or network namespaces), carries out the actions, checks the invariants;
- :mod:`.report`: the metrics from the nodes' traces, a summary table and a plot;
- :mod:`.soak`: random valid timelines from a seed, played in settle mode and checked at the end.
"""
