"""The operator's view of every run's children (Jobs, PyTorchJobs, Pods), kept from events.

Why: a reconcile used to LIST the three kinds by label on every event. Under a burst of new
runs those LISTs dominated the API server (each scans the whole namespace) and a new run
waited behind the repeats of others. This index is the operator's informer cache: it is
fed by the children's watch events (cpt_operator/k8s/watch.py), written through by the
operator's own creates and deletes, and checked by real LISTs, so a reconcile reads children
from memory.

Rules that keep it safe for a level-based reconcile (it must never make the operator act on
children that no longer look like that):

* A run is readable (`synced`) only after a LIST covering it: the startup LIST of every
  labelled child in the watched scope, a periodic verification LIST of the same scope, or a
  LIST of the run alone. Until then the caller LISTs the run itself.
* Events are applied to stored objects only when they are not older (resourceVersion compared
  as the integers the API server's etcd storage uses; when either is not an integer the
  newer-arriving one wins). A DELETED event removes an object only if its uid matches, so a
  late tombstone never removes a re-created child of the same name.
* A LIST merges instead of replacing: what an event or a write changed while the LIST was in
  flight is kept (an object added during it, one deleted during it stays deleted).
* The operator's create stores the API server's answer at once (the next reconcile already
  sees its child; its ADDED event then changes nothing and wakes nobody). A create that
  finds the child already there (409) means this view was behind: the run is marked for a
  fresh LIST. A delete only *marks* the object as deleting; it leaves the index on its
  DELETED event or when a LIST no longer returns it, because the decision waits for a child
  to be really gone (attempt n+1 only starts once nothing of attempt n is left).
* A run with a child marked deleting is re-listed by the resync (a missed DELETED event
  must not hold a run forever).

Stored bodies are projections (`trim`): only the fields reconcile/observe.py and the handler
read, which keeps 1,000 runs' children small. `observe(trim(x)) == observe(x)` is unit-tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cpt_operator.builders.meta import RUN_LABEL

RunKey = tuple[str, str]
"""(namespace, run name)."""
ObjKey = tuple[str, str]
"""(kind, name)."""
KINDS = ("Job", "PyTorchJob", "Pod")
ALL_NAMESPACES = "*"

_META_KEYS = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
_COND_KEYS = ("type", "status", "reason", "message", "lastTransitionTime")
_JOB_STATUS_KEYS = ("active", "succeeded", "failed", "failedIndexes")


def _conditions(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: c[k] for k in _COND_KEYS if c.get(k) is not None}
        for c in status.get("conditions") or []
        if isinstance(c, Mapping)
    ]


def trim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a child that the operator reads (see the module docstring)."""
    kind = str(body.get("kind") or "")
    meta = body.get("metadata") or {}
    out_meta: dict[str, Any] = {k: meta[k] for k in _META_KEYS if meta.get(k) is not None}
    out_meta["labels"] = dict(meta.get("labels") or {})
    if meta.get("deletionTimestamp"):
        out_meta["deletionTimestamp"] = meta["deletionTimestamp"]
    owners = [
        {k: o[k] for k in ("kind", "name", "controller") if o.get(k) is not None}
        for o in meta.get("ownerReferences") or []
    ]
    if owners:
        out_meta["ownerReferences"] = owners
    status = body.get("status") or {}
    out_status: dict[str, Any] = {}
    if status.get("conditions"):
        out_status["conditions"] = _conditions(status)
    if kind == "Job":
        out_status.update({k: status[k] for k in _JOB_STATUS_KEYS if status.get(k) is not None})
    elif kind == "Pod":
        for k in ("phase", "reason", "message"):
            if status.get(k):
                out_status[k] = status[k]
        terminated = []
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            state = (
                {"terminated": {k: term[k] for k in ("exitCode", "reason", "message") if k in term}}
                if term
                else {}
            )
            terminated.append({"state": state})
        if terminated:
            out_status["containerStatuses"] = terminated
    out: dict[str, Any] = {"apiVersion": body.get("apiVersion"), "kind": kind}
    out["metadata"] = out_meta
    if kind == "Pod" and (body.get("spec") or {}).get("nodeName"):
        out["spec"] = {"nodeName": body["spec"]["nodeName"]}
    if out_status:
        out["status"] = out_status
    return out


