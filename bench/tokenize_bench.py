"""Goal 3: tokenization throughput of the tokenize stage vs the seed's datasets.map approach.

Corpus: the offline English corpus of ``cpt_training.corpus.python_docs()`` (about 1.2 MB of
CPython reference-manual topics and docstrings), repeated ``--repeat`` times and dealt into 8
jsonl files, so every variant reads tens of MB. Repetition does not change the per-token work:
the BPE word cache sees the same word distribution as in one copy.

Tokenizer: a 32k byte-level BPE trained on one copy of that corpus with
``cpt_training.corpus.train_bpe_tokenizer``.

Variants (each in a fresh subprocess pinned to the given cores, ``RAYON_NUM_THREADS=1`` so one
core means one core):

* ``ours``: ``cpt_training.tokenize.run_tokenize`` end to end (read jsonl, encode, pack into
  4096-token blocks, write Arrow, ``save_to_disk``), ``workers`` = number of cores.
* ``seed``: the NxD/seed recipe: ``load_dataset("json")``, ``AutoTokenizer``,
  ``ds.map(tokenize, batched=True)``, ``ds.map(group_texts, batched=True)`` (concatenate, cut
  into blocks, labels = input_ids), ``save_to_disk``; ``num_proc`` = number of cores.

The scaling rows (``tokenize.scaling.*``: two workers, two shard processes, each against one)
run on a second corpus, :func:`prepare_code`: about 250 MB of distinct text (every ``.py`` file
of the installed packages), so each of two workers has about half a minute of work, as a real
shard's worker has minutes, and the cache keeps missing as it does on real data. The repeated
corpus gives a worker a few seconds, of which per-process start-up is a large share, and misses
only during its first copy. ``--only scaling`` runs just those rows (and replaces just them in
the results file).

Tokens/s = tokens produced (before dropping the last partial block) / wall seconds of the whole
variant. CPU seconds (self + children) are recorded too: on a busy machine tokens per
CPU-second is the steadier per-core figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

BLOCK = 4096
VOCAB = 32000
FILES = 8


def corpus_docs() -> list[str]:
    common.bootstrap()
    from cpt_training.corpus import python_docs

    return list(python_docs())


def prepare(work: Path, repeat: int) -> tuple[Path, Path, dict[str, Any]]:
    """The repeated jsonl corpus and the 32k tokenizer (cached under ``work``)."""
    common.bootstrap()
    from cpt_training.corpus import train_bpe_tokenizer

    docs: list[str] | None = None
    tok_dir = work / f"tok{VOCAB // 1000}k"
    if not (tok_dir / "tokenizer.json").is_file():
        docs = corpus_docs()
        train_bpe_tokenizer(docs, tok_dir, vocab_size=VOCAB)
    corpus = work / f"corpus-x{repeat}"
    marker = corpus / "_COMPLETE"
    if not marker.is_file():
        docs = docs or corpus_docs()
        corpus.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": d}) + "\n" for d in docs]
        parts: list[list[str]] = [[] for _ in range(FILES)]
        k = 0
        for _ in range(repeat):
            for line in lines:
                parts[k % FILES].append(line)
                k += 1
        for i, part in enumerate(parts):
            (corpus / f"part-{i:03d}.jsonl").write_text("".join(part), encoding="utf-8")
        marker.write_text(json.dumps({"docs": len(docs) * repeat}))
    from tokenizers import Tokenizer

    size = sum(p.stat().st_size for p in corpus.glob("*.jsonl"))
    info = {
        "corpusBytes": size,
        "corpusRepeat": repeat,
        "corpusDocs": json.loads(marker.read_text())["docs"],
        "corpusSource": "cpt_training.corpus.python_docs() (CPython docs), repeated",
        "tokenizerVocab": Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(),
        "blockSize": BLOCK,
        "files": FILES,
        "corpusCopyDocs": json.loads(marker.read_text())["docs"] // repeat,
    }
    return corpus, tok_dir, info


def prepare_llama3(work: Path) -> tuple[Path, dict[str, Any]]:
    """A 32k Llama-3-style tokenizer (its split regex, byte-level, ignore_merges:
    ``cpt_training.corpus.build_llama3_style_bpe``) trained on one copy of the corpus, saved
    with its EOS; cached under ``work``. The stage encodes it with the plain Rust encoder
    (the piece cache serves GPT-2's split only)."""
    common.bootstrap()
    from cpt_training.corpus import build_llama3_style_bpe

    tok_dir = work / f"llama3-style-{VOCAB // 1000}k"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = build_llama3_style_bpe(corpus_docs(), vocab_size=VOCAB)
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(tok_dir / "tokenizer.json"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    return tok_dir, {"tokenizer": "Llama-3-style (split + byte-level BPE)", "tokenizerVocab": vocab}


def prepare_code(work: Path, max_mb: int) -> tuple[Path, dict[str, Any]]:
    """The scaling corpus (cached under ``work``): distinct text sized like a real shard.

    The repeated corpus is too small for a scaling measurement (a few seconds per worker,
    so per-process start-up is a large share) and too kind to a cache (after one copy every
    chunk is a hit, so a worker's cache warm-up, which every worker pays, is all the miss
    work there is). No large distinct English text ships with the machine, so this is code,
    itself a common continual-pretraining domain: every ``.py`` file of the installed packages
    (the venv's ``site-packages``, pinned by ``requirements.lock``), in path order, one file
    one document, identical files once, dealt round-robin into ``FILES`` jsonl files, up to
    ``max_mb`` MB. Its vocabulary keeps growing (identifiers, literals), so cache misses go on
    for the whole run, as on real data."""
    import hashlib
    import sysconfig

    corpus = work / f"code-{max_mb}mb"
    marker = corpus / "_COMPLETE"
    if not marker.is_file():
        root = Path(sysconfig.get_paths()["purelib"])
        corpus.mkdir(parents=True, exist_ok=True)
        seen: set[bytes] = set()
        parts: list[list[str]] = [[] for _ in range(FILES)]
        digest = hashlib.sha256()
        total = docs = 0
        for path in sorted(root.rglob("*.py")):
            try:
                data = path.read_bytes()
                text = data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            key = hashlib.sha1(data).digest()
            if len(text.strip()) < 200 or key in seen:
                continue
            seen.add(key)
            digest.update(key)
            parts[docs % FILES].append(json.dumps({"text": text}) + "\n")
            docs += 1
            total += len(data)
            if total >= max_mb << 20:
                break
        for i, part in enumerate(parts):
            (corpus / f"part-{i:03d}.jsonl").write_text("".join(part), encoding="utf-8")
        marker.write_text(
            json.dumps({"docs": docs, "textBytes": total, "digest": digest.hexdigest()[:16]})
        )
    meta = json.loads(marker.read_text())
    return corpus, {
        "corpusBytes": sum(p.stat().st_size for p in corpus.glob("*.jsonl")),
        "corpusTextBytes": meta["textBytes"],
        "corpusDocs": meta["docs"],
        "corpusDigest": meta["digest"],
        "corpusSource": "every .py file of the bench venv's site-packages (distinct "
        f"documents, path order, up to {max_mb} MB of text), not repeated",
        "blockSize": BLOCK,
        "files": FILES,
    }


# -- variants (run inside the pinned subprocess) -------------------------------------------------


def _cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_ours(
    corpus: Path, tok_dir: Path, out: Path, workers: int, shards: int = 1, shard: int = 0
) -> dict[str, Any]:
    common.bootstrap()
    from cpt_training.config import TokenizeStage
    from cpt_training.tokenize import run_tokenize

    cfg = TokenizeStage.model_validate(
        {
            "sources": [{"uri": str(corpus)}],
            "tokenizerUri": str(tok_dir),
            "outputUri": str(out),
            "blockSize": BLOCK,
            "numShards": shards,
            "shardIndex": shard,
            "workers": workers,
        }
    )
    c0, t0 = _cpu_seconds(), time.perf_counter()
    r = run_tokenize(cfg)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "seconds": wall,
        "cpuSeconds": cpu,
        "tokens": r.tokens + r.dropped_tokens,
        "blocks": r.blocks,
        "docs": r.docs,
    }


def run_plain(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    """The stage as it was before its piece cache: the plain Rust encoder (one process)."""
    common.bootstrap()
    from cpt_training import tokenize as tk

    def plain(rust: Any, spec_json: str | None = None) -> Any:
        return rust

    tk.PieceCache.wrap = plain  # type: ignore[method-assign]
    return run_ours(corpus, tok_dir, out, workers)


def run_seed(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    """The seed's recipe, written from its description (datasets + transformers)."""
    from itertools import chain

    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    num_proc = workers if workers > 1 else None
    c0, t0 = _cpu_seconds(), time.perf_counter()
    files = sorted(str(p) for p in corpus.glob("*.jsonl"))
    raw = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(out / "c"))
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))

    def tokenize_function(examples: dict[str, list[Any]]) -> Any:
        return tokenizer(examples["text"])

    tokenized = raw.map(
        tokenize_function, batched=True, remove_columns=raw.column_names, num_proc=num_proc
    )

    def group_texts(examples: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // BLOCK * BLOCK
        result = {
            k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    grouped.save_to_disk(str(out / "saved"))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    lengths = pc.list_value_length(tokenized.data.column("input_ids"))
    return {
        "seconds": wall,
        "cpuSeconds": cpu,
        "tokens": int(pc.sum(lengths).as_py()),
        "blocks": len(grouped),
        "docs": len(raw),
    }


def run_engine(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    """The ceiling of the Rust encoder alone: texts already in memory, ``encode_batch_fast``
    in batches of the stage's size, ids only; no reading, packing or writing."""
    from tokenizers import Tokenizer

    common.bootstrap()
    from cpt_training.tokenize import DOC_BATCH

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [
        json.loads(line)["text"]
        for p in sorted(corpus.glob("*.jsonl"))
        for line in p.read_text(encoding="utf-8").splitlines()
        if line
    ]
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for i in range(0, len(texts), DOC_BATCH):
        for e in tok.encode_batch_fast(texts[i : i + DOC_BATCH], add_special_tokens=False):
            n += len(e.ids)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {"seconds": wall, "cpuSeconds": cpu, "tokens": n, "blocks": 0, "docs": len(texts)}


def run_wordcache(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    """The stage's encoder alone: ``tokenize.PieceCache`` in front of the Rust tokenizer, on
    the same in-memory texts and batches as ``run_engine``; ids compared with the plain
    encoder on the first 1000 documents."""
    from tokenizers import Tokenizer

    common.bootstrap()
    from cpt_training.tokenize import DOC_BATCH, PieceCache

    rust = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    enc = PieceCache.wrap(rust)
    if not isinstance(enc, PieceCache):
        raise RuntimeError("the piece cache does not apply to this tokenizer")
    texts = [
        json.loads(line)["text"]
        for p in sorted(corpus.glob("*.jsonl"))
        for line in p.read_text(encoding="utf-8").splitlines()
        if line
    ]
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    sample: list[list[int]] = []
    for i in range(0, len(texts), DOC_BATCH):
        docs = enc.encode(texts[i : i + DOC_BATCH])
        n += sum(len(d) for d in docs)
        if len(sample) < 1000:
            sample.extend(docs[: 1000 - len(sample)])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    ref = [list(e.ids) for e in rust.encode_batch_fast(texts[:1000], add_special_tokens=False)]
    same = sum(a == b for a, b in zip(ref, sample, strict=True)) / max(1, len(ref))
    return {
        "seconds": wall,
        "cpuSeconds": cpu,
        "tokens": n,
        "blocks": 0,
        "docs": len(texts),
        "identicalDocsFraction": same,
        "cacheEntries": len(enc.ids),
        "cacheEnabled": enc.enabled,
    }


def _child(args: argparse.Namespace) -> None:
    cores = [int(c) for c in args.cpus.split(",")]
    os.sched_setaffinity(0, cores)
    if args.variant == "shard":
        # One pod of the Indexed Job: shard i of n, one worker, writing to the shared output.
        res = run_ours(
            Path(args.corpus),
            Path(args.tokenizer),
            Path(args.out),
            1,
            args.shards,
            args.shard_index,
        )
        res["loadAvg"] = common.load_average()
        print("RESULT " + json.dumps(res), flush=True)
        return
    fn = {
        "ours": run_ours,
        "seed": run_seed,
        "engine": run_engine,
        "wordcache": run_wordcache,
        "plain": run_plain,
    }[args.variant]
    with tempfile.TemporaryDirectory(prefix="cpt-tokbench-", dir=args.tmp) as tmp:
        res = fn(Path(args.corpus), Path(args.tokenizer), Path(tmp), len(cores))
    res["loadAvg"] = common.load_average()
    print("RESULT " + json.dumps(res), flush=True)


# -- orchestration -------------------------------------------------------------------------------


def _child_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO), str(common.REPO / "training"), str(common.REPO / "operator")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def _result_of(stdout: str, what: str, stderr: str, rc: int) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{stderr[-3000:]}")
    res: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return res


def run_shards(corpus: Path, tok_dir: Path, cores: list[int], tmp: Path) -> dict[str, Any]:
    """The stage as the operator runs it on ``len(cores)`` pods: an Indexed Job of that many
    shards, one process per shard, all at once, into one output (the last writes the
    manifest)."""
    n = len(cores)
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="cpt-tokbench-", dir=tmp) as out:
        c0 = _children_cpu()
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.tokenize_bench",
                    "--child",
                    "--variant",
                    "shard",
                    "--corpus",
                    str(corpus),
                    "--tokenizer",
                    str(tok_dir),
                    "--cpus",
                    str(core),
                    "--shards",
                    str(n),
                    "--shard-index",
                    str(i),
                    "--out",
                    out,
                ],
                cwd=common.REPO,
                env=_child_env(tmp),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, core in enumerate(cores)
        ]
        results = []
        for i, p in enumerate(procs):
            so, se = p.communicate()
            results.append(_result_of(so, f"shard {i} of {n}", se, p.returncode))
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - c0
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    tokens = sum(r["tokens"] for r in results)
    if tokens != manifest["totalTokens"] + manifest["droppedTokens"]:
        raise RuntimeError("shard results do not add up to the manifest")
    return {
        "seconds": wall,
        "cpuSeconds": cpu,
        "tokens": tokens,
        "blocks": manifest["totalBlocks"],
        "docs": manifest["totalDocs"],
        "loadAvg": common.load_average(),
        "loadAvgBefore": load_before,
        "tokensPerSec": tokens / wall,
        "tokensPerCpuSec": tokens / cpu,
        "perShard": results,
    }


