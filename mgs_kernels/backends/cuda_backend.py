"""Native CUDA backend (csrc/cuda, bound in python_api/). Filled in by issue 4."""


def load():
    raise ImportError("the native CUDA extension is not built yet")


def supports(device):
    return device.type == "cuda"
