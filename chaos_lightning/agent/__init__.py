"""agent: the membership machine on real sockets, in one background thread per process."""

from chaos_lightning.agent.agent import Agent, query_status, split_hostport, status

__all__ = ["Agent", "query_status", "split_hostport", "status"]
