"""Device selection and process-group setup for the native backend.

One process per device, launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment). A process started without torchrun runs as a world of one, so the same code path
(FSDP2 over a one-rank mesh) is used everywhere.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cuda", "cpu", "neuron", "xla"]


@dataclass(frozen=True)
class Dist:
    """Where this process runs and who its peers are."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


NEURON_BACKEND = "neuron"
"""TorchNeuron's process-group backend name (its distributed guide initialises with
``backend="neuron"``); registered for the ``neuron`` device when torch_neuronx loads."""


def _load_torch_neuronx() -> None:
    """torch loads torch_neuronx by itself (device-backend autoload); with
    ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` it must be imported, which registers the device and its
    process-group backend. Importing it twice is harmless; its absence is handled by callers."""
    if torch._C._get_privateuse1_backend_name() != "neuron":
        importlib.import_module("torch_neuronx")


def neuron_available() -> bool:
    """True when TorchNeuron registered the ``neuron`` device (PrivateUse1) and it has cores."""
    try:
        _load_torch_neuronx()
        if torch._C._get_privateuse1_backend_name() != "neuron":
            return False
        mod = getattr(torch, "neuron", None)
        return bool(mod is not None and mod.is_available())
    except Exception:  # an absent or half-installed backend means "no neuron here"
        return False


def resolve_device_type(choice: DeviceChoice) -> str:
    """``auto``: cuda if available, else neuron (TorchNeuron), else cpu. Explicit choices are
    checked, so a pod scheduled without its accelerator fails loudly instead of crawling on CPU."""
    if choice == "xla":
        raise ValueError(
            "device 'xla' is the nxd backend's (torch-neuronx); the native backend runs on "
            "device auto, cuda, cpu or neuron"
        )
    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if neuron_available():
            return "neuron"
        return "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    if choice == "neuron" and not neuron_available():
        raise RuntimeError(
            "device 'neuron' was requested but TorchNeuron is not installed or sees no "
            "NeuronCores (the native backend needs TorchNeuron on trn2/trn3; trn1 uses nxd)"
        )
    return choice


def backend_for(device_type: str) -> str:
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    if device_type == "neuron":
        return NEURON_BACKEND
    # Another out-of-tree device registers its collective backend for its device type.
    getter = getattr(dist, "get_default_backend_for_device", None)
    if getter is not None:
        return str(getter(device_type))
    return device_type


def device_count(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.device_count()
    if device_type == "cpu":
        return 1
    mod = getattr(torch, device_type, None)
    return int(mod.device_count()) if mod is not None else 0


def local_device_index(device_type: str, local_rank: int, local_world: int, count: int) -> int:
    """The device index this process drives.

    Every process sees all of the node's devices (CUDA; TorchNeuron when the runtime is given
    the whole node): the index is the local rank. A runtime that was handed one core per process
    (``NEURON_RT_VISIBLE_CORES`` set per rank, as Neuron's runtime guide shows for partitioning
    a node) exposes that core as index 0 of one device, whatever the local rank."""
    if count == 1 and local_world > 1 and device_type != "cuda":
        return 0
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no {device_type} device: this node has {count} "
            f"(nproc-per-node must not exceed the device count)"
        )
    return local_rank


def init_distributed(choice: DeviceChoice, timeout_s: float = 1800.0) -> Dist:
    """Pick the device, bind this process to its local device and join the process group."""
    device_type = resolve_device_type(choice)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_type == "cpu":
        device = torch.device("cpu")
    else:
        index = local_device_index(device_type, local_rank, local_world, device_count(device_type))
        device = torch.device(device_type, index)
        if device_type == "cuda":
            torch.cuda.set_device(device)
        else:
            getattr(torch, device_type).set_device(index)
    backend = backend_for(device_type)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            # device_id binds NCCL's communicator eagerly; TorchNeuron's guide initialises its
            # backend without one, so it is passed on CUDA only.
            dist.init_process_group(
                backend=backend,
                timeout=timeout,
                device_id=device if device_type == "cuda" else None,
            )
        else:
            # Launched without torchrun: a world of one on an in-process store.
            from torch._C._distributed_c10d import HashStore

            dist.init_process_group(
                backend=backend, store=HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return Dist(
        device=device,
        backend=backend,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
    )


def device_name(device: torch.device) -> str:
    """Human/lookup name of the accelerator (e.g. 'NVIDIA H100 80GB HBM3'), 'cpu' on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return "cpu"
    mod = getattr(torch, device.type, None)
    getter = getattr(mod, "get_device_name", None)
    if getter is not None:
        try:
            return str(getter(device.index or 0))
        except Exception:  # device names are informational only
            pass
    return device.type


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def memory_stats(device: torch.device) -> dict[str, int] | None:
    """Peak and current allocator figures of this process's device (bytes), or None on CPU or
    where the device module has no allocator statistics. ``torch.cuda`` and TorchNeuron's
    ``torch.neuron`` (its device-module reference) expose the same functions; reading them is a
    host-side query of the caching allocator, no device synchronisation."""
    if device.type == "cpu":
        return None
    mod = getattr(torch, device.type, None)
    names = ("max_memory_allocated", "memory_allocated", "memory_reserved")
    if mod is None or not all(hasattr(mod, n) for n in names):
        return None
    index = device.index or 0
    return {n: int(getattr(mod, n)(index)) for n in names}


def neuron_ls() -> str | None:
    """``neuron-ls`` output when the tool is installed (Neuron hosts), else None."""
    exe = shutil.which("neuron-ls")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"neuron-ls failed: {exc}"
    return res.stdout if res.returncode == 0 else f"neuron-ls exit {res.returncode}: {res.stderr}"


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
