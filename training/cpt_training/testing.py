"""Tiny models and tokenizers for tests, the demo and local smoke runs.

Nothing may be downloaded at run time, so the "base model" of a test or demo run is a tiny
Llama built here from a ``transformers.LlamaConfig`` with seeded random weights and saved with
``save_pretrained`` (safetensors + config.json), exactly the layout of a real HF model dir.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def make_tiny_llama(
    out_dir: str | Path,
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seq: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    **config_kwargs: Any,
) -> Path:
    """Build a seeded random Llama and ``save_pretrained`` it (safetensors) into ``out_dir``.

    ``tokenizer_dir``: a tokenizer saved with ``save_pretrained``; its files are copied next to
    the model (so the dir is a complete HF model) and its special-token ids go into the config.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special: dict[str, Any] = {}
    tok = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        special = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        if len(tok) > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tok)})")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
        tie_word_embeddings=tie_word_embeddings,
        **special,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def sample_texts(n_docs: int = 400) -> list[str]:
    """Deterministic English documents: the Python reference manual and stdlib docstrings that
    ship with CPython (``cpt_training.corpus``), so nothing is downloaded."""
    from cpt_training.corpus import python_docs

    docs: list[str] = []
    for doc in python_docs():
        docs.append(doc)
        if len(docs) >= n_docs:
            break
    return docs


@dataclass(frozen=True)
class TinyAssets:
    """Everything a training run needs, built locally: tokenizer, base model, tokenized data."""

    tokenizer: Path
    model: Path
    data: Path
    block_size: int
    vocab_size: int


def make_tiny_assets(
    root: str | Path,
    *,
    block_size: int = 64,
    vocab_size: int = 512,
    n_docs: int = 300,
    held_out_fraction: float = 0.1,
    tie_word_embeddings: bool = False,
) -> TinyAssets:
    """A tokenizer trained on the bundled corpus, a tiny Llama using it, and the corpus run
    through the real tokenize stage (one shard, ``held_out_fraction`` held out)."""
    import json

    from cpt_training.config import TokenizeStage
    from cpt_training.tokenize import run_tokenize

    root = Path(root)
    texts = sample_texts(n_docs)
    tok = make_tiny_tokenizer(root / "tokenizer", texts, vocab_size=vocab_size)
    model = make_tiny_llama(
        root / "model",
        vocab_size,
        seq=max(256, block_size),
        tokenizer_dir=tok,
        tie_word_embeddings=tie_word_embeddings,
    )
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    with open(corpus / "docs.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    data = root / "data"
    run_tokenize(
        TokenizeStage(
            sources=[{"uri": str(corpus)}],  # type: ignore[list-item]
            tokenizer_uri=str(tok),
            block_size=block_size,
            output_uri=str(data),
            held_out_fraction=held_out_fraction,
            shard_index=0,
        )
    )
    return TinyAssets(tok, model, data, block_size, vocab_size)


def tokenize_sources(
    root: str | Path,
    assets: TinyAssets,
    corpora: dict[str, list[str]],
    weights: dict[str, float],
    *,
    held_out_fraction: float = 0.1,
) -> Path:
    """Tokenize several named corpora (one jsonl file each) as weighted sources of one
    dataset with ``assets``' tokenizer and block size; returns the dataset dir."""
    import json

    from cpt_training.config import DataSource, TokenizeStage
    from cpt_training.tokenize import run_tokenize

    root = Path(root)
    sources = []
    for name, texts in corpora.items():
        corpus = root / "corpora" / name
        corpus.mkdir(parents=True, exist_ok=True)
        with open(corpus / "docs.jsonl", "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        sources.append(DataSource(uri=str(corpus), role=name, weight=weights[name]))
    data = root / "data"
    run_tokenize(
        TokenizeStage(
            sources=sources,
            tokenizer_uri=str(assets.tokenizer),
            block_size=assets.block_size,
            output_uri=str(data),
            held_out_fraction=held_out_fraction,
            shard_index=0,
        )
    )
    return data


def make_tiny_tokenizer(
    out_dir: str | Path, texts: Iterable[str] | None = None, *, vocab_size: int = 512
) -> Path:
    """Train a byte-level BPE tokenizer (``<pad>``, ``<s>``, ``</s>``) and save it HF-style."""
    from cpt_training.corpus import train_bpe_tokenizer

    source: list[str] | Iterator[str] = list(texts) if texts is not None else sample_texts()
    return train_bpe_tokenizer(source, out_dir, vocab_size=vocab_size)


def native_train_config(
    assets: TinyAssets, ckpt_uri: str, local: str | Path, max_steps: int, **kw: Any
) -> dict[str, Any]:
    """A ``train`` stage config for the native trainer on CPU over ``assets``: 2 ranks x micro
    batch 2 x 2 accumulation steps, checkpoints every 2 steps keeping 2; ``kw`` overrides."""
    cfg: dict[str, Any] = {
        "stage": "train",
        "device": "cpu",
        "modelUri": str(assets.model),
        "dataUri": str(assets.data),
        "seqLen": assets.block_size,
        "globalBatchSize": 8,
        "microBatchSize": 2,
        "maxSteps": max_steps,
        "precision": "fp32",
        "activationCheckpointing": "none",
        "optimizer": {"lr": 3e-3, "minLr": 3e-4, "warmupSteps": 2},
        "checkpoint": {"uri": ckpt_uri, "everySteps": 2, "keep": 2, "localDir": str(local)},
    }
    cfg.update(kw)
    return cfg


def torchrun_train(
    cfg: dict[str, Any],
    nproc: int,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    stage: str = "train",
) -> Any:
    """``cpt-train STAGE`` (train by default) with stage config ``cfg`` under torchrun on
    ``nproc`` local ranks (one thread each), as a pod runs it; returns the finished
    ``subprocess.CompletedProcess``."""
    import json
    import os
    import subprocess
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "cpt_training.cli",
            stage,
        ],
        env={
            **os.environ,
            **(env or {}),
            "CPT_STAGE_CONFIG": json.dumps(cfg),
            "OMP_NUM_THREADS": "1",
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )
