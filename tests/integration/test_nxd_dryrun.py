"""The nxd stages wired end to end on CPU: convert -> train -> kill -> resume -> export.

We test these aspects:
- ``convert.run`` commits ``pretrained_weight``; ``_Trainer.train`` loads it, trains, saves NxD
  tags to node-local scratch, and the real CheckpointSyncer uploads and commits them; progress
  and metrics are written.
- A second attempt restores the newest committed tag and continues: its step-4 loss equals the
  first attempt's step-4 loss exactly (same weights, optimizer state, LR and data).
- The final tag exports to HF names, holds the trained (changed) weights, and the run reports
  done. ``neuron_parallel_compile`` mode writes nothing (and traces the evaluation).
- On a two-source mixture the trainer draws each source's exact quota and evaluates the
  held-out loss per source through the model wrapper: metrics lines, progress.json and
  TensorBoard get it, and it equals transformers' loss of the exported model on the same blocks.

STAND-IN: torch_xla and neuronx_distributed cannot be installed here. The training
subprocesses get stand-in packages on PYTHONPATH (written by this test, nowhere else): TP=PP=1
torch versions of the NxD entry points cpt calls, with the real signatures, and checkpoint
files in NxD's layout; ``xm`` maps to CPU. Everything else is real: storage, checkpoint
protocol, data, schedule, progress, metrics, the model, and the trainer's own code. What
the stand-ins cannot show (parallel layers, collectives, compilation) is hardware-only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cpt_training import tokenize as tk
from cpt_training.checkpoint import latest_committed, restore
from cpt_training.config import ConvertToNxdStage, ExportHfStage, TokenizeStage, TrainStage
from cpt_training.metrics import parse_metrics_lines
from cpt_training.nxd import convert, export
from fixtures.nxd import install_converter
from fixtures.textgen import make_corpus, make_texts, save_tokenizer, train_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEQ = 32

STANDINS = {
    "torch_xla/__init__.py": "",
    "torch_xla/core/__init__.py": "",
    "torch_xla/core/xla_model.py": """
        import torch
        REDUCE_SUM = "sum"
        def xla_device():
            return torch.device("cpu")
        def mark_step():
            pass
        def all_reduce(op, t, groups=None):
            return t  # one process
        """,
    "torch_xla/distributed/__init__.py": "",
    "torch_xla/distributed/xla_backend.py": "",
    "neuronx_distributed/parallel_layers/__init__.py": "",
    "neuronx_distributed/parallel_layers/parallel_state.py": """
        import torch.distributed as dist
        def get_tensor_model_parallel_size():
            return 1
        def get_tensor_model_parallel_rank():
            return 0
        def get_pipeline_model_parallel_rank():
            return 0
        def get_data_parallel_rank():
            return dist.get_rank()
        def get_data_parallel_size():
            return dist.get_world_size()
        def get_data_parallel_replica_groups():
            return [list(range(dist.get_world_size()))]
        """,
    "neuronx_distributed/parallel_layers/layers.py": """
        import torch
        from torch import nn

        class ParallelEmbedding(nn.Embedding):
            def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
                         norm_type=2.0, scale_grad_by_freq=False, sparse=False, init_method=None,
                         device=None, dtype=torch.float32, shard_across_embedding=False,
                         pad=False, sequence_parallel_enabled=False, **kw):
                super().__init__(num_embeddings, embedding_dim, dtype=dtype)
            def init_weight_cpu(self):
                self.reset_parameters()

        class ColumnParallelLinear(nn.Linear):
            def __init__(self, input_size, output_size, bias=True, gather_output=True,
                         dtype=torch.float32, device=None, stride=1, init_method=None,
                         sequence_parallel_enabled=False, sequence_dimension=None,
                         keep_master_weight=False, skip_bias_add=False, pad=False, **kw):
                super().__init__(input_size, output_size, bias=bias, dtype=dtype)
            def init_weight_cpu(self):
                self.reset_parameters()

        class RowParallelLinear(nn.Linear):
            def __init__(self, input_size, output_size, bias=True, input_is_parallel=False,
                         dtype=torch.float32, device=None, stride=1, init_method=None,
                         sequence_parallel_enabled=False, sequence_dimension=None,
                         keep_master_weight=False, skip_bias_add=False, pad=False,
                         reduce_output=True, **kw):
                super().__init__(input_size, output_size, bias=bias, dtype=dtype)
            def init_weight_cpu(self):
                self.reset_parameters()
        """,
    "neuronx_distributed/parallel_layers/loss_functions.py": """
        import torch.nn.functional as F
        def parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
            t = target.clamp(min=0)  # like NxD: no ignore_index; the caller masks -100
            return F.cross_entropy(vocab_parallel_logits, t, reduction="none")
        """,
    "neuronx_distributed/modules/__init__.py": "",
    "neuronx_distributed/modules/qkv_linear.py": """
        import torch
        import torch.nn.functional as F
        from torch import nn

        class GQAQKVColumnParallelLinear(nn.Module):
            def __init__(self, input_size, output_sizes, bias=True, gather_output=True,
                         dtype=torch.float32, device=None, init_method=None,
                         sequence_parallel_enabled=False, keep_master_weight=False,
                         kv_size_multiplier=1, fuse_qkv=True, reduce_dtype=torch.float32):
                super().__init__()
                assert not fuse_qkv and not bias
                q, kv = output_sizes[0], output_sizes[1] * kv_size_multiplier
                self.weight_q = nn.Parameter(torch.empty(q, input_size, dtype=dtype))
                self.weight_k = nn.Parameter(torch.empty(kv, input_size, dtype=dtype))
                self.weight_v = nn.Parameter(torch.empty(kv, input_size, dtype=dtype))
                self.initialize_weight_biases()
            def initialize_weight_biases(self):
                for w in (self.weight_q, self.weight_k, self.weight_v):
                    nn.init.normal_(w, std=0.02)
            def forward(self, x):
                return (F.linear(x, self.weight_q), F.linear(x, self.weight_k),
                        F.linear(x, self.weight_v))
        """,
    "neuronx_distributed/trainer/__init__.py": "",
    "neuronx_distributed/trainer/checkpoint.py": """
        class _IOState:
            _save_task = None  # saves below are synchronous
        g_iostate = _IOState()
        """,
    "neuronx_distributed/__init__.py": """
        import os
        import torch
        from torch import nn

        FILE = "dp_rank_00_tp_rank_00_pp_rank_00.pt"
        _CONFIG_ARGS = (
            "tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size",
            "context_parallel_size", "pipeline_config", "optimizer_config",
            "activation_checkpoint_config", "pad_model", "sequence_parallel",
            "model_init_config", "lora_config", "mixed_precision_config",
            "sequential_move_factor", "lnc_size")

        def neuronx_distributed_config(**kwargs):
            bad = set(kwargs) - set(_CONFIG_ARGS)
            assert not bad, bad
            assert kwargs["tensor_parallel_size"] == 1 and kwargs["pipeline_parallel_size"] == 1
            return dict(kwargs)

        class _Model(nn.Module):
            def __init__(self, module):
                super().__init__()
                self.module = module
            def forward(self, *a, **k):
                return self.module(*a, **k)
            def state_dict(self, *a, **k):
                return self.module.state_dict(*a, **k)
            def load_state_dict(self, sd, strict=True):
                return self.module.load_state_dict(sd, strict=strict)

        def initialize_parallel_model(nxd_config, model_fn, include_buffers=False, *args, **kw):
            init = nxd_config["model_init_config"]
            with torch.device("meta"):
                model = model_fn(*args, **kw)
            model.to_empty(device="cpu")
            with torch.no_grad():
                for m in model.modules():
                    init["param_init_fn"](m, torch.device("cpu"))
            return _Model(model)

        class _Optimizer:
            def __init__(self, nxd_config, optimizer):
                self.nxd_config, self.optimizer = nxd_config, optimizer
                self.grad_norm = None
            @property
            def param_groups(self):
                return self.optimizer.param_groups
            def step(self):
                oc = self.nxd_config["optimizer_config"]
                params = [p for g in self.param_groups for p in g["params"]]
                if oc["grad_clipping"]:
                    self.grad_norm = torch.nn.utils.clip_grad_norm_(params, oc["max_grad_norm"])
                self.optimizer.step()
            def zero_grad(self, set_to_none=False):
                self.optimizer.zero_grad(set_to_none=set_to_none)
            def state_dict(self):
                return self.optimizer.state_dict()
            def load_state_dict(self, sd):
                self.optimizer.load_state_dict(sd)

        def initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults):
            opt = optimizer_class(parameters, **defaults)
            opt.init_zero = lambda: None
            return _Optimizer(nxd_config, opt)

        def save_checkpoint(checkpoint_dir_str, tag, model=None, optimizer=None, scheduler=None,
                            user_content=None, num_workers=8, use_xser=False, num_kept_ckpts=None,
                            async_save=False, zero1_optimizer=False, use_zero1_dcp=False,
                            avoid_saving_lower_precision_weights=False):
            d = os.path.join(checkpoint_dir_str, tag)
            open(os.path.join(d, "checkpoint"), "w").write("1")
            torch.save(model.state_dict(), os.path.join(d, "model", FILE))
            torch.save(optimizer.state_dict(), os.path.join(d, "optim", FILE))
            torch.save(user_content, os.path.join(d, "user_content.pt"))
            open(os.path.join(d, "done"), "w").write("1")

        def load_checkpoint(path, tag=None, model=None, optimizer=None, scheduler=None,
                            num_workers=8, strict=True, use_zero1_dcp=False):
            d = os.path.join(path, tag)
            model.load_state_dict(torch.load(os.path.join(d, "model", FILE)), strict=strict)
            if optimizer is not None:
                optimizer.load_state_dict(torch.load(os.path.join(d, "optim", FILE)))
            uc = os.path.join(d, "user_content.pt")
            return torch.load(uc, weights_only=False) if os.path.exists(uc) else None

        def finalize_checkpoint():
            pass
        """,
}

TRAIN = """
import json, os, sys
import torch.distributed as dist
from cpt_training.cli import setup_logging
from cpt_training.config import TrainStage
from cpt_training.nxd import train as nt
setup_logging()
cfg = TrainStage.model_validate(json.loads(os.environ["CPT_STAGE_CONFIG"]))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
plan = nt.NxdPlan.make(cfg, 1)
sys.exit(nt._Trainer(cfg, plan).train())
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("nxd-dry")
    for rel, src in STANDINS.items():
        p = base / "stand-in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    install_converter(base / "stand-in")  # same flags as NxD's, reference layout
    tok = save_tokenizer(train_tokenizer(make_texts(150, seed=1), vocab_size=300), base / "tok")
    make_corpus(base / "corpus", 40, seed=2)
    tcfg = TokenizeStage.model_validate(
        {
            "sources": [{"uri": str(base / "corpus")}],
            "tokenizerUri": str(tok),
            "outputUri": str(base / "data"),
            "blockSize": SEQ,
            "heldOutFraction": 0.1,
        }
    )
    tk.run_tokenize(tcfg)
    from cpt_training.testing import make_tiny_llama

    make_tiny_llama(base / "hf", 320, hidden=32, layers=2, heads=4, kv_heads=2, seq=64)
    return base


