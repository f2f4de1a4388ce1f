"""The generated CRD: committed copies match the generator, the schema is structural, CEL rules
sit where they belong, and the examples validate against the schemas. (The API server's own
verdict on the CRD and its rules is tests/integration/test_admission.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cpt_operator.api import crd

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_committed_crd_and_schemas_match_the_generator() -> None:
    stale = crd.stale_files(ROOT)
    assert not stale, f"generated files are stale: {stale}; run `make crds`"


def test_the_chart_carries_the_same_crd() -> None:
    assert (ROOT / crd.CHART_CRD_FILE).read_text() == (ROOT / crd.CRD_FILE).read_text()


def test_stale_files_detects_a_hand_edit(tmp_path: Path) -> None:
    crd.write_files(tmp_path)
    assert crd.stale_files(tmp_path) == []
    target = tmp_path / crd.CRD_FILE
    target.write_text(target.read_text().replace("shortNames", "shortnames"))
    assert crd.stale_files(tmp_path) == [crd.CRD_FILE]
    assert crd.write_files(tmp_path) == [crd.CRD_FILE]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for name, child in node.get("properties", {}).items():
            out += _walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_the_schema_is_structural() -> None:
    root = crd.open_api_schema()
    for path, node in _walk(root):
        for bad in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"):
            assert bad not in node, f"{path} has {bad}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_preserve_unknown_fields_only_where_free_form() -> None:
    root = crd.open_api_schema()
    free = sorted(p for p, n in _walk(root) if n.get("x-kubernetes-preserve-unknown-fields"))
    assert free == [
        ".spec.model.configOverrides",
        ".spec.runtime.affinity",
        ".status.acceptedSpec.spec",
        ".status.kopf",
    ]


def test_strings_and_lists_in_the_spec_are_bounded_for_cel_cost() -> None:
    for path, node in _walk(crd.open_api_schema()["properties"]["spec"], ".spec"):
        if node.get("type") == "string" and "enum" not in node and "format" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path


def test_optional_sections_default_to_their_materialized_defaults() -> None:
    spec = crd.open_api_schema()["properties"]["spec"]
    runtime = spec["properties"]["runtime"]["default"]
    assert runtime["images"]["trainerNeuron"] == "ghcr.io/cpt-dev/cpt-trainer-neuron:0.1.0"
    assert spec["properties"]["resiliency"]["default"]["preflight"] == {
        "enabled": True,
        "minBusBandwidthGbps": 0.0,
    }
    assert spec["properties"]["training"]["properties"]["optimizer"]["default"]["lr"] == 1.5e-4
    assert "default" not in spec["properties"]["training"]  # required: no default
    assert "default" not in spec["properties"]["runtime"]["properties"]["hfTokenSecretRef"]
    env_item = spec["properties"]["training"]["properties"]["env"]["items"]
    assert "default" not in env_item["properties"]["valueFrom"]  # optional X | None stays absent


def test_status_has_no_defaults_and_keeps_kopf_fields() -> None:
    status = crd.open_api_schema()["properties"]["status"]
    assert all("default" not in n for _, n in _walk(status))
    assert status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    for field in (
        "phase",
        "observedGeneration",
        "conditions",
        "attempt",
        "plan",
        "checkpoint",
        "progress",
        "tensorboardUri",
        "outputUri",
        "children",
        "message",
    ):
        assert field in status["properties"], field
    assert status["properties"]["phase"]["enum"][0] == "Pending"


def _rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_cel_rules_sit_on_their_fields() -> None:
    root = crd.open_api_schema()
    spec = root["properties"]["spec"]["properties"]
    assert any("size(self.metadata.name) <= 40" in r for r in _rules(root))
    for section in ("model", "data", "training", "checkpoints"):
        assert "self == oldSelf" in _rules(spec[section]), section
    for section in ("runtime", "resiliency", "output"):
        assert "self == oldSelf" not in _rules(spec[section]), section
    training = _rules(spec["training"])
    assert "self.globalBatchSize % self.microBatchSize == 0" in training
    assert any("'trn1.32xlarge': 32" in r and "self.tensorParallel" in r for r in training)
    assert _rules(spec["training"]["properties"]["optimizer"]) == [
        "self.lr <= 0.0 || self.minLr <= self.lr",
        "self.lr <= 0.0 || !has(self.warmupStartLr) || self.warmupStartLr <= self.lr",
    ]
    assert any("exists_one" in r for r in _rules(spec["data"]))  # unique roles
    assert any("s3://" in r for r in _rules(spec["checkpoints"]["properties"]["s3Uri"]))


def test_a_fractional_exclusive_bound_becomes_an_inclusive_bound_plus_cel() -> None:
    held_out = crd.open_api_schema()["properties"]["spec"]["properties"]["data"]["properties"][
        "heldOutFraction"
    ]
    assert held_out["maximum"] == 0.5 and "exclusiveMaximum" not in held_out
    assert _rules(held_out) == ["self < 0.5"]


def test_every_rule_path_exists() -> None:
    bad = crd.Rule("spec.training.nope", "true", "x")
    with pytest.raises(KeyError, match="no field 'nope'"):
        crd._attach(crd.open_api_schema(), bad.path, bad.to_schema())


def test_names_printer_columns_and_status_subresource() -> None:
    doc = yaml.safe_load((ROOT / crd.CRD_FILE).read_text())
    assert doc["metadata"]["name"] == "continualpretrains.cpt.dev"
    names = doc["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "ContinualPretrain",
        "continualpretrains",
        "continualpretrain",
    )
    assert names["shortNames"] == ["cpt"] and "ml" in names["categories"]
    assert doc["spec"]["scope"] == "Namespaced"
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Step", "Attempt", "Loss", "Tokens/s", "MFU%", "Age"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_structural_spec_schema(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    jsonschema.Draft7Validator(crd.open_api_schema()["properties"]["spec"]).validate(doc["spec"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_editor_json_schema(path: Path) -> None:
    schema = json.loads((ROOT / crd.OBJECT_SCHEMA_FILE).read_text())
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text()))


def test_the_editor_schema_rejects_a_typo() -> None:
    schema = json.loads((ROOT / crd.OBJECT_SCHEMA_FILE).read_text())
    doc = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())
    doc["spec"]["training"]["tensorParalel"] = 8
    with pytest.raises(jsonschema.ValidationError, match="tensorParalel"):
        jsonschema.Draft202012Validator(schema).validate(doc)
