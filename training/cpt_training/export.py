"""``cpt-train export-hf``: newest committed checkpoint -> a Hugging Face model that loads.

Steps, each a precondition of the next:

1. ``_SUCCESS`` of an earlier attempt is removed from ``output_uri`` (so a half-done re-run is
   never mistaken for a finished one);
2. the newest committed checkpoint under ``checkpoint_uri`` is restored and verified against
   its manifest;
3. its weights become an HF state dict: native DCP tags are loaded into a CPU model with the HF
   parameter names (DCP reshards FSDP/TP shards on load), NxD tags go through
   ``cpt_training.nxd.export.to_hf_state_dict``;
4. ``LlamaForCausalLM`` (base config + ``config_overrides``) loads them strictly and is saved
   with ``save_pretrained`` (safetensors) plus the tokenizer files, then uploaded;
5. the uploaded copy is downloaded into a fresh directory and loaded with
   ``AutoModelForCausalLM.from_pretrained``: if that fails the stage fails;
6. the loaded model's loss on ``eval_blocks`` held-out blocks of ``data_uri`` goes to
   ``eval.json`` ``{loss, perplexity, blocks, tokens, step}``, with ``sources`` and ``totals``:
   the base model's and this model's loss on the first ``eval_blocks`` held-out blocks of
   every source (``cpt_training.evaluation``);
7. the model card ``README.md`` (``cpt_training.model_card``); ``_SUCCESS`` is written last.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cpt_training import podenv, storage
from cpt_training.checkpoint import CommittedCheckpoint, restore
from cpt_training.config import ConfigError, ExportHfStage
from cpt_training.evaluation import eval_loss

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
EVAL_FILE = "eval.json"
CARD_FILE = "README.md"


def work_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="cpt-export-", dir=podenv.work_base()))


def native_state_dict(tag_dir: Path, hf_config: Any) -> dict[str, torch.Tensor]:
    """Model weights of a native DCP tag as a full, HF-named, fp32 CPU state dict."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from cpt_training.native.llama import Llama

    with torch.device("cpu"):
        model = Llama.from_hf_config(hf_config)
    sd = model.state_dict()
    if model.args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    saved = {
        k[len("model.") :]
        for k in FileSystemReader(str(tag_dir)).read_metadata().state_dict_metadata
        if k.startswith("model.")
    }
    missing = sorted(set(sd) - saved)
    if missing:
        raise RuntimeError(
            f"checkpoint {tag_dir.name} does not fit the model config: it lacks "
            f"{len(missing)} weights, e.g. {', '.join(missing[:3])} (configOverrides must be "
            "the ones the run was trained with)"
        )
    with warnings.catch_warnings():
        # Loading in one process is the intent here, not a missing process group.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load({"model": sd}, checkpoint_id=str(tag_dir), no_dist=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def build_hf_model(hf_config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """``LlamaForCausalLM`` holding exactly ``state`` (strict: no missing or extra weights)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    expected = set(model.state_dict())
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    given = dict(state)
    if tied:
        given.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(given))
    extra = sorted(set(given) - expected)
    if missing or extra:
        raise RuntimeError(
            f"checkpoint weights do not match the model config: missing {missing[:4]}, "
            f"unexpected {extra[:4]}"
        )
    model.load_state_dict(given, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.to(dtype)  # type: ignore[arg-type]
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _tokenizer_source(cfg: ExportHfStage, base_dir: Path) -> Path:
    from cpt_training.model_dir import fetch_model_dir

    if cfg.tokenizer_uri is None:
        return base_dir
    if cfg.tokenizer_uri.startswith("hf://") or storage.is_s3_uri(cfg.tokenizer_uri):
        st_uri = cfg.tokenizer_uri
        if st_uri.startswith("hf://"):
            return fetch_model_dir(st_uri, weights=False)
        dest = work_root() / "tokenizer"
        storage.open_storage(st_uri).download_dir("", dest)
        return dest
    return storage.local_path_of(cfg.tokenizer_uri)


def save_tokenizer(src: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:
        raise RuntimeError(f"no loadable tokenizer in {src}: {exc}") from exc
    tok.save_pretrained(str(out))


@torch.no_grad()
def _checkpoint(cfg: ExportHfStage, work: Path) -> CommittedCheckpoint:
    ckpt = restore(cfg.checkpoint_uri, work / "ckpt", prune_local_dir=False)
    if ckpt is None or ckpt.local_path is None:
        raise RuntimeError(f"no committed checkpoint under {cfg.checkpoint_uri}")
    return ckpt


def _before_after(cfg: ExportHfStage, after: Any, base_dir: Path, dtype: torch.dtype) -> Any:
    """Per-source held-out loss of the base model and of ``after`` (cpt_training.evaluation)."""
    from transformers import AutoModelForCausalLM

    from cpt_training.evaluation import compare, held_out_by_source
    from cpt_training.model_dir import fetch_model_dir, load_hf_config

    assert cfg.data_uri is not None
    sources = held_out_by_source(cfg.data_uri, cfg.eval_blocks)
    weights_dir = fetch_model_dir(cfg.model_uri, weights=True)
    hf_config = load_hf_config(weights_dir, cfg.config_overrides)
    before = AutoModelForCausalLM.from_pretrained(str(weights_dir), config=hf_config, dtype=dtype)
    before.eval()  # type: ignore[no-untyped-call]
    comparison = compare(before, after, sources)
    del before
    for name, e in comparison["sources"].items():
        log.info(
            "held-out %s: loss %s -> %s over %d blocks",
            name,
            e["before"]["loss"],
            e["after"]["loss"],
            e["blocks"],
        )
    return comparison


def _model_card(cfg: ExportHfStage, step: int, result: dict[str, Any], base_dir: Path) -> str:
    from cpt_training import model_card

    tokens_seen = None
    if cfg.data_uri and cfg.global_batch_size:
        from cpt_training.data import TokenBlocks

        blocks = TokenBlocks(cfg.data_uri, mixture=cfg.mixture)
        tokens_seen = blocks.tokens_seen(step, cfg.global_batch_size)
    comparison = {k: result[k] for k in ("sources", "totals")} if "sources" in result else None
    return model_card.render(
        cfg,
        step=step,
        comparison=comparison,
        tokens_seen=tokens_seen,
        license_=model_card.base_license(base_dir),
    )


def run(cfg: ExportHfStage) -> int:
    from transformers import AutoModelForCausalLM

    from cpt_training.model_dir import fetch_model_dir, load_hf_config

    t0 = time.perf_counter()
    out_st = storage.open_storage(cfg.output_uri)
    out_st.delete(SUCCESS)
    work = work_root()
    try:
        base_dir = fetch_model_dir(cfg.model_uri, weights=False)  # config + tokenizer
        try:
            hf_config = load_hf_config(base_dir, cfg.config_overrides)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        ckpt = _checkpoint(cfg, work)
        assert ckpt.local_path is not None
        log.info("exporting %s (step %d) from %s", ckpt.tag, ckpt.step, ckpt.uri)
        dtype = getattr(torch, cfg.dtype)
        if cfg.backend == "nxd":
            from cpt_training.nxd.export import to_hf_state_dict

            state = to_hf_state_dict(ckpt.local_path, cfg)
        else:
            state = native_state_dict(ckpt.local_path, hf_config)
        model = build_hf_model(hf_config, state, dtype)
        del state
        local_out = work / "hf"
        model.save_pretrained(str(local_out))
        del model
        save_tokenizer(_tokenizer_source(cfg, base_dir), local_out)
        out_st.upload_dir(local_out)
        log.info("uploaded the HF model to %s", out_st.uri)

        # Prove the uploaded copy loads: fetch it back into a fresh directory.
        check_dir = work / "check"
        out_st.download_dir("", check_dir)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(check_dir), dtype=dtype)
        except Exception as exc:
            raise RuntimeError(f"the exported model at {out_st.uri} does not load: {exc}") from exc
        loaded.eval()  # type: ignore[no-untyped-call]
        result: dict[str, Any] = {
            "step": ckpt.step,
            "checkpoint": ckpt.uri,
            "loss": None,
            "perplexity": None,
            "blocks": 0,
            "tokens": 0,
            "dtype": cfg.dtype,
        }
        if cfg.data_uri and cfg.eval_blocks > 0:
            from cpt_training.native.data import heldout_blocks

            blocks = heldout_blocks(cfg.data_uri, cfg.eval_blocks)
            loss, tokens = eval_loss(loaded, blocks)
            result.update(
                loss=loss,
                perplexity=math.exp(loss) if loss < 700 else None,
                blocks=len(blocks),
                tokens=tokens,
            )
            log.info("held-out loss %.4f over %d blocks (%d tokens)", loss, len(blocks), tokens)
        if cfg.data_uri and cfg.eval_blocks > 0:
            result.update(_before_after(cfg, loaded, base_dir, dtype))
        card = _model_card(cfg, ckpt.step, result, base_dir)
        out_st.write_bytes(CARD_FILE, card.encode())
        result["seconds"] = round(time.perf_counter() - t0, 3)
        out_st.write_bytes(EVAL_FILE, (json.dumps(result, indent=1) + "\n").encode())
        out_st.write_bytes(SUCCESS, b"")
        print(json.dumps({"stage": "export-hf", "output": out_st.uri, **result}), flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
