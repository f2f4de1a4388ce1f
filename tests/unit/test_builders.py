"""Child manifests and stage configs built from a ContinualPretrain spec.

Golden files (tests/golden/<spec>.yaml) pin every child of four runs: the trn1 NxD seed shape,
NVIDIA native, trn2 native and local-cpu. After an intended change, regenerate them with
``CPT_UPDATE_GOLDEN=1 pytest tests/unit/test_builders.py`` and review the diff. The targeted
tests below say *why* the important fields are what they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.builders import jobs, meta, pods, pytorchjob, stages
from cpt_operator.builders.jobs import RunRef
from cpt_training.config import STAGE_CONFIG_ENV, TrainStage, parse_stage_config

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SPECS = sorted(p.stem for p in (GOLDEN / "specs").glob("*.yaml"))
UPDATE = os.environ.get("CPT_UPDATE_GOLDEN") == "1"
EXCLUDED_NODE = "ip-10-0-7-41.us-west-2.compute.internal"


def load(name: str) -> tuple[ContinualPretrainSpec, RunRef]:
    body = yaml.safe_load((GOLDEN / "specs" / f"{name}.yaml").read_text())
    m = body["metadata"]
    return ContinualPretrainSpec.model_validate(body["spec"]), RunRef(
        m["name"], m["namespace"], m["uid"]
    )


def render_all(spec: ContinualPretrainSpec, run: RunRef) -> list[dict[str, Any]]:
    """Every child the operator can create for the run (attempt 2 resumes from step 40 and
    avoids the node attempt 1 failed on)."""
    n, ns = run.name, run.namespace
    out = [
        pytorchjob.preflight_job(spec, run, stages.preflight_stage(spec, n, ns)),
        jobs.tokenize_job(spec, run, stages.tokenize_stage(spec, n, ns)),
    ]
    if spec.training.resolved_backend() == "nxd":
        out.append(jobs.weights_job(spec, run, stages.convert_to_nxd_stage(spec, n, ns)))
    out.append(pytorchjob.training_job(spec, run, stages.train_stage(spec, n, 1, ns)))
    out.append(
        pytorchjob.training_job(
            spec,
            run,
            stages.train_stage(spec, n, 2, ns),
            resume_step=40,
            resume_uri=f"{spec.checkpoints.s3_uri}step_40",
            exclude_nodes=[EXCLUDED_NODE],
        )
    )
    out.append(jobs.export_job(spec, run, stages.export_stage(spec, n, ns)))
    return out


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    if manifest["kind"] == "Job":
        return list(manifest["spec"]["template"]["spec"]["containers"])
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    return [c for r in specs.values() for c in r["template"]["spec"]["containers"]]


def pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    if manifest["kind"] == "Job":
        return [manifest["spec"]["template"]["spec"]]
    return [r["template"]["spec"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("name", SPECS)
def test_children_match_the_golden_file(name: str) -> None:
    spec, run = load(name)
    text = yaml.safe_dump_all(render_all(spec, run), sort_keys=True, width=100)
    path = GOLDEN / f"{name}.yaml"
    if UPDATE or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{path} is stale: rerun with CPT_UPDATE_GOLDEN=1"


def test_child_names_are_deterministic_per_component_and_attempt() -> None:
    assert meta.child_name("r", "tokenize") == "r-tokenize"
    assert meta.child_name("r", "weights") == "r-weights"
    assert meta.child_name("r", "preflight") == "r-preflight"
    assert meta.child_name("r", "export") == "r-export"
    assert meta.child_name("r", "train", 3) == "r-train-3"
    with pytest.raises(ValueError, match="attempt"):
        meta.child_name("r", "train")


@pytest.mark.parametrize("name", SPECS)
def test_every_child_is_owned_by_the_run_and_labelled(name: str) -> None:
    spec, run = load(name)
    for m in render_all(spec, run):
        md = m["metadata"]
        assert md["namespace"] == run.namespace
        (ref,) = md["ownerReferences"]
        assert ref == {
            "apiVersion": "cpt.dev/v1alpha1",
            "kind": "ContinualPretrain",
            "name": run.name,
            "uid": run.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        component = md["labels"]["app.kubernetes.io/component"]
        for labels in [md["labels"]] + [
            t["metadata"]["labels"]
            for t in (
                [m["spec"]["template"]]
                if m["kind"] == "Job"
                else [r["template"] for r in m["spec"]["pytorchReplicaSpecs"].values()]
            )
        ]:
            assert labels["cpt.dev/run"] == run.name
            assert labels["app.kubernetes.io/instance"] == run.name
            assert labels["app.kubernetes.io/managed-by"] == "cpt-operator"
            assert labels["cpt.dev/stage"] == component
            assert ("cpt.dev/attempt" in labels) == (component == "train")


@pytest.mark.parametrize("name", SPECS)
def test_every_pod_runs_restricted_except_documented_efa_ipc_lock(name: str) -> None:
    """Non-root uid 65532 everywhere but Neuron device containers, which run as root
    (docs/security.md); IPC_LOCK exactly where EFA is requested."""
    spec, run = load(name)
    for m in render_all(spec, run):
        for ps in pod_specs(m):
            neuron = any(
                "aws.amazon.com/neuron" in c.get("resources", {}).get("limits", {})
                for c in ps["containers"]
            )
            psc = ps["securityContext"]
            assert psc["runAsNonRoot"] is not neuron
            assert psc["runAsUser"] == (0 if neuron else pods.RUN_AS_USER) == psc["runAsGroup"]
            assert psc["fsGroup"] == pods.RUN_AS_USER == 65532
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert ps["automountServiceAccountToken"] is False
        for c in containers(m):
            sc = c["securityContext"]
            neuron = "aws.amazon.com/neuron" in c.get("resources", {}).get("limits", {})
            assert sc["runAsNonRoot"] is not neuron
            assert sc.get("runAsUser") == (0 if neuron else None)
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["privileged"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            added = sc["capabilities"].get("add", [])
            uses_efa = "vpc.amazonaws.com/efa" in c.get("resources", {}).get("limits", {})
            assert added == (["IPC_LOCK"] if uses_efa else [])


@pytest.mark.parametrize("name", SPECS)
def test_no_secret_value_ever_reaches_a_manifest(name: str) -> None:
    spec, run = load(name)
    text = json.dumps(render_all(spec, run))
    assert "testing" not in text  # the S3 server's key in e2e tests
    for m in render_all(spec, run):
        for c in containers(m):
            for e in c["env"]:
                if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"]


def test_trn1_training_job_is_a_master_worker_gang_on_whole_trn1_nodes() -> None:
    spec, run = load("trn1-nxd")
    ptj = pytorchjob.training_job(spec, run, stages.train_stage(spec, run.name, 2, run.namespace))
    assert ptj["apiVersion"] == "kubeflow.org/v1" and ptj["metadata"]["name"] == "llama-cpt-train-2"
    replicas = ptj["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert {r["restartPolicy"] for r in replicas.values()} == {"Never"}
    assert ptj["spec"]["nprocPerNode"] == "32"
    assert ptj["spec"]["runPolicy"]["backoffLimit"] == 0
    assert ptj["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    assert ptj["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
    assert ptj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "trn1-queue"
    ps = replicas["Worker"]["template"]["spec"]
    (c,) = ps["containers"]
    assert c["name"] == "pytorch"
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    assert (
        c["resources"]["requests"]
        == c["resources"]["limits"]
        == {
            "aws.amazon.com/neuron": "16",
            "vpc.amazonaws.com/efa": "8",
        }
    )
    assert ps["nodeSelector"]["node.kubernetes.io/instance-type"] == "trn1.32xlarge"
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in ps[
        "tolerations"
    ]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in ps["volumes"]
    assert c["command"] == ["cpt-torchrun"]
    assert c["args"] == [
        "--nnodes=$(PET_NNODES)",
        "--nproc-per-node=32",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "cpt_training.cli",
        "train",
    ]
    env = env_of(c)
    assert env["FI_PROVIDER"] == "efa"
    assert env["NEURON_RT_NUM_CORES"] == "32"
    # The compile cache is the run's own: concurrent runs must never share one.
    assert env["NEURON_COMPILE_CACHE_URL"] == "s3://cpt-cache/neuron/team-a/llama-cpt"
    cfg = parse_stage_config(json.loads(env[STAGE_CONFIG_ENV]))
    assert isinstance(cfg, TrainStage)
    assert cfg.attempt == 2 and cfg.backend == "nxd" and cfg.device == "xla"


def test_train_stage_derives_every_location_from_the_checkpoint_root() -> None:
    spec, run = load("trn1-nxd")
    cfg = stages.train_stage(spec, run.name, 1, run.namespace)
    assert cfg.data_uri == "s3://cpt-ckpt/llama-cpt/data/"
    assert cfg.progress_uri == "s3://cpt-ckpt/llama-cpt/progress.json"
    assert cfg.tensorboard_uri == "s3://cpt-ckpt/llama-cpt/tensorboard/"
    assert cfg.checkpoint.uri == "s3://cpt-ckpt/llama-cpt/"
    assert cfg.checkpoint.every_steps == 20
    assert cfg.checkpoint.local_dir == "/scratch/checkpoints"
    assert cfg.parallelism.tensor_parallel == 8 and cfg.parallelism.pipeline_parallel == 4
    assert cfg.seq_len == 4096 and cfg.max_steps == 100
    weights = stages.convert_to_nxd_stage(spec, run.name, run.namespace)
    assert weights.output_uri == "s3://cpt-ckpt/llama-cpt/pretrained_weight"


def test_max_tokens_becomes_whole_steps_and_an_explicit_data_uri_is_kept() -> None:
    spec, run = load("p5-native")
    cfg = stages.train_stage(spec, run.name, 1, run.namespace)
    assert cfg.max_steps == -(-1_000_000_000 // (64 * 2048))
    assert cfg.data_uri == "s3://cpt-data/tokenized/llama-gpu/"
    assert cfg.device == "cuda" and cfg.backend == "native" and cfg.compile is True


def test_tokenize_job_reruns_only_failed_shards_and_fails_fast_on_a_bad_config() -> None:
    spec, run = load("trn1-nxd")
    job = jobs.tokenize_job(spec, run, stages.tokenize_stage(spec, run.name, run.namespace))
    s = job["spec"]
    assert s["completionMode"] == "Indexed" and s["completions"] == 4 and s["parallelism"] == 4
    assert s["backoffLimitPerIndex"] == 2 and s["maxFailedIndexes"] == 0
    rules = s["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    ps = s["template"]["spec"]
    assert ps["restartPolicy"] == "Never"
    assert ps["nodeSelector"] == {"cpt.dev/pool": "cpu"}
    (c,) = ps["containers"]
    assert c["command"] == ["cpt-train", "tokenize"]
    cfg = json.loads(env_of(c)[STAGE_CONFIG_ENV])
    assert cfg["numShards"] == 4 and cfg.get("shardIndex") is None


def test_gpu_variant_requests_gpus_and_efa_and_tolerates_the_gpu_taint() -> None:
    spec, run = load("p5-native")
    ptj = pytorchjob.training_job(spec, run, stages.train_stage(spec, run.name, 1, run.namespace))
    ps = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (c,) = ps["containers"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32"}
    assert ps["tolerations"][0] == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    assert ps["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert {
        "name": "scratch",
        "hostPath": {"path": "/local/nvme", "type": "DirectoryOrCreate"},
    } in ps["volumes"]
    assert "FI_PROVIDER" not in env_of(c)  # the NxD env is for trn1 only


def test_local_cpu_variant_has_no_accelerator_resources_and_targets_the_given_nodes() -> None:
    spec, run = load("local-cpu")
    ptj = pytorchjob.training_job(spec, run, stages.train_stage(spec, run.name, 1, run.namespace))
    ps = ptj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (c,) = ps["containers"]
    assert "resources" not in c or not c["resources"]
    assert ps["nodeSelector"] == {"cpt.dev/local-executor": "true"}
    assert ps["tolerations"] == [
        {
            "key": "cpt.dev/local-executor",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        }
    ]
    assert "--nproc-per-node=2" in c["args"]
    # Nothing but anti-affinity keeps the replicas of a CPU gang on separate nodes.
    (term,) = ps["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["cpt.dev/attempt"] == "1"
    cfg = json.loads(env_of(c)[STAGE_CONFIG_ENV])
    assert cfg["device"] == "cpu"


NOT_IN_FAILED = {
    "key": "kubernetes.io/hostname",
    "operator": "NotIn",
    "values": ["trn1-bad-1", "trn1-bad-2"],
}


def train_job_avoiding(spec: ContinualPretrainSpec, run: RunRef, nodes: list[str]) -> Any:
    cfg = stages.train_stage(spec, run.name, 3, run.namespace)
    return pytorchjob.training_job(spec, run, cfg, exclude_nodes=nodes)


def test_later_attempts_keep_every_replica_off_the_excluded_nodes() -> None:
    spec, run = load("trn1-nxd")
    ptj = train_job_avoiding(spec, run, ["trn1-bad-1", "trn1-bad-2", "trn1-bad-1"])
    for ps in pod_specs(ptj):
        required = ps["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert required == {"nodeSelectorTerms": [{"matchExpressions": [NOT_IN_FAILED]}]}
    # No exclusions, no affinity at all (the golden files pin the attempt-1 shape).
    for ps in pod_specs(train_job_avoiding(spec, run, [])):
        assert "affinity" not in ps


def test_excluded_nodes_are_anded_into_every_term_of_the_users_node_affinity() -> None:
    spec, run = load("trn1-nxd")
    zone = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-west-2d"]}
    capacity = {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["reserved"]}
    by_name = {"key": "metadata.name", "operator": "In", "values": ["trn1-7"]}
    preferred = [{"weight": 1, "preference": {"matchExpressions": [capacity]}}]
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zone]}, {"matchFields": [by_name]}]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": preferred,
        },
        "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []},
    }
    before = json.dumps(user, sort_keys=True)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"affinity": user})})
    ptj = train_job_avoiding(spec, run, ["trn1-bad-1", "trn1-bad-2"])
    for ps in pod_specs(ptj):
        aff = ps["affinity"]
        # Terms are ORed: a term without the NotIn would let the scheduler pick a bad node.
        terms = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert terms == [
            {"matchExpressions": [zone, NOT_IN_FAILED]},
            {"matchFields": [by_name], "matchExpressions": [NOT_IN_FAILED]},
        ]
        assert aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == preferred
        assert aff["podAffinity"] == user["podAffinity"]
    assert json.dumps(user, sort_keys=True) == before  # the spec's own affinity is not modified
    # Attempt 1 (nothing excluded) passes the user's affinity through unchanged.
    (first, *_) = pod_specs(train_job_avoiding(spec, run, []))
    assert first["affinity"] == user


def test_a_cpu_gang_keeps_its_anti_affinity_next_to_the_exclusions() -> None:
    spec, run = load("local-cpu")
    for ps in pod_specs(train_job_avoiding(spec, run, ["exec-1"])):
        assert ps["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = ps["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert term["matchExpressions"] == [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["exec-1"]}
        ]


def test_a_single_node_run_has_only_a_master_replica() -> None:
    spec, run = load("trn2-native")
    ptj = pytorchjob.training_job(spec, run, stages.train_stage(spec, run.name, 1, run.namespace))
    assert list(ptj["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    ps = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": "scratch", "persistentVolumeClaim": {"claimName": "fsx-scratch"}} in ps[
        "volumes"
    ]
    (c,) = ps["containers"]
    assert {"name": "scratch", "mountPath": "/fsx"} in c["volumeMounts"]
    cfg = json.loads(env_of(c)[STAGE_CONFIG_ENV])
    assert cfg["device"] == "neuron" and cfg["checkpoint"]["localDir"] == "/fsx/checkpoints"


def test_adopt_replaces_a_foreign_controller_reference_and_keeps_the_name() -> None:
    owner = RunRef("r", "ns", "u1").owner()
    m = {
        "kind": "Job",
        "metadata": {
            "name": "r-export",
            "ownerReferences": [{"kind": "Other", "uid": "x", "controller": True}],
        },
    }
    out = meta.adopt(m, owner)
    assert out["metadata"]["name"] == "r-export" and out["metadata"]["namespace"] == "ns"
    assert [r["uid"] for r in out["metadata"]["ownerReferences"]] == ["u1"]
    assert m["metadata"]["ownerReferences"][0]["uid"] == "x"  # the input is not mutated


def test_stage_config_json_is_byte_stable() -> None:
    spec, run = load("trn1-nxd")
    a = pods.stage_config_json(stages.train_stage(spec, run.name, 1))
    b = pods.stage_config_json(stages.train_stage(spec, run.name, 1))
    assert a == b and json.loads(a)["stage"] == "train"


def test_a_run_name_whose_children_would_exceed_63_characters_is_rejected() -> None:
    spec, _ = load("trn1-nxd")
    run = RunRef("x" * 50, "ns", "u")
    with pytest.raises(ValueError, match="63"):
        pytorchjob.training_job(spec, run, stages.train_stage(spec, run.name, 1))


def _containers_of(obj: Any) -> list[int]:
    """ids of every dict and list inside obj (obj included)."""
    out: list[int] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            out.append(id(x))
            stack.extend(x.values())
        elif isinstance(x, list):
            out.append(id(x))
            stack.extend(x)
    return out


@pytest.mark.parametrize("name", SPECS)
def test_every_build_returns_objects_of_its_own(name: str) -> None:
    """Callers edit what the builders return (the dry run's key blanks env values, a wrapper
    Job takes the pod template), and adopt() copies only the metadata: two builds, and the
    spec they come from, must share no dict or list, or one edit would change every later
    child."""
    spec, run = load(name)
    first, second = render_all(spec, run), render_all(spec, run)
    ids_first = _containers_of(first)
    assert len(ids_first) == len(set(ids_first)), "one object appears twice in one build"
    assert not set(ids_first) & set(_containers_of(second))
    assert not set(ids_first) & set(_containers_of(spec.model_dump()))


def test_the_trainer_s_speed_knobs_pass_from_the_spec_to_the_train_stage() -> None:
    spec, run = load("p5-native")
    default = stages.train_stage(spec, run.name, 1, run.namespace)
    assert default.fused_loss is False and default.parallelism.fsdp_single_device is False
    assert default.float8 is False
    body = spec.model_dump(by_alias=True)
    body["training"]["fusedLoss"] = True
    body["training"]["fsdpSingleDevice"] = True
    body["training"]["float8"] = True
    tuned = ContinualPretrainSpec.model_validate(body)
    cfg = stages.train_stage(tuned, run.name, 1, run.namespace)
    assert cfg.fused_loss is True and cfg.parallelism.fsdp_single_device is True
    assert cfg.float8 is True
    wire = parse_stage_config(cfg.model_dump_json(by_alias=True))
    assert isinstance(wire, TrainStage)
    assert wire.fused_loss and wire.parallelism.fsdp_single_device and wire.float8


def test_whole_tag_restore_passes_from_the_spec_to_the_train_stage() -> None:
    spec, run = load("trn1-nxd")
    default = stages.train_stage(spec, run.name, 1, run.namespace)
    assert default.checkpoint.restore_whole_tag is False
    body = spec.model_dump(by_alias=True)
    body["checkpoints"]["restoreWholeTag"] = True
    cfg = stages.train_stage(ContinualPretrainSpec.model_validate(body), run.name, 1, run.namespace)
    wire = parse_stage_config(cfg.model_dump_json(by_alias=True))
    assert isinstance(wire, TrainStage) and wire.checkpoint.restore_whole_tag is True
