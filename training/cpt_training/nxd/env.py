"""Container environment for NxD training on trn1: a pure function of the stage config.

The operator imports :func:`neuron_env` to set the training pods' env (this module is
torch-free on purpose), and ``cpt-train train`` applies the same values as defaults before it
imports torch_xla, so a hand-started or local run behaves like a pod.

What is set and why (sources: NxD's Llama example scripts, the AWS EKS sample templates, the
Neuron runtime/compiler docs, all at the SDK 2.28 era):

* EFA (only on instances that have EFA devices): ``FI_PROVIDER=efa``,
  ``FI_EFA_USE_DEVICE_RDMA=1``, ``FI_EFA_FORK_SAFE=1`` (the data loader forks while EFA memory
  is registered), ``FI_EFA_ENABLE_SHM_TRANSFER=1`` (libfabric's shared-memory path for peers on
  the same node) and ``FI_LOG_LEVEL=warn`` (libfabric's warnings in the pod log: the first
  thing to read when a collective cannot start), as the AWS EKS NxD sample sets them.
* ``CCOM_SOCKET_IFNAME=eth0``: the collectives' bootstrap socket; in a pod the primary
  interface is ``eth0`` (the NxD scripts set this in their Kubernetes/MPI branch).
* ``NEURON_RT_NUM_CORES``: all NeuronCores of the node (32 on trn1.32xlarge); torchrun starts
  one process per core.
* Precision (:mod:`cpt_training.nxd.precision`, table in docs/nxd.md):
  ``NEURON_RT_STOCHASTIC_ROUNDING_EN`` follows how weights are updated (off with ZeRO-1's
  fp32 master weights, on for bf16 weights updated in place), keyed on ZeRO-1 as it runs
  (configured and DP > 1), not as configured; ``XLA_DISABLE_FUNCTIONALIZATION=0`` with
  ZeRO-1. ``XLA_DOWNCAST_BF16`` is never ``1``: layers are bf16 themselves (``0`` with master
  weights, for NxD's ZeRO-1 bucket size).
* ``NEURON_CC_FLAGS``: ``--model-type=transformer``; ``--distribution-strategy=llm-training``
  only for sharded graphs (TP or PP > 1): it targets the collectives of model-parallel LLM
  training and is to be left off with NKI kernels (we use none); ``--cache_dir=<per run>``:
  concurrent runs must never share one compile cache (a half-written NEFF of one run is
  another run's corrupt cache hit), so the cache is per run (an ``s3://`` URI works too: the
  cache layer and ``neuron_parallel_compile`` take either). ``NEURON_COMPILE_CACHE_URL`` is
  set to the same place for tools that only read that variable (``--cache_dir`` wins).
* ``NEURON_FUSE_SOFTMAX=1``, ``MALLOC_ARENA_MAX=64`` (bounds glibc arenas of 32 processes).
* ``NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS``: enables async execution up to SDK 2.30
  (deprecated there) and is a no-op from 2.31, so it is set only when the pinned SDK is older
  than 2.31: 7 with pipeline parallelism (as the TP+PP example), 3 otherwise (TP+ZeRO-1 one).

Deliberately not set: ``TPU_NUM_DEVICES``/``TPU_CHIPS_PER_HOST_BOUNDS`` (XRT-era, PJRT ignores
them), ``NEURON_RT_VISIBLE_CORES`` (torch-neuronx derives it per local rank),
``NEURON_EXTRACT_GRAPHS_ONLY`` (set by ``neuron_parallel_compile`` itself).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from cpt_training import flops
from cpt_training.config import TrainStage
from cpt_training.nxd import precision

SDK_VERSION = "2.28.0"
"""The Neuron SDK of the trainer-neuron image (images/trainer-neuron/Dockerfile)."""

DLC_IMAGE = (
    "public.ecr.aws/neuron/pytorch-training-neuronx:2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04"
)

DEFAULT_CACHE_ROOT = "/var/tmp/neuron-compile-cache"


NXD_INSTANCES = ("trn1.2xlarge", "trn1.32xlarge", "trn1n.32xlarge")
"""What the nxd backend runs on (SDK 2.28 XLA training, trn1 family)."""
DEFAULT_INSTANCE = "trn1.32xlarge"


def instance_info(instance_type: str | None) -> flops.InstanceType:
    """The trn1 instance facts (from the shared table in ``cpt_training.flops``); ``None``
    means trn1.32xlarge. Anything else is an error naming the allowed types."""
    name = (instance_type or DEFAULT_INSTANCE).removeprefix("ml.")  # HyperPod spelling
    if name not in NXD_INSTANCES:
        raise ValueError(
            f"instanceType {instance_type!r} is not supported by the nxd backend; allowed: "
            + ", ".join(NXD_INSTANCES)
        )
    return flops.instance_type(name)


def _sdk_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def compile_cache_dir(cfg: TrainStage, compile_cache_uri: str | None) -> str:
    """The run's own compile cache: the given URI, else a local dir named after the run."""
    if compile_cache_uri:
        return compile_cache_uri.rstrip("/")
    return f"{DEFAULT_CACHE_ROOT}/{cfg.run_name}"