def _children_cpu() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def run_variant(
    variant: str, corpus: Path, tok_dir: Path, cores: list[int], tmp: Path
) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO), str(common.REPO / "training"), str(common.REPO / "operator")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    load_before = common.load_average()
    cmd = [
        sys.executable,
        "-m",
        "bench.tokenize_bench",
        "--child",
        "--variant",
        variant,
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--cpus",
        ",".join(map(str, cores)),
        "--tmp",
        str(tmp),
    ]
    proc = subprocess.run(
        cmd, cwd=common.REPO, env=env, capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} on cores {cores} failed:\n{proc.stderr[-3000:]}")
    res: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    res["loadAvgBefore"] = load_before
    res["tokensPerSec"] = res["tokens"] / res["seconds"]
    res["tokensPerCpuSec"] = res["tokens"] / res["cpuSeconds"]
    return res


SCALING = "tokenize.scaling."


def bench(
    repeat: int, reps: int, seed_reps: int, scale_mb: int, scale_reps: int, only: str = "all"
) -> list[dict[str, Any]]:
    """The measurements; ``only="scaling"``: just the ``tokenize.scaling.*`` rows;
    ``only="encoders"``: just :func:`encoder_rows`."""
    work = common.WORK / "tokenize"
    work.mkdir(parents=True, exist_ok=True)
    if only == "encoders":
        return encoder_rows(work, repeat, reps)
    everything = only == "all"
    # One copy: the piece cache's hit rate on text it has not seen before (the repeated corpus
    # hits the cache far more often than distinct text of the same size would).
    corpus1, tok_dir, info1 = prepare(work, 1)
    corpus, _, info = prepare(work, repeat) if everything else (corpus1, tok_dir, info1)
    ncores = common.usable_cores()
    code, code_info = prepare_code(work, scale_mb) if ncores >= 2 else (corpus, {})
    code_info["tokenizerVocab"] = info["tokenizerVocab"]
    one = [sorted(os.sched_getaffinity(0))[0]]
    two = sorted(os.sched_getaffinity(0))[:2]
    runs: dict[str, list[dict[str, Any]]] = {}

    def go(key: str, variant: str, cores: list[int], src: Path | None = None) -> None:
        if variant == "shards":
            r = run_shards(src or corpus, tok_dir, cores, work)
        else:
            r = run_variant(variant, src or corpus, tok_dir, cores, work)
        runs.setdefault(key, []).append(r)
        print(
            f"  {key:12s} {r['tokensPerSec'] / 1e6:6.3f} M tok/s "
            f"({r['seconds']:.1f} s wall, {r['cpuSeconds']:.1f} s cpu, load {r['loadAvg']})",
            flush=True,
        )

    # Interleaved, so a change in the machine's load hits every variant alike.
    for i in range(max(reps, seed_reps, scale_reps) if everything else scale_reps):
        if i < scale_reps and ncores >= 2:
            go("code-1", "ours", one, code)
            go("code-2", "ours", two, code)
            go("code-shards-1", "shards", one, code)
            go("code-shards-2", "shards", two, code)
        if not everything:
            continue
        if i < reps:
            go("engine-1", "engine", one)
            go("wordcache-1", "wordcache", one)
            go("engine-1-copy", "engine", one, corpus1)
            go("wordcache-1-copy", "wordcache", one, corpus1)
            go("ours-1", "ours", one)
            go("plain-1", "plain", one)
            if ncores >= 2:
                go("ours-2", "ours", two)
        if i < seed_reps:
            go("seed-1", "seed", one)
            if ncores >= 2:
                go("seed-2", "seed", two)

    machine = common.cpu_machine()
    cfg = dict(info)

    best = functools.partial(best_run, runs)
    summary = functools.partial(summarize_runs, runs)
    scaling = scaling_rows(runs, machine, code_info) if ncores >= 2 else []
    if not everything:
        return scaling
    out = []
    o1, s1 = best("ours-1"), best("seed-1")
    out.append(
        common.measurement(
            "tokenize.stage.plain_encoder",
            machine,
            {**cfg, "cores": 1, "workers": 1},
            "tokens/s",
            best("plain-1")["tokensPerSec"],
            baseline=("seed: datasets.map + group_texts, 1 core", s1["tokensPerSec"]),
            details={
                **summary("plain-1"),
                "what": "the stage with its piece cache switched off (the plain Rust encoder), "
                "as before this benchmark",
            },
        )
    )
    out.append(
        common.measurement(
            "tokenize.encoder.piece_cache.one_copy",
            machine,
            {**info1, "cores": 1},
            "tokens/s",
            best("wordcache-1-copy")["tokensPerSec"],
            baseline=("Rust encode_batch_fast alone", best("engine-1-copy")["tokensPerSec"]),
            details={
                **summary("wordcache-1-copy"),
                "rust": summary("engine-1-copy"),
                "what": "as tokenize.encoder.piece_cache on a single copy of the corpus: every "
                "piece is new to the cache once",
            },
        )
    )
    wc = best("wordcache-1")
    out.append(
        common.measurement(
            "tokenize.encoder.piece_cache",
            machine,
            {**cfg, "cores": 1},
            "tokens/s",
            wc["tokensPerSec"],
            baseline=("Rust encode_batch_fast alone", best("engine-1")["tokensPerSec"]),
            details={
                **summary("wordcache-1"),
                "identicalDocsFraction": wc.get("identicalDocsFraction"),
                "what": "the stage's encoder alone (tokenize.PieceCache in front of the Rust "
                "tokenizer) on in-memory texts; ids compared with encode_batch_fast on 1000 "
                "documents",
            },
        )
    )
    out.append(
        common.measurement(
            "tokenize.encoder.rust_alone",
            machine,
            {**cfg, "cores": 1},
            "tokens/s",
            best("engine-1")["tokensPerSec"],
            details={
                **summary("engine-1"),
                "what": "Rust encode_batch_fast alone on in-memory texts (no I/O, packing, "
                "writing): the encoder the stage used before the piece cache, and the seed uses",
            },
        )
    )
    out.append(
        common.measurement(
            "tokenize.per_core",
            machine,
            {**cfg, "cores": 1, "workers": 1},
            "tokens/s",
            o1["tokensPerSec"],
            goal=common.goal(">=", 1.0e6),
            details=summary("ours-1"),
        )
    )
    out.append(
        common.measurement(
            "tokenize.vs_seed.1core",
            machine,
            {**cfg, "cores": 1},
            "tokens/s",
            o1["tokensPerSec"],
            baseline=("seed: datasets.map + group_texts, 1 core", s1["tokensPerSec"]),
            goal=common.goal(">=", 3.0, "ratio"),
            details={"seed": summary("seed-1")},
        )
    )
    if ncores >= 2:
        o2, s2 = best("ours-2"), best("seed-2")
        out.append(
            common.measurement(
                "tokenize.vs_seed.2core",
                machine,
                {**cfg, "cores": 2},
                "tokens/s",
                o2["tokensPerSec"],
                baseline=("seed: datasets.map(num_proc=2) + group_texts", s2["tokensPerSec"]),
                goal=common.goal(">=", 3.0, "ratio"),
                details={"seed": summary("seed-2")},
            )
        )
        # The same two runs on the small repeated corpus (a few seconds each), where the
        # earlier revisions measured scaling.
        scaling[0]["details"]["repeatedCorpus"] = {
            "oneWorkerTokensPerSec": o1["tokensPerSec"],
            "twoWorkersTokensPerSec": o2["tokensPerSec"],
            "ratio": o2["tokensPerSec"] / o1["tokensPerSec"],
            "corpusBytes": cfg["corpusBytes"],
        }
    return out + scaling


