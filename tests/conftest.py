"""Fixtures shared by every test tier.

* ``cluster`` (session): the local control plane (hack/devcluster/devcluster.py), reused when
  one is already healthy (``make cluster-up``), else started here and stopped at the end.
* ``namespace``: a fresh namespace, deleted afterwards.
* ``s3`` (session), ``bucket``, ``s3_env``: the loopback S3 server (moto server mode).
* ``executor`` (session): runs pods bound to the ``exec-*`` nodes as local processes.

Tiers run cheapest first: unit, parity, integration, e2e, faults, containers.

Option ``--keep-cluster`` leaves a cluster this session started running afterwards.
Helpers: ``from fixtures.cluster import wait_for``; see docs/devcluster.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from fixtures import cluster as _cluster  # noqa: E402
from fixtures import executor as _executor  # noqa: E402
from fixtures import s3 as _s3  # noqa: E402
from fixtures.cluster import Cluster  # noqa: E402
from fixtures.executor import Executor  # noqa: E402
from fixtures.s3 import S3Server  # noqa: E402
from fixtures.tiers import tier_rank  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    _cluster.add_options(parser)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: tier_rank(Path(str(item.path))))  # stable: modules stay whole
    _cluster.prepare_binaries(config, items)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from _cluster.cluster_fixture(request)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _cluster.namespace_fixture(cluster, request)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    yield from _s3.s3_fixture()


@pytest.fixture
def bucket(s3: S3Server) -> Iterator[str]:
    yield from _s3.bucket_fixture(s3)


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    return _s3.s3_env_fixture(s3, monkeypatch)


@pytest.fixture(scope="session")
def executor(cluster: Cluster) -> Iterator[Executor]:
    yield from _executor.executor_fixture(cluster)
