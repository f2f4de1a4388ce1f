"""Model shape, FLOPs per token, MFU, and the device / instance tables.

Pure and torch-free: the trainer imports it to log MFU, the operator's planner to size runs.
One definition of every hardware number lives here so the two never disagree.

FLOPs per token follow torchtitan's definition (``get_num_flop_per_token``):

    flops_per_token = 6 * N + 12 * L * H * Q * T

* ``6 * N``: 2 FLOPs (multiply + add) x 3 passes (forward, and a backward that costs two forwards)
  for every parameter, with N the parameter count *excluding the input embedding* (a lookup, not a
  matmul). The output projection (LM head) is a matmul and stays in N. For a model with tied
  embeddings the shared matrix *is* the LM head, so it is counted once rather than dropped.
* ``12 * L * H * Q * T``: the two attention matmuls (QK^T and AV), 2 FLOPs each per element, x3 for
  forward + backward, over L layers, H query heads of size Q and a context of T tokens. Causal
  masking is not discounted and activation recomputation is not counted (model FLOPs, not
  hardware FLOPs), matching torchtitan so our MFU compares with published numbers.

MFU = flops_per_token x tokens/s / (devices x peak FLOP/s of one device). A device here is what one
training process drives: a NeuronCore on Trainium, a GPU on NVIDIA. With no peak (CPU) MFU is
``None``: no number beats a misleading one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GIB = 1024**3

InstanceTypeName = Literal[
    "trn1.2xlarge",
    "trn1.32xlarge",
    "trn1n.32xlarge",
    "trn2.48xlarge",
    "p4d.24xlarge",
    "p4de.24xlarge",
    "p5.48xlarge",
    "p5e.48xlarge",
    "p5en.48xlarge",
    "local-cpu",
]
"""Instance types the API accepts (``spec.training.instanceType``)."""

Accelerator = Literal["neuron", "cuda", "cpu"]


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder that FLOPs and memory depend on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    REQUIRED_KEYS = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Shape from a Hugging Face ``LlamaConfig`` dict (``config.json``)."""
        missing = [k for k in cls.REQUIRED_KEYS if config.get(k) is None]
        if missing:
            raise ValueError(f"model config is missing {', '.join(missing)}")
        heads = int(config["num_attention_heads"])
        kv = config.get("num_key_value_heads")
        head_dim = config.get("head_dim")
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv) if kv is not None else heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=int(head_dim) if head_dim is not None else None,
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, SwiGLU MLP and two RMSNorms."""
        h, q = self.hidden_size, self.dim_per_head
        qd, kvd = self.num_heads * q, self.num_kv_heads * q
        attn = h * qd + 2 * h * kvd + qd * h
        if self.attention_bias:
            attn += qd + 2 * kvd + h
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        return attn + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Separate output projection; 0 when tied to the input embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Every parameter once (a tied matrix once)."""
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
            + self.hidden_size  # final norm
            + self.lm_head_params
        )

    @property
    def non_embedding_params(self) -> int:
        """Parameters that cost matmul FLOPs: all but the input-embedding lookup. A tied matrix
        is also the LM head, so it stays (counted once)."""
        if self.tie_word_embeddings:
            return self.total_params
        return self.total_params - self.embedding_params

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, torchtitan's definition (see the module docstring)."""
        attention = 12 * self.num_layers * self.num_heads * self.dim_per_head * seq_len
        return float(6 * self.non_embedding_params + attention)


@dataclass(frozen=True)
class DeviceSpec:
    """What one training process drives, with its dense BF16 peak and memory."""

    name: str
    peak_bf16_tflops: float | None
    memory_gib: float | None
    reserved_gib: float
    """Memory the runtime keeps for itself (context, kernels, collectives buffers); planned
    model state must fit in ``memory_gib - reserved_gib``."""
    note: str = ""

    @property
    def peak_flops(self) -> float | None:
        return None if self.peak_bf16_tflops is None else self.peak_bf16_tflops * 1e12


DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec(
            "trn1-neuroncore",
            95.0,
            16.0,
            1.0,
            "NeuronCore-v2: half of a Trainium chip (190 TFLOPS, 32 GiB HBM per chip).",
        ),
        DeviceSpec("trn1-chip", 190.0, 32.0, 2.0, "Trainium chip = 2 NeuronCore-v2."),
        DeviceSpec("trn2-chip", 667.0, 96.0, 4.0, "Trainium2 chip = 8 NeuronCore-v3."),
        DeviceSpec(
            "trn2-logical-core",
            667.0 / 4,
            24.0,
            1.0,
            "LNC=2 (the trn2 default): 2 physical NeuronCore-v3 per logical core, "
            "4 logical cores per chip, so a quarter of the chip's 667 TFLOPS and 96 GiB.",
        ),
        DeviceSpec(
            "trn2-physical-core",
            667.0 / 8,
            12.0,
            0.5,
            "LNC=1: one NeuronCore-v3, an eighth of the chip's 667 TFLOPS and 96 GiB.",
        ),
        DeviceSpec("h100", 989.0, 80.0, 1.5, "H100 SXM dense BF16 (torchtitan uses 989e12)."),
        DeviceSpec("h200", 989.0, 141.0, 1.5, "H200: same tensor cores as H100 SXM, 141 GB."),
        DeviceSpec("a100-80", 312.0, 80.0, 1.5, "A100 SXM 80 GB."),
        DeviceSpec("a100-40", 312.0, 40.0, 1.5, "A100 SXM 40 GB."),
        DeviceSpec("cpu", None, None, 0.0, "No meaningful peak: MFU is not reported."),
    )
}


