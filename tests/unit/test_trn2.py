"""trn2 through TorchNeuron: the logical NeuronCore configuration (LNC) a process count
implies, what the planner makes of it, the pods' env and image, and the trn2 example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.api.planner import load_run, plan_object
from cpt_operator.builders import pytorchjob, stages
from cpt_operator.builders.jobs import RunRef
from cpt_training import flops, metrics
from cpt_training.native.neuron import torchneuron_env

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "llama31-8b-trn2.yaml"


def test_trn2_runs_one_process_per_logical_core_lnc2_by_default_lnc1_at_128() -> None:
    trn2 = flops.instance_type("trn2.48xlarge")
    assert (trn2.processes_per_node, trn2.lnc, trn2.device_spec.memory_gib) == (64, 2, 24.0)
    lnc1 = trn2.for_processes(128)
    assert (lnc1.processes_per_node, lnc1.lnc, lnc1.device_spec.memory_gib) == (128, 1, 12.0)
    # The node's peak is the same either way: 16 chips x 667 TFLOPS.
    assert trn2.peak_flops_per_node == pytest.approx(lnc1.peak_flops_per_node)
    assert trn2.peak_flops_per_node == pytest.approx(16 * 667e12)
    # Any other count is not an LNC of this instance: unchanged.
    assert trn2.for_processes(32) is trn2
    assert flops.instance_type("trn1.32xlarge").lnc is None


def test_mfu_of_a_trn2_process_uses_the_core_its_lnc_gives_it() -> None:
    lnc2 = metrics.peak_flops_per_device("neuron", "neuron", "trn2.48xlarge", 64)
    lnc1 = metrics.peak_flops_per_device("neuron", "neuron", "trn2.48xlarge", 128)
    assert lnc2 == pytest.approx(2 * lnc1)  # type: ignore[operator]


def _example() -> dict[str, Any]:
    return load_run(EXAMPLE)


def _with(doc: dict[str, Any], **training: Any) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(doc))
    out["spec"]["training"].update(training)
    return out


def test_the_trn2_example_plans_native_fsdp2_compiled_on_logical_cores() -> None:
    p = plan_object(_example())
    assert p.ok, p.errors
    assert (p.backend, p.world_size, p.tensor_parallel, p.data_parallel) == ("native", 128, 1, 128)
    assert p.instance is not None and p.instance.device == "trn2-logical-core"
    assert p.max_steps == 954
    m = p.memory
    assert m is not None and m.device_bytes == 24 * flops.GIB
    assert m.weights + m.grads + m.optimizer + m.activations + m.reserved < m.device_bytes


def test_128_processes_plan_on_physical_cores_and_other_counts_are_refused() -> None:
    p = plan_object(_with(_example(), processesPerNode=128, activationCheckpointing="full"))
    assert p.instance is not None and p.instance.device == "trn2-physical-core"
    assert p.world_size == 256
    bad = plan_object(_with(_example(), processesPerNode=100))
    assert (
        "spec.training.processesPerNode: trn2.48xlarge runs one process per logical "
        "NeuronCore: 64 (LNC=2), 128 (LNC=1) (got 100)"
    ) in [str(e) for e in bad.errors]


def _train_container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = ContinualPretrainSpec.model_validate(doc["spec"])
    name = doc["metadata"]["name"]
    run = RunRef(name, "team-t", "00000000-0000-4000-8000-00000000002a")
    job = pytorchjob.training_job(spec, run, stages.train_stage(spec, name, 1, "team-t"))
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = master["containers"]
    assert job["spec"]["nprocPerNode"] == str(spec.training.resolved_processes_per_node())
    return dict(container)


def test_the_trn2_example_renders_a_torchneuron_job_with_the_samples_resources() -> None:
    c = _train_container(_example())
    assert c["image"] == "ghcr.io/cpt-dev/cpt-trainer-torchneuron:0.1.0"
    # trn2.48xlarge: 16 Trainium2 devices and 16 EFA interfaces (aws-neuron-eks-samples'
    # trn2 node group has 16 EFA network cards), requested == limited: the pod owns the node.
    want = {"aws.amazon.com/neuron": "16", "vpc.amazonaws.com/efa": "16"}
    assert c["resources"] == {"requests": want, "limits": want}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NEURON_LOGICAL_NC_CONFIG"] == "2"
    assert env["TORCH_NEURONX_NEFF_CACHE_DIR"].endswith("/neuron-neff-cache")
    assert env["FI_PROVIDER"] == "efa"
    assert "NEURON_COMPILE_CACHE_URL" not in env  # the XLA-era cache is not TorchNeuron's
    assert "--nproc-per-node=64" in c["args"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    stage = next(e for e in c["env"] if e["name"] == "CPT_STAGE_CONFIG")["value"]
    assert '"compile":true' in stage and '"device":"neuron"' in stage


def test_128_processes_per_trn2_node_set_lnc_1_on_the_pods() -> None:
    c = _train_container(_with(_example(), processesPerNode=128))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NEURON_LOGICAL_NC_CONFIG"] == "1"
    assert "--nproc-per-node=128" in c["args"]


def test_the_torchneuron_env_refuses_an_lnc_neuron_does_not_support() -> None:
    assert torchneuron_env(lnc=2, efa=False, neff_cache_dir="/x") == {
        "NEURON_LOGICAL_NC_CONFIG": "2",
        "TORCH_NEURONX_NEFF_CACHE_DIR": "/x",
    }
    with pytest.raises(ValueError, match="allowed 1 or 2"):
        torchneuron_env(lnc=4, efa=True, neff_cache_dir="/x")
