"""The side effects a decision asks for. The handler executes them in order through the client
layer; the decision itself never performs I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Propagation = Literal["Foreground", "Background"]


@dataclass(frozen=True)
class CreateChild:
    """Create-if-absent: a 409 AlreadyExists counts as success (names are deterministic)."""

    manifest: dict[str, Any] = field(hash=False, compare=False)
    kind: str = ""
    name: str = ""

    @staticmethod
    def of(manifest: dict[str, Any]) -> CreateChild:
        return CreateChild(
            manifest=manifest, kind=manifest["kind"], name=manifest["metadata"]["name"]
        )


@dataclass(frozen=True)
class DeleteChild:
    """Delete a child; a 404 counts as success. `grace_period=0` force-deletes a pod whose node
    is gone, which the kubelet would otherwise never confirm."""

    api_version: str
    kind: str
    name: str
    propagation: Propagation = "Background"
    grace_period: int | None = None


@dataclass(frozen=True)
class EmitEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = CreateChild | DeleteChild | EmitEvent
