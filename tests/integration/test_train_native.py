"""The native trainer for real: 2-process torchrun (gloo, CPU), a tiny Llama, its own
tokenizer and tokenized data, checkpoints synced to and restored from the loopback S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cpt_training import storage
from cpt_training.checkpoint import list_committed
from cpt_training.metrics import parse_metrics_lines
from cpt_training.testing import (
    TinyAssets,
    make_tiny_assets,
    native_train_config,
    torchrun_train,
)

pytestmark = pytest.mark.integration

STEPS = 6


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    metrics: list[dict[str, Any]]

    @property
    def losses(self) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in self.metrics}


def train(cfg: dict[str, Any], env: dict[str, str], nproc: int = 2, expect_ok: bool = True) -> Run:
    proc = torchrun_train(cfg, nproc, env, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
        # Every rank joined its threads (cpt_training.native.train.LEFTOVER_THREADS_MSG): a
        # thread left inside torch at exit aborts that rank, now and then.
        assert "background threads still running at exit" not in proc.stderr, proc.stderr[-6000:]
    return Run(proc, parse_metrics_lines(proc.stdout))


def config(assets: TinyAssets, ckpt_uri: str, local: Path, **kw: Any) -> dict[str, Any]:
    return native_train_config(assets, ckpt_uri, local, STEPS, **kw)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def s3_run_env(s3: Any) -> Iterator[dict[str, str]]:
    """The S3 server's standard AWS env, for the trainer processes and for this process's own
    reads (module-scoped, so set with a MonkeyPatch context)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        yield dict(s3.env)


@pytest.fixture(scope="module")
def s3_model(assets: TinyAssets, s3: Any, s3_run_env: dict[str, str]) -> str:
    """The tiny base model uploaded to S3 (trainers download it once per node)."""
    uri = f"s3://{s3.new_bucket()}/models/tiny"
    storage.upload_dir(assets.model, uri)
    return uri


@pytest.fixture(scope="module")
def uninterrupted(
    assets: TinyAssets,
    s3: Any,
    s3_run_env: dict[str, str],
    s3_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Run, str, Path]]:
    """One full run to STEPS, base model and checkpoints in S3: the reference the other tests
    compare with."""
    model_uri = s3_model
    root = f"s3://{s3.new_bucket()}/runs/a/ckpt"
    local = tmp_path_factory.mktemp("local-a")
    cache = tmp_path_factory.mktemp("cache-a")
    run = train(
        config(assets, root, local, modelUri=model_uri),
        {**s3_run_env, "CPT_CACHE_DIR": str(cache)},
    )
    # Downloaded once for the node: config, tokenizer and weights.
    (cached,) = [p for p in (cache / "models").iterdir()]
    assert (cached / "model.safetensors").is_file() and (cached / ".complete").is_file()
    yield run, root, local


def test_training_lowers_the_loss_and_logs_every_step(uninterrupted: Any) -> None:
    run, _, _ = uninterrupted
    assert [m["step"] for m in run.metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in run.metrics]
    assert losses[-1] < losses[0] - 0.05, losses
    for m in run.metrics:
        assert m["mfu"] is None  # CPU: no peak, no MFU
        assert m["tokens_per_sec"] > 0 and m["tflops"] > 0 and m["grad_norm"] > 0
    assert run.metrics[0]["lr"] == pytest.approx(1.5e-3)  # warmup step 1 of 2
    assert run.metrics[-1]["lr"] == pytest.approx(3e-4)  # decayed to minLr at the end


def test_checkpoints_are_committed_to_s3_keeping_the_newest_two(uninterrupted: Any) -> None:
    _, root, local = uninterrupted
    committed = list_committed(root, settings=None)
    assert [c.tag for c in committed] == ["step_4", "step_6"]
    st = storage.open_storage(root)
    assert not st.exists("step_2")  # pruned in S3 ...
    assert sorted(p.name for p in local.glob("step_*")) == ["step_4", "step_6"]  # ... and locally
    files = st.list("step_6")
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)


