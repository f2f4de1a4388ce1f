"""Base model files: fetch once per node, read the HF config, load safetensors into the model.

The model's parameter names are HF's, so the safetensors files load straight into the
(FSDP/TP-sharded) parameters through DCP's Hugging Face reader: every rank reads only the
slices it owns, from the node-local copy, with no full state dict anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cpt_training import podenv, storage

log = logging.getLogger(__name__)

# Files a model dir needs for training/export; everything else (pytorch_model.bin, onnx,
# original/ consolidated checkpoints) is skipped when downloading.
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt")


def cache_root() -> Path:
    return podenv.model_cache_dir()


def _wanted(name: str, weights: bool) -> bool:
    from fnmatch import fnmatch

    base = name.rsplit("/", 1)[-1]
    if "/" in name or not any(fnmatch(base, p) for p in MODEL_PATTERNS):
        return False
    return weights or not base.endswith(".safetensors")


def model_cache_dir(uri: str, dest_root: Path | None = None) -> Path:
    """Where a remote model is cached on this node (deterministic, so every rank agrees)."""
    return (dest_root or cache_root() / "models") / hashlib.sha1(uri.encode()).hexdigest()[:16]


def fetch_model_dir(uri: str, dest_root: Path | None = None, *, weights: bool = True) -> Path:
    """A local directory holding the model at ``uri`` (local path, ``s3://`` or ``hf://``).

    ``weights=False`` fetches only config and tokenizer files (a resumed run needs no base
    weights). Remote models are downloaded into ``<cache>/models/<sha1(uri)>/`` and reused
    when a marker says an earlier download finished."""
    if not uri.startswith("hf://") and not storage.is_s3_uri(uri):
        path = storage.local_path_of(uri)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model dir {path} has no config.json")
        return path
    dest = model_cache_dir(uri, dest_root)
    marker = dest / (".complete" if weights else ".complete-config")
    if marker.is_file() or (dest / ".complete").is_file():
        return dest
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, _, revision = uri[len("hf://") :].partition("@")
        patterns = [p for p in MODEL_PATTERNS if weights or p != "*.safetensors"]
        snapshot_download(
            repo_id=repo, revision=revision or None, local_dir=str(dest), allow_patterns=patterns
        )
    else:
        st = storage.open_storage(uri)
        keys = [k for k in st.list() if _wanted(k, weights)]
        if "config.json" not in keys:
            raise FileNotFoundError(f"model {uri} has no config.json")
        log.info("downloading %d model files from %s", len(keys), uri)
        st.download_dir("", dest, keys=keys)
    if not (dest / "config.json").is_file():
        raise FileNotFoundError(f"model {uri} has no config.json")
    marker.write_text(uri)
    return dest


def fetch_model_dir_per_node(uri: str, is_local_main: bool, *, weights: bool = True) -> Path:
    """Local rank 0 of every node downloads while the node's other ranks wait (collective:
    all ranks call it at the same point)."""
    path = fetch_model_dir(uri, weights=weights) if is_local_main else None
    if dist.is_initialized():
        dist.barrier()
    if path is not None:
        return path
    if uri.startswith("hf://") or storage.is_s3_uri(uri):
        return model_cache_dir(uri)
    return storage.local_path_of(uri)


def load_hf_config(model_dir: Path, overrides: dict[str, Any]) -> Any:
    """The model's ``LlamaConfig`` with ``config_overrides`` applied (unknown keys rejected)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    known = set(config.to_dict())
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(
            f"configOverrides has keys the model config does not have: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


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
