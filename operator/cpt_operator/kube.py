"""The operator's one door to the Kubernetes API: the official `kubernetes` client, public API only.

Every call blocks (the client is urllib3 underneath): the controller runs a run's whole
reconcile in a worker thread (cpt_operator/handlers.py), so nothing here is async. Requests
go through the client's generic request path (`ApiClient.param_serialize` + `call_api`: its
configuration, auth, TLS and errors) by resource path, and answers stay the API server's JSON
as plain dicts: the pure layers (reconcile/, builders/) never see a client type, and the
operator never loads the client's typed models (its core API classes alone hold 85 MiB of
model classes once imported, more than the rest of the operator).

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
from typing import Any, Protocol

from kubernetes import config
from kubernetes.client.api_client import ApiClient
from kubernetes.client.configuration import Configuration
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

PLURALS = {"Job": "jobs", "PyTorchJob": "pytorchjobs", "Pod": "pods", "Node": "nodes"}
RUN_API_VERSION = f"{GROUP}/{VERSION}"
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"


def path(api_version: str, plural: str, namespace: str | None = None, name: str = "") -> str:
    """The REST path of a collection or (with `name`) of one object."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace is not None else ""
    return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")


class KubeApi(Protocol):
    """What the controller needs of the API; `Kube` is the real one."""

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list_runs(self, namespace: str | None) -> list[dict[str, Any]]: ...

    def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]: ...

    def list_workloads(self, namespace: str) -> list[dict[str, Any]]: ...

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


def api_client(pool_size: int = 32) -> ApiClient:
    """A client for the environment's cluster: in-cluster service account, else KUBECONFIG.
    One HTTP connection per worker thread (`pool_size`), so no reconcile waits for a socket."""
    cfg = Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # KUBECONFIG as it is now (the client reads it once, when first imported)
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg
        )
    cfg.connection_pool_maxsize = max(pool_size, 4)
    return ApiClient(cfg)


def _status(err: ApiException) -> int:
    return int(err.status or 0)


class Kube:
    """`KubeApi` on the official client."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def request(
        self,
        method: str,
        resource: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Any:
        """One request; the answer's JSON. Raises ApiException (with `.status`) when the API
        server refuses it."""
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, data, _ = self.api.param_serialize(
            method,
            resource,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=data, _request_timeout=REQUEST_TIMEOUT
        )
        raw = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            text = raw.decode(errors="replace") if raw else None
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        return json.loads(raw) if raw else None

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            run: dict[str, Any] = self.request(
                "GET", path(RUN_API_VERSION, PLURAL, namespace, name)
            )
        except ApiException as err:
            if _status(err) == 404:
                return None
            raise
        return run

    def list_runs(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every run in one namespace or (None) in all of them."""
        answer = self.request("GET", path(RUN_API_VERSION, PLURAL, namespace))
        return list(answer.get("items") or [])

    def _list_labelled(
        self, api_version: str, kind: str, namespace: str, run: str
    ) -> list[dict[str, Any]]:
        """Objects of a kind carrying the run's label (selected by the API server), each with
        its kind (list items carry none)."""
        answer = self.request(
            "GET",
            path(api_version, PLURALS[kind], namespace),
            query={"labelSelector": f"{RUN_LABEL}={run}"},
        )
        items = list(answer.get("items") or [])
        for item in items:
            item["apiVersion"], item["kind"] = api_version, kind
        return items

    def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The run's Jobs and PyTorchJobs."""
        return (
            self._list_labelled("batch/v1", "Job", namespace, run),
            self._list_labelled("kubeflow.org/v1", "PyTorchJob", namespace, run),
        )

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._list_labelled("v1", "Pod", namespace, run)

    def list_workloads(self, namespace: str) -> list[dict[str, Any]]:
        """Kueue's Workloads in the namespace; none where Kueue is not installed or this
        identity may not read them (a suspended child then shows no Kueue reason)."""
        try:
            answer = self.request("GET", path(KUEUE_API_VERSION, "workloads", namespace))
        except ApiException as err:
            if _status(err) not in (401, 403, 404):
                raise
            return []
        return list(answer.get("items") or [])

    def get_nodes(self, names: list[str]) -> list[dict[str, Any]]:
        """Nodes by name; a node that no longer exists is simply absent from the answer."""
        found = []
        for name in sorted(set(names)):
            try:
                found.append(self.request("GET", path("v1", "nodes", None, name)))
            except ApiException as err:
                if _status(err) != 404:
                    raise
        return found

    def _create(self, manifest: Mapping[str, Any], namespace: str, dry_run: bool) -> None:
        query = {"fieldManager": FIELD_MANAGER} | ({"dryRun": "All"} if dry_run else {})
        collection = path(manifest["apiVersion"], PLURALS[manifest["kind"]], namespace)
        self.request("POST", collection, query=query, body=dict(manifest))

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        """Create-if-absent: True when created, False when it already existed."""
        try:
            self._create(manifest, namespace, dry_run=False)
        except ApiException as err:
            if _status(err) == 409:
                return False
            raise
        return True

    def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        """Server-side dry run of a create: the API server's message when it rejects the
        object as invalid (400/422), else "" (accepted, or it cannot tell: 403, 409)."""
        try:
            self._create(manifest, namespace, dry_run=True)
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
        options: dict[str, Any] = {"propagationPolicy": propagation}
        if grace_period is not None:
            options["gracePeriodSeconds"] = grace_period
        try:
            self.request("DELETE", path(api_version, PLURALS[kind], namespace, name), body=options)
        except ApiException as err:
            if _status(err) == 404:
                return False
            raise
        return True

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """JSON merge patch on the status subresource (None values delete keys)."""
        self.request(
            "PATCH",
            path(RUN_API_VERSION, PLURAL, namespace, name) + "/status",
            query={"fieldManager": FIELD_MANAGER},
            body={"status": dict(patch)},
            content_type="application/merge-patch+json",
        )

    def secret_exists(self, namespace: str, name: str) -> bool | None:
        """Whether a Secret exists, asking for its metadata only (PartialObjectMetadata: the
        data never reaches the operator). None when this identity may not read Secrets (the
        chart grants no such right by default) or the answer is anything but 200/404."""
        try:
            self.request("GET", path("v1", "secrets", namespace, name), accept=PARTIAL_METADATA)
        except ApiException as err:
            return {404: False}.get(_status(err))
        return True

    def pod_security_level(self, namespace: str) -> str | None:
        """The namespace's enforced Pod Security level ("" when unlabelled), or None when
        this identity may not read Namespaces."""
        try:
            ns = self.request("GET", path("v1", "namespaces", None, namespace))
        except ApiException as err:
            if _status(err) not in (401, 403, 404):
                raise
            return None
        labels = (ns.get("metadata") or {}).get("labels") or {}
        return str(labels.get(POD_SECURITY_ENFORCE, ""))

    def post_event(self, run: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the run, so `kubectl describe cpt` and `kubectl get events`
        show it. Best effort: a lost Event must never fail a reconcile."""
        meta = run.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
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
            self.request("POST", path("v1", "events", str(meta.get("namespace"))), body=event)
        except ApiException as err:
            log.warning(
                "could not post event %s on %s/%s: %s",
                reason,
                meta.get("namespace"),
                meta.get("name"),
                error_message(err),
            )


def error_message(err: BaseException) -> str:
    """One line for a log or a condition: the API server's own message of a failed request
    (its Status body), else the error's text. The client's own text of an ApiException spans
    lines (status, headers, body), which splits one log record over several lines."""
    if isinstance(err, ApiException):
        try:
            body = json.loads(err.body or "{}")
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return " ".join(str(err).split())
