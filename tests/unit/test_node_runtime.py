"""Pure parts of the real node (hack/node): the cluster DNS answers, the kubelet config,
and the tier's rule for a missing capability (skip, but fail under CI=true)."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from fixtures import node as node_fixture
from fixtures.node import node_runtime

pytestmark = pytest.mark.unit

clusterdns = __import__("clusterdns")
nodeconfig = __import__("nodeconfig")


def query(name: str, qtype: int = 1) -> bytes:
    msg = struct.pack("!HHHHHH", 42, 0x0100, 1, 0, 0, 0)
    msg += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return msg + struct.pack("!HH", qtype, 1)


def test_cluster_dns_answers_the_kubernetes_service_and_nxdomain_otherwise() -> None:
    records = {"kubernetes.default.svc.cluster.local": "10.96.0.1"}
    reply = clusterdns.answer(query("Kubernetes.default.svc.cluster.local"), records)
    qid, flags, _qd, ancount = struct.unpack("!HHHH", reply[:8])
    assert qid == 42 and flags & 0x8000 and flags & 0xF == 0 and ancount == 1
    assert reply[-4:] == socket.inet_aton("10.96.0.1")
    aaaa = clusterdns.answer(query("kubernetes.default.svc.cluster.local", 28), records)
    assert struct.unpack("!HHHH", aaaa[:8])[3] == 0 and struct.unpack("!H", aaaa[2:4])[0] & 0xF == 0
    other = clusterdns.answer(query("example.com"), records)
    assert struct.unpack("!H", other[2:4])[0] & 0xF == 3  # NXDOMAIN


def test_kubelet_config_keeps_the_settings_this_host_needs(tmp_path) -> None:
    conf = json.loads(
        nodeconfig.kubelet_config(
            sock=tmp_path / "c.sock", port=1, healthz_port=2, pod_logs=tmp_path,
            cgroup_root="cpt-node", cluster_dns="10.89.0.1", taint=node_runtime.TAINT,
        )
    )  # fmt: skip
    assert conf["address"] == "127.0.0.1" and conf["cgroupDriver"] == "cgroupfs"
    assert conf["failCgroupV1"] is False and conf["imageGCHighThresholdPercent"] == 100
    assert conf["registerWithTaints"] == [node_runtime.TAINT]
    toml = nodeconfig.containerd_toml(tmp_path, tmp_path / "s", "p:1", tmp_path, "/usr/lib/cni")
    assert "restrict_oom_score_adj = true" in toml and "SystemdCgroup = false" in toml


def test_a_missing_capability_skips_naming_it_but_fails_under_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no cgroups"):
        node_fixture.unavailable("no cgroups")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no cgroups.*CI=true"):
        node_fixture.unavailable("no cgroups")
