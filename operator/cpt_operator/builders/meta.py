"""Names, labels and owner references shared by every child manifest.

Child names are deterministic so that create-if-absent is idempotent: a restarted operator
computes the same names and finds what it already created. Labels follow
docs/architecture.md; the `cpt.dev/run` label is how the operator lists a run's children.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal

from cpt_operator.api.status_models import MAX_ATTEMPTS_LIMIT

Component = Literal["tokenize", "weights", "preflight", "precompile", "train", "export"]

CPT_API_VERSION: Final = "cpt.dev/v1alpha1"
CPT_KIND: Final = "ContinualPretrain"
MANAGED_BY: Final = "cpt-operator"

RUN_LABEL: Final = "cpt.dev/run"
STAGE_LABEL: Final = "cpt.dev/stage"
ATTEMPT_LABEL: Final = "cpt.dev/attempt"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"

# Kubernetes DNS-1123 label limit: Job and PyTorchJob names become pod hostnames/labels.
MAX_NAME: Final = 63

# The stage each component runs (`cpt-train <stage>`).
STAGE_OF: Final[dict[str, str]] = {
    "tokenize": "tokenize",
    "weights": "convert-to-nxd",
    "preflight": "preflight",
    "precompile": "precompile",
    "train": "train",
    "export": "export-hf",
}


def child_name(run: str, component: Component, attempt: int | None = None) -> str:
    """`<run>-tokenize`, `<run>-weights`, `<run>-preflight`, `<run>-train-<n>`, `<run>-export`."""
    if component == "train":
        if attempt is None or not 1 <= attempt <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(
                f"the training child needs an attempt number in 1..{MAX_ATTEMPTS_LIMIT}"
            )
        return f"{run}-train-{attempt}"
    return f"{run}-{component}"


def labels(run: str, component: Component, attempt: int | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "cpt",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "cpt",
        RUN_LABEL: run,
        STAGE_LABEL: component,
    }
    if attempt is not None:
        out[ATTEMPT_LABEL] = str(attempt)
    return out


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """The controller reference that lets the garbage collector remove children with the run
    (what kopf.adopt does, without needing kopf in the pure layer)."""
    meta = owner.get("metadata") or {}
    if not meta.get("uid") or not meta.get("name"):
        raise ValueError("the owner needs metadata.name and metadata.uid")
    return {
        "apiVersion": owner.get("apiVersion", CPT_API_VERSION),
        "kind": owner.get("kind", CPT_KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def adopt(manifest: Mapping[str, Any], owner: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `manifest` in the owner's namespace, owned by it (replacing any other
    controller reference). The name is never changed: names are deterministic. Only the
    top level and `metadata` are copied, the only parts written here; the rest is shared
    with `manifest` (a deep copy of a PyTorchJob was a tenth of the operator's CPU in a
    burst of new runs)."""
    out = dict(manifest)
    meta = out["metadata"] = dict(out.get("metadata") or {})
    owner_meta = owner.get("metadata") or {}
    if owner_meta.get("namespace"):
        meta["namespace"] = owner_meta["namespace"]
    refs = [r for r in meta.get("ownerReferences", []) if not r.get("controller")]
    refs.append(owner_reference(owner))
    meta["ownerReferences"] = refs
    return out


def clone(data: Any) -> Any:
    """A deep copy of JSON data (manifests, templates); tuples come back as lists, as they
    would from the API server."""
    return json.loads(json.dumps(data))


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise ValueError(
            f"child name {name!r} is {len(name)} characters; Kubernetes allows {MAX_NAME}: "
            "use a shorter metadata.name for the run"
        )
    return name
