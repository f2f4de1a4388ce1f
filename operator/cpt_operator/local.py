"""Local mode (`cpt local run.yaml`): the same run as the operator's, as local processes.

The embedded default: no cluster, no images. The run.yaml is planned with the API's planner
(local mode: local paths allowed, instanceType local-cpu), the stage configs come from the
same `builders.stages` the operator uses, and each stage runs the same `cpt-train <stage>`
entry point the pods run:

    [preflight]  torchrun, the training shape, gloo all-reduce
    tokenize     one process per shard, in parallel (JOB_COMPLETION_INDEX like the Indexed Job)
    [weights]    convert-to-nxd (nxd backend only)
    train        torchrun per "node" (local rendezvous), retried up to maxAttempts; every
                 attempt resumes from the newest committed checkpoint, as in the cluster
    export       export-hf: the final Hugging Face model, proven to load

Storage URIs may be local folders (relative to the current directory) or s3:// (standard AWS
environment). A progress bar follows progress.json while training. Logs of every process go
to `<workdir>/logs/`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from cpt_operator.api import planner
from cpt_operator.api.models import ContinualPretrainSpec, EvalStatus, parse_spec
from cpt_operator.builders import pods, stages
from cpt_operator.reconcile.decide import format_validation_error
from cpt_operator.reconcile.observe import observe_held_out
from cpt_training.config import STAGE_CONFIG_ENV, TrainStage

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC = 0, 1, 2
POLL_SECONDS = 1.0
STAGE_ORDER = ("preflight", "tokenize", "weights", "train", "export")


class LocalRunError(RuntimeError):
    """A stage failed; the message names the stage and its log."""


@dataclass
class LocalRun:
    name: str
    spec: ContinualPretrainSpec
    workdir: Path
    out: IO[str]

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli() -> list[str]:
    return [sys.executable, "-m", "cpt_training.cli"]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def _env(config: BaseModel, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[STAGE_CONFIG_ENV] = pods.stage_config_json(config)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _wait_all(
    procs: Sequence[tuple[subprocess.Popen[bytes], Path]],
    on_tick: Callable[[], None] | None = None,
) -> list[tuple[int, Path]]:
    """Wait for every process; if one fails the others are stopped (a gang fails together)."""
    failed: list[tuple[int, Path]] = []
    while True:
        codes = [p.poll() for p, _ in procs]
        for (_proc, log), code in zip(procs, codes, strict=True):
            if code not in (None, 0) and (code, log) not in failed:
                failed.append((code, log))
        if failed:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc, _ in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            return failed
        if all(code == 0 for code in codes):
            return []
        if on_tick is not None:
            on_tick()
        time.sleep(POLL_SECONDS / 4)


# -- stages -----------------------------------------------------------------------------------


def _gang(run: LocalRun, stage: str, config: BaseModel, tag: str) -> list[tuple[int, Path]]:
    """`nodes` torchrun agents with a local rendezvous, like the PyTorchJob's replicas."""
    t = run.spec.training
    port = _free_port()
    procs = []
    for rank in range(t.nodes):
        node = f"{run.name}-node{rank}"
        cfg = _node_local(run, config, node)
        argv = [
            *_torchrun(),
            f"--nnodes={t.nodes}",
            f"--nproc-per-node={t.resolved_processes_per_node()}",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "cpt_training.cli",
            stage,
        ]
        log = run.logs / f"{tag}-node{rank}.log"
        procs.append((_start(argv, _env(cfg, {"CPT_NODE_ID": node}), log), log))
    return _wait_all(procs, _progress_ticker(run) if stage == "train" else None)


def _node_local(run: LocalRun, config: BaseModel, node: str) -> BaseModel:
    """Each local "node" gets its own scratch, as each pod has its own volume: the checkpoint
    syncer uploads and restores per node."""
    if not isinstance(config, TrainStage):
        return config
    scratch = run.workdir / "scratch" / node / "checkpoints"
    policy = config.checkpoint.model_copy(update={"local_dir": str(scratch)})
    return config.model_copy(update={"checkpoint": policy})


