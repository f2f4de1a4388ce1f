"""Model directories: fetch a base model once per node, read its HF config.

Backend-neutral: the native trainer, the NxD trainer and converter, and export all start from a
local directory holding ``config.json``, the tokenizer and (when needed) the safetensors, fetched
from a local path, ``s3://`` or ``hf://`` and cached per node.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

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
    import torch.distributed as dist

    path = fetch_model_dir(uri, weights=weights) if is_local_main else None
    if dist.is_available() and dist.is_initialized():
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
