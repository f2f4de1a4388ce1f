"""The real node puts the host back as it found it (hack/node/node.py `down`).

The kubelet changes host sysctls (kernel.panic, kernel.panic_on_oops, vm.overcommit_memory),
and the node makes cgroups in every hierarchy, a bridge, veths, network namespaces, mounts
and entries in /var/log/containers and /var/lib/cni. Stopping it must undo all of that; the
session fixture also compares at its end. Here the node is stopped mid-session, the host is
compared with the record taken before `up`, and the node is started again for later tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from fixtures.node import RealNode, node_runtime

pytestmark = pytest.mark.containers


def test_stopping_the_node_restores_sysctls_cgroups_links_mounts_and_dirs(
    real_node: RealNode, cluster: Cluster
) -> None:
    node = real_node.node
    before = node_runtime.HostSnapshot.from_json(json.loads(node.snapshot_file.read_text()))
    running = node_runtime.HostSnapshot.take(node.root)
    # While it runs, the node has changed the host (so the comparison below means something).
    assert running.cgroups and node_runtime.BRIDGE in running.links
    assert running.sysctls != before.sysctls, "the kubelet set none of the recorded sysctls"

    diffs = node_runtime.down(node, cluster)
    try:
        assert diffs == []
        after = node_runtime.HostSnapshot.take(node.root)
        assert after == before
        assert not any(Path(c).exists() for c in running.cgroups if c not in before.cgroups)
        assert node_runtime.BRIDGE not in after.links
        assert node.pid_of("kubelet") is None and node.pid_of("containerd") is None
    finally:
        node_runtime.up(node, cluster, real_node.kubelet_bin)
        node_runtime.import_images(node, list(real_node.manifests.values()))
    assert real_node.ready()
