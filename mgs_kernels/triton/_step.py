"""Fused optimizer step: combine the task rows and apply SGD / Adam(W) in one pass (see
``mgs_kernels._fused_step`` for the contract and ``reference_kernel`` for the arithmetic).

``_fused_step_kernel``, grid (K,) over the slot chunk table (``chunks.module`` is the slot, chunks
never cross a slot): program k reads its slot's flags and hyper-parameters once (scalars), then walks
its chunk in BLOCK_N blocks starting at the chunk's first element. For every block it sums the T task
rows with the slot's weights (float32, rows in order 0..T-1, every row always multiplied so that
NaN / Inf reach the result), optionally stores that gradient into ``grad_out``, and updates the fp32
parameter and its state tensors, reached through the int64 data-pointer tables at the element's
offset within its slot. Programs own disjoint elements: no atomics, bitwise deterministic. A chunk
of an inactive slot runs zero blocks.

Matching torch. The ops are those of torch's single-tensor SGD / Adam in the same order, with the
same fused multiply-adds as ATen's vectorized CPU kernels (``add(x, alpha=a)`` is ``fma(x, a, self)``,
``lerp`` is ``fma(w, b - a, a)`` / ``fma(w - 1, b - a, b)``; ``mul``, ``addcmul`` and ``addcdiv`` are
unfused) and IEEE ``sqrt`` / ``/`` (``tl.sqrt_rn`` / ``tl.div_rn``: on NVIDIA GPUs Triton's plain
``sqrt`` is ``sqrt.approx.ftz`` and ``/`` is ``div.full``, both approximate). The launch disables
Triton's automatic FMA contraction, so every other product is rounded as in torch. Left to rounding:
the order of the task sum (torch's ``sum(0)`` may pair rows differently) and, under
``TRITON_INTERPRET=1``, ``tl.fma`` (numpy rounds the product); the tests compare at rtol 1e-5.

Per-slot flags (maximize, weight decay, momentum / first step / nesterov, amsgrad, decoupled) are
runtime values read from the hyper table, not constexpr specializations: the table lives on the
device and reading it back would cost a host sync every step, and the flags vary between param
groups of one launch. A flag is splat to a block once per program and selects with ``tl.where``
(never an arithmetic blend, which would turn an Inf into a NaN); as a load / store mask it gates
the state a slot does not use (no memory traffic, and that pointer may be 0). A uniform mask keeps
the loads vectorized.

Vector loads. Blocks start at the chunk start, so a block's offset within its slot is a multiple of
the chunk size's power-of-two part and its column in ``grads`` a multiple of the power of two that
divides every chunk start; the launcher computes both on the host (once per chunk table, one
device-to-host copy) and checks the 16-byte alignment of every parameter / state pointer (every
step, host-side pointers) before promising them to the compiler with ``tl.multiple_of``. Only the
last block of a chunk is masked.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _fused_step as _fs
from . import _config
from ._gram import _launch_context

_INTERPRETED = _config.interpreting()  # the mode the triton.jit decorators below ran in

# Hyper-parameter columns (triton.jit only reads constexpr globals).
_LR = tl.constexpr(_fs.LR)
_WD = tl.constexpr(_fs.WD)
_MOMENTUM = tl.constexpr(_fs.MOMENTUM)
_DAMPENING_KEEP = tl.constexpr(_fs.DAMPENING_KEEP)
_NESTEROV = tl.constexpr(_fs.NESTEROV)
_MAXIMIZE = tl.constexpr(_fs.MAXIMIZE)
_FIRST = tl.constexpr(_fs.FIRST)
_HAS_MOMENTUM = tl.constexpr(_fs.HAS_MOMENTUM)
_ONE_MINUS_BETA1 = tl.constexpr(_fs.ONE_MINUS_BETA1)
_BETA2 = tl.constexpr(_fs.BETA2)
_ONE_MINUS_BETA2 = tl.constexpr(_fs.ONE_MINUS_BETA2)
_EPS = tl.constexpr(_fs.EPS)
_STEP_SIZE = tl.constexpr(_fs.STEP_SIZE)
_BC2_SQRT = tl.constexpr(_fs.BC2_SQRT)
_AMSGRAD = tl.constexpr(_fs.AMSGRAD)
_DECOUPLED = tl.constexpr(_fs.DECOUPLED)
_DECAY = tl.constexpr(_fs.DECAY)
_NUM_HYPER = tl.constexpr(_fs.NUM_HYPER)
_SGD = tl.constexpr(_fs.SGD_KIND)

# The largest alignment promised to the compiler: 16 bytes, one vector of 4 fp32 state elements.
_PTR_ALIGN = 16
# Task-row columns are promised at most 4-element alignment, also for bf16 / fp16 rows (8-byte
# vectors): with 8 (16-byte bf16 vectors) Triton gives the rows a wider register layout than the
# fp32 state streams and converts between them through shared memory in every block.
_COL_VEC = 4


@triton.jit
def _hyper(h, col, BLOCK_N: tl.constexpr):
    # Flags are compared after the splat: under TRITON_INTERPRET=1 a splat of a scalar comparison
    # result keeps the float type of its operands (and breaks a later `&`).
    return tl.full([BLOCK_N], tl.load(h + col), tl.float32)


@triton.jit
def _load(ptrs, ok, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_if(ptrs, ok, flag, MASKED: tl.constexpr):
    """Load where ``flag`` (uniform over the program) is set; zeros and no memory access otherwise."""
    if MASKED:
        x = tl.load(ptrs, mask=ok & flag, other=0.0)
    else:
        x = tl.load(ptrs, mask=flag, other=0.0)
    return x


@triton.jit
def _store(ptrs, x, ok, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=ok)
    else:
        tl.store(ptrs, x)


@triton.jit
def _store_if(ptrs, x, ok, flag, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=ok & flag)
    else:
        tl.store(ptrs, x, mask=flag)


@triton.jit
def _step_block(
    grads_ptr, stride_t, w_row, out_ptr, col,  # task rows / combined gradient at columns col [BLOCK_N]
    p_ptrs, s1_ptrs, s2_ptrs, s3_ptrs, ok,  # fp32 parameter / state at the same elements
    maximize, wd_on, wd, lr_neg, has_mom, need_buf, first, nesterov, mom, dk,  # SGD (and shared)
    small_w1, w1, w1m1, beta2, omb2, eps, step_neg, bc2, amsgrad, decay_on, coupled_on, decay,  # Adam
    T: tl.constexpr, KIND: tl.constexpr, HAS_OUT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    # g = sum_t w[t] * grads[t, col]: products rounded, summed in task order.
    acc = _load(grads_ptr + col, ok, MASKED).to(tl.float32) * tl.load(w_row)
    row = grads_ptr
    for t in tl.static_range(1, T):
        row += stride_t
        acc += _load(row + col, ok, MASKED).to(tl.float32) * tl.load(w_row + t)
    if HAS_OUT:
        _store(out_ptr + col, acc.to(out_ptr.dtype.element_ty), ok, MASKED)
    g = tl.where(maximize, -acc, acc)
    p = _load(p_ptrs, ok, MASKED)
    if KIND == _SGD:
        g = tl.where(wd_on, tl.fma(p, wd, g), g)  # grad.add(param, alpha=wd)
        buf = _load_if(s1_ptrs, ok, need_buf, MASKED)
        buf = tl.where(first, g, tl.fma(g, dk, buf * mom))  # clone(grad) | buf.mul_(m).add_(grad, alpha=1-d)
        _store_if(s1_ptrs, buf, ok, has_mom, MASKED)
        g = tl.where(has_mom, tl.where(nesterov, tl.fma(buf, mom, g), buf), g)  # grad.add(buf, alpha=m) | buf
        p = tl.fma(g, lr_neg, p)  # param.add_(grad, alpha=-lr)
    else:
        p = tl.where(decay_on, p * decay, p)  # param.mul_(1 - lr * wd)
        g = tl.where(coupled_on, tl.fma(p, wd, g), g)  # grad.add(param, alpha=wd)
        m = _load(s1_ptrs, ok, MASKED)
        v = _load(s2_ptrs, ok, MASKED)
        # exp_avg.lerp_(grad, w1), torch's two-sided formula.
        m = tl.fma(tl.where(small_w1, w1, w1m1), g - m, tl.where(small_w1, m, g))
        v = v * beta2 + omb2 * g * g  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2)
        _store(s1_ptrs, m, ok, MASKED)
        _store(s2_ptrs, v, ok, MASKED)
        vmax = _load_if(s3_ptrs, ok, amsgrad, MASKED)
        vmax = tl.where((vmax > v) | (vmax != vmax), vmax, v)  # torch.maximum: NaN wins
        _store_if(s3_ptrs, vmax, ok, amsgrad, MASKED)
        vv = tl.where(amsgrad, vmax, v)
        denom = tl.div_rn(tl.sqrt_rn(vv), bc2) + eps  # (sqrt(v) / bias_correction2_sqrt).add_(eps)
        p = p + tl.div_rn(step_neg * m, denom)  # param.addcdiv_(exp_avg, denom, value=-step_size)
    _store(p_ptrs, p, ok, MASKED)


@triton.jit
def _fused_step_kernel(
    grads_ptr,  # *T [T, N] task rows (unit column stride)
    stride_t,  # row stride of grads in elements (int64 when >= 2^31)
    w_ptr,  # *f32 [S, T] combine weights of each slot (clip folded in)
    out_ptr,  # *T_out [N] combined gradient (a dummy when not HAS_OUT)
    slot_of_ptr,  # *i64 [K] slot of each chunk
    start_ptr,  # *i64 [K] first element of each chunk
    length_ptr,  # *i64 [K]
    slot_start_ptr,  # *i64 [S] first element of each slot
    active_ptr,  # *i32 [S]
    hyper_ptr,  # *f32 [S, NUM_HYPER]
    param_tab, s1_tab, s2_tab, s3_tab,  # *i64 [S] data pointers (0 where unused)
    T: tl.constexpr,
    KIND: tl.constexpr,  # SGD_KIND / ADAM_KIND
    HAS_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COL_DIV: tl.constexpr,  # every chunk start is a multiple of COL_DIV (elements)
    LOC_DIV: tl.constexpr,  # every chunk's offset within its slot is a multiple of LOC_DIV
    PTR_DIV: tl.constexpr,  # every parameter / state pointer is a multiple of PTR_DIV bytes
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_of_ptr + pid).to(tl.int64)
    s = tl.load(start_ptr + pid)  # int64: element indices never pass through int32
    n = tl.load(length_ptr + pid)
    n = tl.where(tl.load(active_ptr + slot) != 0, n, 0)  # an inactive slot: no block at all
    loc = s - tl.load(slot_start_ptr + slot)  # offset of the chunk within its slot
    w_row = w_ptr + slot * T

    # Hyper-parameters and flags of the slot, splat to [BLOCK_N] once: tl.fma / tl.div_rn do not
    # broadcast, and block flags keep masks and selects uniform (a splat compiles to one register).
    h = hyper_ptr + slot * _NUM_HYPER
    maximize = _hyper(h, _MAXIMIZE, BLOCK_N) != 0
    wd = _hyper(h, _WD, BLOCK_N)
    wd_on = wd != 0
    lr_neg = -_hyper(h, _LR, BLOCK_N)
    has_mom = _hyper(h, _HAS_MOMENTUM, BLOCK_N) != 0
    first_v = _hyper(h, _FIRST, BLOCK_N)
    first = first_v != 0
    need_buf = has_mom & (first_v == 0)
    nesterov = _hyper(h, _NESTEROV, BLOCK_N) != 0
    mom = _hyper(h, _MOMENTUM, BLOCK_N)
    dk = _hyper(h, _DAMPENING_KEEP, BLOCK_N)
    w1 = _hyper(h, _ONE_MINUS_BETA1, BLOCK_N)
    small_w1 = tl.abs(w1) < 0.5
    w1m1 = w1 - 1.0
    beta2 = _hyper(h, _BETA2, BLOCK_N)
    omb2 = _hyper(h, _ONE_MINUS_BETA2, BLOCK_N)
    eps = _hyper(h, _EPS, BLOCK_N)
    step_neg = -_hyper(h, _STEP_SIZE, BLOCK_N)
    bc2 = _hyper(h, _BC2_SQRT, BLOCK_N)
    amsgrad = _hyper(h, _AMSGRAD, BLOCK_N) != 0
    decoupled_v = _hyper(h, _DECOUPLED, BLOCK_N)
    decay_on = wd_on & (decoupled_v != 0)
    coupled_on = wd_on & (decoupled_v == 0)
    decay = _hyper(h, _DECAY, BLOCK_N)

    p_base = tl.load(param_tab + slot).to(tl.pointer_type(tl.float32))
    s1_base = tl.load(s1_tab + slot).to(tl.pointer_type(tl.float32))
    s2_base = tl.load(s2_tab + slot).to(tl.pointer_type(tl.float32))
    s3_base = tl.load(s3_tab + slot).to(tl.pointer_type(tl.float32))
    if PTR_DIV > 1:
        p_base = tl.multiple_of(p_base, PTR_DIV)
        s1_base = tl.multiple_of(s1_base, PTR_DIV)
        s2_base = tl.multiple_of(s2_base, PTR_DIV)
        s3_base = tl.multiple_of(s3_base, PTR_DIV)

    lanes = tl.arange(0, BLOCK_N)
    full = n // BLOCK_N
    for j in range(0, full):
        c0 = tl.multiple_of(s + j * BLOCK_N, COL_DIV)
        l0 = tl.multiple_of(loc + j * BLOCK_N, LOC_DIV)
        col = c0 + lanes
        li = l0 + lanes
        _step_block(
            grads_ptr, stride_t, w_row, out_ptr, col, p_base + li, s1_base + li, s2_base + li, s3_base + li,
            lanes < BLOCK_N, maximize, wd_on, wd, lr_neg, has_mom, need_buf, first, nesterov, mom, dk,
            small_w1, w1, w1m1, beta2, omb2, eps, step_neg, bc2, amsgrad, decay_on, coupled_on, decay,
            T, KIND, HAS_OUT, False,
        )  # fmt: skip
    for j in range(full, (n + BLOCK_N - 1) // BLOCK_N):  # the partial last block, if any
        off = j * BLOCK_N + lanes
        col = s + off
        li = loc + off
        _step_block(
            grads_ptr, stride_t, w_row, out_ptr, col, p_base + li, s1_base + li, s2_base + li, s3_base + li,
            off < n, maximize, wd_on, wd, lr_neg, has_mom, need_buf, first, nesterov, mom, dk,
            small_w1, w1, w1m1, beta2, omb2, eps, step_neg, bc2, amsgrad, decay_on, coupled_on, decay,
            T, KIND, HAS_OUT, True,
        )  # fmt: skip


@dataclass(frozen=True)
class _TableInfo:
    slot_start: torch.Tensor  # int64 [S] on the table's device (0 for a slot without chunks)
    col_div: int  # power of two (<= 16) dividing every chunk start
    loc_div: int  # power of two (<= 16) dividing every chunk's offset within its slot


_TABLE_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _pow2_div(values, cap: int = 16) -> int:
    d = cap
    for v in values:
        while d > 1 and v % d:
            d //= 2
    return d


def _table_info(chunks, num_slots: int) -> _TableInfo:
    """Slot starts and alignments of a chunk table, from its host copy (no device read), cached."""
    info = _TABLE_INFO.get(chunks)
    if info is None:
        start, first, module = chunks.host["start"], chunks.host["first"], chunks.host["module"]
        slot_start = torch.zeros(num_slots, dtype=torch.int64)
        has = first[1:] > first[:-1]
        slot_start[has] = start[first[:-1][has]]
        loc = start - slot_start[module.long()]
        info = _TableInfo(
            slot_start=slot_start.to(chunks.start.device),
            col_div=_pow2_div(start.tolist()),
            loc_div=_pow2_div(loc.tolist()),
        )
        _TABLE_INFO[chunks] = info
    return info


def _check_slots(args) -> int:
    """Validate the host views of the active slots; the pointer alignment (bytes) to promise."""
    align = _PTR_ALIGN
    for s, p in enumerate(args.param_tensors):
        if p is None:
            continue
        for t in (p, *args.state_tensors[s]):
            if t is None:
                continue
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device != args.grads.device:
                raise RuntimeError(
                    f"fused step: slot {s} needs contiguous float32 tensors on {args.grads.device}, got "
                    f"{t.dtype} {'contiguous' if t.is_contiguous() else 'non-contiguous'} on {t.device}"
                )
            while align > 1 and t.data_ptr() % align:
                align //= 2
    return align


def fused_step(args, *, block_n: int | None = None) -> None:
    """Apply ``args`` (a ``FusedStepArgs``): one launch over the slot chunks, in place.

    ``block_n`` overrides the configured block size (tests and tuning); any power of two is correct.
    """
    chunks = args.chunks
    K = chunks.num_chunks
    if K == 0:
        return
    grads = args.grads
    if grads.stride(1) != 1:  # the task buffer is contiguous; a strided view is read from a copy
        grads = grads.contiguous()
    T = grads.shape[0]
    cfg = _config.step_config(T)
    bn = int(block_n or cfg.block_n)
    info = _table_info(chunks, args.num_slots)
    ptr_div = _check_slots(args)
    w = args.slot_weights
    if w.dtype != torch.float32 or not w.is_contiguous():
        w = w.to(torch.float32).contiguous()
    hyper = args.hyper
    if hyper.dtype != torch.float32 or not hyper.is_contiguous():
        hyper = hyper.to(torch.float32).contiguous()
    out = args.grad_out
    if out is not None and (out.dim() != 1 or out.stride(0) != 1):
        raise RuntimeError(f"fused step: grad_out must be a contiguous 1-D tensor, got strides {out.stride()}")
    with _launch_context(grads):
        _fused_step_kernel[(K,)](
            grads, grads.stride(0), w, out if out is not None else grads,
            chunks.module, chunks.start, chunks.length, info.slot_start, args.active, hyper,
            args.param_ptr, args.state1_ptr, args.state2_ptr, args.state3_ptr,
            T=T, KIND=int(args.kind), HAS_OUT=out is not None, BLOCK_N=bn,
            COL_DIV=min(info.col_div, _COL_VEC, bn), LOC_DIV=min(info.loc_div, bn), PTR_DIV=ptr_div,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
