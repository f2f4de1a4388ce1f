"""Pod-template pieces shared by every stage: security contexts, env, volumes.

Security: every stage pod runs as uid/gid 65532 (the images' user) with no privilege
escalation, all Linux capabilities dropped and the runtime's default seccomp profile, which is
the Pod Security "restricted" profile. Departures (:mod:`cpt_operator.api.podsecurity`,
docs/security.md): training containers on Neuron instances run as root, because a stock EKS
Neuron AMI node hands `/dev/neuron*` to the container owned by root and EFA's memory locking
needs `IPC_LOCK`, which Linux grants only to root; EFA training containers add `IPC_LOCK`
(still with every other capability dropped and no privilege escalation). A `hostPath` scratch
volume (instance-store NVMe) is an opt-in departure; the namespace must allow it.

Secrets are only ever referenced (`secretKeyRef`): no credential value reaches a manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from cpt_operator.api.models import ContinualPretrainSpec, EnvVar, ScratchSpec, Toleration
from cpt_training.config import STAGE_CONFIG_ENV

RUN_AS_USER = 65532
"""The non-root uid/gid of every cpt pod and image (images/*/Dockerfile ``USER 65532``)."""
ROOT = 0
SHM_VOLUME = "dshm"
SCRATCH_VOLUME = "scratch"
TMP_VOLUME = "tmp"


def pod_security_context(*, root: bool = False) -> dict[str, Any]:
    """``root``: the Neuron training pod (module docstring); fsGroup stays cpt's group so
    files it writes on shared volumes stay readable by cpt's other pods."""
    uid = ROOT if root else RUN_AS_USER
    return {
        "runAsNonRoot": not root,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(*, ipc_lock: bool = False, root: bool = False) -> dict[str, Any]:
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if ipc_lock:
        caps["add"] = ["IPC_LOCK"]
    out: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "runAsNonRoot": not root,
        "capabilities": caps,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if root:
        out["runAsUser"] = ROOT
    return out


def stage_config_json(config: BaseModel) -> str:
    """Compact, key-sorted JSON: identical specs give byte-identical manifests."""
    data = config.model_dump(mode="json", by_alias=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _secret_env(name: str, secret: str, key: str, optional: bool | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional is not None:
        ref["optional"] = optional
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _user_env(items: Iterable[EnvVar]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        entry = item.model_dump(mode="json", by_alias=True, exclude_none=True)
        out.append(entry)
    return out


def stage_env(
    spec: ContinualPretrainSpec,
    config: BaseModel,
    extra: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The container env: the stage config, stage-specific values, credential references,
    then the user's `training.env` (which cannot override the reserved names: the API rejects
    them)."""
    env: list[dict[str, Any]] = [{"name": STAGE_CONFIG_ENV, "value": stage_config_json(config)}]
    env += [{"name": k, "value": v} for k, v in (extra or {}).items()]
    creds = spec.runtime.s3_credentials_secret_ref
    if creds is not None:
        env.append(_secret_env("AWS_ACCESS_KEY_ID", creds.name, creds.access_key_id_key))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", creds.name, creds.secret_access_key_key))
        if creds.session_token_key:
            env.append(_secret_env("AWS_SESSION_TOKEN", creds.name, creds.session_token_key))
    hf = spec.runtime.hf_token_secret_ref
    if hf is not None:
        env.append(_secret_env("HF_TOKEN", hf.name, hf.key, hf.optional))
    env += _user_env(spec.training.env)
    return env


def tolerations(items: Iterable[Toleration]) -> list[dict[str, Any]]:
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in items]


def scratch_volume(scratch: ScratchSpec) -> dict[str, Any]:
    if scratch.type == "hostPath":
        return {
            "name": SCRATCH_VOLUME,
            "hostPath": {"path": scratch.path, "type": "DirectoryOrCreate"},
        }
    if scratch.type == "pvc":
        return {"name": SCRATCH_VOLUME, "persistentVolumeClaim": {"claimName": scratch.claim_name}}
    empty: dict[str, Any] = {}
    if scratch.size_limit:
        empty["sizeLimit"] = scratch.size_limit
    return {"name": SCRATCH_VOLUME, "emptyDir": empty}


def shm_volume() -> dict[str, Any]:
    """Memory-backed /dev/shm: the container default (64 MiB) starves data loader workers and
    the collectives' shared-memory transport."""
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}


def tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {}}


def resources(
    requests: Mapping[str, Any], limits: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out
