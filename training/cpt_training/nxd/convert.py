"""``cpt-train convert-to-nxd``: a HF Llama -> NxD ``pretrained_weight`` (TP/PP shards).

Steps: fetch the HF model (safetensors, any number of shards) -> check the layout against the
config (so a bad TP/KV combination fails in seconds, not after the 32-node job compiled) ->
merge all shards into ONE flat state-dict file (NxD's converter ``torch.load``s a single file
as the full state; it must be flat ``{name: tensor}``: this converter does not unwrap
``--model_key`` on that path) -> run NxD's converter from the image -> check every expected
shard exists with the names and shapes the trainer's model will ask for -> upload with a
manifest and commit marker to ``output_uri`` (``<checkpoint root>/pretrained_weight``).

Memory: the merged file is the model in its stored dtype (bf16: ~140 GB for 70B); the
converter runs in a child process after this process has dropped its copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpt_training import podenv
from cpt_training.config import ConvertToNxdStage
from cpt_training.nxd.layout import (
    LlamaShape,
    NxdLayout,
    nxd_param_names,
    plan_layout,
    shard_file_name,
    untie_lm_head,
)

log = logging.getLogger(__name__)

CONVERTER_MODULE = "cpt_training.nxd.converter_main"


# ---------------------------------------------------------------------------------------------
# Pure: the converter's command line
# ---------------------------------------------------------------------------------------------


def bool_flag(name: str, value: bool) -> list[str]:
    """The converter declares its switches ``type=bool``: argparse turns ANY non-empty string,
    "False" included, into True. So a switch is passed only when true, and never with a false
    value."""
    return [name, "True"] if value else []


def _layout_args(layout: NxdLayout, config_file: str) -> list[str]:
    return [
        "--config",
        config_file,
        "--hw_backend",
        layout.hw_backend,
        "--tp_size",
        str(layout.tp),
        "--pp_size",
        str(layout.pp),
        "--n_layers",
        str(layout.shape.num_layers),
        "--kv_size_multiplier",
        str(layout.kv_size_multiplier),
        *bool_flag("--qkv_linear", layout.qkv_linear),
    ]


def from_full_argv(
    layout: NxdLayout, *, input_file: str, output_dir: str, config_file: str
) -> list[str]:
    """Flags for HF full state (one file) -> ``<output_dir>/model/dp_rank_00_tp_*_pp_*.pt``."""
    return [
        "--input_dir",
        input_file,
        "--output_dir",
        output_dir,
        *_layout_args(layout, config_file),
        *bool_flag("--coalesce_qkv", layout.coalesce_qkv),
        "--convert_from_full_state",
    ]


def to_full_argv(
    layout: NxdLayout, *, model_dir: str, output_dir: str, config_file: str, xser: bool
) -> list[str]:
    """Flags for ``<tag>/model`` shards -> ``<output_dir>/checkpoint.pt`` (HF names)."""
    return [
        "--input_dir",
        model_dir,
        "--output_dir",
        output_dir,
        *_layout_args(layout, config_file),
        *bool_flag("--load_xser", xser),
        "--convert_to_full_state",
    ]


def converter_command(args: Sequence[str], python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", CONVERTER_MODULE, *args]


def expected_shard_files(layout: NxdLayout) -> list[str]:
    return [f"model/{shard_file_name(t, p)}" for p in range(layout.pp) for t in range(layout.tp)]


def check_shard_names(layout: NxdLayout, pp_rank: int, names: Sequence[str], *, where: str) -> None:
    """The converter's keys for a stage must be exactly what the model will load."""
    want, got = set(nxd_param_names(layout, pp_rank)), set(names)
    if want != got:
        missing, extra = sorted(want - got)[:5], sorted(got - want)[:5]
        raise RuntimeError(
            f"{where}: NxD converter output does not match the nxd model's parameters "
            f"(missing {missing}, unexpected {extra})"
        )


def apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**config, **dict(overrides)}


