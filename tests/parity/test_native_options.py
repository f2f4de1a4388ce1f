"""The native backend accepts exactly the model options it reproduces: the planner refuses the
others before any child exists, naming the config.json field; the trainer refuses them too
(for a config the planner could not read); and what it accepts is what the parity tests cover."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from cpt_operator.api.planner import load_run, plan_object
from cpt_training.native.options import ROPE_TYPES, unsupported_options

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[2]
P5 = load_run(ROOT / "examples" / "llama32-1b-p5.yaml")


def _with_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(P5)
    doc["spec"]["model"].setdefault("configOverrides", {}).update(overrides)
    return doc


REFUSED = [
    ({"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
    ({"attention_dropout": 0.1}, "attention_dropout: 0.1: the native backend has no attention"),
    (
        {"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}},
        "rope_parameters.rope_type: 'ntk-by-parts' is not a rope type",
    ),
    (
        {"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}},
        "rope_parameters.rope_type: 'su' is not a rope type",
    ),
    (
        {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
        "rope_parameters.partial_rotary_factor: 0.5",
    ),
    ({"partial_rotary_factor": 0.25}, "rope_parameters.partial_rotary_factor: 0.25"),
]


def test_the_native_example_plans_as_it_is() -> None:
    p = plan_object(P5)
    assert p.ok, p.errors
    assert p.backend == "native"


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_the_planner_refuses_an_option_the_native_model_would_not_reproduce(
    overrides: dict[str, Any], message: str
) -> None:
    errors = [str(e) for e in plan_object(_with_overrides(overrides)).errors]
    assert any(e.startswith(f"spec.model.configOverrides: {message}") for e in errors), errors


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
        {"rope_type": "proportional", "partial_rotary_factor": 0.5},
    ],
)
def test_the_planner_accepts_every_rope_type_the_parity_suite_covers(rope: dict[str, Any]) -> None:
    p = plan_object(_with_overrides({"rope_parameters": {"rope_theta": 5e5, **rope}}))
    assert p.ok, p.errors


def test_the_accepted_rope_types_are_transformers_own_for_llama() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_TYPES) == {"default", *ROPE_INIT_FUNCTIONS}


def test_every_variant_of_the_model_parity_suite_is_accepted() -> None:
    from test_model_parity import SHAPES

    from fixtures.parity_models import ROPES, llama_config

    for rope in ROPES:
        for shape in SHAPES.values():
            assert unsupported_options(llama_config(rope, **shape).to_dict()) == [], (rope, shape)


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_the_trainer_refuses_the_same_options_for_configs_the_planner_did_not_read(
    overrides: dict[str, Any], message: str
) -> None:
    from transformers import LlamaConfig

    from cpt_training.native.llama import LlamaArgs

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match="config.json " + message.split(":")[0]):
        LlamaArgs.from_hf(config)
