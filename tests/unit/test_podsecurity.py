"""The Pod Security level a run needs (``cpt_operator.api.podsecurity``), as ``cpt plan``,
the admission check and the pods themselves state it.

We test these aspects:
- The seed's trn1 run needs "privileged" (IPC_LOCK for EFA, root for the Neuron devices,
  hostPath scratch, the training operator's init container), each named with its field.
- A single-node CPU run needs only "restricted"; a multi-node one "baseline"; a trn2 run with
  emptyDir scratch still "privileged" (EFA).
- The admission check rejects exactly the departures an enforced level does not admit, with
  the level to use in the message; an unlabelled namespace admits everything.
- ``cpt plan`` prints the level (text and JSON) for the example run.
- The trainer-neuron image's default user is the pods' non-root uid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cpt_operator import cli
from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.api.podsecurity import required_level
from cpt_operator.builders import pods
from cpt_operator.reconcile.admission import pod_security_problems

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def spec_of(path: Path) -> ContinualPretrainSpec:
    return ContinualPretrainSpec.model_validate(yaml.safe_load(path.read_text())["spec"])


def golden(name: str) -> ContinualPretrainSpec:
    return spec_of(ROOT / "tests" / "golden" / "specs" / f"{name}.yaml")


def test_the_seed_run_needs_privileged_and_names_every_reason():
    need = required_level(spec_of(ROOT / "examples" / "run.yaml"))
    assert need.level == "privileged"
    fields = {(d.field, d.level) for d in need.departures}
    assert fields == {
        ("spec.training.instanceType", "privileged"),
        ("spec.training.instanceType", "baseline"),
        ("spec.checkpoints.scratch.type", "privileged"),
        ("spec.training.nodes", "baseline"),
    }
    assert any("IPC_LOCK" in d.why for d in need.departures)
    assert any("root" in d.why for d in need.departures)


def test_cpu_runs_need_restricted_alone_and_baseline_with_workers():
    cpu = golden("local-cpu")
    one = cpu.model_copy(update={"training": cpu.training.model_copy(update={"nodes": 1})})
    assert required_level(one).level == "restricted"
    two = cpu.model_copy(update={"training": cpu.training.model_copy(update={"nodes": 2})})
    assert required_level(two).level == "baseline"


def test_a_trn2_run_without_hostpath_still_needs_privileged_for_efa():
    spec = golden("trn2-native")
    assert spec.checkpoints.scratch.type != "hostPath"
    need = required_level(spec)
    assert need.level == "privileged"
    assert need.admitted_by("privileged") and not need.admitted_by("baseline")
    assert need.admitted_by("") and need.admitted_by(None)


def test_admission_rejects_only_what_the_enforced_level_does_not_admit():
    spec = golden("trn1-nxd")
    assert pod_security_problems(spec, "") == []
    assert pod_security_problems(spec, "privileged") == []
    base = pod_security_problems(spec, "baseline")
    assert {b.field for b in base} <= {
        "spec.training.instanceType",
        "spec.checkpoints.scratch.type",
    }
    assert all("pod-security.kubernetes.io/enforce=privileged" in b.message for b in base)
    assert any("IPC_LOCK" in b.message for b in base)
    assert not any("run as root" in b.message for b in base)  # baseline admits root
    strict = pod_security_problems(spec, "restricted")
    assert any("run as root" in b.message for b in strict)


def test_cpt_plan_states_the_level_in_text_and_json(capsys):
    assert cli.main(["plan", str(ROOT / "examples" / "run.yaml")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("pod security"))
    assert "namespace must allow privileged" in line and "root for Neuron devices" in line
    assert cli.main(["plan", "--json", str(ROOT / "examples" / "run.yaml")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["podSecurity"]["level"] == "privileged"


def test_the_neuron_image_user_is_the_pods_non_root_uid():
    text = (ROOT / "images" / "trainer-neuron" / "Dockerfile").read_text()
    users = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users[-1] == f"{pods.RUN_AS_USER}:{pods.RUN_AS_USER}"
