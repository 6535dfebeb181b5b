"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

# The strategy records which samples each step trained only when asked
# (CHAOS_RECORD_SAMPLES); the tests check exactly-once from that record, in
# this process and in every worker it starts (they inherit the environment).
os.environ.setdefault("CHAOS_RECORD_SAMPLES", "1")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# -- the network-namespace testbed ---------------------------------------------
@pytest.fixture
def need_netns():
    """Skip without root/ip/tc on a workstation; fail under CI=true, where
    .ci/run installs iproute2 and runs as root."""
    from chaos_lightning.testbed import available

    ok, why = available()
    if not ok:
        if _ci():
            pytest.fail(f"namespace testbed unavailable under CI=true: {why}")
        pytest.skip(f"namespace testbed unavailable: {why} (under CI=true this fails)")


@pytest.fixture
def need_cgroup():
    """Skip without a writable cgroup for the testbed's CPU limits on a
    workstation; fail under CI=true (root there, as for the namespaces)."""
    from chaos_lightning.testbed.cpu import available

    ok, why = available()
    if not ok:
        if _ci():
            pytest.fail(f"no usable cgroup for a CPU limit under CI=true: {why}")
        pytest.skip(f"no usable cgroup for a CPU limit: {why} (under CI=true this fails)")


# -- etcd (baseline rendezvous) -------------------------------------------------

@pytest.fixture
def etcd_endpoint(tmp_path):
    """A fresh real etcd server for this test; yields ``127.0.0.1:PORT``.

    Missing etcd skips the test on a workstation but fails it under CI=true:
    CI installs etcd, so its absence there is a broken setup, not a choice.
    """
    from etcd_server import etcd_binary, etcd_server

    if etcd_binary() is None:
        if _ci():
            pytest.fail("etcd binary not found but CI is set: install etcd-server (see .ci/run)")
        pytest.skip("etcd binary not found: apt-get install etcd-server (under CI=true this fails)")
    with etcd_server(tmp_path / "etcd") as endpoint:
        yield endpoint