@dataclass(frozen=True)
class InstanceType:
    """A node shape: how many training processes it runs and what the pods must request."""

    name: str
    device: str
    """Key into DEVICES: what one process drives."""
    processes_per_node: int
    accelerator: Accelerator
    chips: int = 0
    resources: dict[str, int] = field(default_factory=dict)
    """Extended resources a training pod requests to own the whole node."""
    efa_devices: int = 0
    vcpus: int = 0
    memory_gib: int = 0
    network_gbps: int = 0
    lnc_devices: tuple[tuple[int, str], ...] = ()
    """Trainium2 and later: (logical NeuronCore configuration, device) pairs, default first. A
    node runs one process per logical core: physical cores / LNC."""
    physical_cores: int = 0

    @property
    def device_spec(self) -> DeviceSpec:
        return DEVICES[self.device]

    @property
    def lnc(self) -> int | None:
        """The LNC this shape's device stands for (None where there is no such setting)."""
        return next((lnc for lnc, dev in self.lnc_devices if dev == self.device), None)

    def for_processes(self, processes: int) -> InstanceType:
        """This instance run with ``processes`` per node: on Trainium2+ the LNC whose logical
        core count equals it (64 -> LNC=2, 128 -> LNC=1 on trn2.48xlarge) and its device;
        otherwise (or for any other count) unchanged."""
        for lnc, dev in self.lnc_devices:
            if self.physical_cores // lnc == processes:
                return replace(self, device=dev, processes_per_node=processes)
        return self

    @property
    def peak_flops_per_node(self) -> float | None:
        peak = self.device_spec.peak_flops
        return None if peak is None else peak * self.processes_per_node


def _neuron(chips: int, efa: int) -> dict[str, int]:
    res = {"aws.amazon.com/neuron": chips}
    if efa:
        res["vpc.amazonaws.com/efa"] = efa
    return res


def _gpu(gpus: int, efa: int) -> dict[str, int]:
    return {"nvidia.com/gpu": gpus, "vpc.amazonaws.com/efa": efa}


def _instance(
    name: str,
    device: str,
    procs: int,
    acc: Accelerator,
    chips: int,
    resources: dict[str, int],
    efa: int,
    vcpus: int,
    mem_gib: int,
    net_gbps: int,
) -> InstanceType:
    return InstanceType(name, device, procs, acc, chips, resources, efa, vcpus, mem_gib, net_gbps)


# name, device per process, processes, accelerator, chips, pod resources, EFA, vCPU, GiB, Gbps
INSTANCE_TYPES: dict[str, InstanceType] = {
    i.name: i
    for i in (
        _instance("trn1.2xlarge", "trn1-neuroncore", 2, "neuron", 1, _neuron(1, 0), 0, 8, 32, 12),
        _instance(
            "trn1.32xlarge", "trn1-neuroncore", 32, "neuron", 16, _neuron(16, 8), 8, 128, 512, 800
        ),
        _instance(
            "trn1n.32xlarge",
            "trn1-neuroncore",
            32,
            "neuron",
            16,
            _neuron(16, 16),
            16,
            128,
            512,
            1600,
        ),
        replace(
            _instance(
                "trn2.48xlarge",
                "trn2-logical-core",
                64,
                "neuron",
                16,
                _neuron(16, 16),
                16,
                192,
                2048,
                3200,
            ),
            lnc_devices=((2, "trn2-logical-core"), (1, "trn2-physical-core")),
            physical_cores=128,
        ),
        _instance("p4d.24xlarge", "a100-40", 8, "cuda", 8, _gpu(8, 4), 4, 96, 1152, 400),
        _instance("p4de.24xlarge", "a100-80", 8, "cuda", 8, _gpu(8, 4), 4, 96, 1152, 400),
        _instance("p5.48xlarge", "h100", 8, "cuda", 8, _gpu(8, 32), 32, 192, 2048, 3200),
        _instance("p5e.48xlarge", "h200", 8, "cuda", 8, _gpu(8, 32), 32, 192, 2048, 3200),
        _instance("p5en.48xlarge", "h200", 8, "cuda", 8, _gpu(8, 16), 16, 192, 2048, 3200),
        # Local/CPU runs (`cpt local`, CPU-only clusters); spec.training.processesPerNode
        # overrides the 2.
        _instance("local-cpu", "cpu", 2, "cpu", 0, {}, 0, 0, 0, 0),
    )
}


def instance_type(name: str) -> InstanceType:
    """Look up an instance type; the error lists the known ones."""
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        known = ", ".join(INSTANCE_TYPES)
        raise ValueError(f"unknown instance type {name!r}; known: {known}") from None


def mfu(
    flops_per_token: float, tokens_per_sec: float, devices: int, peak_flops_per_device: float | None
) -> float | None:
    """Model FLOPs utilization as a fraction of peak (0..1), or None without a peak."""
    if peak_flops_per_device is None or devices <= 0 or peak_flops_per_device <= 0:
        return None
    return flops_per_token * tokens_per_sec / (devices * peak_flops_per_device)


def mfu_for_instance(
    shape: ModelShape, seq_len: int, tokens_per_sec: float, processes: int, instance: str
) -> float | None:
    """MFU of a run of ``processes`` training processes on ``instance`` nodes (trainer logging)."""
    peak = instance_type(instance).device_spec.peak_flops
    return mfu(shape.flops_per_token(seq_len), tokens_per_sec, processes, peak)
