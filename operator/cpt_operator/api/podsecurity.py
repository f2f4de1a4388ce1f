"""Which Pod Security Standards level a run's namespace must enforce (at most) for its pods.

cpt's pods meet "restricted" except where a run's hardware or storage needs more; each
departure is named with the spec field that causes it (docs/security.md, Pod security):

* Neuron training containers (trn1/trn2) run as root: the Neuron runtime opens
  ``/dev/neuron*``, which a stock EKS Neuron AMI node hands to the container owned by root,
  and EFA memory locking needs ``IPC_LOCK``, a capability Linux grants only to root (it is
  not effective for a non-root user: kubernetes/kubernetes#56374). Root is outside
  "restricted"; baseline allows it.
* EFA instances add ``IPC_LOCK`` (RDMA memory registration pins pages): outside baseline.
* A hostPath scratch volume: outside baseline.
* With more than one node the training operator (v1) injects an init container without a
  securityContext into every Worker pod: outside "restricted".

Pure and torch-free: the planner (``cpt plan``), the admission check and ``cpt doctor`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_training.flops import instance_type

Level = Literal["restricted", "baseline", "privileged"]
ORDER: tuple[Level, ...] = ("restricted", "baseline", "privileged")
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"


@dataclass(frozen=True)
class Departure:
    field: str
    level: Level
    """The lowest level that admits this departure."""
    why: str
    short: str
    """A few words for ``cpt plan``'s one-line summary."""


@dataclass(frozen=True)
class PodSecurityNeed:
    level: Level
    departures: list[Departure] = field(default_factory=list)

    def admitted_by(self, enforced: str | None) -> bool:
        """Does a namespace enforcing ``enforced`` ("" or None: nothing) admit the pods?"""
        if enforced not in ORDER:
            return True  # unlabelled (or an unknown value): no enforcement
        return ORDER.index(self.level) <= ORDER.index(enforced)  # type: ignore[arg-type]

    def rejected_by(self, enforced: str | None) -> list[Departure]:
        """The departures a namespace enforcing ``enforced`` rejects."""
        if enforced not in ORDER:
            return []
        limit = ORDER.index(enforced)  # type: ignore[arg-type]
        return [d for d in self.departures if ORDER.index(d.level) > limit]

    def summary(self) -> str:
        if not self.departures:
            return "restricted"
        return f"{self.level} ({', '.join(d.short for d in self.departures)})"


def runs_as_root(spec: ContinualPretrainSpec) -> bool:
    """Training containers on Neuron instances run as root (see the module docstring)."""
    return instance_type(spec.training.instance_type).accelerator == "neuron"


def required_level(spec: ContinualPretrainSpec) -> PodSecurityNeed:
    """The least permissive Pod Security level that admits every pod of ``spec``."""
    inst = instance_type(spec.training.instance_type)
    out: list[Departure] = []
    where = "spec.training.instanceType"
    if inst.efa_devices > 0:
        out.append(
            Departure(
                where,
                "privileged",
                f"{inst.name} training pods add the capability IPC_LOCK (EFA pins RDMA memory)",
                "IPC_LOCK for EFA",
            )
        )
    if runs_as_root(spec):
        out.append(
            Departure(
                where,
                "baseline",
                f"{inst.name} training containers run as root (Neuron devices, EFA memory locking)",
                "root for Neuron devices",
            )
        )
    if spec.checkpoints.scratch.type == "hostPath":
        out.append(
            Departure(
                "spec.checkpoints.scratch.type",
                "privileged",
                "hostPath scratch volumes are outside the baseline level",
                "hostPath scratch",
            )
        )
    if spec.training.nodes > 1:
        out.append(
            Departure(
                "spec.training.nodes",
                "baseline",
                "the training operator adds an init container without a securityContext to "
                "every Worker pod",
                "the training operator's init container",
            )
        )
    level: Level = "restricted"
    for d in out:
        if ORDER.index(d.level) > ORDER.index(level):
            level = d.level
    return PodSecurityNeed(level, out)
