"""Fixtures of the real-container tier: the real node (session), the operator installed with
helm from the chart as it renders, and the `runs` helper bound to them (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from containers.harness import OperatorRelease, install_operator
from e2e.harness import Runs, install_crd

from fixtures import node as _node
from fixtures.cluster import Cluster
from fixtures.node import RealNode
from fixtures.s3 import S3Server


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: `make test-unit` builds nothing
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _node.prepare(config, items)


@pytest.fixture(scope="session")
def real_node(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[RealNode]:
    yield from _node.real_node_fixture(request, cluster)


@pytest.fixture
def operator_release(
    real_node: RealNode, cluster: Cluster, namespace: str, s3: S3Server
) -> Iterator[OperatorRelease]:
    install_crd(cluster)
    release = install_operator(
        cluster,
        namespace,
        s3,
        endpoint=real_node.reachable(s3),
        selector=real_node.selector,
        tolerations=real_node.tolerations,
    )
    try:
        yield release
    finally:
        release.uninstall()


@pytest.fixture
def runs(cluster: Cluster, namespace: str, operator_release: OperatorRelease) -> Runs:
    return Runs(cluster, namespace, None)
