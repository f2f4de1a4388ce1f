"""The operator's one door to the Kubernetes API: the official `kubernetes` client, public API only.

Every call blocks (the client is urllib3 underneath): the controller runs a run's whole
reconcile in a worker thread (cpt_operator/handlers.py), so nothing here is async. Objects
cross this boundary as plain dicts in their JSON form (camelCase keys), so the pure layers
(reconcile/, builders/) never see a client type. Jobs and PyTorchJobs go through the
client's generic custom-object API, which answers dicts as the API server sent them; Pods,
Nodes, Namespaces, Secrets and Events through the typed core API.

Writes are idempotent: `create` is create-if-absent (409 AlreadyExists counts as done, child
names are deterministic), `delete` treats 404 as done, the status is one JSON merge patch on
the status subresource. `KubeApi` is what the controller needs; tests give it fakes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cpt_operator.api.models import GROUP, KIND, PLURAL, VERSION
from cpt_operator.builders.meta import RUN_LABEL

__all__ = ["ApiException", "Kube", "KubeApi", "api_client"]

log = logging.getLogger(__name__)

FIELD_MANAGER = "cpt-operator"
EVENT_SOURCE = "cpt-operator"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"
REQUEST_TIMEOUT = 30.0
MAX_EVENT_MESSAGE = 1000

# (group, version, plural) of the children created through the custom-object API.
CUSTOM_KINDS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("batch/v1", "Job"): ("batch", "v1", "jobs"),
    ("kubeflow.org/v1", "PyTorchJob"): ("kubeflow.org", "v1", "pytorchjobs"),
}


class KubeApi(Protocol):
    """What the controller needs of the API; `Kube` is the real one."""

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list_runs(self, namespace: str | None) -> list[dict[str, Any]]: ...

    def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]: ...

    def get_nodes(self, names: list[str]) -> list[dict[str, Any]]: ...

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool: ...

    def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str: ...

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str,
        *,
        propagation: str = "Background",
        grace_period: int | None = None,
    ) -> bool: ...

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None: ...

    def secret_exists(self, namespace: str, name: str) -> bool | None: ...

    def pod_security_level(self, namespace: str) -> str | None: ...

    def post_event(self, run: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...


def api_client(pool_size: int = 16) -> client.ApiClient:
    """A client for the environment's cluster: in-cluster service account, else KUBECONFIG.
    One HTTP connection per worker thread (`pool_size`), so no reconcile waits for a socket."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # KUBECONFIG as it is now (the client reads it once, when first imported)
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg
        )
    cfg.connection_pool_maxsize = max(pool_size, 4)
    return client.ApiClient(cfg)


def _status(err: ApiException) -> int:
    return int(err.status or 0)


