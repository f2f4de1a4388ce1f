"""The trn1 container environment (``cpt_training.nxd.env.neuron_env``).

We test these aspects:
- EFA variables only where the instance has EFA; core count from the instance table.
- Precision: XLA_DOWNCAST_BF16 never 1 (0 with master weights); stochastic rounding off
  under ZeRO-1 master weights and on without them, keyed on ZeRO-1 as it runs (DP > 1);
  ZeRO-1 sets XLA_DISABLE_FUNCTIONALIZATION=0 (one row per test: test_nxd_precision.py).
- Compiler flags: llm-training only for sharded graphs; the compile cache is per run, never
  shared between two runs, and an explicit (s3) cache is used as given.
- The async-exec knob exists only for SDKs before 2.31 (a no-op afterwards).
- A non-trn1 instance is refused naming the allowed ones; defaults never override the pod env.
- The module is importable without torch (the operator image has none).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cpt_training.config import TrainStage
from cpt_training.nxd import env

pytestmark = pytest.mark.unit


def stage(**kw):
    base = {
        "backend": "nxd",
        "run_name": "r1",
        "model_uri": "s3://b/m/",
        "data_uri": "s3://b/d/",
        "checkpoint": {"uri": "s3://b/c/"},
    }
    par = kw.pop("parallelism", {})
    return TrainStage.model_validate({**base, "parallelism": par, **kw})


def test_trn1_32xlarge_gets_efa_and_32_cores():
    e = env.neuron_env(stage(), world_size=64, compile_cache_uri=None)
    assert e["FI_PROVIDER"] == "efa"
    assert e["FI_EFA_USE_DEVICE_RDMA"] == "1" and e["FI_EFA_FORK_SAFE"] == "1"
    assert e["NEURON_RT_NUM_CORES"] == "32"
    assert e["CCOM_SOCKET_IFNAME"] == "eth0"
    assert e["NEURON_FUSE_SOFTMAX"] == "1" and e["MALLOC_ARENA_MAX"] == "64"
    assert all(isinstance(v, str) for v in e.values())


def test_an_instance_without_efa_gets_no_efa_variables():
    e = env.neuron_env(stage(instance_type="trn1.2xlarge"), world_size=64, compile_cache_uri=None)
    assert not any(k.startswith("FI_") for k in e)
    assert e["NEURON_RT_NUM_CORES"] == "2"


def test_bf16_with_zero1_uses_master_weights_so_stochastic_rounding_is_off():
    e = env.neuron_env(stage(parallelism={"zero1": True}), world_size=64, compile_cache_uri=None)
    assert e["XLA_DOWNCAST_BF16"] == "0"  # never 1; 0 selects NxD's bf16-tensor bucket size
    assert e["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"
    assert e["XLA_DISABLE_FUNCTIONALIZATION"] == "0"


def test_zero1_at_one_data_parallel_rank_rounds_like_no_zero1():
    cfg = stage(parallelism={"zero1": True, "tensorParallel": 32})
    e = env.neuron_env(cfg, world_size=32, compile_cache_uri=None)
    assert e["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"
    assert "XLA_DISABLE_FUNCTIONALIZATION" not in e


def test_efa_env_has_the_samples_shm_transfer_and_log_level():
    e = env.neuron_env(stage(), world_size=64, compile_cache_uri=None)
    assert e["FI_EFA_ENABLE_SHM_TRANSFER"] == "1"
    assert e["FI_LOG_LEVEL"] == "warn"


def test_a_world_size_the_degrees_do_not_divide_is_refused_naming_them():
    cfg = stage(parallelism={"tensorParallel": 8, "pipelineParallel": 8})
    with pytest.raises(ValueError, match="tensorParallel x pipelineParallel"):
        env.neuron_env(cfg, world_size=96, compile_cache_uri=None)


@pytest.mark.parametrize(
    ("tp", "pp", "llm"), [(1, 1, False), (8, 1, True), (1, 4, True), (32, 8, True)]
)
def test_llm_training_distribution_strategy_only_for_sharded_graphs(tp, pp, llm):
    cfg = stage(parallelism={"tensor_parallel": tp, "pipeline_parallel": pp})
    flags = env.neuron_env(cfg, world_size=256, compile_cache_uri=None)["NEURON_CC_FLAGS"].split()
    assert "--model-type=transformer" in flags
    assert ("--distribution-strategy=llm-training" in flags) is llm


def test_compile_cache_is_per_run_by_default_and_as_given_otherwise():
    a = env.neuron_env(stage(run_name="alpha"), world_size=64, compile_cache_uri=None)
    b = env.neuron_env(stage(run_name="beta"), world_size=64, compile_cache_uri=None)
    assert a["NEURON_COMPILE_CACHE_URL"] != b["NEURON_COMPILE_CACHE_URL"]
    assert a["NEURON_COMPILE_CACHE_URL"].endswith("/alpha")
    assert f"--cache_dir={a['NEURON_COMPILE_CACHE_URL']}" in a["NEURON_CC_FLAGS"].split()
    s3 = env.neuron_env(stage(), world_size=64, compile_cache_uri="s3://b/c/neuron-cache/")
    assert "--cache_dir=s3://b/c/neuron-cache" in s3["NEURON_CC_FLAGS"].split()
    assert s3["NEURON_COMPILE_CACHE_URL"] == "s3://b/c/neuron-cache"


def test_async_exec_knob_only_before_sdk_2_31():
    pp = stage(parallelism={"pipeline_parallel": 2, "tensor_parallel": 8})
    assert (
        env.neuron_env(pp, world_size=64, compile_cache_uri=None)[
            "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"
        ]
        == "7"
    )
    tp = env.neuron_env(stage(), world_size=64, compile_cache_uri=None, sdk_version="2.30.0")
    assert tp["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "3"
    later = env.neuron_env(stage(), world_size=64, compile_cache_uri=None, sdk_version="2.31.1")
    assert "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS" not in later


def test_non_trn1_instances_are_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"instanceType 'p5.48xlarge'.*trn1.32xlarge"):
        env.neuron_env(stage(instance_type="p5.48xlarge"), world_size=64, compile_cache_uri=None)
    assert env.instance_info("ml.trn1.32xlarge").name == "trn1.32xlarge"


def test_defaults_never_override_what_the_pod_sets():
    target = {"MALLOC_ARENA_MAX": "8"}
    env.apply_defaults({"MALLOC_ARENA_MAX": "64", "NEURON_FUSE_SOFTMAX": "1"}, target)
    assert target == {"MALLOC_ARENA_MAX": "8", "NEURON_FUSE_SOFTMAX": "1"}


def test_the_env_module_does_not_import_torch():
    code = (
        "import sys; import cpt_training.nxd.env as e; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(e.SDK_VERSION)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == env.SDK_VERSION
