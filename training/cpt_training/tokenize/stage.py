"""The stage driver: the config hash, and running one shard idempotently (skip when done,
stage locally, publish, then the done file and the manifest)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from cpt_training.config import (
    TokenizeStage,
)
from cpt_training.storage import TMP_MARKER, open_storage
from cpt_training.tokenize.layout import (
    FORMAT,
    TokenizeError,
    done_name,
    heldout_name,
    shard_name,
)
from cpt_training.tokenize.manifest import ShardResult, _check_existing, _maybe_write_manifest
from cpt_training.tokenize.shard import _tokenize_shard
from cpt_training.tokenize.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def config_hash(cfg: TokenizeStage, tokenizer_digest: str) -> str:
    """Hash of everything that changes the output bytes: not the shard index, workers or
    output; the tokenizer by the digest of its content, not by where it was loaded from."""
    relevant = cfg.model_dump(
        mode="json",
        # txt_split is hashed below under the key it always had; storage tuning moves bytes
        # faster, it changes none of them.
        exclude={
            "shard_index",
            "workers",
            "output_uri",
            "stage",
            "tokenizer_uri",
            "txt_split",
            "storage",
        },
    )
    for src in relevant["sources"]:
        if src.get("data_files") is None:  # added later: unset keeps earlier hashes valid
            src.pop("data_files", None)
        # Training's sampling, not the tokens: a new weight or name needs no new tokenization.
        src.pop("weight", None)
        src.pop("role", None)
    relevant["tokenizer"] = tokenizer_digest
    relevant["format"] = FORMAT
    relevant["txtSplit"] = cfg.txt_split
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def run_tokenize(cfg: TokenizeStage) -> ShardResult:
    """Run shard ``cfg.resolved_shard_index()`` of the tokenize stage (idempotent)."""
    shard = cfg.resolved_shard_index()
    n = cfg.num_shards
    if not 0 <= shard < n:
        raise TokenizeError(f"shardIndex {shard} is out of range for numShards {n} (0..{n - 1})")
    tok = load_tokenizer(cfg.tokenizer_uri)
    chash = config_hash(cfg, tok.digest)
    out = open_storage(cfg.output_uri)
    _check_existing(out, chash)
    try:
        prev = ShardResult.from_json(out.read_json(done_name(shard, n)))
    except FileNotFoundError:
        prev = None
    if prev is not None:
        log.info("shard %d of %d already done (configHash %s): skipping", shard, n, chash)
        prev.skipped = True
        _maybe_write_manifest(out, cfg, chash)
        return prev
    # Leftovers of a killed earlier run of this shard are not visible (no done file): clear.
    out.delete_prefix(shard_name(shard, n))
    out.delete_prefix(heldout_name(shard, n))
    # A local output is staged inside itself (a hidden dir with the storage layer's temp
    # marker, removed on failure or by the next run of this shard), so the finished dirs are
    # renamed into place instead of copied: a shard's Arrow files hold about 9 bytes per
    # token, a serial copy of seconds at the end of a large shard. Others are uploaded.
    local_out = out.local_path()
    prefix = f".{shard_name(shard, n)}{TMP_MARKER}"
    if local_out is not None:
        local_out.mkdir(parents=True, exist_ok=True)
        for stale in local_out.glob(prefix + "*"):  # left by a killed earlier run
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=local_out) as tmp:
        stage = Path(tmp)
        result = _tokenize_shard(cfg, tok, shard, chash, stage)
        for name in (shard_name(shard, n), heldout_name(shard, n)):
            if not (stage / name).is_dir():
                continue
            if local_out is not None:
                os.replace(stage / name, local_out / name)
            else:
                out.upload_dir(stage / name, name)
    out.write_json(done_name(shard, n), result.to_json())
    log.info(
        "shard %d of %d: %d docs, %d blocks (%d tokens, %d dropped) in %.1fs",
        shard,
        n,
        result.docs,
        result.blocks,
        result.tokens,
        result.dropped_tokens,
        result.seconds,
    )
    _maybe_write_manifest(out, cfg, chash)
    return result
