"""``cpt-train precompile``: Neuron's ``neuron_parallel_compile`` over the run's exact training
command, on every node of the training gang (graphs are per world size and layout).

The tool runs the command once in graph-extraction mode (it sets
``NEURON_EXTRACT_GRAPHS_ONLY``; cpt's nxd trainer then runs a few steps and writes nothing, see
``nxd/plan.py``) and compiles the extracted graphs in parallel into the persistent cache named
by ``NEURON_COMPILE_CACHE_URL`` (the run's ``neuronCompileCacheUri``). Once it succeeded, global
rank 0's node records the run's cache key at ``marker_uri``; the operator skips the stage for a
run whose key is already recorded there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

from cpt_training import storage
from cpt_training.config import STAGE_CONFIG_ENV, PrecompileStage

log = logging.getLogger(__name__)

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(arg: str, environ: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion (an unknown variable stays as written)."""
    return _VAR.sub(lambda m: environ.get(m.group(1), m.group(0)), arg)


def run(cfg: PrecompileStage) -> int:
    """The stage; returns the process exit code."""
    if storage.exists(cfg.marker_uri):
        log.info("the compile cache holds key %s already: nothing to do", cfg.cache_key)
        return 0
    env = dict(os.environ)
    env[STAGE_CONFIG_ENV] = json.dumps(cfg.train.to_wire())
    command = [cfg.compiler, *(expand(a, env) for a in cfg.command)]
    log.info("precompiling: %s", " ".join(command))
    t0 = time.monotonic()
    rc = subprocess.run(command, env=env, stdout=sys.stdout, stderr=sys.stderr).returncode
    if rc != 0:
        log.error("%s exited %d", cfg.compiler, rc)
        return rc
    if os.environ.get("RANK", "0") == "0":
        storage.write_json(
            cfg.marker_uri,
            {
                "cacheKey": cfg.cache_key,
                "seconds": round(time.monotonic() - t0, 1),
                "writtenAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    log.info("precompiled in %.0fs; cache key %s recorded", time.monotonic() - t0, cfg.cache_key)
    return 0
