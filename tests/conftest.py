"""Shared test helpers: the backend matrix, random layouts of odd sizes, and comparison against the
float64 reference.

The device and Triton's mode are decided here, once, before anything imports the kernels: without a
CUDA device the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, read by triton.jit
when the kernel modules are imported), so the "triton" backend is part of every CPU backend matrix.
"""

from __future__ import annotations

import os
import random
from typing import List

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mgs_kernels import _settings, backends, reference  # noqa: E402

# Where device-aware tests run, and every backend that runs there: tests parametrize over these.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = backends.usable_backends(DEVICE)
# Every backend that runs on CPU tensors (the behaviour matrix of test_ops / test_step; on a machine without
# a GPU the same list as BACKENDS, Triton included through its interpreter).
CPU_BACKENDS = backends.usable_backends("cpu")


def pytest_report_header(config):
    status = backends.backend_status(DEVICE)
    lines = [f"mgs_kernels backend matrix on {DEVICE}: {BACKENDS}; on CPU tensors: {CPU_BACKENDS}"]
    lines += [f"  {name}: {why}" for name, why in status.items() if why]
    return lines


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_sizes(rng: random.Random, num_modules: int, max_size: int = 300, empty_prob: float = 0.2) -> List[int]:
    """Module sizes with odd values and some empty modules."""
    return [0 if rng.random() < empty_prob else rng.randint(1, max_size) for _ in range(num_modules)]


def offsets_from_sizes(sizes: List[int]) -> torch.Tensor:
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    if sizes:
        off[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    return off


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor, rtol: float,
                              grads: torch.Tensor = None) -> None:
    """|out - ref| <= rtol * scale, module by module, where scale is the module's max |ref| or, when
    ``grads`` is given, its max |grads| if larger (the surgery can cancel gradients to ~0 exactly in
    float64, leaving only the inputs' rounding as a yardstick)."""
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(out).all() == torch.isfinite(ref).all()
    bounds = offsets.tolist()
    for m in range(len(bounds) - 1):
        a, b = bounds[m], bounds[m + 1]
        if a == b:
            continue
        scale = ref[a:b].abs().max().item() + 1e-30
        if grads is not None:
            scale = max(scale, grads[:, a:b].double().abs().max().item())
        err = (out[a:b] - ref[a:b]).abs().max().item()
        assert err <= rtol * scale, f"module {m} [{a}:{b}]: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def storage_rtol(dtype: torch.dtype) -> float:
    """Tolerance for a result stored in ``dtype`` (the reference sees the same stored inputs)."""
    return {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@pytest.fixture
def rng(request):
    seed = _settings.get("MGS_TEST_SEED")
    if seed is None:
        seed = random.randrange(1 << 30)
    # Print the seed on failure so a fresh-random failure can be replayed with MGS_TEST_SEED.
    request.node.user_properties.append(("seed", seed))
    print(f"MGS_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return random.Random(seed)


def reference_result(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    return reference.modular_pcgrad(grads, offsets, order=order, eps=eps, dtype=torch.float64)


def property_case(T, sizes, seed, scale, dtype, eps, margin=1e-4):
    """One hypothesis case: (grads, offsets, order, float64 reference), or None where PCGrad decisions
    (or |g_j|^2 against eps) sit within rounding of the threshold. Some draws make one task the exact
    negative of another, or zero."""
    from mgs_kernels import random_order

    gen = torch.Generator().manual_seed(seed)
    grads = (torch.randn(T, sum(sizes), generator=gen) * scale).to(dtype)
    if T >= 2 and seed % 3 == 0:
        grads[1] = -grads[0]
    if T >= 3 and seed % 5 == 0:
        grads[2] = 0
    offsets = offsets_from_sizes(sizes)
    order = random_order(len(sizes), T, generator=gen)
    gram64 = reference.gram(grads, offsets)
    if reference.decision_margin(gram64, order, eps) <= margin:
        return None
    diag = torch.diagonal(gram64, dim1=1, dim2=2)
    if not ((diag - eps).abs() > 1e-3 * diag.clamp_min(1e-30)).all():
        return None
    return grads, offsets, order, reference_result(grads, offsets, order, eps)


def surgery_weights(surgery) -> torch.Tensor:
    """float32 [M, T] weights of ``surgery``'s captured rows, through the public pipeline stages."""
    import mgs_kernels as mgs

    gram = mgs.segmented_gram(surgery.buffer, surgery.partition.offsets, backend=surgery.backend_name)
    return surgery.weighting(gram, backend=surgery.backend)


def fused_step_args(surgery, optimizer, weights, keep_grads):
    """The FusedStepArgs ``surgery.step()`` would hand its backend's kernel for ``weights``."""
    from mgs_kernels._fused_step import FusedStep

    fused = FusedStep(surgery.partition.slots, surgery.device)
    grad_out = surgery.result.buffer if keep_grads else None
    return fused.prepare(optimizer, surgery.buffer, weights, surgery.task_grads.touched, grad_out)
