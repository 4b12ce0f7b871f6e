"""Triton launch configuration: task limits and the shared-memory fit of the tl.dot Gram (pure Python)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mgs_kernels import BackendUnavailableError  # noqa: E402
from mgs_kernels.triton import _config  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# sm_86 / sm_89 / sm_120 (99 KB), sm_80 (163 KB), sm_90 (227 KB) opt-in shared memory per block
LIMITS = (101_376, 166_912, 232_448)


@pytest.fixture
def compiled(monkeypatch):
    """Configurations as a GPU launch would choose them (not the interpreter's tiny blocks)."""
    monkeypatch.setattr(_config, "interpreting", lambda: False)


@pytest.mark.parametrize("smem", LIMITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_gram_config_fits_every_device(compiled, dtype, smem):
    for T in range(1, _config.max_tasks(dtype) + 1):
        cfg = _config.gram_config(T, dtype, smem=smem)
        if cfg.use_dot:
            elem = 4 if dtype == torch.float32 else 2
            assert _config.gram_dot_smem(cfg.t_pad, cfg.block_n, cfg.num_stages, elem) <= _config.SMEM_FRACTION * smem
            assert cfg.t_pad >= T and cfg.block_n >= 16 and cfg.num_stages >= 2
            assert cfg.upcast == (dtype == torch.float32)
        else:
            assert T < _config.gram_dot_min_t() and cfg.t_pad >= T


def test_review_case_fp32_t128_no_longer_reachable_and_t64_is_small(compiled):
    # The review: fp32 with 65 <= T <= 128 asked for 327,680 B. Now fp32 stops at 64 tasks, whose tiles
    # need far less than sm_80's limit.
    assert _config.max_tasks(torch.float32) == 64
    cfg = _config.gram_config(64, torch.float32, smem=232_448)
    assert _config.gram_dot_smem(cfg.t_pad, cfg.block_n, cfg.num_stages, 4) < 100_000
    cfg = _config.gram_config(128, torch.bfloat16, smem=166_912)
    assert _config.gram_dot_smem(cfg.t_pad, cfg.block_n, cfg.num_stages, 2) <= 0.85 * 166_912


def test_max_and_preferred_tasks():
    assert _config.max_tasks(torch.float32) == 64
    assert _config.max_tasks(torch.bfloat16) == _config.max_tasks(torch.float16) == 128
    lo, hi = _config.preferred_tasks(torch.bfloat16)
    assert lo == _config.gram_dot_min_t() and hi == 128
    with pytest.raises(TypeError):
        _config.max_tasks(torch.float64)


def test_launchers_raise_above_max_tasks():
    from mgs_kernels._plan import plan_from_sizes
    from mgs_kernels.triton import _combine, _gram, _solve

    T = _config.max_tasks(torch.float32) + 1
    grads = torch.zeros(T, 10)
    plan = plan_from_sizes([10])
    with pytest.raises(BackendUnavailableError, match="at most 64 tasks"):
        _gram.segmented_gram(grads, plan)
    with pytest.raises(BackendUnavailableError, match="at most 64 tasks"):
        _combine.segmented_combine(grads, plan, torch.ones(1, T), torch.empty(10))
    big = max(_config.MAX_TASKS.values()) + 1
    with pytest.raises(BackendUnavailableError, match="at most 128 tasks"):
        _solve.pcgrad_weights(torch.zeros(1, big, big), torch.zeros(1, big, big - 1, dtype=torch.int64), 0.0)


def test_solve_and_step_configs_keep_registers_bounded(compiled):
    for T in (1, 2, 8, 16, 32, 64, 128):
        t_pad = _config.next_pow2(T)
        warps = _config.solve_num_warps(T)
        assert t_pad * t_pad // (32 * warps) <= 32, T  # elements of C per thread
        assert _config.step_config(T).block_n == 128 * _config.step_config(T).num_warps  # 4 per thread
