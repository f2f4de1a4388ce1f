"""Fixtures for the operator e2e tests: the CRD (once), a live operator process per test
namespace, and the `runs` helper bound to both (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e.harness import OperatorProcess, Runs, install_crd

from fixtures.cluster import Cluster
from fixtures.s3 import S3Server


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> Cluster:
    install_crd(cluster)
    return cluster


@pytest.fixture
def operator(crd: Cluster, namespace: str, s3: S3Server) -> Iterator[OperatorProcess]:
    op = OperatorProcess(crd, namespace, s3)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def runs(crd: Cluster, namespace: str, operator: OperatorProcess) -> Runs:
    return Runs(crd, namespace, operator)
