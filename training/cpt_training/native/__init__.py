"""The native training backend: plain PyTorch (FSDP2, DTensor TP, torch.compile, DCP) on CUDA,
CPU (gloo) and TorchNeuron devices. Entry point: :func:`cpt_training.native.train.run`."""