def _progress_ticker(run: LocalRun) -> Callable[[], None]:
    """A tqdm bar fed from progress.json (what the operator shows in status)."""
    from tqdm import tqdm

    from cpt_training import storage

    uri = stages.paths(run.spec, run.name).progress
    bar = tqdm(
        total=run.spec.max_steps(),
        desc="train",
        unit="step",
        file=run.out,
        leave=False,
        mininterval=POLL_SECONDS,
    )
    last = [0.0]
    seen: list[Any] = [None]

    def tick() -> None:
        now = time.monotonic()
        if now - last[0] < POLL_SECONDS:
            return
        last[0] = now
        try:
            data = storage.read_json(uri)
        except (FileNotFoundError, ValueError, OSError):
            return
        except Exception:  # S3 hiccups: the bar is advisory
            return
        if data.get("updatedAt") == seen[0]:
            return  # nothing new: no redraw (keeps logs of non-terminal output short)
        seen[0] = data.get("updatedAt")
        step = int(data.get("step") or 0)
        bar.n = min(step, bar.total or step)
        bar.set_postfix(progress_postfix(data), refresh=False)
        bar.refresh()

    return tick


def progress_postfix(data: dict[str, Any]) -> dict[str, Any]:
    """The bar's postfix from progress.json: attempt, loss, tokens/s and, once the trainer
    has evaluated, the held-out loss per source in the form of the EVAL column of kubectl."""
    post: dict[str, Any] = {"attempt": data.get("attempt")}
    if data.get("loss") is not None:
        post["loss"] = f"{data['loss']:.3f}"
    if data.get("tokensPerSec"):
        post["tok/s"] = f"{data['tokensPerSec']:.0f}"
    held_out = observe_held_out(data.get("eval"))
    if held_out is not None:
        post["eval"] = EvalStatus.make(held_out.step, list(held_out.sources)).summary
    return post


def _preflight(run: LocalRun) -> None:
    cfg = stages.preflight_stage(run.spec, run.name)
    if failed := _gang(run, "preflight", cfg, "preflight"):
        raise LocalRunError(_failure("preflight", failed))


def _tokenize(run: LocalRun) -> None:
    cfg = stages.tokenize_stage(run.spec, run.name)
    shards = cfg.num_shards
    width = max(1, min(shards, os.cpu_count() or 1))
    pending = list(range(shards))
    while pending:
        batch, pending = pending[:width], pending[width:]
        procs = []
        for index in batch:
            shard = cfg.model_copy(update={"shard_index": index})
            log = run.logs / f"tokenize-{index:05d}.log"
            procs.append((_start([*_cli(), "tokenize"], _env(shard), log), log))
        if failed := _wait_all(procs):
            raise LocalRunError(_failure("tokenize", failed))
    run.say(f"  tokenized {shards} shard(s) into {cfg.output_uri}")


def _single(run: LocalRun, stage: str, config: BaseModel, tag: str) -> None:
    log = run.logs / f"{tag}.log"
    if failed := _wait_all([(_start([*_cli(), stage], _env(config), log), log)]):
        raise LocalRunError(_failure(tag, failed))


def _train(run: LocalRun) -> None:
    max_attempts = run.spec.resiliency.max_attempts
    for attempt in range(1, max_attempts + 1):
        cfg = stages.train_stage(run.spec, run.name, attempt)
        failed = _gang(run, "train", cfg, f"train-{attempt}")
        if not failed:
            return
        run.say(f"  attempt {attempt} of {max_attempts} failed: {_failure('train', failed)}")
        if attempt < max_attempts:
            run.say(f"  attempt {attempt + 1} resumes from the newest committed checkpoint")
    raise LocalRunError(f"train: all {max_attempts} attempts failed; logs in {run.logs}")


def _failure(stage: str, failed: list[tuple[int, Path]]) -> str:
    code, log = failed[0]
    return f"{stage} exited with {code}; see {log}:\n{_tail(log)}"


def _plot(run: LocalRun) -> None:
    """The loss curves across attempts as ``<workdir>/curves.png`` (what ``cpt plot`` draws);
    a run is never failed over its picture."""
    try:
        from cpt_operator import plot

        curves = plot.read_curves(stages.paths(run.spec, run.name).tensorboard)
        out = run.workdir / "curves.png"
        plot.render_png(curves, out, title=f"{run.name} (local)")
        run.say(f"curves: {out} ({len(curves.attempts)} attempt(s); `cpt plot` redraws them)")
    except Exception as err:  # missing plot extra, no event files: say so, keep the result
        run.say(f"curves: not drawn ({type(err).__name__}: {err})")