def neuron_cc_flags(cfg: TrainStage, cache_dir: str) -> str:
    flags = ["--model-type=transformer"]
    p = cfg.parallelism
    if p.tensor_parallel > 1 or p.pipeline_parallel > 1:
        flags.append("--distribution-strategy=llm-training")
    flags.append(f"--cache_dir={cache_dir}")
    return " ".join(flags)


EFA_ENV = {
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    "FI_EFA_FORK_SAFE": "1",
    "FI_EFA_ENABLE_SHM_TRANSFER": "1",
    "FI_LOG_LEVEL": "warn",
}


def stage_recipe(cfg: TrainStage, world_size: int) -> precision.PrecisionRecipe:
    """The precision recipe of ``cfg`` on ``world_size`` processes (DP from TP and PP)."""
    p = cfg.parallelism
    dp = precision.data_parallel_degree(world_size, p.tensor_parallel, p.pipeline_parallel)
    return precision.recipe(cfg.precision, p.zero1, dp)


def neuron_env(
    cfg: TrainStage,
    *,
    world_size: int,
    compile_cache_uri: str | None,
    sdk_version: str = SDK_VERSION,
) -> dict[str, str]:
    """Environment variables for every trn1 training container/process of ``cfg``.

    ``world_size``: processes of the whole job (nodes x processes per node); with TP and PP
    it gives DP, which decides whether ZeRO-1 actually runs. ``compile_cache_uri``: where
    this run's Neuron compile cache lives (a local dir or ``s3://``); must be unique per run.
    ``None`` gives a local per-run dir. Raises ``ValueError`` naming ``instanceType`` for a
    non-trn1 instance, or the degrees when ``world_size`` does not divide.
    """
    inst = instance_info(cfg.instance_type)
    cache = compile_cache_dir(cfg, compile_cache_uri)
    env: dict[str, str] = {}
    if inst.efa_devices > 0:
        env |= EFA_ENV
    env |= {
        "CCOM_SOCKET_IFNAME": "eth0",
        "NEURON_RT_NUM_CORES": str(inst.processes_per_node),
        "NEURON_FUSE_SOFTMAX": "1",
        "MALLOC_ARENA_MAX": "64",
        "NEURON_CC_FLAGS": neuron_cc_flags(cfg, cache),
        "NEURON_COMPILE_CACHE_URL": cache,
    }
    env |= stage_recipe(cfg, world_size).env()
    if _sdk_tuple(sdk_version) < (2, 31):
        inflight = 7 if cfg.parallelism.pipeline_parallel > 1 else 3
        env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] = str(inflight)
    return env


def apply_defaults(env: Mapping[str, str], target: MutableMapping[str, str] | None = None) -> None:
    """Set each variable unless the process already has it (the pod env wins)."""
    dst = os.environ if target is None else target
    for key, value in env.items():
        dst.setdefault(key, value)
