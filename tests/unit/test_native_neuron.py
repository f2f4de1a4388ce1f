"""The native backend's `neuron` path, checked against TorchNeuron 2.33's documented API (see
docs/trn2.md). No Trainium here: TorchNeuron's device module is replaced by a stand-in with
the functions its reference lists, and the decisions are checked on real torch objects."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from cpt_training.native import distributed as nd
from cpt_training.native.parallelize import compile_options

pytestmark = pytest.mark.unit


def test_the_process_group_backend_on_neuron_is_torchneurons_own() -> None:
    # TorchNeuron's distributed guide: init_process_group(backend="neuron").
    assert nd.backend_for("neuron") == "neuron"
    assert nd.backend_for("cuda") == "nccl"
    assert nd.backend_for("cpu") == "gloo"


def test_compile_on_neuron_uses_the_neuron_dynamo_backend_with_static_shapes() -> None:
    assert compile_options("neuron", 1) == {
        "backend": "neuron",
        "dynamic": False,
        "fullgraph": True,
    }
    assert compile_options("neuron", 4) == {
        "backend": "neuron",
        "dynamic": False,
        "fullgraph": False,
    }
    # Elsewhere torch's default backend (Inductor) and default dynamic handling.
    assert compile_options("cuda", 1) == {"fullgraph": True}


def test_each_local_rank_drives_its_own_core_when_the_process_sees_the_whole_node() -> None:
    assert nd.local_device_index("neuron", 5, 64, 64) == 5
    assert nd.local_device_index("cuda", 3, 8, 8) == 3


def test_a_process_given_one_core_by_the_runtime_drives_index_zero() -> None:
    # NEURON_RT_VISIBLE_CORES per rank: each process sees one device whatever its local rank.
    assert nd.local_device_index("neuron", 37, 64, 1) == 0


def test_more_local_ranks_than_devices_is_an_error_that_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match="nproc-per-node must not exceed"):
        nd.local_device_index("neuron", 64, 128, 64)
    with pytest.raises(RuntimeError, match="local rank 1 has no cuda device"):
        nd.local_device_index("cuda", 1, 2, 1)


class FakeNeuron(types.SimpleNamespace):
    """The part of ``torch.neuron`` (TorchNeuron's device module) the trainer calls."""


def _install_fake_neuron(monkeypatch: pytest.MonkeyPatch, count: int) -> dict[str, Any]:
    calls: dict[str, Any] = {}
    mod = FakeNeuron(
        is_available=lambda: True,
        device_count=lambda: count,
        set_device=lambda i: calls.setdefault("set_device", i),
        synchronize=lambda: calls.setdefault("synchronize", True),
    )
    monkeypatch.setattr(torch, "neuron", mod, raising=False)
    monkeypatch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: "neuron")
    return calls


def test_neuron_is_available_only_when_torchneuron_registered_the_device(monkeypatch) -> None:
    monkeypatch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: "privateuseone")
    # torch_neuronx is not installed here: the import attempt fails and means "no neuron".
    assert nd.neuron_available() is False
    with pytest.raises(RuntimeError, match="TorchNeuron is not installed"):
        nd.resolve_device_type("neuron")
    _install_fake_neuron(monkeypatch, 64)
    assert nd.neuron_available() is True
    assert nd.resolve_device_type("neuron") == "neuron"


def test_init_binds_the_local_core_and_joins_the_neuron_group_without_a_device_id(
    monkeypatch,
) -> None:
    calls = _install_fake_neuron(monkeypatch, 64)
    seen: dict[str, Any] = {}

    def fake_init(**kw: Any) -> None:
        seen.update(kw)

    # torch.device("neuron", i) needs the PrivateUse1 backend renamed, which is process-global
    # and irreversible: a stand-in records what the trainer asked for.
    monkeypatch.setattr(torch, "device", lambda kind, index=None: (kind, index))
    monkeypatch.setattr(nd.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(nd.dist, "init_process_group", fake_init)
    monkeypatch.setattr(nd.dist, "get_rank", lambda: 70)
    monkeypatch.setattr(nd.dist, "get_world_size", lambda: 128)
    for k, v in {
        "MASTER_ADDR": "10.0.0.1",
        "WORLD_SIZE": "128",
        "LOCAL_RANK": "6",
        "LOCAL_WORLD_SIZE": "64",
    }.items():
        monkeypatch.setenv(k, v)
    d = nd.init_distributed("neuron")
    assert d.device == ("neuron", 6)
    assert calls["set_device"] == 6
    assert seen["backend"] == "neuron" and seen["device_id"] is None
    assert (d.rank, d.world_size, d.local_world_size) == (70, 128, 64)
    nd.synchronize(types.SimpleNamespace(type="neuron"))  # type: ignore[arg-type]
    assert calls["synchronize"] is True


def test_memory_statistics_come_from_the_device_modules_allocator(monkeypatch) -> None:
    # The allocator counters TorchNeuron's torch.neuron module lists, per device index.
    fake = FakeNeuron(
        max_memory_allocated=lambda i: 3 << 30,
        memory_allocated=lambda i: 2 << 30,
        memory_reserved=lambda i: 4 << 30,
    )
    monkeypatch.setattr(torch, "neuron", fake, raising=False)
    dev = types.SimpleNamespace(type="neuron", index=5)
    assert nd.memory_stats(dev) == {  # type: ignore[arg-type]
        "max_memory_allocated": 3 << 30,
        "memory_allocated": 2 << 30,
        "memory_reserved": 4 << 30,
    }
    assert nd.memory_stats(torch.device("cpu")) is None
    monkeypatch.setattr(torch, "neuron", FakeNeuron(), raising=False)  # no allocator stats
    assert nd.memory_stats(dev) is None  # type: ignore[arg-type]
