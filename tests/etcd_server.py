"""The tests' etcd server: :mod:`chaos_lightning.integrations.etcd.server` (shared with the benchmarks)."""

from chaos_lightning.integrations.etcd.server import HEALTH_TIMEOUT, etcd_binary, etcd_server

__all__ = ["HEALTH_TIMEOUT", "etcd_binary", "etcd_server"]
