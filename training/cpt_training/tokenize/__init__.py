"""The tokenize stage: shard ``i`` of ``N`` reads its slice of the corpus, tokenizes, packs
and writes Arrow blocks that both trainers load.

Input: Hugging Face datasets by id (``load_dataset(..., streaming=True)``; a local dataset dir
works too) and/or ``s3://``/local prefixes of ``.jsonl`` (``.json``), ``.parquet`` and ``.txt``
files. A ``.txt`` file is one document; with ``txtSplit: paragraph`` every
blank-line-separated paragraph is one document.

Shard assignment (disjoint and complete, deterministic from the file listing):

* Files of all ``uri`` sources are listed and sorted. With at least as many files as shards,
  each file is one unit; otherwise each file is cut into ``k = ceil(N / files)`` units by row
  index modulo ``k`` (unit ``j`` holds rows ``r`` with ``r % k == j``), so small corpora
  still spread over all shards. Units go to shards greedily by estimated size (largest
  first, to the least loaded shard; ties by unit order), so shards get similar work.
* HF datasets use ``datasets.distributed.split_dataset_by_node(rank=i, world_size=N)``:
  whole data files per shard when their count divides ``N``, rows modulo ``N`` otherwise.

Packing (``concat``): each document becomes ``ids(text)`` (no special tokens) followed by
EOS; a shard's documents, in order, are concatenated and cut into ``block_size`` blocks.
``labels = input_ids`` (the model shifts), ``attention_mask`` is all ones. The remainder
carries over from document to document within the shard; the final partial block of each
shard is dropped (counted as ``droppedTokens`` in the shard's done file), so at most
``block_size - 1`` tokens are lost per shard and no block is padded.

Held-out: a document is held out when ``blake2b(seed, text)`` mapped to [0, 1) is below
``held_out_fraction``: deterministic, independent of sharding and order. Held-out documents
are packed the same way into ``heldout-XXXXX-of-YYYYY/``.

Output (``output_uri``): ``shard-XXXXX-of-YYYYY/`` (the HF ``save_to_disk`` layout, written
with pyarrow; read with ``load_from_disk``), optional ``heldout-…/``, then
``shard-….done.json`` (counts and the config hash), and finally ``manifest.json`` written by
whichever shard completes the set.
Data is staged in a local temp dir and uploaded before the done file, so a partial shard is
never visible as complete. A rerun with the same config hash skips finished shards and
re-checks the manifest; any different config hash in the output fails with a clear error.

Tokenizer (``tokenizer_uri``): a local dir, an ``s3://`` dir (downloaded to a temp dir) or
``hf://org/name[@rev]`` (tokenizer files via ``huggingface_hub.snapshot_download``,
``HF_TOKEN`` from the env). ``tokenizer.json`` is loaded with the ``tokenizers`` library and EOS
read from ``tokenizer_config.json``/``special_tokens_map.json`` (no transformers/torch import);
slow-only tokenizers are converted with ``AutoTokenizer``. Byte-level BPE tokenizers encode
through :class:`PieceCache` (the same ids, a fraction of the cost), others through the Rust
``encode_batch_fast``. The shard's work is a list of tasks (jsonl files in ``TASK_BYTES``
line-aligned slices) that read, split off held-out documents and encode by themselves;
with ``workers > 1`` a pool of ``workers`` processes (one Rayon thread each) runs them, and the
main process only packs the returned ids in task order and writes the blocks. A local output
is staged in a hidden dir inside it and renamed into place; others are uploaded.

The parts, by concern: :mod:`.layout` (names, format, errors), :mod:`.tokenizer` (loading),
:mod:`.sources` (units, shard plan, HF sources), :mod:`.reading` (documents, text splitting,
held-out), :mod:`.packing` (blocks into Arrow), :mod:`.shard` (tasks, workers, one shard),
:mod:`.manifest` (done files, manifest) and :mod:`.stage` (config hash, the driver); the
piece cache is :mod:`cpt_training.piece_cache`. The names below are this package's API.
"""

from __future__ import annotations

from cpt_training.piece_cache import PieceCache
from cpt_training.tokenize.layout import (
    DOC_BATCH,
    FORMAT,
    MANIFEST,
    TokenizeError,
    done_name,
    heldout_name,
    shard_name,
)
from cpt_training.tokenize.manifest import ShardResult
from cpt_training.tokenize.packing import FILE_BYTES, FLUSH_BLOCKS, BlockWriter
from cpt_training.tokenize.reading import TASK_BYTES, is_held_out, shard_documents
from cpt_training.tokenize.sources import (
    SCRIPT_ERROR,
    Unit,
    plan_shards,
    script_source_error,
)
from cpt_training.tokenize.stage import config_hash, run_tokenize
from cpt_training.tokenize.tokenizer import LoadedTokenizer, load_tokenizer

__all__ = [
    "DOC_BATCH",
    "FILE_BYTES",
    "FLUSH_BLOCKS",
    "FORMAT",
    "MANIFEST",
    "SCRIPT_ERROR",
    "TASK_BYTES",
    "BlockWriter",
    "LoadedTokenizer",
    "PieceCache",
    "ShardResult",
    "TokenizeError",
    "Unit",
    "config_hash",
    "done_name",
    "heldout_name",
    "is_held_out",
    "load_tokenizer",
    "plan_shards",
    "run_tokenize",
    "script_source_error",
    "shard_documents",
    "shard_name",
]