# ---------------------------------------------------------------------------------------------
# I/O helpers (shared with export)
# ---------------------------------------------------------------------------------------------


def work_dir(name: str) -> Path:
    """Scratch space: ``$CPT_WORK_DIR`` (the Job mounts a big volume there) or the temp dir."""
    d = Path(tempfile.mkdtemp(prefix=f"cpt-{name}-", dir=podenv.work_base()))
    return d


def read_config(model_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    return apply_overrides(json.loads(path.read_text()), overrides)


def merge_safetensors(model_dir: Path, out_file: Path) -> int:
    """All ``*.safetensors`` of a HF model -> one flat ``torch.save`` dict (lm_head untied).
    Returns the number of tensors."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors files")
    full: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if key in full:
                    raise ValueError(f"tensor {key!r} appears in two safetensors files")
                full[key] = sf.get_tensor(key)
    full = untie_lm_head(full)
    torch.save(full, out_file)
    n = len(full)
    del full
    return n


def run_converter(args: Sequence[str]) -> None:
    cmd = converter_command(args)
    log.info("running NxD checkpoint converter: %s", " ".join(cmd[1:]))
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"NxD checkpoint converter failed with exit code {proc.returncode}")


def verify_output(out_dir: Path, layout: NxdLayout) -> None:
    import torch

    for rel in expected_shard_files(layout):
        path = out_dir / rel
        if not path.is_file():
            raise RuntimeError(f"NxD converter did not write {rel}")
    for p in range(layout.pp):
        for t in range(layout.tp):
            rel = f"model/{shard_file_name(t, p)}"
            sd = torch.load(out_dir / rel, map_location="cpu", mmap=True, weights_only=True)
            check_shard_names(layout, p, list(sd), where=rel)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def layout_for(cfg: ConvertToNxdStage, config: dict[str, Any]) -> NxdLayout:
    return plan_layout(
        LlamaShape.from_config(config),
        tp=cfg.tensor_parallel,
        pp=cfg.pipeline_parallel,
        kv_size_multiplier=cfg.kv_size_multiplier,
        qkv_linear=cfg.qkv_linear,
        hw_backend=cfg.hw_backend,
    )


def run(cfg: ConvertToNxdStage, *, config_overrides: Mapping[str, Any] | None = None) -> int:
    from cpt_training.checkpoint import upload_and_commit
    from cpt_training.config import ConfigError
    from cpt_training.model_dir import fetch_model_dir

    work = work_dir("convert")
    try:
        model_dir = fetch_model_dir(cfg.model_uri)
        config = read_config(model_dir, config_overrides or {})
        try:
            layout = layout_for(cfg, config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        config_file = work / "config.json"
        config_file.write_text(json.dumps(config, indent=2))
        full_file = work / "full_state.pt"
        n = merge_safetensors(model_dir, full_file)
        log.info("merged %d tensors of %s into one state dict", n, cfg.model_uri)
        out_dir = work / "pretrained_weight"
        run_converter(
            from_full_argv(
                layout,
                input_file=str(full_file),
                output_dir=str(out_dir),
                config_file=str(config_file),
            )
        )
        full_file.unlink()
        verify_output(out_dir, layout)
        shutil.copyfile(config_file, out_dir / "config.json")
        manifest = upload_and_commit(
            out_dir,
            cfg.output_uri,
            step=0,
            world={"backend": "nxd", **layout_record(layout)},
            extra={"source": cfg.model_uri},
        )
        log.info(
            "pretrained_weight committed: %d files, %d bytes",
            len(manifest.files),
            manifest.total_bytes,
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def layout_record(layout: NxdLayout) -> dict[str, Any]:
    """The layout as stored next to checkpoints (manifest ``world``, NxD ``user_content``)."""
    return {
        "tensorParallel": layout.tp,
        "pipelineParallel": layout.pp,
        "kvSizeMultiplier": layout.kv_size_multiplier,
        "qkvLinear": layout.qkv_linear,
        "hwBackend": layout.hw_backend,
    }
