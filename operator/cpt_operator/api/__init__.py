"""The ContinualPretrain API: spec/status models, CRD generation and the planner.

Pure code: nothing in this package talks to the Kubernetes API or imports torch.
"""

from cpt_operator.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ContinualPretrain,
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    Phase,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ContinualPretrain",
    "ContinualPretrainSpec",
    "ContinualPretrainStatus",
    "Phase",
]
