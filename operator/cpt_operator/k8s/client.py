"""The operator's one door to the Kubernetes API (lightkube, async).

Kopf owns the run watch; the children's watches (`watch_labelled`, driven by
cpt_operator/k8s/watch.py) and everything else the operator does to the API go through `Kube`:
reading a run and its children, create-if-absent, delete, status patches and Events. Objects
cross this boundary as plain dicts so the pure layers never see a client type. The class is
small on purpose: tests wrap or replace it to count writes.

Writes answer with what the API server returned (the created child, the resourceVersion of a
status patch) so the handler can keep its child index current and recognise the echo of its
own patch (see cpt_operator/index.py). Two admission facts are cached per namespace: the Pod
Security level for a few seconds (a burst of new runs in one namespace asks once, not once
per run) and "Secrets are not readable here" (403) for a minute. Concurrent requests are
capped (`CPT_API_CONCURRENCY`): past a few dozen, the HTTP pool spends its time scanning
connections and the API server answers no faster.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from lightkube import ALL_NS, ApiError, AsyncClient, ConfigError, codecs
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.kubeconfig import KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Event, Namespace, Node, Pod, Secret
from lightkube.types import CascadeType, PatchType

from cpt_operator.index import trim
from cpt_operator.k8s.transport import AiohttpTransport
from cpt_operator.k8s.watch import WATCH_TIMEOUT_S, Gone
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
POD_SECURITY_TTL = 10.0
SECRETS_FORBIDDEN_TTL = 60.0
API_CONCURRENCY = int(os.environ.get("CPT_API_CONCURRENCY", "16"))
LIST_PAGE = int(os.environ.get("CPT_LIST_PAGE", "200"))
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("batch/v1", "Job"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("v1", "Pod"),
)

_KINDS: dict[tuple[str, str], Any] = {
    ("batch/v1", "Job"): Job,
    ("kubeflow.org/v1", "PyTorchJob"): PyTorchJob,
    ("v1", "Pod"): Pod,
    (f"{GROUP}/{VERSION}", KIND): ContinualPretrain,
}


CREATE, FIRST, LATER = 0, 1, 2
"""Request priorities when requests queue for a slot: creates of children, then admission
checks (what a waiting user's first child needs: a run that passed its checks gets its child
before the next run is checked), then reads, Events and status patches."""


class _Slots:
    """A concurrency cap whose waiters are served by priority, then in arrival order."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: tuple[collections.deque[asyncio.Future[None]], ...] = tuple(
            collections.deque() for _ in range(LATER + 1)
        )

    @contextlib.asynccontextmanager
    async def __call__(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0 and not any(self._waiting):
            self._free -= 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[priority].append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot just as it was cancelled
                else:
                    self._waiting[priority].remove(waiter)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for queue in self._waiting:
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the slot passes straight to it
                    return
        self._free += 1


def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)


