"""Triton backend (mgs_kernels/triton). Filled in by issue 3."""


def load():
    raise ImportError("the Triton kernels are not written yet")


def supports(device):
    return device.type == "cuda"