def test_progress_and_tensorboard_reach_s3(uninterrupted: Any) -> None:
    run, root, _ = uninterrupted
    progress = storage.read_json(storage.join_uri(root, "progress.json"))
    assert progress["done"] is True
    assert progress["step"] == STEPS and progress["maxSteps"] == STEPS
    assert progress["lastCommittedStep"] == STEPS and progress["attempt"] == 1
    assert progress["loss"] == pytest.approx(run.metrics[-1]["loss"])
    assert progress["mfu"] is None
    events = storage.open_storage(storage.join_uri(root, "tensorboard", "attempt-1")).list()
    assert any("tfevents" in e for e in events)


def test_stop_and_resume_reproduces_the_uninterrupted_loss_curve(
    uninterrupted: Any,
    assets: TinyAssets,
    s3: Any,
    s3_run_env: dict[str, str],
    s3_model: str,
    tmp_path: Path,
) -> None:
    reference, _, _ = uninterrupted
    root = f"s3://{s3.new_bucket()}/runs/b/ckpt"
    first = train(
        config(
            assets,
            root,
            tmp_path / "node-1",
            stopAfterSteps=3,
            checkpoint={
                "uri": root,
                "everySteps": 2,
                "keep": 2,
                "localDir": str(tmp_path / "node-1"),
            },
        ),
        s3_run_env,
    )
    assert sorted(first.losses) == [1, 2, 3]
    progress = storage.read_json(storage.join_uri(root, "progress.json"))
    assert progress["done"] is False and progress["lastCommittedStep"] == 2
    # Attempt 2 on a "new node" (empty local dir): restores step_2 from S3 and goes on.
    second = train(
        config(
            assets,
            root,
            tmp_path / "node-2",
            attempt=2,
            modelUri=s3_model,
            checkpoint={
                "uri": root,
                "everySteps": 2,
                "keep": 2,
                "localDir": str(tmp_path / "node-2"),
            },
        ),
        {**s3_run_env, "CPT_CACHE_DIR": str(tmp_path / "cache-2")},
    )
    assert sorted(second.losses) == [3, 4, 5, 6]
    # A resumed run reads the base model's config, never its weights.
    (cached,) = list((tmp_path / "cache-2" / "models").iterdir())
    assert (cached / "config.json").is_file() and not (cached / "model.safetensors").exists()
    combined = {**first.losses, **second.losses}
    for step, loss in reference.losses.items():
        assert combined[step] == pytest.approx(loss, abs=1e-6), step
    assert "resumed from" in second.proc.stderr and "step_2" in second.proc.stderr
    assert storage.read_json(storage.join_uri(root, "progress.json"))["attempt"] == 2
    assert storage.open_storage(storage.join_uri(root, "tensorboard", "attempt-2")).list()


def test_tensor_parallel_training_matches_data_parallel(
    uninterrupted: Any, assets: TinyAssets, tmp_path: Path
) -> None:
    reference, _, _ = uninterrupted
    root = str(tmp_path / "ckpt")  # local storage: the same code path as S3 minus the wire
    run = train(
        config(
            assets,
            root,
            tmp_path / "local",
            parallelism={"tensorParallel": 2},
            activationCheckpointing="selective",
            stopAfterSteps=3,
        ),
        {},
    )
    assert sorted(run.losses) == [1, 2, 3]
    for step, loss in run.losses.items():
        assert loss == pytest.approx(reference.losses[step], abs=1e-5), step


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_on_nodes(cfgs: list[dict[str, Any]], env: dict[str, str]) -> list[Run]:
    """One torchrun agent per "node" (one process each), started together on this host with
    their own node id, scratch dir and model cache: a two-node job on loopback."""
    port = _free_port()
    procs = []
    for node, cfg in enumerate(cfgs):
        node_env = {
            **os.environ,
            **env,
            "CPT_STAGE_CONFIG": json.dumps(cfg),
            "OMP_NUM_THREADS": "1",
            "CPT_NODE_ID": f"node-{node}",
            "CPT_CACHE_DIR": str(Path(cfg["checkpoint"]["localDir"]).parent / f"cache-{node}"),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nnodes={len(cfgs)}",
                    f"--node-rank={node}",
                    "--nproc-per-node=1",
                    "--master-addr=127.0.0.1",
                    f"--master-port={port}",
                    "-m",
                    "cpt_training.cli",
                    "train",
                ],
                env=node_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        assert p.returncode == 0, out[-2000:] + err[-6000:]
        runs.append(Run(done, parse_metrics_lines(out)))
    return runs


