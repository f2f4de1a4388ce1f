"""The trn1 training backend: torch-neuronx (PyTorch/XLA) + neuronx-distributed (NxD Core).

Pinned to the Neuron SDK 2.28 training container (see ``docs/nxd.md`` for why). NxD and
torch_xla exist only in that image, so every module here imports them inside functions;
importing ``cpt_training.nxd.*`` works on any machine, and everything that does not need the
hardware (env, layout, argv, resume and upload decisions) is pure and unit-tested.

Modules: ``env`` (container environment, used by the operator too: torch-free), ``layout``
(HF <-> NxD shard layout, a pure-torch reference of the converter's mapping), ``model``
(Llama built from NxD parallel layers), ``train`` (``cpt-train train`` with backend nxd),
``convert`` (HF -> ``pretrained_weight``), ``export`` (NxD tag -> HF state dict).
"""
