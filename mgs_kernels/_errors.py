"""Exceptions raised by mgs_kernels."""


class MGSInputError(ValueError):
    """Bad input to an mgs_kernels call (shape, dtype, device, offsets, task id).

    Raised before anything is written: a failed call leaves outputs and buffers as they were.
    """


class BackendUnavailableError(RuntimeError):
    """The requested backend is not available here (not built, no device, or wrong device)."""