def test_two_nodes_restore_only_the_files_their_ranks_load_and_resume_exactly(
    uninterrupted: Any,
    assets: TinyAssets,
    s3: Any,
    s3_run_env: dict[str, str],
    s3_model: str,
    tmp_path: Path,
) -> None:
    reference, _, _ = uninterrupted
    root = f"s3://{s3.new_bucket()}/runs/nodes/ckpt"

    def cfgs(attempt: int, every: int, **kw: Any) -> list[dict[str, Any]]:
        out = []
        for node in range(2):
            local = tmp_path / f"attempt-{attempt}" / f"node-{node}"
            ckpt = {"uri": root, "everySteps": every, "keep": 2, "localDir": str(local)}
            out.append(
                config(assets, root, local, attempt=attempt, modelUri=s3_model, checkpoint=ckpt)
                | kw
            )
        return out

    first = train_on_nodes(cfgs(1, 2, stopAfterSteps=3), s3_run_env)
    assert sorted(first[0].losses) == [1, 2, 3]  # rank 0 (node 0) logs
    m = storage.read_json(storage.join_uri(root, "step_2", "cpt-manifest.json"))
    assert {(f["path"], f["node"]) for f in m["files"]} == {
        (".metadata", 0),
        ("__0_0.distcp", 0),
        ("__1_0.distcp", 1),
    }, "each node uploaded its own rank's file"

    # Attempt 2 saves nothing in its two steps, so its scratch keeps exactly what it restored.
    second = train_on_nodes(cfgs(2, 5, stopAfterSteps=2), s3_run_env)
    got = {
        node: sorted(p.name for p in (tmp_path / "attempt-2" / f"node-{node}" / "step_2").iterdir())
        for node in range(2)
    }
    # Replicated items (step counters, RNG) live in rank 0's file; sharded state in each
    # rank's own. Node 0 never needs rank 1's shards; node 1 needs both files.
    marker = ["cpt-commit.json", "cpt-manifest.json"]
    assert got[0] == sorted([".metadata", "__0_0.distcp", *marker])
    assert got[1] == sorted([".metadata", "__0_0.distcp", "__1_0.distcp", *marker])
    assert "this node needs 2 of 3 files" in second[0].proc.stderr
    assert "this node needs 3 of 3 files" in second[1].proc.stderr
    # Step 4's loss depends on the restored optimizer moments through step 3's update.
    assert sorted(second[0].losses) == [3, 4]
    combined = {**first[0].losses, **second[0].losses}
    for step in range(1, 5):
        assert combined[step] == pytest.approx(reference.losses[step], abs=1e-6), step


def test_closing_the_batch_stream_joins_its_prefetch_thread(assets: TinyAssets) -> None:
    """A stopped run exits right after its last step: the prefetch thread must be gone by then
    (one still making tensors when the interpreter finalizes aborts the rank)."""
    import threading
    import time

    from cpt_training.data import TokenBlocks
    from cpt_training.native.data import open_batches

    def prefetchers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "cpt-data-prefetch"]

    data = open_batches(
        TokenBlocks(str(assets.data)),
        dp_rank=0,
        dp_size=1,
        micro_batch=2,
        grad_accum=2,
        start_step=0,
    )
    first = next(data)
    assert len(first) == 2 and prefetchers()
    time.sleep(0.5)  # the prefetcher fills its queue and blocks on it
    data.close()
    assert prefetchers() == []
