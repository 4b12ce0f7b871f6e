"""Triton kernels of mgs_kernels: segmented Gram, batched PCGrad solve, segmented combine, fused step.

``triton.jit`` decides when a kernel module is imported whether its kernels are compiled (GPU) or run by
the CPU interpreter (``TRITON_INTERPRET=1``): set that variable before this package is first imported
(the test suite does it once, in tests/conftest.py).

Launchers (plain Python, inputs already validated; each module holds its private kernels and the
launcher beside them):

    segmented_gram(grads [T, N], plan) -> float32 [M, T, T]                  (_gram.py)
    pcgrad_weights(gram float32 [M, T, T], order int64 [M, T, T-1], eps)      (_solve.py)
    segmented_combine(grads [T, N], plan, weights float32 [M, T], out [N])    (_combine.py)
    fused_step(args: FusedStepArgs)   combine + SGD / Adam(W) update, in place (_step.py)

Launch parameters live in _config.py.
"""

from __future__ import annotations

from ._combine import segmented_combine
from ._gram import segmented_gram
from ._solve import pcgrad_weights
from ._step import fused_step

__all__ = ["segmented_gram", "pcgrad_weights", "segmented_combine", "fused_step"]