class KubeApi(Protocol):
    """What handlers need; `Kube` is the real one, tests provide fakes."""

    async def get_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]: ...

    async def get_nodes(self, names: list[str]) -> list[dict[str, Any]]: ...

    async def list_labelled(self, namespace: str | None) -> list[dict[str, Any]]: ...

    async def list_runs(self, namespace: str | None) -> list[dict[str, Any]]: ...

    async def create(
        self, manifest: Mapping[str, Any], namespace: str
    ) -> dict[str, Any] | None: ...

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

    async def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> str | None: ...

    async def secret_exists(self, namespace: str, name: str) -> bool | None: ...

    async def pod_security_level(self, namespace: str) -> str | None: ...

    async def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str: ...

    async def post_event(
        self, run: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None: ...


def default_client() -> AsyncClient:
    """lightkube's client for the environment's cluster (kubeconfig or in-cluster), its
    requests sent over aiohttp (cpt_operator/k8s/transport.py) unless CPT_HTTP_CLIENT=httpx."""
    choice = os.environ.get("CPT_HTTP_CLIENT", "aiohttp")
    if choice not in ("aiohttp", "httpx"):
        raise ValueError(f"CPT_HTTP_CLIENT={choice!r}: use aiohttp or httpx")
    if choice == "httpx":
        return AsyncClient(field_manager=FIELD_MANAGER)
    config = KubeConfig.from_env().get()
    if config is None or config.user is None:
        raise ConfigError("no Kubernetes context or user in the environment's configuration")
    tls = verify_cluster(config.cluster, config.user, config.abs_file)
    return AsyncClient(config, field_manager=FIELD_MANAGER, transport=AiohttpTransport(tls))


class Kube:
    """lightkube-backed implementation of `KubeApi`."""

    def __init__(self, client: AsyncClient | None = None, *, concurrency: int = 0) -> None:
        self._client = client or default_client()
        self._slots = _Slots(concurrency or API_CONCURRENCY)
        self._pod_security: dict[str, tuple[float, str | None]] = {}
        self._secrets_forbidden: dict[str, float] = {}

    async def close(self) -> None:
        await self._client.close()

    async def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            async with self._slots(LATER):
                obj = await self._client.get(ContinualPretrain, name, namespace=namespace)
            return _as_dict(obj)
        except ApiError as err:
            if err.status.code == 404:
                return None
            raise

    async def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Jobs, PyTorchJobs and pods labelled with the run, in that order."""
        labels: dict[str, Any] = {RUN_LABEL: run}
        jobs, ptjs, pods = await asyncio.gather(
            *(self._list(kind, namespace, labels) for kind in CHILD_KINDS)
        )
        return jobs, ptjs, pods

    async def list_labelled(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every Job, PyTorchJob and Pod carrying the run label, in one namespace or (None)
        all of them: the child index's startup and verification LIST. Each object comes back
        already projected (`index.trim`), one kind and one page (`CPT_LIST_PAGE` objects) at
        a time: with 1,000 runs the whole answer decoded into models was a transient ~45 MiB,
        and the heap that peak took stayed in the resident set."""
        ns = namespace if namespace is not None else ALL_NS
        out: list[dict[str, Any]] = []
        for kind in CHILD_KINDS:
            out += await self._list_projected(kind, ns)
        return out

    async def _send_labelled(
        self,
        kind: tuple[str, str],
        namespace: Any,
        params: dict[str, Any],
        *,
        watch: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """A raw LIST or watch request of `kind`'s objects carrying the run label, through
        lightkube's own HTTP client (its auth, TLS and base URL), answered undecoded: lightkube
        would build a model of every object where the index keeps a few fields. The one place
        that uses lightkube's internals for it."""
        generic = self._client._client
        br = generic.prepare_request(
            "list",
            res=_KINDS[kind],
            namespace=namespace,
            watch=watch,
            params={"labelSelector": RUN_LABEL, **params},
        )
        build = generic._client.build_request
        req = (
            build(br.method, br.url, params=br.params)  # the client's own timeouts
            if timeout is None
            else build(br.method, br.url, params=br.params, timeout=timeout)
        )
        resp = await generic.send(req, stream=watch)  # type: ignore[no-untyped-call]
        if not watch:  # a watch reads its status itself (410 is Gone, not an error)
            generic.raise_for_status(resp)  # type: ignore[no-untyped-call]  # ApiError
        return resp

    async def _list_projected(self, kind: tuple[str, str], namespace: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            async with self._slots(LATER):
                resp = await self._send_labelled(
                    kind, namespace, {"limit": LIST_PAGE, "continue": token}
                )
            page = resp.json()
            del resp
            for item in page.get("items") or []:
                item["apiVersion"], item["kind"] = kind  # list items carry no kind
                out.append(trim(item))
            token = (page.get("metadata") or {}).get("continue") or None
            if token is None:
                return out

    async def watch_labelled(
        self, kind: tuple[str, str], namespace: str | None, resource_version: str | None
    ) -> AsyncIterator[str]:
        """Raw event lines of a watch of `kind`'s objects carrying the run label, in one
        namespace or (None) all: the label is selected by the API server (see
        cpt_operator/k8s/watch.py). Lines are left undecoded: lightkube would build a model
        of every object, the index keeps a few fields. Raises watch.Gone on 410. Holds no
        request slot (it is open for minutes)."""
        resp = await self._send_labelled(
            kind,
            namespace if namespace is not None else ALL_NS,
            {
                "allowWatchBookmarks": "true",
                "timeoutSeconds": WATCH_TIMEOUT_S,
                "resourceVersion": resource_version,
            },
            watch=True,
            timeout=WATCH_TIMEOUT_S + 30,
        )
        try:
            if resp.status_code == 410:
                raise Gone(f"HTTP 410 for {kind[1]} at resourceVersion {resource_version}")
            if resp.status_code != 200:
                body = (await resp.aread())[:300]
                raise RuntimeError(f"watch {kind[1]}: HTTP {resp.status_code}: {body!r}")
            async for line in resp.aiter_lines():
                if line:
                    yield line
        finally:
            await resp.aclose()

    async def list_runs(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every ContinualPretrain in one namespace or (None) all of them: which S3 prefixes
        the runs already own, read once at startup (afterwards the run watch keeps it)."""
        ns = namespace if namespace is not None else ALL_NS
        async with self._slots(LATER):
            return [_as_dict(r) async for r in self._client.list(ContinualPretrain, namespace=ns)]

    async def _list(
        self, kind: tuple[str, str], namespace: Any, labels: dict[str, Any]
    ) -> list[dict[str, Any]]:
        res = _KINDS[kind]
        async with self._slots(LATER):
            items = [
                _as_dict(o)
                async for o in self._client.list(res, namespace=namespace, labels=labels)
            ]
        for item in items:  # list items carry no kind of their own
            item["apiVersion"], item["kind"] = kind
        return items

    async def get_nodes(self, names: list[str]) -> list[dict[str, Any]]:
        """Nodes by name; a node that no longer exists is simply absent from the answer."""
        found = []
        for name in sorted(set(names)):
            try:
                async with self._slots(LATER):
                    found.append(_as_dict(await self._client.get(Node, name)))
            except ApiError as err:
                if err.status.code != 404:
                    raise
        return found

    async def create(self, manifest: Mapping[str, Any], namespace: str) -> dict[str, Any] | None:
        """Create-if-absent: the created object as the API server answered it, or None when
        it already existed."""
        body = dict(manifest)
        body["metadata"] = {**(body.get("metadata") or {}), "namespace": namespace}
        obj: Any = codecs.from_dict(body)
        try:
            async with self._slots(CREATE):
                created = _as_dict(await self._client.create(obj))
        except ApiError as err:
            if err.status.code == 409:
                return None
            raise
        created.setdefault("apiVersion", body.get("apiVersion"))
        created.setdefault("kind", body.get("kind"))
        return created

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
            async with self._slots(LATER):
                await self._client.delete(
                    res, name, namespace=namespace, cascade=cascade, grace_period=grace_period
                )
        except ApiError as err:
            if err.status.code == 404:
                return False
            raise
        return True

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> str | None:
        """JSON merge patch on the status subresource (None values delete keys). Returns the
        run's resourceVersion after the patch."""
        async with self._slots(LATER):
            obj = await self._client.patch(
                ContinualPretrain.Status,
                name,
                {"status": dict(patch)},
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        version = (_as_dict(obj).get("metadata") or {}).get("resourceVersion")
        return str(version) if version else None

    async def secret_exists(self, namespace: str, name: str) -> bool | None:
        """Whether a Secret exists, asking for its metadata only (PartialObjectMetadata: the
        data never reaches the operator). None when this identity may not read Secrets (the
        chart grants no such right by default) or the answer is anything but 200/404.
        A 403 is remembered for the namespace for a minute."""
        forbidden_at = self._secrets_forbidden.get(namespace)
        if forbidden_at is not None and time.monotonic() - forbidden_at < SECRETS_FORBIDDEN_TTL:
            return None
        generic = self._client._client  # lightkube's request layer, for the Accept header
        request = generic.prepare_request(
            "get", Secret, name=name, namespace=namespace, headers={"Accept": PARTIAL_METADATA}
        )
        async with self._slots(FIRST):
            response = await generic.send(generic.build_adapter_request(request))  # type: ignore[no-untyped-call]
        if response.status_code in (401, 403):
            self._secrets_forbidden[namespace] = time.monotonic()
        return {200: True, 404: False}.get(response.status_code)

    async def pod_security_level(self, namespace: str) -> str | None:
        """The namespace's enforced Pod Security level ("" when unlabelled), or None when
        this identity may not read Namespaces. Cached per namespace for a few seconds."""
        hit = self._pod_security.get(namespace)
        if hit is not None and time.monotonic() - hit[0] < POD_SECURITY_TTL:
            return hit[1]
        level: str | None
        try:
            async with self._slots(FIRST):
                ns = await self._client.get(Namespace, namespace)
            labels = (ns.metadata.labels if ns.metadata else None) or {}
            level = str(labels.get(POD_SECURITY_ENFORCE, ""))
        except ApiError as err:
            if err.status.code not in (401, 403, 404):
                raise
            level = None
        self._pod_security[namespace] = (time.monotonic(), level)
        return level

    async def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        """Server-side dry run of a create: the API server's message when it rejects the
        object as invalid (400/422), else "" (accepted, or it cannot tell: 403, 409)."""
        body = dict(manifest)
        body["metadata"] = {**(body.get("metadata") or {}), "namespace": namespace}
        try:
            async with self._slots(FIRST):
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
            async with self._slots(LATER):
                await self._client.create(event)
        except ApiError as err:
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), err)
