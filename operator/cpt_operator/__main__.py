"""`python -m cpt_operator`: the operator, as the image runs it.

The same handlers as `kopf run -m cpt_operator.handlers --standalone`, with the settings read
once here (cpt_operator/settings.py: the CPT_* variables the chart sets) and handed to
the handlers through kopf's memo. Kubernetes access: in-cluster service account, or
KUBECONFIG. S3: the standard AWS environment.
"""

from __future__ import annotations

import logging

import kopf

from cpt_operator import handlers  # noqa: F401  (registers the handlers)
from cpt_operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings.from_env()
    verbose = settings.log_level == "DEBUG"
    kopf.configure(verbose=verbose)
    if not verbose:  # a line per request or handler call drowns the operator's own log
        for name in ("botocore", "boto3", "urllib3", "kubernetes", "kopf.objects"):
            logging.getLogger(name).setLevel(logging.WARNING)
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(settings=settings),
    )


if __name__ == "__main__":
    main()
