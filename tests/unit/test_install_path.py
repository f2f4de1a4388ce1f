"""docs/install.md as a path a user can follow, checked against the files it uses.

We test these aspects:
- The steps come in the order the issue asks for: cluster (eksctl ClusterConfig), device
  plugins, training-operator, Pod Identity / IRSA, images (`make images REGISTRY=... PUSH=1`),
  the chart with the image values, `cpt doctor`, `kubectl apply`.
- examples/eks/trn1-cluster.yaml: the trn1 group is EFA-enabled, in one AZ, in the placement
  group the doc creates, tainted as cpt's pods tolerate, sized for examples/run.yaml; the tools
  group carries the label examples/run.yaml selects.
- The doc's shell for "your run.yaml" (bucket and images into a copy of the example), run as
  written, gives a spec that validates, names the pushed images and plans.
- The chart has the image values the doc sets.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.api.planner import plan
from cpt_operator.builders.pytorchjob import ACCELERATOR_TAINTS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "install.md").read_text()


def section(title_prefix: str) -> str:
    start = DOC.index(f"\n## {title_prefix}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end > 0 else None]


def test_the_steps_come_in_order() -> None:
    marks = [
        "eksctl create cluster -f examples/eks/trn1-cluster.yaml",
        "neuron-helm-chart",
        "aws-efa-k8s-device-plugin",
        "training-operator.git/manifests/overlays/standalone",
        "create-pod-identity-association",
        "associate-iam-oidc-provider",
        'make images REGISTRY="$REGISTRY" PUSH=1',
        '--set image.repository="$REGISTRY/cpt-operator"',
        'cpt doctor my-run.yaml -n "$RUN_NS"',
        'kubectl -n "$RUN_NS" apply -f my-run.yaml',
    ]
    positions = [DOC.index(m) for m in marks]
    assert positions == sorted(positions), list(zip(marks, positions, strict=True))


def test_the_eks_cluster_config_fits_the_seed_run() -> None:
    cfg = yaml.safe_load((ROOT / "examples" / "eks" / "trn1-cluster.yaml").read_text())
    run = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())["spec"]
    assert cfg["apiVersion"] == "eksctl.io/v1alpha5" and cfg["kind"] == "ClusterConfig"
    groups = {g["name"]: g for g in cfg["managedNodeGroups"]}
    trn1 = groups["trn1-32xl"]
    assert trn1["instanceType"] == run["training"]["instanceType"] == "trn1.32xlarge"
    assert trn1["efaEnabled"] is True and len(trn1["availabilityZones"]) == 1
    pg = trn1["placement"]["groupName"]
    assert f"--group-name {pg} --strategy cluster" in DOC
    assert {"key": ACCELERATOR_TAINTS["neuron"], "value": "true", "effect": "NoSchedule"} in (
        trn1["taints"]
    )
    assert trn1["maxSize"] >= trn1["desiredCapacity"] >= run["training"]["nodes"]
    tools = groups["tools"]
    for key, value in run["runtime"]["toolsNodeSelector"].items():
        assert tools["labels"][key] == value


def test_the_docs_run_yaml_recipe_gives_a_spec_with_your_bucket_and_images(
    tmp_path: Path,
) -> None:
    block = re.search(r"```bash\n(.*?)```", section("7."), re.S)
    assert block is not None
    script = block.group(1)
    assert "sed " in script and "printf " in script
    # The cluster-facing commands are stand-ins that record their arguments; everything else
    # runs as written.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kubectl", "cpt"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RUN_NS": "ml",
        "ACCOUNT": "123456789012",
        "BUCKET": "acme-ml",
        "REGISTRY": "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        "TAG": "0.1.0",
    }
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "run.yaml").write_text((ROOT / "examples" / "run.yaml").read_text())
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, check=True)
    calls = (tmp_path / "calls").read_text()
    assert "kubectl label namespace ml pod-security.kubernetes.io/enforce=privileged" in calls
    assert "cpt plan my-run.yaml" in calls
    body = yaml.safe_load((tmp_path / "my-run.yaml").read_text())
    spec = ContinualPretrainSpec.model_validate(body["spec"])
    assert spec.checkpoints.s3_uri.startswith("s3://acme-ml/")
    assert spec.runtime.images.trainer_neuron == (
        "123456789012.dkr.ecr.us-west-2.amazonaws.com/cpt-trainer-neuron:0.1.0"
    )
    assert spec.runtime.images.tools.endswith("/cpt-tools:0.1.0")
    assert spec.runtime.tools_node_selector == {"cpt.dev/pool": "tools"}
    assert plan(spec).ok


def test_the_chart_has_the_image_values_the_doc_sets() -> None:
    values = yaml.safe_load((ROOT / "charts" / "cpt" / "values.yaml").read_text())
    assert {"repository", "tag"} <= set(values["image"])
