"""`python -m cpt_operator`: the operator, as the image runs it.

Equivalent to `kopf run -m cpt_operator.handlers --standalone -A --liveness=...`: the same
handlers and the same settings (they are applied by the startup handler either way).

Environment:
  CPT_WATCH_NAMESPACES   comma-separated namespaces to watch; empty = the whole cluster
  CPT_LIVENESS_ENDPOINT  kopf liveness URL (default http://0.0.0.0:8080/healthz; "" = off)
  CPT_LOG_LEVEL          DEBUG for verbose kopf logs (default INFO)
  CPT_RESYNC_SECONDS     resync interval (default 10)
  CPT_GC_THRESHOLD       allocations between young garbage collections (default 20000;
                         0 = Python's own settings), see tune_gc
Kubernetes access: in-cluster service account, or KUBECONFIG. S3: the standard AWS env.
"""

from __future__ import annotations

import gc
import logging
import os

import kopf

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


DEFAULT_GC_THRESHOLD = 20000


def tune_gc(threshold: int) -> None:
    """Freeze what the imports made and collect young garbage every `threshold` allocations
    instead of Python's 700. Measured on a burst of 200 new runs (docs/PERFORMANCE.md 5): the
    collector ran 190 times in 3 s, 0.25 CPU-s, mostly full passes over the modules' and the
    runs' long-lived objects; frozen and at 20000, 4 passes, 0.06 CPU-s. A process-wide
    setting, so only the operator's own process makes it (not tests that import the
    handlers)."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, *older = gc.get_threshold()
    gc.set_threshold(threshold, *older)


def main() -> None:
    import cpt_operator.handlers  # noqa: F401  (registers the handlers)

    tune_gc(int(os.environ.get("CPT_GC_THRESHOLD", str(DEFAULT_GC_THRESHOLD))))

    verbose = os.environ.get("CPT_LOG_LEVEL", "INFO").upper() == "DEBUG"
    kopf.configure(verbose=verbose)
    if not verbose:  # one line per API request drowns the operator's own log
        for name in ("httpx", "httpx2", "botocore", "boto3", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    namespaces = [n for n in os.environ.get("CPT_WATCH_NAMESPACES", "").split(",") if n]
    liveness = os.environ.get("CPT_LIVENESS_ENDPOINT", DEFAULT_LIVENESS) or None
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
    )


if __name__ == "__main__":
    main()
