"""Fixtures of the fault matrix: a private control plane (see _support.py), a namespace and a
live operator process per test, and the `runs` helper bound to them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e.harness import OperatorProcess, Runs, install_crd
from faults._support import gate, private_cluster

from fixtures import cluster as _cluster
from fixtures.cluster import Cluster, devcluster, wait_for
from fixtures.s3 import S3Server


@pytest.fixture(scope="session")
def fault_cluster() -> Iterator[Cluster]:
    try:
        devcluster.find_bin_dir(build=True)
    except devcluster.BinariesUnavailable as e:
        pytest.skip(f"control plane binaries cannot be built: {e}")
    for cluster in private_cluster():
        install_crd(cluster)
        yield cluster


@pytest.fixture
def fault_ns(fault_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace; afterwards the gate is closed, every node is Ready again and the
    namespace is gone (its pods would otherwise still hold trn1 nodes for the next case)."""
    name = ""
    try:
        for name in _cluster.namespace_fixture(fault_cluster, request):
            yield name
    finally:
        gate(fault_cluster, False)
        for node in fault_cluster.api.get("/api/v1/nodes")["items"]:
            if not fault_cluster.node_ready(node["metadata"]["name"]):
                fault_cluster.set_node_ready(node["metadata"]["name"], True)
        if name:
            wait_for(
                lambda: fault_cluster.api.get_or_none(f"/api/v1/namespaces/{name}") is None,
                timeout=90,
                what=f"namespace {name} deleted",
            )


@pytest.fixture
def operator(fault_cluster: Cluster, fault_ns: str, s3: S3Server) -> Iterator[OperatorProcess]:
    op = OperatorProcess(fault_cluster, fault_ns, s3)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def runs(fault_cluster: Cluster, fault_ns: str, operator: OperatorProcess) -> Runs:
    return Runs(fault_cluster, fault_ns, operator)
