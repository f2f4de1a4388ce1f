"""cpt workload: the code that runs inside the stage pods (and in local mode).

Modules: ``config`` (the operator <-> workload contract, torch-free), ``storage`` (local/S3
behind one URI interface), ``checkpoint`` (manifest + commit protocol, restore, prune, sync),
``tokenize`` (the tokenize stage), ``data`` (token blocks for the trainers). Importing this
package is cheap: nothing heavy (torch, datasets) is imported here.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
