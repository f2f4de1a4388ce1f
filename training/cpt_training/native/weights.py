"""Base model weights: load HF safetensors into the (sharded) model. Fetching the model
directory and reading its config are backend-neutral: :mod:`cpt_training.model_dir`.

The model's parameter names are HF's, so the safetensors files load straight into the
(FSDP/TP-sharded) parameters through DCP's Hugging Face reader: every rank reads only the
slices it owns, from the node-local copy, with no full state dict anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def safetensors_keys(model_dir: Path) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    if not keys:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return keys


def load_hf_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load HF safetensors into ``model`` (plain, FSDP2- or TP-sharded) in place."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    sd = get_model_state_dict(model)
    in_file = safetensors_keys(model_dir)
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    if tied:
        sd.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    missing = sorted(k for k in sd if k not in in_file)
    if missing:
        raise ValueError(
            f"the base model in {model_dir} lacks {len(missing)} weights the config needs, "
            f"e.g. {', '.join(missing[:4])} (do configOverrides change the model's shape?)"
        )
    # Loads in place: the tensors in ``sd`` are (shards of) the model's own parameters.
    dcp_load(sd, storage_reader=HuggingFaceStorageReader(str(model_dir)), no_dist=not _dist())


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()
