"""cpt operator: the ContinualPretrain API, its planner, and the Kubernetes controller."""

__version__ = "0.1.0"
