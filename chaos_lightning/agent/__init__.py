"""agent: the membership machine on real sockets, in one background thread per process."""

from chaos_lightning.agent.agent import Agent, enable_fault_injection, link_fault, query_status, request_link_fault, status

__all__ = ["Agent", "enable_fault_injection", "link_fault", "query_status", "request_link_fault", "status"]