class Kube:
    """`KubeApi` on the official client."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def _json(self, obj: Any, api_version: str, kind: str) -> dict[str, Any]:
        """A typed answer as the API server's JSON (list items carry no kind of their own)."""
        out: dict[str, Any] = self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        out["apiVersion"], out["kind"] = api_version, kind
        return out

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            run = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as err:
            if _status(err) == 404:
                return None
            raise
        return cast(dict[str, Any], run)

    def list_runs(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every run in one namespace or (None) in all of them."""
        if namespace is None:
            answer = self.custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _request_timeout=REQUEST_TIMEOUT
            )
        else:
            answer = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT
            )
        return list(cast(dict[str, Any], answer).get("items") or [])

    def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The run's Jobs and PyTorchJobs (label cpt.dev/run, selected by the API server)."""
        found: list[list[dict[str, Any]]] = []
        for (api_version, kind), (group, version, plural) in CUSTOM_KINDS.items():
            answer = self.custom.list_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                label_selector=f"{RUN_LABEL}={run}",
                _request_timeout=REQUEST_TIMEOUT,
            )
            items = list(cast(dict[str, Any], answer).get("items") or [])
            for item in items:
                item["apiVersion"], item["kind"] = api_version, kind
            found.append(items)
        return found[0], found[1]

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"{RUN_LABEL}={run}", _request_timeout=REQUEST_TIMEOUT
        )
        return [self._json(p, "v1", "Pod") for p in pods.items]

    def get_nodes(self, names: list[str]) -> list[dict[str, Any]]:
        """Nodes by name; a node that no longer exists is simply absent from the answer."""
        found = []
        for name in sorted(set(names)):
            try:
                node = self.core.read_node(name, _request_timeout=REQUEST_TIMEOUT)
            except ApiException as err:
                if _status(err) != 404:
                    raise
                continue
            found.append(self._json(node, "v1", "Node"))
        return found

    def _create(self, manifest: Mapping[str, Any], namespace: str, dry_run: str | None) -> None:
        group, version, plural = CUSTOM_KINDS[(manifest["apiVersion"], manifest["kind"])]
        self.custom.create_namespaced_custom_object(
            group,
            version,
            namespace,
            plural,
            dict(manifest),
            dry_run=dry_run,
            field_manager=FIELD_MANAGER,
            _request_timeout=REQUEST_TIMEOUT,
        )

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        """Create-if-absent: True when created, False when it already existed."""
        try:
            self._create(manifest, namespace, None)
        except ApiException as err:
            if _status(err) == 409:
                return False
            raise
        return True

    def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        """Server-side dry run of a create: the API server's message when it rejects the
        object as invalid (400/422), else "" (accepted, or it cannot tell: 403, 409)."""
        try:
            self._create(manifest, namespace, "All")
        except ApiException as err:
            if _status(err) in (400, 422):
                return error_message(err)
        return ""

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str,
        *,
        propagation: str = "Background",
        grace_period: int | None = None,
    ) -> bool:
        """Delete; True when a delete was issued, False when it was already gone."""
        options: dict[str, Any] = {
            "propagation_policy": propagation,
            "grace_period_seconds": grace_period,
            "_request_timeout": REQUEST_TIMEOUT,
        }
        try:
            if (api_version, kind) == ("v1", "Pod"):
                self.core.delete_namespaced_pod(name, namespace, **options)
            else:
                group, version, plural = CUSTOM_KINDS[(api_version, kind)]
                self.custom.delete_namespaced_custom_object(
                    group, version, namespace, plural, name, **options
                )
        except ApiException as err:
            if _status(err) == 404:
                return False
            raise
        return True

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """JSON merge patch on the status subresource (None values delete keys)."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": dict(patch)},
            field_manager=FIELD_MANAGER,
            _request_timeout=REQUEST_TIMEOUT,
        )

    def secret_exists(self, namespace: str, name: str) -> bool | None:
        """Whether a Secret exists, asking for its metadata only (PartialObjectMetadata: the
        data never reaches the operator). None when this identity may not read Secrets (the
        chart grants no such right by default) or the answer is anything but 200/404."""
        try:
            self.core.read_namespaced_secret(
                name,
                namespace,
                _headers={"Accept": PARTIAL_METADATA},
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as err:
            return {404: False}.get(_status(err))
        return True

    def pod_security_level(self, namespace: str) -> str | None:
        """The namespace's enforced Pod Security level ("" when unlabelled), or None when
        this identity may not read Namespaces."""
        try:
            ns = self.core.read_namespace(namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if _status(err) not in (401, 403, 404):
                raise
            return None
        labels = (ns.metadata.labels if ns.metadata else None) or {}
        return str(labels.get(POD_SECURITY_ENFORCE, ""))

    def post_event(self, run: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the run, so `kubectl describe cpt` and `kubectl get events`
        show it. Best effort: a lost Event must never fail a reconcile."""
        meta = run.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{meta.get('name', 'cpt')}."},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:MAX_EVENT_MESSAGE],
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "reportingInstance": EVENT_SOURCE,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "action": reason,
        }
        try:
            self.core.create_namespaced_event(
                str(meta.get("namespace")),
                cast(client.CoreV1Event, client.CoreV1Event.from_dict(event)),
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as err:
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), err)


def error_message(err: ApiException) -> str:
    """The API server's own message of a failed request (its Status body), else the error."""
    try:
        body = json.loads(err.body or "{}")
    except ValueError:
        return str(err)
    return str(body.get("message") or err) if isinstance(body, dict) else str(err)