def _env(world: Path, cfg: TrainStage | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEURON", "XLA_"))}
    env["PYTHONPATH"] = str(world / "stand-in")
    env["CPT_WORK_DIR"] = str(world)
    env["CPT_CACHE_DIR"] = str(world / "cache")
    env["CPT_DATA_CACHE"] = str(world / "data-cache")
    env["WORLD_SIZE"] = "1"
    if cfg is not None:
        env["CPT_STAGE_CONFIG"] = json.dumps(cfg.to_wire())
    return {**env, **extra}


def _train(world: Path, cfg: TrainStage, **extra: str) -> tuple[str, str]:
    store = world / f"pg-{os.urandom(4).hex()}"
    res = subprocess.run(
        [sys.executable, "-c", TRAIN, str(store)],
        env=_env(world, cfg, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout, res.stderr


def _stage(world: Path, attempt: int, **kw) -> TrainStage:
    return TrainStage.model_validate(
        {
            "backend": "nxd",
            "attempt": attempt,
            "modelUri": str(world / "hf"),
            "dataUri": str(world / "data"),
            "seqLen": SEQ,
            "globalBatchSize": 4,
            "microBatchSize": 2,
            "maxSteps": 6,
            "precision": "fp32",
            "activationCheckpointing": "none",
            "optimizer": {"lr": 1e-3, "minLr": 1e-4, "warmupSteps": 2},
            "checkpoint": {
                "uri": str(world / "ckpt"),
                "everySteps": 3,
                "localDir": str(world / f"scratch-{attempt}"),
                "asyncSave": True,
            },
            "instanceType": "trn1.2xlarge",
            **kw,
        }
    )


def test_convert_train_resume_export_on_cpu(world, monkeypatch):
    for k, v in _env(world).items():
        monkeypatch.setenv(k, v)
    root = str(world / "ckpt")
    conv = ConvertToNxdStage(
        model_uri=str(world / "hf"), output_uri=f"{root}/pretrained_weight", tensor_parallel=1
    )
    assert convert.run(conv) == 0

    out1, _ = _train(world, _stage(world, 1, stopAfterSteps=4))
    m1 = {r["step"]: r for r in parse_metrics_lines(out1)}
    assert sorted(m1) == [1, 2, 3, 4]
    assert latest_committed(root).tag == "step_3"
    progress = json.loads((world / "ckpt" / "progress.json").read_text())
    assert progress["lastCommittedStep"] == 3 and progress["done"] is False

    out2, err2 = _train(world, _stage(world, 2))
    # restored through the trainer's per-rank file selection (one rank: every file of the tag)
    assert "restore step_3: this node needs 5 of 5 files" in err2
    m2 = {r["step"]: r for r in parse_metrics_lines(out2)}
    assert sorted(m2) == [4, 5, 6]
    assert m2[4]["loss"] == m1[4]["loss"]  # exact: same state, LR and batches after resume
    assert m2[4]["lr"] == m1[4]["lr"]
    final = latest_committed(root)
    assert final.tag == "step_6"
    progress = json.loads((world / "ckpt" / "progress.json").read_text())
    assert progress["done"] is True and progress["lastCommittedStep"] == 6

    local = restore(root, world / "export-local")
    assert local is not None and local.local_path is not None
    cfg = ExportHfStage(
        backend="nxd",
        model_uri=str(world / "hf"),
        checkpoint_uri=root,
        output_uri=str(world / "out"),
        dtype="float32",
    )
    trained = export.to_hf_state_dict(local.local_path, cfg)
    from safetensors.torch import load_file

    base = load_file(str(world / "hf" / "model.safetensors"))
    assert set(base) <= set(trained)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base)  # every tensor moved in 6 AdamW steps
    uc = torch.load(local.local_path / "user_content.pt", weights_only=False)
    assert uc["step"] == 6 and uc["world"]["tensorParallel"] == 1


def test_precompile_mode_traces_a_few_steps_and_writes_nothing(world, monkeypatch):
    for k, v in _env(world).items():
        monkeypatch.setenv(k, v)
    root = world / "ckpt"
    if not (root / "pretrained_weight").exists():
        conv = ConvertToNxdStage(
            model_uri=str(world / "hf"), output_uri=str(root / "pretrained_weight")
        )
        assert convert.run(conv) == 0
    before = sorted(p.name for p in root.iterdir())
    progress = (root / "progress.json").read_text() if (root / "progress.json").exists() else None
    cfg = _stage(
        world,
        3,
        checkpoint={"uri": str(root), "everySteps": 1, "localDir": str(world / "scratch-pc")},
        evalEverySteps=100,
    )
    out, err = _train(world, cfg, NEURON_EXTRACT_GRAPHS_ONLY="1")
    assert "stopping after 3 steps in this process (step 3)" in err
    assert "traced the held-out evaluation" in err  # its graph is compiled ahead too
    assert parse_metrics_lines(out) == []  # no metrics from a graph-extraction run
    assert sorted(p.name for p in root.iterdir()) == before
    now = (root / "progress.json").read_text() if (root / "progress.json").exists() else None
    assert now == progress
    assert not list((world / "scratch-pc").glob("step_*"))


def test_nxd_evaluates_every_source_through_the_model_wrapper_and_matches_transformers(
    world, monkeypatch, tmp_path
):
    """A 0.75/0.25 mixture on the nxd trainer: tokens per source follow the weights, the
    held-out loss per source goes to the metrics lines, progress.json and TensorBoard, and its
    final value is what transformers computes for the exported model on the same blocks."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cpt_training.config import MixtureSource
    from cpt_training.data import TokenBlocks
    from cpt_training.metrics import MetricsSink
    from cpt_training.testing import make_tiny_assets, sample_texts, tokenize_sources

    for k, v in _env(world).items():
        monkeypatch.setenv(k, v)
    assets = make_tiny_assets(tmp_path / "assets", block_size=SEQ, vocab_size=320, n_docs=60)
    texts = sample_texts(160)
    weights = {"domain": 0.75, "replay": 0.25}
    data = tokenize_sources(
        tmp_path / "mixed", assets, {"domain": texts[:100], "replay": texts[100:]}, weights
    )
    mixture = [{"name": n, "weight": w} for n, w in weights.items()]
    root = tmp_path / "ckpt"
    conv = ConvertToNxdStage(
        model_uri=str(assets.model), output_uri=str(root / "pretrained_weight"), tensor_parallel=1
    )
    assert convert.run(conv) == 0
    cfg = _stage(
        world,
        1,
        modelUri=str(assets.model),
        dataUri=str(data),
        mixture=mixture,
        maxSteps=4,
        evalEverySteps=2,
        evalBlocks=3,
        checkpoint={"uri": str(root), "everySteps": 4, "localDir": str(tmp_path / "scratch")},
    )
    out, err = _train(world, cfg)

    evals = parse_metrics_lines(out, MetricsSink.EVAL_PREFIX)
    assert [e["step"] for e in evals] == [2, 4], err[-3000:]
    progress = json.loads((root / "progress.json").read_text())
    assert progress["eval"]["step"] == 4 and progress["done"] is True
    final = progress["eval"]["sources"]
    assert set(final) == {"domain", "replay"}
    blocks = TokenBlocks(str(data), mixture=[MixtureSource(**m) for m in mixture])
    assert progress["tokensPerSource"] == blocks.tokens_seen(4, 4)  # 4 blocks a step
    assert progress["tokensPerSource"]["replay"] == 4 * SEQ  # the exact quota: 1 in 4
    acc = EventAccumulator(str(root / "tensorboard" / "attempt-1"))
    acc.Reload()
    for name in weights:
        points = acc.Scalars(f"eval/{name}/loss")
        assert [p.step for p in points] == [2, 4]
        assert points[-1].value == pytest.approx(final[name]["loss"], rel=1e-5)
        assert evals[-1]["eval"][name] == pytest.approx(final[name]["loss"])

    # The export stage on the nxd tag (step 4): transformers scores the base and the trained
    # model on the same blocks; "after" is what the trainer measured in its last evaluation.
    from huggingface_hub import ModelCard

    from cpt_training.export import run as export_run

    out_dir = tmp_path / "out"
    ecfg = ExportHfStage(
        backend="nxd",
        model_uri=str(assets.model),
        checkpoint_uri=str(root),
        output_uri=str(out_dir),
        data_uri=str(data),
        eval_blocks=3,
        dtype="float32",
        mixture=[MixtureSource(**m) for m in mixture],
    )
    assert export_run(ecfg) == 0
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["step"] == 4 and set(result["sources"]) == set(weights)
    for name, e in result["sources"].items():
        assert e["blocks"] == 3
        assert e["after"]["loss"] == pytest.approx(final[name]["loss"], rel=1e-5), name
        assert abs(e["lossChange"]) > 1e-3  # 4 steps moved it: the comparison can tell
    card = ModelCard.load(out_dir / "README.md")
    assert "replay" in card.text and "| domain |" in card.text


def _converted(world: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A checkpoint root `world/name` holding the converted base weights (TP 1)."""
    for k, v in _env(world).items():
        monkeypatch.setenv(k, v)
    root = world / name
    conv = ConvertToNxdStage(
        model_uri=str(world / "hf"), output_uri=str(root / "pretrained_weight"), tensor_parallel=1
    )
    assert convert.run(conv) == 0
    return root


def test_sigterm_saves_the_current_step_through_nxds_save_api_and_exits_preempted(
    world, monkeypatch
):
    """The nxd trainer's side of the stop contract: SIGTERM mid-run, the step in flight is
    finished, saved with ``nxd.save_checkpoint`` (the stand-in writes NxD's layout), committed
    by the syncer, and the process exits EXIT_PREEMPTED; the next attempt resumes there."""
    from cpt_training.preemption import EXIT_PREEMPTED

    root = _converted(world, monkeypatch, "ckpt-stop")
    ckpt = {"uri": str(root), "everySteps": 100, "localDir": str(world / "scratch-stop")}
    cfg = _stage(world, 1, maxSteps=400, checkpoint=ckpt)
    store = world / f"pg-{os.urandom(4).hex()}"
    err_path = world / "stop-stderr.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(store)],
        env=_env(world, cfg),
        stdout=subprocess.PIPE,
        stderr=err_path.open("w"),
        text=True,
    )
    seen = 0
    for line in proc.stdout:
        metrics = parse_metrics_lines(line)
        if metrics and metrics[-1]["step"] >= 2:
            seen = metrics[-1]["step"]
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    err = err_path.read_text()
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    stopped = max([seen, *(m["step"] for m in parse_metrics_lines(rest))])
    final = latest_committed(str(root))
    assert final.tag == f"step_{stopped}" and stopped < 400
    assert (world / "scratch-stop" / f"step_{stopped}" / "done").exists()  # NxD's layout
    progress = json.loads((root / "progress.json").read_text())
    assert progress["stoppedAtStep"] == stopped and progress["lastCommittedStep"] == stopped

    resume = {**ckpt, "localDir": str(world / "scratch-stop-2")}
    out2, err2 = _train(world, _stage(world, 2, maxSteps=400, checkpoint=resume, stopAfterSteps=1))
    assert [m["step"] for m in parse_metrics_lines(out2)] == [stopped + 1]
    assert f"restore step_{stopped}" in err2


COMPILER_STUB = """#!/bin/sh
# STAND-IN for neuron_parallel_compile (tests only): the documented interface is
# `neuron_parallel_compile <training command>`: it runs the command in graph-extraction mode
# (NEURON_EXTRACT_GRAPHS_ONLY) and then compiles the graphs into NEURON_COMPILE_CACHE_URL.
NEURON_EXTRACT_GRAPHS_ONLY=1 "$@" || exit $?
mkdir -p "$NEURON_COMPILE_CACHE_URL" && echo compiled > "$NEURON_COMPILE_CACHE_URL/graphs.neff"
"""


def test_the_precompile_stage_compiles_once_records_the_key_and_skips_the_next_time(
    world, monkeypatch
):
    from cpt_training.config import PrecompileStage

    root = _converted(world, monkeypatch, "ckpt-pc")
    compiler = world / "bin" / "neuron_parallel_compile"
    compiler.parent.mkdir(exist_ok=True)
    compiler.write_text(COMPILER_STUB)
    compiler.chmod(0o755)
    cache = world / "neuron-cache"
    ckpt = {"uri": str(root), "everySteps": 1, "localDir": str(world / "scratch-pc2")}
    cfg = PrecompileStage(
        train=_stage(world, 1, checkpoint=ckpt),
        cache_key="0123456789abcdef",
        marker_uri=str(cache / "cpt-precompiled" / "0123456789abcdef.json"),
        command=[sys.executable, "-c", TRAIN, str(world / "pg-pc-$(PC_RUN)")],
        compiler=str(compiler),
    )

    def precompile() -> subprocess.CompletedProcess[str]:
        env = _env(world, NEURON_COMPILE_CACHE_URL=str(cache), PC_RUN=os.urandom(4).hex())
        env["CPT_STAGE_CONFIG"] = json.dumps(cfg.to_wire())
        return subprocess.run(
            [sys.executable, "-m", "cpt_training.cli", "precompile"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = precompile()
    assert first.returncode == 0, first.stderr[-4000:]
    # The training command itself ran, in graph-extraction mode: a few steps, nothing saved.
    assert "stopping after 3 steps in this process (step 3)" in first.stderr
    assert not list((world / "scratch-pc2").glob("step_*"))
    assert latest_committed(str(root)) is None  # no training checkpoint committed
    assert (cache / "graphs.neff").read_text().strip() == "compiled"
    marker = json.loads((cache / "cpt-precompiled" / "0123456789abcdef.json").read_text())
    assert marker["cacheKey"] == "0123456789abcdef"
    (cache / "graphs.neff").unlink()
    second = precompile()
    assert second.returncode == 0 and "holds key 0123456789abcdef already" in second.stderr
    assert not (cache / "graphs.neff").exists()  # not compiled again
