"""TorchNeuron (Neuron SDK 2.33, the native backend on trn2/trn3): the pinned versions and the
pod environment. Pure and torch-free: the operator builds the training pods' env from it and
the image test checks the Dockerfile against the pins. docs/trn2.md says where each value
comes from."""

from __future__ import annotations

SDK_VERSION = "2.33.0"
TORCH_NEURONX_VERSION = "2.14.3"
"""torch-neuronx's wheel family: <torch major.minor>.<TorchNeuron release>; 2.13.3 is the
other family of the same SDK (torch 2.13)."""
TORCH_VERSION = "2.14"
OLDEST_TORCH = "2.13"
"""The oldest torch the training code supports: 2.13.3's torch (CI runs the native trainer on
it, hack/oldest-torch.txt)."""

DEFAULT_LNC = 2
"""Logical NeuronCore configuration: physical NeuronCores per logical core. trn2's default;
the runtime and compiler must agree on it, so it is set explicitly."""
NEFF_CACHE_SUBDIR = "neuron-neff-cache"


def torchneuron_env(*, lnc: int, efa: bool, neff_cache_dir: str) -> dict[str, str]:
    """The env of a native training pod on Trainium2+.

    * ``NEURON_LOGICAL_NC_CONFIG``: the LNC the runtime groups cores by; neuronx-cc compiles for
      the same value (Neuron's LNC guide: a different compiler LNC is unsupported).
    * ``TORCH_NEURONX_NEFF_CACHE_DIR``: TorchNeuron's persistent compile cache (a local
      directory: on the pod's scratch volume, so a retry on the same node reuses it).
    * ``FI_*``: libfabric's EFA provider for the Neuron collectives across nodes, as Neuron's
      EFA setup and training samples set it (only where the instance has EFA).
    """
    if lnc not in (1, 2):
        raise ValueError(f"logical NeuronCore configuration {lnc}: allowed 1 or 2")
    env = {"NEURON_LOGICAL_NC_CONFIG": str(lnc), "TORCH_NEURONX_NEFF_CACHE_DIR": neff_cache_dir}
    if efa:
        env.update(FI_PROVIDER="efa", FI_EFA_USE_DEVICE_RDMA="1", FI_EFA_FORK_SAFE="1")
    return env
