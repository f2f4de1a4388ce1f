"""An NxD checkpoint tag -> the full HF-named state dict (for ``cpt-train export-hf``).

The layout (TP, PP, qkv_linear, KV multiplier) is read from the tag itself: TP/PP from the
shard file names, the rest from the parameter names and shapes of one shard. So export needs
no knowledge of how training was configured, and a mismatch cannot silently produce a
scrambled model. NxD's converter (``--convert_to_full_state``, ``--load_xser`` when the tag
was saved with xser) does the merge; its ``checkpoint.pt`` is loaded, checked against the HF
parameter list, and returned. The native export then builds ``LlamaForCausalLM``, loads it,
saves it with ``save_pretrained`` and evaluates it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt_training.config import ExportHfStage
from cpt_training.nxd.convert import (
    read_config,
    run_converter,
    to_full_argv,
    work_dir,
)
from cpt_training.nxd.layout import (
    SHARD_FILE_RE,
    LlamaShape,
    NxdLayout,
    hf_param_names,
    plan_layout,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def is_xser(model_dir_entries: Iterable[str]) -> bool:
    """NxD's rule: a tag saved with xser has ``*.tensors`` directories next to the files."""
    return any(e.endswith(".tensors") for e in model_dir_entries)


def parallel_degrees(model_dir_entries: Iterable[str]) -> tuple[int, int]:
    """(TP, PP) from ``dp_rank_00_tp_rank_XX_pp_rank_YY.pt`` names; the grid must be full."""
    ranks = set()
    for name in model_dir_entries:
        m = SHARD_FILE_RE.match(name)
        if m and int(m.group(1)) == 0:
            ranks.add((int(m.group(2)), int(m.group(3))))
    if not ranks:
        raise ValueError("no dp_rank_00_tp_rank_XX_pp_rank_YY.pt files in the tag's model/")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    missing = {(t, p) for t in range(tp) for p in range(pp)} - ranks
    if missing:
        raise ValueError(f"incomplete NxD checkpoint: shards {sorted(missing)[:4]} are missing")
    return tp, pp


def infer_layout(
    shape: LlamaShape, tp: int, pp: int, stage0_shapes: Mapping[str, tuple[int, ...]]
) -> NxdLayout:
    """qkv_linear and the KV multiplier from the (tp 0, pp 0) shard's names and shapes."""
    key_k = "model.layers.0.self_attn.qkv_proj.weight_k"
    if key_k in stage0_shapes:
        rows = stage0_shapes[key_k][0]  # KV heads per rank x head_dim
        kvm = rows * tp // (shape.kv_heads * shape.head_dim)
        return plan_layout(shape, tp=tp, pp=pp, kv_size_multiplier=kvm, qkv_linear=True)
    return plan_layout(shape, tp=tp, pp=pp)


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def to_hf_state_dict(
    checkpoint_local_dir: str | Path, cfg: ExportHfStage
) -> dict[str, torch.Tensor]:
    """The full state dict, HF names, of the NxD tag at ``checkpoint_local_dir`` (a local
    ``<root>/<tag>/`` copy), in ``cfg.dtype``."""
    import torch

    tag_dir = Path(checkpoint_local_dir)
    model_dir = tag_dir / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{tag_dir} is not an NxD checkpoint tag (no model/ dir)")
    entries = _entries(model_dir)
    tp, pp = parallel_degrees(entries)
    if (cfg.tensor_parallel, cfg.pipeline_parallel) not in ((1, 1), (tp, pp)):
        log.warning(
            "export config says TP=%d PP=%d, the checkpoint has TP=%d PP=%d: using the files",
            cfg.tensor_parallel,
            cfg.pipeline_parallel,
            tp,
            pp,
        )
    work = work_dir("export")
    try:
        config = _config(cfg, work)
        shape = LlamaShape.from_config(config)
        xser = is_xser(entries)
        stage0 = _shard_shapes(model_dir / "dp_rank_00_tp_rank_00_pp_rank_00.pt", xser)
        layout = infer_layout(shape, tp, pp, stage0)
        config_file = work / "config.json"
        config_file.write_text(json.dumps(config))
        run_converter(
            to_full_argv(
                layout,
                model_dir=str(model_dir),
                output_dir=str(work / "full"),
                config_file=str(config_file),
                xser=xser,
            )
        )
        full = torch.load(work / "full" / "checkpoint.pt", map_location="cpu", weights_only=True)
        want = set(hf_param_names(shape))
        missing = sorted(want - set(full))
        if missing:
            raise RuntimeError(f"merged NxD checkpoint lacks {missing[:5]}")
        dtype = getattr(torch, cfg.dtype)
        return {k: full[k].to(dtype) for k in sorted(want)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _config(cfg: ExportHfStage, work: Path) -> dict[str, Any]:
    from cpt_training.model_dir import fetch_model_dir  # cached: export fetched it already

    return read_config(fetch_model_dir(cfg.model_uri), cfg.config_overrides)


def _shard_shapes(path: Path, xser: bool) -> dict[str, tuple[int, ...]]:
    import torch

    if xser:
        # xser files hold TensorReferences; the shapes live in the ``.info.pt`` index
        info = torch.load(str(path) + ".info.pt", map_location="cpu", weights_only=False)
        ref = torch.load(path, map_location="cpu", weights_only=False)
        return {k: tuple(info[v.tid]["shape"]) for k, v in ref.items() if hasattr(v, "tid")}
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {k: tuple(v.shape) for k, v in sd.items()}
