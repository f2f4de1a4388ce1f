"""`python -m cpt_operator`: the operator, as the image runs it.

Equivalent to `kopf run -m cpt_operator.handlers --standalone -A --liveness=...`: the same
handlers and the same settings (they are applied by the startup handler either way).

Environment:
  CPT_WATCH_NAMESPACES   comma-separated namespaces to watch; empty = the whole cluster
  CPT_LIVENESS_ENDPOINT  kopf liveness URL (default http://0.0.0.0:8080/healthz; "" = off)
  CPT_LOG_LEVEL          DEBUG for verbose kopf logs (default INFO)
  CPT_RESYNC_SECONDS     resync interval (default 10)
Kubernetes access: in-cluster service account, or KUBECONFIG. S3: the standard AWS env.
"""

from __future__ import annotations

import logging
import os

import kopf

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def main() -> None:
    import cpt_operator.handlers  # noqa: F401  (registers the handlers)

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
