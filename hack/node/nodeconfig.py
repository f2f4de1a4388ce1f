"""Configuration files of the real node (containerd, CNI, kubelet), written under its root.

Each setting that departs from a default says why: most are what this kind of host needs
(cgroup v1 hybrid layout, root without CAP_SYS_RESOURCE, no registry) and are recorded with
their symptoms in docs/devcluster.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def containerd_toml(root: Path, sock: Path, pause_ref: str, cni_conf: Path, cni_bin: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "warn"
[{cri}]
  sandbox_image = "{pause_ref}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below its own and
  # every sandbox failed with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    # Images were imported, never pulled: nothing may be garbage-collected away.
    discard_unpacked_layers = false
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        # crun refuses this kernel's hybrid cgroup layout; the kubelet uses cgroupfs.
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"
"""


def cni_conflist(name: str, bridge: str, subnet: str, gateway: str, ipam_dir: Path) -> str:
    """A bridge with the host as gateway; no masquerade (pods talk only to the host's
    forwarded addresses) and host-local leases under the node's own root."""
    conf: dict[str, Any] = {
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conf, indent=2) + "\n"


def kubelet_config(
    *,
    sock: Path,
    port: int,
    healthz_port: int,
    pod_logs: Path,
    cgroup_root: str,
    cluster_dns: str,
    taint: dict[str, str],
) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Loopback only (address below); the apiserver calls it for `kubectl logs`/exec with
        # no client certificate, so anonymous requests are allowed. Never on a shared network.
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{sock}",
        "podLogsDir": str(pod_logs),
        # cgroup v1 (hybrid) host, no systemd as PID 1: the cgroupfs driver, a cgroup root of
        # its own so teardown can remove exactly what it made.
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cgroup_root}",
        "failCgroupV1": False,
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "protectKernelDefaults": False,
        # Imported images cannot be pulled again: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A shared, busy dev host: do not evict test pods for its disk or memory pressure.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "registerWithTaints": [taint],
        "serializeImagePulls": False,
        "resolvConf": "/etc/resolv.conf",
        # hack/node/clusterdns.py on the bridge's gateway: kopf's in-cluster login dials
        # kubernetes.default.svc by name.
        "clusterDNS": [cluster_dns],
        "clusterDomain": "cluster.local",
        "nodeStatusUpdateFrequency": "2s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": True,
    }
    return json.dumps(config, indent=2) + "\n"


def kubeconfig(api_url: str, ca_file: Path, token: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "c", "cluster": {"server": api_url, "certificate-authority": str(ca_file)}}
            ],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        },
        indent=2,
    )
