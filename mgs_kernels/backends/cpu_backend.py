"""Native CPU backend (C++/OpenMP kernels in csrc/cpu, bound in python_api/). Filled in by issue 4."""


def load():
    raise ImportError("the native CPU extension is not built yet")


def supports(device):
    return device.type == "cpu"