# -- entry point ------------------------------------------------------------------------------


def localize(
    spec: ContinualPretrainSpec, processes: int | None
) -> tuple[ContinualPretrainSpec, list[str]]:
    """This machine's shape: CPU processes over gloo. A cluster run.yaml (trn1, p5) keeps its
    model, data and hyper-parameters; only where it runs changes (and the notes say so)."""
    notes: list[str] = []
    t = spec.training.model_copy()
    if t.instance_type != "local-cpu":
        notes.append(
            f"instanceType {t.instance_type} -> local-cpu, backend -> native, nodes {t.nodes} -> 1,"
            f" tensorParallel {t.tensor_parallel} / pipelineParallel {t.pipeline_parallel} -> 1"
        )
        t.instance_type = "local-cpu"
        t.backend = "native"
        t.nodes, t.tensor_parallel, t.pipeline_parallel = 1, 1, 1
        t.sequence_parallel = False
        t.processes_per_node = processes or 2
    elif processes is not None:
        t.processes_per_node = processes
    return spec.model_copy(update={"training": t}), notes


def run_local(
    path: str | Path,
    *,
    workdir: str | Path | None = None,
    processes: int | None = None,
    nproc: int | None = None,
    max_steps: int | None = None,
    stage: str | None = None,
    out: IO[str] | None = None,
) -> int:
    """Run every stage of `path` on this machine; returns a process exit code (0 = the
    Hugging Face model is written and loads). `nproc` is the CLI's name for `processes`."""
    stream = out or sys.stdout
    try:
        obj = planner.load_run(path)
        name = str((obj.get("metadata") or {}).get("name") or "run")
        raw = dict(obj.get("spec") or {})
        if max_steps is not None:
            raw["training"] = {**raw.get("training", {}), "maxSteps": max_steps, "maxTokens": None}
            raw["training"] = {k: v for k, v in raw["training"].items() if v is not None}
        spec = parse_spec(raw)
    except ValidationError as err:
        print(f"cpt local: invalid spec: {format_validation_error(err)}", file=stream)
        return EXIT_BAD_SPEC
    except (OSError, ValueError) as err:
        print(f"cpt local: {err}", file=stream)
        return EXIT_BAD_SPEC
    spec, notes = localize(spec, processes or nproc)
    plan = planner.plan(spec, mode="local", base_dir=Path.cwd())
    stream.write(planner.render_text(plan, title=f"ContinualPretrain {name} (local)"))
    if not plan.ok:
        return EXIT_BAD_SPEC
    if stage is not None and stage not in STAGE_ORDER:
        print(f"cpt local: unknown stage {stage!r}; allowed: {', '.join(STAGE_ORDER)}", file=stream)
        return EXIT_BAD_SPEC
    run = LocalRun(name, spec, Path(workdir or Path(".cpt-local") / name).resolve(), stream)
    for note in notes:
        run.say(f"note: {note}")
    steps: list[tuple[str, Callable[[LocalRun], None]]] = []
    if spec.resiliency.preflight.enabled:
        steps.append(("preflight", _preflight))
    steps.append(("tokenize", _tokenize))
    if spec.training.resolved_backend() == "nxd":
        steps.append(
            (
                "weights",
                lambda r: _single(
                    r, "convert-to-nxd", stages.convert_to_nxd_stage(r.spec, r.name), "weights"
                ),
            )
        )
    steps.append(("train", _train))
    steps.append(
        ("export", lambda r: _single(r, "export-hf", stages.export_stage(r.spec, r.name), "export"))
    )
    started = time.monotonic()
    for step_name, fn in steps:
        if stage is not None and step_name != stage:
            continue
        run.say(f"[{step_name}] started (logs: {run.logs})")
        t0 = time.monotonic()
        try:
            fn(run)
        except LocalRunError as err:
            run.say(f"[{step_name}] FAILED: {err}")
            return EXIT_FAILED
        run.say(f"[{step_name}] done in {time.monotonic() - t0:.0f}s")
    if stage in (None, "train", "export"):
        _plot(run)
    if stage in (None, "export"):
        run.say(
            f"Hugging Face model: {spec.output.s3_uri} "
            f"(total {time.monotonic() - started:.0f}s; load it with "
            "AutoModelForCausalLM.from_pretrained)"
        )
    return EXIT_OK


__all__ = ["LocalRunError", "localize", "run_local"]