def encoder_rows(work: Path, repeat: int, reps: int) -> list[dict[str, Any]]:
    """The per-core rows again after an encoder change, without the slow seed and scaling
    variants: the stage and its encoder alone with the byte-level BPE (``tokenize.per_core``,
    ``tokenize.encoder.*``), and the stage and the Rust encoder with a Llama-3-style
    tokenizer (``tokenize.llama3_style.*``), interleaved ``reps`` times on one core."""
    corpus, tok_dir, info = prepare(work, repeat)
    l3_dir, l3_info = prepare_llama3(work)
    one = [sorted(os.sched_getaffinity(0))[0]]
    runs: dict[str, list[dict[str, Any]]] = {}
    plan = [
        ("engine-1", "engine", tok_dir),
        ("wordcache-1", "wordcache", tok_dir),
        ("ours-1", "ours", tok_dir),
        ("engine-1-l3", "engine", l3_dir),
        ("ours-1-l3", "ours", l3_dir),
    ]
    for _ in range(reps):
        for key, variant, tok in plan:
            r = run_variant(variant, corpus, tok, one, work)
            runs.setdefault(key, []).append(r)
            print(f"  {key:12s} {r['tokensPerSec'] / 1e6:6.3f} M tok/s (load {r['loadAvg']})")
    machine = common.cpu_machine()
    best = functools.partial(best_run, runs)
    summary = functools.partial(summarize_runs, runs)
    l3_cfg = {**info, **l3_info, "cores": 1}
    return [
        common.measurement(
            "tokenize.per_core",
            machine,
            {**info, "cores": 1, "workers": 1},
            "tokens/s",
            best("ours-1")["tokensPerSec"],
            goal=common.goal(">=", 1.0e6),
            details=summary("ours-1"),
        ),
        common.measurement(
            "tokenize.encoder.piece_cache",
            machine,
            {**info, "cores": 1},
            "tokens/s",
            best("wordcache-1")["tokensPerSec"],
            baseline=("Rust encode_batch_fast alone", best("engine-1")["tokensPerSec"]),
            details={
                **summary("wordcache-1"),
                "identicalDocsFraction": best("wordcache-1").get("identicalDocsFraction"),
                "what": "the stage's encoder alone (piece cache, classes asked of the Rust "
                "pre-tokenizer) on in-memory texts",
            },
        ),
        common.measurement(
            "tokenize.encoder.rust_alone",
            machine,
            {**info, "cores": 1},
            "tokens/s",
            best("engine-1")["tokensPerSec"],
            details={**summary("engine-1"), "what": "Rust encode_batch_fast alone"},
        ),
        common.measurement(
            "tokenize.llama3_style.per_core",
            machine,
            {**l3_cfg, "workers": 1},
            "tokens/s",
            best("ours-1-l3")["tokensPerSec"],
            baseline=("Rust encode_batch_fast alone", best("engine-1-l3")["tokensPerSec"]),
            details={
                **summary("ours-1-l3"),
                "what": "the stage end to end with a Llama-3-style tokenizer (plain Rust "
                "encoder: the piece cache serves GPT-2's split only)",
            },
        ),
        common.measurement(
            "tokenize.llama3_style.rust_alone",
            machine,
            l3_cfg,
            "tokens/s",
            best("engine-1-l3")["tokensPerSec"],
            details={**summary("engine-1-l3"), "what": "Rust encode_batch_fast alone"},
        ),
    ]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with the rows named in ``new`` replaced in place, the others appended."""
    fresh = {m["name"]: m for m in new}
    out = [fresh.pop(m["name"], m) for m in old]
    return out + list(fresh.values())


def best_run(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    """The fastest repeat: the least disturbed by other processes on a shared machine."""
    return max(runs[key], key=lambda r: r["tokensPerSec"])


def summarize_runs(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    rs = runs[key]
    return {
        "runs": rs,
        "medianTokensPerSec": common.median([r["tokensPerSec"] for r in rs]),
        "tokensPerCpuSec": common.median([r["tokensPerCpuSec"] for r in rs]),
    }


def scaling_rows(
    runs: dict[str, list[dict[str, Any]]], machine: str, code_info: dict[str, Any]
) -> list[dict[str, Any]]:
    """``tokenize.scaling.*``: two workers (one shard process) and two shard processes (the
    Indexed Job's pods) against one, on the distinct code corpus of :func:`prepare_code`."""

    def row(
        name: str, two: str, one: str, cfg: dict[str, Any], baseline: str, one_as: str, what: str
    ) -> dict[str, Any]:
        """``two`` (the runs on two cores) against ``one`` (the same work on one core)."""
        mine, base = summarize_runs(runs, two), summarize_runs(runs, one)
        return common.measurement(
            SCALING + name,
            machine,
            {**code_info, "cores": 2, **cfg},
            "tokens/s",
            best_run(runs, two)["tokensPerSec"],
            baseline=(baseline, best_run(runs, one)["tokensPerSec"]),
            goal=common.goal(">=", 1.7, "ratio"),
            details={
                **mine,
                one_as: base,
                "cpuEfficiency": mine["tokensPerCpuSec"] / base["tokensPerCpuSec"],
                "what": what,
            },
        )

    return [
        row(
            "2workers",
            "code-2",
            "code-1",
            {"workers": 2},
            "ours, 1 worker, same corpus",
            "oneWorker",
            "run_tokenize with workers=2 on two cores against workers=1 on one core, one shard "
            "of the distinct code corpus; both timed from the call (tokenizer load, encoding, "
            "packing, Arrow writing included)",
        ),
        row(
            "2shards",
            "code-shards-2",
            "code-shards-1",
            {"shards": 2, "workersPerShard": 1},
            "one shard process, timed the same way",
            "oneShard",
            "two shard processes at once (the Indexed Job's pods), one core each, against one "
            "shard process on one core, on the distinct code corpus; both timed from process "
            "start (interpreter, imports, tokenizer load included)",
        ),
    ]


def merge_scaling(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results after a ``--only scaling`` run: the old scaling rows replaced in place by
    the new ones, every other row kept."""
    fresh = {m["name"]: m for m in new}
    out = [
        fresh.pop(m["name"], m)
        for m in old
        if not m["name"].startswith(SCALING) or m["name"] in fresh
    ]
    return out + list(fresh.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["ours", "seed", "engine", "shard", "wordcache", "plain"])
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("--corpus")
    p.add_argument("--tokenizer")
    p.add_argument("--cpus")
    p.add_argument("--tmp")
    p.add_argument("--repeat", type=int, default=48, help="corpus copies (48 = about 60 MB)")
    p.add_argument("--reps", type=int, default=3, help="repeats of our variants")
    p.add_argument("--seed-reps", type=int, default=3, help="repeats of the seed variants")
    p.add_argument(
        "--scale-mb", type=int, default=256, help="MB of code for the scaling rows (256: all)"
    )
    p.add_argument("--scale-reps", type=int, default=2, help="repeats of the scaling variants")
    p.add_argument(
        "--only",
        choices=["all", "scaling", "encoders"],
        default="all",
        help="scaling: run only the tokenize.scaling.* rows and replace just those in the "
        "results file; encoders: only the per-core encoder rows (encoder_rows)",
    )
    p.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    items = bench(args.repeat, args.reps, args.seed_reps, args.scale_mb, args.scale_reps, args.only)
    for m in items:
        print(json.dumps({k: m.get(k) for k in ("name", "value", "ratio")}))
    if not args.no_write:
        path = common.RESULTS / "tokenize.json"
        old = json.loads(path.read_text()) if path.is_file() else []
        if args.only == "scaling":
            items = merge_scaling(old, items)
        elif args.only == "encoders":
            items = merge_rows(old, items)
        print("wrote", common.write_results("tokenize", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
