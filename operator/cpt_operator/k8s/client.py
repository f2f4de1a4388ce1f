"""The operator's one door to the Kubernetes API (lightkube, async).

Kopf owns the watches; everything else the operator does to the API goes through `Kube`:
reading a run and its children, create-if-absent, delete, status patches and Events. Objects
cross this boundary as plain dicts so the pure layers never see a client type. The class is
small on purpose: tests wrap or replace it to count writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from lightkube import ApiError, AsyncClient, codecs
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Event, Namespace, Node, Pod, Secret
from lightkube.types import CascadeType, PatchType

from cpt_operator.reconcile.observe import RUN_LABEL

log = logging.getLogger(__name__)

GROUP, VERSION, KIND, PLURAL = "cpt.dev", "v1alpha1", "ContinualPretrain", "continualpretrains"
ContinualPretrain = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
PyTorchJob = create_namespaced_resource("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs")

FIELD_MANAGER = "cpt-operator"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"
EVENT_SOURCE = "cpt-operator"
_MAX_EVENT_MESSAGE = 1000

_KINDS: dict[tuple[str, str], Any] = {
    ("batch/v1", "Job"): Job,
    ("kubeflow.org/v1", "PyTorchJob"): PyTorchJob,
    ("v1", "Pod"): Pod,
    (f"{GROUP}/{VERSION}", KIND): ContinualPretrain,
}


def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)


class KubeApi(Protocol):
    """What handlers need; `Kube` is the real one, tests provide fakes."""

    async def get_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]: ...

    async def get_nodes(self, names: list[str]) -> list[dict[str, Any]]: ...

    async def create(self, manifest: Mapping[str, Any], namespace: str) -> bool: ...

    async def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str,
        *,
        propagation: str = "Background",
        grace_period: int | None = None,
    ) -> bool: ...

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None: ...

    async def secret_exists(self, namespace: str, name: str) -> bool | None: ...

    async def pod_security_level(self, namespace: str) -> str | None: ...

    async def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str: ...

    async def post_event(
        self, run: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None: ...


class Kube:
    """lightkube-backed implementation of `KubeApi`."""

    def __init__(self, client: AsyncClient | None = None) -> None:
        self._client = client or AsyncClient(field_manager=FIELD_MANAGER)

    async def close(self) -> None:
        await self._client.close()

    async def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _as_dict(await self._client.get(ContinualPretrain, name, namespace=namespace))
        except ApiError as err:
            if err.status.code == 404:
                return None
            raise

    async def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Jobs, PyTorchJobs and pods labelled with the run, in that order."""
        labels: dict[str, Any] = {RUN_LABEL: run}
        jobs = [
            _as_dict(j) async for j in self._client.list(Job, namespace=namespace, labels=labels)
        ]
        ptjs = [
            _as_dict(j)
            async for j in self._client.list(PyTorchJob, namespace=namespace, labels=labels)
        ]
        pods = [
            _as_dict(p) async for p in self._client.list(Pod, namespace=namespace, labels=labels)
        ]
        return jobs, ptjs, pods

    async def get_nodes(self, names: list[str]) -> list[dict[str, Any]]:
        """Nodes by name; a node that no longer exists is simply absent from the answer."""
        found = []
        for name in sorted(set(names)):
            try:
                found.append(_as_dict(await self._client.get(Node, name)))
            except ApiError as err:
                if err.status.code != 404:
                    raise
        return found

    async def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        """Create-if-absent. True when created now, False when it already existed."""
        body = dict(manifest)
        body["metadata"] = {**(body.get("metadata") or {}), "namespace": namespace}
        obj: Any = codecs.from_dict(body)
        try:
            await self._client.create(obj)
        except ApiError as err:
            if err.status.code == 409:
                return False
            raise
        return True

    async def delete(
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
        res = _KINDS[(api_version, kind)]
        cascade = CascadeType.FOREGROUND if propagation == "Foreground" else CascadeType.BACKGROUND
        try:
            await self._client.delete(
                res, name, namespace=namespace, cascade=cascade, grace_period=grace_period
            )
        except ApiError as err:
            if err.status.code == 404:
                return False
            raise
        return True

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """JSON merge patch on the status subresource (None values delete keys)."""
        await self._client.patch(
            ContinualPretrain.Status,
            name,
            {"status": dict(patch)},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )

    async def secret_exists(self, namespace: str, name: str) -> bool | None:
        """Whether a Secret exists, asking for its metadata only (PartialObjectMetadata: the
        data never reaches the operator). None when this identity may not read Secrets (the
        chart grants no such right by default) or the answer is anything but 200/404."""
        generic = self._client._client  # lightkube's request layer, for the Accept header
        request = generic.prepare_request(
            "get", Secret, name=name, namespace=namespace, headers={"Accept": PARTIAL_METADATA}
        )
        response = await generic.send(generic.build_adapter_request(request))  # type: ignore[no-untyped-call]
        return {200: True, 404: False}.get(response.status_code)

    async def pod_security_level(self, namespace: str) -> str | None:
        """The namespace's enforced Pod Security level ("" when unlabelled), or None when
        this identity may not read Namespaces."""
        try:
            ns = await self._client.get(Namespace, namespace)
        except ApiError as err:
            if err.status.code in (401, 403, 404):
                return None
            raise
        labels = (ns.metadata.labels if ns.metadata else None) or {}
        return str(labels.get(POD_SECURITY_ENFORCE, ""))

    async def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        """Server-side dry run of a create: the API server's message when it rejects the
        object as invalid (400/422), else "" (accepted, or it cannot tell: 403, 409)."""
        body = dict(manifest)
        body["metadata"] = {**(body.get("metadata") or {}), "namespace": namespace}
        try:
            await self._client.create(codecs.from_dict(body), dry_run=True)  # type: ignore[call-overload]
        except ApiError as err:
            if err.status.code in (400, 422):
                return str(err.status.message or err)
        return ""

    async def post_event(
        self, run: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event on the run, so `kubectl describe cpt` and `kubectl get events`
        show it. Best effort: a lost event must never fail a reconcile."""
        meta = run.get("metadata") or {}
        now = datetime.now(UTC)
        event = Event(
            metadata=ObjectMeta(
                generateName=f"{meta.get('name', 'cpt')}.", namespace=meta.get("namespace")
            ),
            involvedObject=ObjectReference(
                apiVersion=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=meta.get("name"),
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
                resourceVersion=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message[:_MAX_EVENT_MESSAGE],
            source=EventSource(component=EVENT_SOURCE),
            reportingComponent=EVENT_SOURCE,
            reportingInstance=EVENT_SOURCE,
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
            action=reason,
        )
        try:
            await self._client.create(event)
        except ApiError as err:
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), err)