def run_key(body: Mapping[str, Any]) -> RunKey | None:
    meta = body.get("metadata") or {}
    run = (meta.get("labels") or {}).get(RUN_LABEL)
    ns = meta.get("namespace")
    return (str(ns), str(run)) if run and ns else None


def _obj_key(body: Mapping[str, Any]) -> ObjKey:
    return str(body.get("kind") or ""), str((body.get("metadata") or {}).get("name") or "")


def _rv(body: Mapping[str, Any] | None) -> int | None:
    try:
        return int((body or {}).get("metadata", {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def compare_versions(a: str | None, b: str | None) -> int | None:
    """-1/0/1 for two resourceVersions, None when either is not an integer."""
    try:
        x, y = int(str(a)), int(str(b))
    except ValueError:
        return None
    return (x > y) - (x < y)


def _older(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    a, b = _rv(new), _rv(old)
    return a is not None and b is not None and a < b


def _same(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Equal apart from the resourceVersion (a change the decision cannot see)."""
    if a is None or b is None:
        return a is b
    strip = {**a, "metadata": {k: v for k, v in a["metadata"].items() if k != "resourceVersion"}}
    other = {**b, "metadata": {k: v for k, v in b["metadata"].items() if k != "resourceVersion"}}
    return strip == other


@dataclass
class _Entry:
    objects: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)
    touched: dict[ObjKey, int] = field(default_factory=dict)  # seq of the last event/write
    listed_at: float | None = None  # monotonic time of the last LIST covering this run
    stale: bool = False  # a create found a child this view did not have


class ChildIndex:
    """Children by run. Not thread-safe: used from the operator's one event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[RunKey, _Entry] = {}
        self._seq = 0
        self._lists = 0  # LISTs in flight
        self._deleted: dict[str, int] = {}  # uid -> seq of its removal, while LISTs run
        self._scopes: dict[str, float] = {}  # namespace (or "*") -> time of its last LIST

    # -- reading ---------------------------------------------------------------------------

    def synced(self, key: RunKey) -> bool:
        """Whether `children(key)` may be used (see the module docstring)."""
        entry = self._entries.get(key)
        if entry is not None and entry.stale:
            return False
        if entry is not None and entry.listed_at is not None:
            return True
        return key[0] in self._scopes or ALL_NAMESPACES in self._scopes

    def needs_list(self, key: RunKey) -> bool:
        """Not synced, or holding a child marked deleting (its DELETED event may be lost)."""
        if not self.synced(key):
            return True
        entry = self._entries.get(key)
        return entry is not None and any(
            o["metadata"].get("deletionTimestamp") for o in entry.objects.values()
        )

    def children(
        self, key: RunKey
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Jobs, PyTorchJobs and Pods of a run (the stored projections; do not mutate)."""
        entry = self._entries.get(key)
        out: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        for (kind, _), obj in sorted((entry.objects if entry else {}).items()):
            out.setdefault(kind, []).append(obj)
        return out["Job"], out["PyTorchJob"], out["Pod"]

    def scope_age(self, scope: str) -> float | None:
        at = self._scopes.get(scope)
        return None if at is None else self._clock() - at

    def __len__(self) -> int:
        return sum(len(e.objects) for e in self._entries.values())

    # -- events and writes -----------------------------------------------------------------

    def _touch(self, entry: _Entry, ok: ObjKey) -> None:
        self._seq += 1
        entry.touched[ok] = self._seq

    def apply(self, type_: str | None, body: Mapping[str, Any]) -> RunKey | None:
        """A watch event (type None: an initial listing). Returns the run whose view
        changed in a way the decision can see, else None (nothing to reconcile)."""
        key = run_key(body)
        if key is None:
            return None
        entry = self._entries.setdefault(key, _Entry())
        ok = _obj_key(body)
        old = entry.objects.get(ok)
        if type_ == "DELETED":
            uid = (body.get("metadata") or {}).get("uid")
            if old is None or (uid and old["metadata"].get("uid") not in (None, uid)):
                self._remember_deleted(uid)
                return None
            del entry.objects[ok]
            self._touch(entry, ok)
            self._remember_deleted(uid)
            return key
        if _older(body, old):
            return None
        new = trim(body)
        entry.objects[ok] = new
        self._touch(entry, ok)
        return None if _same(new, old) else key

    def _remember_deleted(self, uid: Any) -> None:
        if uid and self._lists:
            self._deleted[str(uid)] = self._seq

    def created(self, body: Mapping[str, Any]) -> None:
        """Our create succeeded: `body` is the API server's answer (or the manifest)."""
        self.apply("ADDED", body)

    def create_conflict(self, key: RunKey) -> None:
        """A create found the child already there: this view is behind, LIST it again."""
        self._entries.setdefault(key, _Entry()).stale = True

    def deleting(self, key: RunKey, kind: str, name: str, *, gone: bool = False) -> None:
        """Our delete was issued (`gone`: the API server said it did not exist)."""
        entry = self._entries.get(key)
        if entry is None or (kind, name) not in entry.objects:
            return
        if gone:
            del entry.objects[(kind, name)]
        else:
            obj = entry.objects[(kind, name)]
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            obj["metadata"] = {"deletionTimestamp": stamp, **obj["metadata"]}
        self._touch(entry, (kind, name))

    def forget(self, key: RunKey) -> None:
        """The run is gone (its children go with it through ownerReferences)."""
        self._entries.pop(key, None)

    # -- LISTs -----------------------------------------------------------------------------

    def begin_list(self) -> int:
        """Call before sending a LIST; pass the token to `end_list`."""
        self._lists += 1
        return self._seq

    def abort_list(self) -> None:
        self._lists = max(0, self._lists - 1)
        if not self._lists:
            self._deleted.clear()

    def end_list(
        self,
        token: int,
        listed: Iterable[Mapping[str, Any]],
        *,
        run: RunKey | None = None,
        scope: str | None = None,
    ) -> None:
        """Merge a LIST answer covering one run, or a namespace / every namespace."""
        by_run: dict[RunKey, list[Mapping[str, Any]]] = {}
        for body in listed:
            key = run_key(body)
            if key is not None and (run is None or key == run):
                by_run.setdefault(key, []).append(body)

        def covers(key: RunKey) -> bool:
            if run is not None:
                return key == run
            return scope == ALL_NAMESPACES or key[0] == scope

        now = self._clock()
        keys = {k for k in self._entries if covers(k)} | set(by_run)
        if run is not None:
            keys.add(run)
        for key in keys:
            entry = self._entries.setdefault(key, _Entry())
            fresh: dict[ObjKey, dict[str, Any]] = {}
            for body in by_run.get(key, []):
                ok = _obj_key(body)
                uid = str((body.get("metadata") or {}).get("uid") or "")
                if uid and self._deleted.get(uid, -1) > token:
                    continue  # deleted by an event while the LIST was in flight
                mine = entry.objects.get(ok)
                if entry.touched.get(ok, -1) > token and mine is not None and _older(body, mine):
                    fresh[ok] = mine
                else:
                    fresh[ok] = trim(body)
            for ok, mine in entry.objects.items():
                if ok not in fresh and entry.touched.get(ok, -1) > token:
                    fresh[ok] = mine  # appeared while the LIST was in flight
            entry.objects = fresh
            entry.touched = {ok: s for ok, s in entry.touched.items() if ok in fresh}
            entry.listed_at = now
            entry.stale = False
            if not fresh and run is None:
                del self._entries[key]
        if scope is not None:
            self._scopes[scope] = now
        self.abort_list()
