"""The tests' etcd server and free ports: :mod:`chaos_lightning.integrations.etcd.server` (shared with the benchmarks)."""

from chaos_lightning.integrations.etcd.server import HEALTH_TIMEOUT, etcd_binary, etcd_server, free_port

__all__ = ["HEALTH_TIMEOUT", "etcd_binary", "etcd_server", "free_port"]
