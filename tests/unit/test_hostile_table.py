# ruff: noqa: E501  (the table asserts whole messages verbatim, one string per row)
"""Hostile and careless input, the unit tables (docs/RELIABILITY.md, hostile input): each row
asserts the exact message and that nothing happened.

* PLAN_CASES: specs `cpt plan` refuses, with the field and the fix; the operator's pass over
  the same spec (decide, from a new run) fails it in planning and creates no child.
* The run file itself (api/wire.py): non-UTF-8, duplicate keys, alias bombs: `cpt plan` and
  `cpt local` exit 2 naming the file, before anything runs.
* Updates (reconcile/accept.py): a refused generation leaves the accepted spec in force.
* Status (reconcile/trust.py): attempt numbers and terminal phases are read back from what
  the children and S3 confirm; a Failed run revives only after an edit that can fix it.
* Policy (reconcile/admission.py): system priority classes, hostPath scratch.

The same classes run against the live operator in tests/e2e/test_hostile_specs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator import cli, local
from cpt_operator.api import wire
from cpt_operator.api.models import (
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    AttemptStatus,
    ContinualPretrainStatus,
    Phase,
    parse_spec,
)
from cpt_operator.api.planner import load_run, plan_object
from cpt_operator.builders import jobs, pytorchjob, stages
from cpt_operator.builders.jobs import RunRef
from cpt_operator.reconcile import accept, admission, trust
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.actions import CreateChild, EmitEvent
from cpt_operator.reconcile.admission import Blocker, Policy
from cpt_operator.reconcile.decide import RunMeta, decide
from cpt_operator.reconcile.observe import Observed, observe
from cpt_operator.reconcile.status import dump_status
from fixtures.specedit import edit

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUN = load_run(ROOT / "examples" / "run.yaml")
SPECS = ROOT / "tests" / "golden" / "specs"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def ENV(*names: str) -> list[dict[str, str]]:
    return [{"name": n, "value": "x"} for n in names]


@dataclass(frozen=True)
class PlanCase:
    id: str
    changes: dict[str, Any]
    message: str


PLAN_CASES = [
    PlanCase(
        "job-completion-index",
        dict(spec__training__env=ENV("JOB_COMPLETION_INDEX")),
        "spec.training.env[0].name: env JOB_COMPLETION_INDEX is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "neuron-cc-flags",
        dict(spec__training__env=ENV("NEURON_CC_FLAGS")),
        "spec.training.env[0].name: env NEURON_CC_FLAGS is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "neuron-rt-prefix",
        dict(spec__training__env=ENV("NEURON_RT_VISIBLE_CORES")),
        "spec.training.env[0].name: env NEURON_RT_VISIBLE_CORES is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "efa-prefix",
        dict(spec__training__env=ENV("FI_PROVIDER")),
        "spec.training.env[0].name: env FI_PROVIDER is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "torchelastic-prefix",
        dict(spec__training__env=ENV("TORCHELASTIC_RUN_ID")),
        "spec.training.env[0].name: env TORCHELASTIC_RUN_ID is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "cpt-node-id",
        dict(spec__training__env=ENV("CPT_NODE_ID")),
        "spec.training.env[0].name: env CPT_NODE_ID is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "group-world-size",
        dict(spec__training__env=ENV("GROUP_WORLD_SIZE")),
        "spec.training.env[0].name: env GROUP_WORLD_SIZE is set by the operator, the Job controller or torchrun and cannot be overridden (docs/api.md lists the reserved names)",
    ),
    PlanCase(
        "env-twice",
        dict(spec__training__env=ENV("XLA_FLAGS", "XLA_FLAGS")),
        "spec.training.env[1].name: env names must be unique: XLA_FLAGS is also env[0]",
    ),
    PlanCase(
        "hf-token-twice",
        dict(
            spec__runtime__hfTokenSecretRef={"name": "hf", "key": "token"},
            spec__training__env=[
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "other", "key": "t"}}}
            ],
        ),
        "spec.training.env[0].name: env HF_TOKEN is set by the operator from spec.runtime's Secret reference (s3CredentialsSecretRef or hfTokenSecretRef): drop one of the two",
    ),
    PlanCase(
        "aws-key-twice",
        dict(
            spec__runtime__s3CredentialsSecretRef={"name": "keys"},
            spec__training__env=[
                {
                    "name": "AWS_ACCESS_KEY_ID",
                    "valueFrom": {"secretKeyRef": {"name": "other", "key": "id"}},
                }
            ],
        ),
        "spec.training.env[0].name: env AWS_ACCESS_KEY_ID is set by the operator from spec.runtime's Secret reference (s3CredentialsSecretRef or hfTokenSecretRef): drop one of the two",
    ),
    PlanCase(
        "steps-as-string",
        dict(spec__training__maxSteps="10"),
        'spec.training.maxSteps: must be of type integer, got "10" (the API server converts no types)',
    ),
    PlanCase(
        "compile-as-yes-string",
        dict(spec__training__compile="yes"),
        'spec.training.compile: must be of type boolean, got "yes" (the API server converts no types)',
    ),
    PlanCase(
        "nodes-as-float",
        dict(spec__training__nodes=2.5),
        "spec.training.nodes: must be of type integer, got 2.5 (the API server converts no types)",
    ),
    PlanCase(
        "suspend-as-int",
        dict(spec__suspend=1),
        "spec.suspend: must be of type boolean, got 1 (the API server converts no types)",
    ),
    PlanCase(
        "shards-as-string",
        dict(spec__data__shards="4"),
        'spec.data.shards: must be of type integer, got "4" (the API server converts no types)',
    ),
    PlanCase(
        "cpu-dot",
        dict(spec__runtime__toolsResources={"cpu": "."}),
        "spec.runtime.toolsResources.cpu: '.' is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 64Gi, 100M, 1e3)",
    ),
    PlanCase(
        "memory-1e400",
        dict(spec__runtime__toolsResources={"memory": "1e400"}),
        "spec.runtime.toolsResources.memory: '1e400' is out of range for a Kubernetes quantity (at most 2^63-1)",
    ),
    PlanCase(
        "memory-negative",
        dict(spec__runtime__toolsResources={"memory": "-1Gi"}),
        "spec.runtime.toolsResources.memory: '-1Gi' must not be negative",
    ),
    PlanCase(
        "cpu-unit-typo",
        dict(spec__runtime__toolsResources={"cpu": "2 cores"}),
        "spec.runtime.toolsResources.cpu: '2 cores' is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 64Gi, 100M, 1e3)",
    ),
    PlanCase(
        "memory-bad-suffix",
        dict(spec__runtime__toolsResources={"memory": "4GB"}),
        "spec.runtime.toolsResources.memory: '4GB' is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 64Gi, 100M, 1e3)",
    ),
    PlanCase(
        "size-limit-bad",
        dict(spec__checkpoints__scratch={"sizeLimit": "lots"}),
        "spec.checkpoints.scratch.sizeLimit: 'lots' is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 64Gi, 100M, 1e3)",
    ),
    PlanCase(
        "size-limit-huge",
        dict(spec__checkpoints__scratch={"sizeLimit": "99999999Ei"}),
        "spec.checkpoints.scratch.sizeLimit: '99999999Ei' is out of range for a Kubernetes quantity (at most 2^63-1)",
    ),
    PlanCase(
        "mount-over-dev-shm",
        dict(spec__checkpoints__scratch={"mountPath": "/dev/shm"}),
        "spec.checkpoints.scratch.mountPath: '/dev/shm': lies in /dev, a system path or one the pods mount",
    ),
    PlanCase(
        "mount-dotdot-into-dev",
        dict(spec__checkpoints__scratch={"mountPath": "/scratch/../dev/shm"}),
        "spec.checkpoints.scratch.mountPath: '.' and '..' segments are not allowed (write the path they lead to)",
    ),
    PlanCase(
        "mount-over-tmp",
        dict(spec__checkpoints__scratch={"mountPath": "/tmp/ckpt"}),
        "spec.checkpoints.scratch.mountPath: '/tmp/ckpt': lies in /tmp, a system path or one the pods mount",
    ),
    PlanCase(
        "mount-root",
        dict(spec__checkpoints__scratch={"mountPath": "/"}),
        "spec.checkpoints.scratch.mountPath: '/': must not be / (the whole filesystem)",
    ),
    PlanCase(
        "mount-double-slash",
        dict(spec__checkpoints__scratch={"mountPath": "/scratch//x"}),
        "spec.checkpoints.scratch.mountPath: '/scratch//x': empty segments ('//') are not allowed",
    ),
    PlanCase(
        "mount-over-etc",
        dict(spec__checkpoints__scratch={"mountPath": "/etc"}),
        "spec.checkpoints.scratch.mountPath: '/etc': lies in /etc, a system path or one the pods mount",
    ),
    PlanCase(
        "hostpath-root",
        dict(spec__checkpoints__scratch={"type": "hostPath", "path": "/"}),
        "spec.checkpoints.scratch.path: '/': must not be / (the whole filesystem)",
    ),
    PlanCase(
        "hostpath-kubelet",
        dict(spec__checkpoints__scratch={"type": "hostPath", "path": "/var/lib/kubelet/pods"}),
        "spec.checkpoints.scratch.path: '/var/lib/kubelet/pods': lies in /var/lib/kubelet, a system directory",
    ),
    PlanCase(
        "hostpath-dotdot",
        dict(spec__checkpoints__scratch={"type": "hostPath", "path": "/local/nvme/../../etc"}),
        "spec.checkpoints.scratch.path: '.' and '..' segments are not allowed (write the path they lead to)",
    ),
    PlanCase(
        "hostpath-etc",
        dict(spec__checkpoints__scratch={"type": "hostPath", "path": "/etc"}),
        "spec.checkpoints.scratch.path: '/etc': lies in /etc, a system directory",
    ),
    PlanCase(
        "output-inside-checkpoints",
        dict(spec__output__s3Uri=RUN["spec"]["checkpoints"]["s3Uri"].rstrip("/") + "/model/"),
        "spec.output.s3Uri: must differ from spec.checkpoints.s3Uri and lie neither inside nor around it: the exported model would be mixed with checkpoints and tokenized data (and checkpoint pruning runs there)",
    ),
    PlanCase(
        "output-around-checkpoints",
        dict(
            spec__output__s3Uri="/".join(
                RUN["spec"]["checkpoints"]["s3Uri"].rstrip("/").split("/")[:-1]
            )
            + "/"
        ),
        "spec.output.s3Uri: must differ from spec.checkpoints.s3Uri and lie neither inside nor around it: the exported model would be mixed with checkpoints and tokenized data (and checkpoint pruning runs there)",
    ),
    PlanCase(
        "output-is-tokenized",
        dict(
            spec__data__tokenizedUri="s3://my-bucket/tok/",
            spec__output__s3Uri="s3://my-bucket/tok/",
        ),
        "spec.output.s3Uri: must differ from spec.data.tokenizedUri and lie neither inside nor around it: the exported model would be mixed with checkpoints and tokenized data (and checkpoint pruning runs there)",
    ),
    PlanCase(
        "tokens-beyond-steps",
        dict(
            spec__training__maxSteps=..., spec__training__maxTokens=2**60, spec__data__blockSize=8
        ),
        "spec.training.maxTokens: 1152921504606846976 tokens are 281474976710656 steps of 512 x 8 tokens, more than maxSteps allows (1099511627776)",
    ),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c.id for c in PLAN_CASES])
def test_cpt_plan_refuses_a_hostile_spec_naming_the_field_and_the_operator_creates_nothing(
    case: PlanCase,
) -> None:
    doc = edit(RUN, **case.changes)
    assert [str(e) for e in plan_object(doc).errors] == [case.message]
    body = {"metadata": {"name": "hostile", "namespace": "ns", "uid": "u", "generation": 1}}
    decision = decide(RunMeta.of(body), doc["spec"], None, Observed(), T0)
    assert decision.status["phase"] == "Failed"
    assert case.message in decision.status["message"]
    assert not [a for a in decision.actions if isinstance(a, CreateChild)]


def test_the_tables_have_at_least_80_rows_with_the_e2e_table() -> None:
    from e2e.test_hostile_specs import CASES, UPDATE_CASES  # the live table

    unit = len(PLAN_CASES) + len(WIRE_CASES) + len(QUANTITIES_OK) + len(QUANTITIES_BAD)
    assert unit + len(CASES) + len(UPDATE_CASES) >= 80


# -- the run file itself ------------------------------------------------------------------


BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
       f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
       f"*{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
)  # fmt: skip
WIRE_CASES = [
    ("not-utf8", b"apiVersion: cpt.dev/v1alpha1\nkind: Continual\xff\n",
     "not UTF-8 (byte 0xff at offset 44); save the file as UTF-8"),
    ("latin1-name", "metadata:\n  name: l\u00e4uft\n".encode("latin-1"),
     "not UTF-8 (byte 0xe4 at offset 19); save the file as UTF-8"),
    ("duplicate-key", b"kind: ContinualPretrain\nspec:\n  suspend: false\n  suspend: true\n",
     "line 4: duplicate key 'suspend' (first on line 3); kubectl would silently keep the last one"),
    ("duplicate-top-key", b"kind: A\nkind: ContinualPretrain\n",
     "line 2: duplicate key 'kind' (first on line 1); kubectl would silently keep the last one"),
    ("alias-bomb", BOMB.encode(),
     "more than 100000 values once its YAML aliases are expanded (an alias bomb?)"),
]  # fmt: skip


@pytest.mark.parametrize(("id_", "raw", "message"), WIRE_CASES, ids=[c[0] for c in WIRE_CASES])
def test_cpt_plan_and_cpt_local_refuse_a_bad_run_file_naming_it(
    id_: str, raw: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(raw)
    assert cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr()
    assert err.err == f"cpt plan: {path}: {message}\n" and err.out == ""
    workdir = tmp_path / "work"
    assert local.run_local(path, workdir=workdir) == local.EXIT_BAD_SPEC
    assert capsys.readouterr().out == f"cpt local: {path}: {message}\n"
    assert not workdir.exists()  # nothing ran


QUANTITIES_OK = ["1", "500m", "1.5", "64Gi", "100M", "1e3", "+2", ".5", "2.", "0", "1E-3", "7Ei"]
QUANTITIES_BAD = [".", "1e400", "4GB", "2 cores", "", "1.2.3", "Gi", "--1", "1ki", "8Ei"]


@pytest.mark.parametrize("text", QUANTITIES_OK)
def test_a_kubernetes_quantity_is_accepted(text: str) -> None:
    assert wire.check_quantity(text) == text


@pytest.mark.parametrize("text", QUANTITIES_BAD)
def test_a_malformed_or_huge_quantity_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        wire.check_quantity(text)


# -- reserved env names: every name a builder sets is reserved -------------------------------


@pytest.mark.parametrize("name", ["trn1-nxd", "trn2-native", "p5-native", "local-cpu"])
def test_every_env_name_the_builders_set_is_reserved_or_a_secret_refs(name: str) -> None:
    spec = parse_spec(yaml.safe_load((SPECS / f"{name}.yaml").read_text())["spec"])
    run = RunRef("r", "ns", "u")
    manifests = [
        jobs.tokenize_job(spec, run, stages.tokenize_stage(spec, "r", "ns")),
        pytorchjob.training_job(spec, run, stages.train_stage(spec, "r", 1, "ns")),
    ]
    user = {e.name for e in spec.training.env}
    taken = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}
    for manifest in manifests:
        for container in _containers(manifest):
            for env in container.get("env", []):
                n = env["name"]
                if n in user or n in taken:
                    continue
                assert n in RESERVED_ENV_NAMES or n.startswith(RESERVED_ENV_PREFIXES), n


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    if manifest["kind"] == "Job":
        return list(manifest["spec"]["template"]["spec"]["containers"])
    replicas = manifest["spec"]["pytorchReplicaSpecs"].values()
    return [c for r in replicas for c in r["template"]["spec"]["containers"]]


def test_extra_compiler_flags_are_appended_to_the_operators_own() -> None:
    raw = yaml.safe_load((SPECS / "trn1-nxd.yaml").read_text())["spec"]
    raw["training"]["env"] = [{"name": "CPT_EXTRA_NEURON_CC_FLAGS", "value": "--verbose=35"}]
    spec = parse_spec(raw)
    ptj = pytorchjob.training_job(spec, RunRef("r", "ns", "u"), stages.train_stage(spec, "r", 1))
    env = {e["name"]: e.get("value") for e in _containers(ptj)[0]["env"]}
    assert env["NEURON_CC_FLAGS"].endswith(" --verbose=35")
    assert "--model-type=transformer" in env["NEURON_CC_FLAGS"]


# -- policy ---------------------------------------------------------------------------------


SYSTEM_PC = (
    "spec.runtime.priorityClassName: 'system-node-critical' is a system priority class, "
    "reserved for the cluster's own components (training pods with it would preempt them); "
    "use a priority class of your own, or have the operator installed with the chart value "
    "operator.allowSystemPriorityClasses=true"
)


def test_a_system_priority_class_is_refused_unless_the_chart_allows_it() -> None:
    spec = parse_spec(edit(RUN, spec__runtime__priorityClassName="system-node-critical")["spec"])
    assert admission.policy_problems(spec, Policy()) == [
        Blocker("SystemPriorityClass", "spec.runtime.priorityClassName", SYSTEM_PC)
    ]
    assert admission.policy_problems(spec, Policy(allow_system_priority_classes=True)) == []
    own = parse_spec(edit(RUN, spec__runtime__priorityClassName="training-high")["spec"])
    assert admission.policy_problems(own, Policy()) == []


def test_hostpath_scratch_is_refused_when_the_chart_turns_it_off() -> None:
    raw = edit(RUN, spec__checkpoints__scratch={"type": "hostPath", "path": "/local/nvme"})
    spec = parse_spec(raw["spec"])
    assert admission.policy_problems(spec, Policy()) == []
    assert [b.message for b in admission.policy_problems(spec, Policy(False, False))] == [
        "spec.checkpoints.scratch.type: hostPath scratch is turned off for this operator "
        "(chart value operator.allowHostPathScratch); use emptyDir (with sizeLimit) or pvc"
    ]


# -- updates: the accepted spec (reconcile/accept.py) ----------------------------------------


def _run_body(spec: dict[str, Any], generation: int, status: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "r", "namespace": "ns", "uid": "u", "generation": generation}
    return {"metadata": meta, "spec": spec, "status": status}


def _checker(bad: set[str]) -> Any:
    """Refuses a spec whose output.s3Uri is in `bad`; counts its calls."""
    calls: list[str] = []

    def check(spec: Any, cluster: bool) -> list[Blocker]:
        calls.append(spec["output"]["s3Uri"] + ("" if cluster else " (spec only)"))
        if spec["output"]["s3Uri"] in bad:
            return [Blocker("InvalidSpec", "spec.output.s3Uri", "spec.output.s3Uri: no")]
        return []

    check.calls = calls  # type: ignore[attr-defined]
    return check


GOOD = RUN["spec"]
BAD = edit(RUN, spec__output__s3Uri="s3://my-bucket/evil/")["spec"]
RECORD = accept.record_of(GOOD, 1).model_dump(mode="json", by_alias=True)


def test_a_refused_generation_leaves_the_accepted_spec_in_force_and_is_reported_once() -> None:
    memory, check = accept.Memory(), _checker({"s3://my-bucket/evil/"})
    body = _run_body(BAD, 2, {"phase": "Training", "acceptedSpec": RECORD})
    verdict = accept.choose(body, memory, check)
    assert verdict.spec == GOOD and verdict.record is not None
    assert verdict.record.generation == 1 and [b.reason for b in verdict.rejected] == [
        "InvalidSpec"
    ]
    status = ContinualPretrainStatus(phase=Phase.TRAINING)
    events = accept.report(status, verdict, 2, T0, BAD)
    message = "generation 2 is refused, the run goes on with generation 1: spec.output.s3Uri: no"
    assert events == [EmitEvent("Warning", "SpecRejected", message)]
    accepted = cond.get(status, "SpecAccepted")
    assert accepted is not None and (accepted.status, accepted.reason) == ("False", "InvalidSpec")
    assert accepted.message == message and accepted.observed_generation == 2
    again = accept.choose(body, memory, check)
    assert accept.report(status, again, 2, T0, BAD) == []  # no second event, no second check
    assert check.calls == [GOOD["output"]["s3Uri"] + " (spec only)", "s3://my-bucket/evil/"]


def test_an_accepted_generation_replaces_the_record() -> None:
    body = _run_body(
        edit(RUN, spec__suspend=True)["spec"], 3, {"acceptedSpec": RECORD, "phase": "Training"}
    )
    verdict = accept.choose(body, accept.Memory(), _checker(set()))
    assert verdict.record is not None and verdict.record.generation == 3
    assert verdict.record.spec["suspend"] is True and "model" not in verdict.record.spec
    status = ContinualPretrainStatus(phase=Phase.TRAINING)
    assert accept.report(status, verdict, 3, T0, body["spec"]) == [
        EmitEvent("Normal", "SpecAccepted", "generation 3 accepted")
    ]
    assert status.accepted_spec == verdict.record


def test_a_hand_edited_record_is_not_trusted() -> None:
    forged = dict(RECORD, spec={**RECORD["spec"], "output": {"s3Uri": "s3://my-bucket/evil/"}})
    body = _run_body(BAD, 2, {"phase": "Training", "acceptedSpec": forged})
    verdict = accept.choose(body, accept.Memory(), _checker({"s3://my-bucket/evil/"}))
    assert verdict.spec is None and verdict.record is None  # nothing acceptable: act on nothing
    status = ContinualPretrainStatus(phase=Phase.TRAINING)
    (event,) = accept.report(status, verdict, 2, T0, BAD)
    assert event.message == (
        "generation 2 is refused, no generation of this spec was accepted yet: nothing is "
        "created until it is fixed: spec.output.s3Uri: no"
    )


def test_a_record_whose_digest_matches_but_fails_the_checks_now_is_not_trusted() -> None:
    evil = accept.record_of(BAD, 1).model_dump(mode="json", by_alias=True)
    body = _run_body(BAD, 1, {"phase": "Training", "acceptedSpec": evil})
    verdict = accept.choose(body, accept.Memory(), _checker({"s3://my-bucket/evil/"}))
    assert verdict.spec is None and verdict.rejected


def test_an_oversized_runtime_is_refused_rather_than_recorded() -> None:
    huge = edit(RUN, spec__runtime__affinity={"x": "y" * (70 * 1024)})["spec"]
    body = _run_body(huge, 2, {"phase": "Training", "acceptedSpec": RECORD})
    verdict = accept.choose(body, accept.Memory(), _checker(set()))
    assert verdict.spec == GOOD
    assert [b.reason for b in verdict.rejected] == ["SpecTooLarge"]
    assert "more than the 65536 the operator keeps" in verdict.rejected[0].message


# -- status derived, not trusted; revival (reconcile/trust.py) -------------------------------


def _ptj(name: str, attempt: int, condition: str = "Running") -> dict[str, Any]:
    labels = {"cpt.dev/run": "r", "cpt.dev/attempt": str(attempt)}
    conds = [{"type": condition, "status": "True", "lastTransitionTime": "2026-03-01T12:00:00Z"}]
    return {"metadata": {"name": name, "labels": labels}, "status": {"conditions": conds}}


SPEC = parse_spec(edit(RUN, spec__resiliency__maxAttempts=3)["spec"])


@pytest.mark.parametrize(
    ("written", "children", "expected", "why"),
    [
        (100, [], 3, "status.attempt 100 exceeds spec.resiliency.maxAttempts (3) and no child "
         "confirms it; continuing as attempt 3"),
        (50, [_ptj("r-train-2", 2)], 2, "status.attempt 50 exceeds spec.resiliency.maxAttempts "
         "(3) and no child confirms it; continuing as attempt 2"),
        (0, [_ptj("r-train-2", 2)], 2, "status.attempt 0 is behind attempt 2 of the run's "
         "children/progress"),
        (2, [_ptj("r-train-2", 2)], 2, None),
    ],
)  # fmt: skip
def test_the_attempt_number_is_what_the_children_confirm(
    written: int, children: list[dict[str, Any]], expected: int, why: str | None
) -> None:
    status = ContinualPretrainStatus(phase=Phase.TRAINING, attempt=written)
    assert trust.bound_attempt(status, SPEC, observe(pytorchjobs=children)) == why
    assert status.attempt == expected


def test_preempted_attempts_raise_the_attempt_bound_and_a_forged_number_above_it_goes_back() -> (
    None
):
    """Preemptions do not count against maxAttempts (3 here): attempt 5 after two preempted
    attempts is legitimate before its child exists; 6 is not."""
    preempted = [AttemptStatus(attempt=n, reason=cond.PREEMPTED) for n in (1, 2)]
    status = ContinualPretrainStatus(phase=Phase.TRAINING, attempt=5, attempts=preempted)
    assert trust.bound_attempt(status, SPEC, observe()) is None and status.attempt == 5
    status.attempt = 6
    assert trust.bound_attempt(status, SPEC, observe()) == (
        "status.attempt 6 exceeds spec.resiliency.maxAttempts (3) plus 2 preempted attempts and "
        "no child confirms it; continuing as attempt 5"
    )
    assert status.attempt == 5


def test_a_hand_written_succeeded_phase_goes_back_to_the_running_training() -> None:
    status = ContinualPretrainStatus(phase=Phase.SUCCEEDED, attempt=1)
    why = trust.repair_terminal(status, observe(pytorchjobs=[_ptj("r-train-2", 2)]), "r")
    assert why == (
        "status.phase Succeeded was not written by the operator while a child of the run still "
        "runs; back to Training"
    )
    assert (status.phase, status.attempt, status.children.train) == (
        Phase.TRAINING, 2, "r-train-2",
    )  # fmt: skip
    done = ContinualPretrainStatus(phase=Phase.SUCCEEDED)
    finished = observe(pytorchjobs=[_ptj("r-train-1", 1, "Succeeded")])
    assert trust.repair_terminal(done, finished, "r") is None and done.phase == Phase.SUCCEEDED


def _failed(reason: str, attempt: int, planned: str = "True") -> ContinualPretrainStatus:
    status = ContinualPretrainStatus(phase=Phase.FAILED, attempt=attempt)
    cond.set_condition(status, "Failed", "True", reason, "x", now=T0, generation=1)
    cond.set_condition(status, "Planned", planned, "Planned", "x", now=T0, generation=1)
    return status


def test_raising_max_attempts_revives_a_run_that_used_them_all() -> None:
    status = _failed("MaxAttemptsExceeded", 2)
    spec = parse_spec(edit(RUN, spec__resiliency={"maxAttempts": 4})["spec"])
    assert trust.revive(status, spec, 2, T0) == (
        True, "spec.resiliency.maxAttempts is 4: continuing with attempt 3",
    )  # fmt: skip
    assert (status.phase, status.attempt, status.completion_time) == (Phase.PENDING, 3, None)
    failed = cond.get(status, "Failed")
    assert failed is not None and (failed.status, failed.reason) == ("False", "Revived")


def test_an_edit_without_more_attempts_does_not_revive_and_says_what_would() -> None:
    status = _failed("MaxAttemptsExceeded", 3)
    assert trust.revive(status, SPEC, 2, T0) == (
        False,
        "the run stays Failed: 3 of 3 attempts are used; raise spec.resiliency.maxAttempts "
        "above 3 to continue it",
    )
    assert status.phase == Phase.FAILED


def test_a_failure_no_edit_can_fix_stays_failed() -> None:
    status = _failed("TokenizationFailed", 0)
    revived, why = trust.revive(status, SPEC, 2, T0)
    assert not revived and why.startswith("the run stays Failed (TokenizationFailed): ")
    assert "delete and re-create it" in why and status.phase == Phase.FAILED


def test_a_failure_before_any_child_is_planned_again_after_an_edit() -> None:
    status = _failed("SecretNotFound", 0, planned="False")
    assert trust.revive(status, SPEC, 2, T0) == (
        True, "generation 2 is accepted: planning the run again",
    )  # fmt: skip
    assert status.phase == Phase.PENDING and dump_status(status)["attempt"] == 0


def test_export_on_deadline_set_after_a_deadline_failure_exports_the_newest_checkpoint() -> None:
    from cpt_operator.api.models import CheckpointStatus

    status = _failed(cond.DEADLINE_EXCEEDED, 2)
    status.checkpoint = CheckpointStatus(step=40, uri="s3://b/ckpt/step_40")
    assert trust.revive(status, SPEC, 2, T0)[0] is False  # exportOnDeadline not set
    spec = parse_spec(edit(RUN, spec__resiliency__exportOnDeadline=True)["spec"])
    assert trust.revive(status, spec, 2, T0) == (
        True, "spec.resiliency.exportOnDeadline is set: exporting the newest checkpoint",
    )  # fmt: skip
    assert status.phase == Phase.CONVERTING and status.attempt == 2
    status.phase, status.output_uri = Phase.FAILED, "s3://b/out"  # exported already
    assert trust.revive(status, spec, 3, T0)[0] is False


def test_an_unreadable_status_part_is_dropped_without_resetting_the_attempt() -> None:
    from cpt_operator.reconcile.status import load_status

    status = load_status({"phase": "Training", "attempt": 2, "conditions": [{"type": 1}]})
    assert (status.phase, status.attempt, status.conditions) == (Phase.TRAINING, 2, [])


def test_cpt_plan_warns_over_a_stated_cost(capsys: pytest.CaptureFixture[str]) -> None:
    from cpt_operator.api.planner import load_run, plan_object

    run = str(ROOT / "examples" / "run.yaml")
    estimate = plan_object(load_run(Path(run)), base_dir=Path.cwd()).estimate
    assert estimate is not None and estimate.cost_usd is not None and estimate.cost_usd > 100
    assert cli.main(["plan", run, "--max-cost-usd", "100"]) == 0
    expected = f"the estimated cost, ${estimate.cost_usd:,.0f}, exceeds --max-cost-usd 100"
    assert f"! spec.training: {expected}" in capsys.readouterr().out
    assert cli.main(["plan", run, "--max-cost-usd", "1000000"]) == 0
    assert "exceeds --max-cost-usd" not in capsys.readouterr().out
