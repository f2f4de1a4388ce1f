"""The precompile stage (nxd, ``spec.runtime.precompile``): ``<run>-precompile``, a PyTorchJob
of the training gang's exact shape whose pods run ``cpt-train precompile``, which runs
``neuron_parallel_compile`` over the very command the training pods run
(cpt_training/nxd/precompile.py).

The cache key names what the compiled graphs depend on: the training stage config without what
only says where things are or which attempt this is (attempt, run name, URIs, checkpoint
policy, storage tuning, stop point), plus the gang's size and the trainer image (its Neuron
SDK). A run whose key is recorded in its compile cache skips the stage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cpt_operator.api.models import ContinualPretrainSpec, join_uri
from cpt_operator.builders import pytorchjob, stages
from cpt_operator.builders.jobs import RunRef
from cpt_training.config import PrecompileStage, TrainStage

MARKERS = "cpt-precompiled"
"""Under the compile cache: one `<key>.json` per precompiled layout."""

NOT_IN_KEY = (
    "attempt",
    "runName",
    "modelUri",
    "dataUri",
    "progressUri",
    "tensorboardUri",
    "checkpoint",
    "storage",
    "stopAfterSteps",
    "evalEverySteps",
    "evalBlocks",
)


def cache_key(spec: ContinualPretrainSpec, train: TrainStage) -> str:
    """16 hex digits over everything the graphs depend on (see the module docstring)."""
    wire = {k: v for k, v in train.to_wire().items() if k not in NOT_IN_KEY}
    t = spec.training
    wire["gang"] = {"nodes": t.nodes, "processesPerNode": t.resolved_processes_per_node()}
    wire["image"] = spec.runtime.images.trainer_neuron
    text = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def precompile_stage(spec: ContinualPretrainSpec, run: str, namespace: str = "") -> PrecompileStage:
    """Attempt 1's training config, its key, where the key is recorded, and the training
    pods' own command (cpt-torchrun with the rendezvous from the pod's env)."""
    train = stages.train_stage(spec, run, 1, namespace)
    key = cache_key(spec, train)
    cache = stages.paths(spec, run, namespace).compile_cache
    procs = spec.training.resolved_processes_per_node()
    return PrecompileStage(
        train=train,
        cache_key=key,
        marker_uri=join_uri(cache, MARKERS, f"{key}.json"),
        command=[pytorchjob.LAUNCHER, *pytorchjob.torchrun_args(procs, "train")],
    )


def precompile_job(
    spec: ContinualPretrainSpec, run: RunRef, config: PrecompileStage
) -> dict[str, Any]:
    """The training gang's shape, placement and Neuron env, running `cpt-train precompile`."""
    return pytorchjob.gang_job(spec, run, "precompile", config, command=["cpt-train", "precompile"])
