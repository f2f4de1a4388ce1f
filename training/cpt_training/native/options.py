"""Which Llama config options the native backend reproduces exactly, checked before anything
runs: the operator's planner calls :func:`unsupported_options` on the merged config.json +
configOverrides, the trainer on the loaded config. Torch-free (the operator imports it).

Why refuse rather than warn: a model option the native Llama does not implement trains a
different model from the one ``export-hf`` hands to transformers, silently. Everything listed
in :data:`ROPE_TYPES` is reproduced by construction (the rotary tables come from transformers'
own module); ``tests/parity`` proves each one bit-identical in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
"""transformers' rope types for Llama (``ROPE_INIT_FUNCTIONS`` plus ``default``; a parity test
fails when a transformers update adds one)."""


def rope_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rope parameters in either spelling: transformers 5's ``rope_parameters`` or 4's
    ``rope_scaling`` (``type`` or ``rope_type``) with a top-level ``partial_rotary_factor``."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    out: dict[str, Any] = {}
    if isinstance(scaling, Mapping):
        out.update(scaling)
    if isinstance(params, Mapping):
        out.update(params)
    if "rope_type" not in out and "type" in out:
        out["rope_type"] = out["type"]
    if "partial_rotary_factor" not in out and "partial_rotary_factor" in config:
        out["partial_rotary_factor"] = config["partial_rotary_factor"]
    return out


def unsupported_options(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(config.json field, why and the fix) for every option the native backend would not
    train exactly as transformers' ``LlamaForCausalLM`` runs it; empty when all are fine."""
    out: list[tuple[str, str]] = []
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        out.append(
            (
                "model_type",
                f"{model_type!r}: the native backend trains Llama only; allowed: 'llama'",
            )
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        out.append(("hidden_act", f"{act!r}: Llama's MLP is SwiGLU; allowed: silu"))
    dropout = config.get("attention_dropout") or 0.0
    if float(dropout) != 0.0:
        out.append(
            (
                "attention_dropout",
                f"{dropout}: the native backend has no attention dropout, so it would train "
                "another model than transformers does; set it to 0 in configOverrides",
            )
        )
    rope = rope_settings(config)
    kind = rope.get("rope_type") or "default"
    if kind not in ROPE_TYPES:
        out.append(
            (
                "rope_parameters.rope_type",
                f"{kind!r} is not a rope type transformers has for Llama; "
                f"allowed: {', '.join(ROPE_TYPES)}",
            )
        )
    partial = rope.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0 and kind != "proportional":
        out.append(
            (
                "rope_parameters.partial_rotary_factor",
                f"{partial}: Llama rotates the whole head (transformers' Llama fails on a "
                "partial rotary width except with rope_type 'proportional'); remove it or "
                "set 1.0",
            )
        )
    return out
