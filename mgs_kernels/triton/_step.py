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

Vector loads, per chunk. A chunk first peels a masked head of fewer than COL_VEC elements so that its
task-row column is a multiple of COL_VEC; the kernel then checks on the slot's pointer values (int64
tables, no host work) whether the parameter and every state it uses are 16-byte aligned at that
element. If so, the chunk's full blocks run unmasked with ``tl.multiple_of`` hints (16-byte state
vectors, COL_VEC-element task-row vectors when the row stride allows it); if not, the chunk runs
through the masked block code, correct for any alignment. One odd-sized or misaligned slot therefore
costs only its own chunks the vector path, not the whole table.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _fused_step as _fs
from . import _config
from ._launch import _launch_context


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

# The alignment the vector path needs: 16 bytes, one vector of 4 fp32 state elements.
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
    # A loop, not unrolled (compile time flat in T; the resident warps hide the load latency).
    row = grads_ptr  # pointer arithmetic: 64-bit offsets even when stride_t is an int32
    for t in tl.range(1, T):
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
def _aligned(ptr_int, loc):
    """The fp32 stream at data pointer ptr_int (int64; 0 = unused) is 16-byte aligned at element loc."""
    return (ptr_int == 0) | ((ptr_int + loc * 4) % 16 == 0)


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
    COL_VEC: tl.constexpr,  # elements of one task-row vector (a power of two dividing BLOCK_N)
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

    p_int = tl.load(param_tab + slot)
    s1_int = tl.load(s1_tab + slot)
    s2_int = tl.load(s2_tab + slot)
    s3_int = tl.load(s3_tab + slot)
    p_base = p_int.to(tl.pointer_type(tl.float32))
    s1_base = s1_int.to(tl.pointer_type(tl.float32))
    s2_base = s2_int.to(tl.pointer_type(tl.float32))
    s3_base = s3_int.to(tl.pointer_type(tl.float32))

    # Per chunk, not per table: a scalar head of < COL_VEC elements brings the task-row column to a
    # multiple of COL_VEC; if every fp32 stream of the slot is 16-byte aligned there too (checked here
    # on the pointer values), the full blocks after the head run unmasked with alignment hints (vector
    # loads and stores), else the whole chunk runs through the masked block code (scalar, correct for
    # any alignment). Only the head and the last partial block are masked on the vector path.
    head = tl.minimum((COL_VEC - s % COL_VEC) % COL_VEC, n)
    lv = loc + head
    vec = _aligned(p_int, lv) & _aligned(s1_int, lv) & _aligned(s2_int, lv) & _aligned(s3_int, lv)
    nfull = tl.where(vec, (n - head) // BLOCK_N, 0)
    lanes = tl.arange(0, BLOCK_N)
    all_ok = lanes < BLOCK_N
    sv = s + head
    p_v = tl.multiple_of(p_base + lv, 16)  # the promise holds wherever the loop below runs
    s1_v = tl.multiple_of(s1_base + lv, 16)
    s2_v = tl.multiple_of(s2_base + lv, 16)
    s3_v = tl.multiple_of(s3_base + lv, 16)
    for j in range(0, nfull):
        col = tl.multiple_of(sv + j * BLOCK_N, COL_VEC) + lanes
        li = j * BLOCK_N + lanes
        _step_block(
            grads_ptr, stride_t, w_row, out_ptr, col, p_v + li, s1_v + li, s2_v + li, s3_v + li,
            all_ok, maximize, wd_on, wd, lr_neg, has_mom, need_buf, first, nesterov, mom, dk,
            small_w1, w1, w1m1, beta2, omb2, eps, step_neg, bc2, amsgrad, decay_on, coupled_on, decay,
            T, KIND, HAS_OUT, False,
        )  # fmt: skip
    # Masked blocks: j = -1 is the head [0, a_len) (vector path only), j >= 0 the blocks of [b0, n).
    a_len = tl.where(vec, head, 0)
    b0 = a_len + nfull * BLOCK_N
    nb = (n - b0 + BLOCK_N - 1) // BLOCK_N
    for j in range(tl.where(a_len > 0, -1, 0), nb):
        off = tl.where(j < 0, 0, b0 + j * BLOCK_N) + lanes
        ok = off < tl.where(j < 0, a_len, n)
        col = s + off
        li = loc + off
        _step_block(
            grads_ptr, stride_t, w_row, out_ptr, col, p_base + li, s1_base + li, s2_base + li, s3_base + li,
            ok, maximize, wd_on, wd, lr_neg, has_mom, need_buf, first, nesterov, mom, dk,
            small_w1, w1, w1m1, beta2, omb2, eps, step_neg, bc2, amsgrad, decay_on, coupled_on, decay,
            T, KIND, HAS_OUT, True,
        )  # fmt: skip


@dataclass(frozen=True)
class _TableInfo:
    slot_start: torch.Tensor  # int64 [S] on the table's device (0 for a slot without chunks)


_TABLE_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _table_info(chunks, num_slots: int) -> _TableInfo:
    """Slot starts of a chunk table, from its host copy (no device read), cached per table."""
    info = _TABLE_INFO.get(chunks)
    if info is None:
        start, first = chunks.host["start"], chunks.host["first"]
        slot_start = torch.zeros(num_slots, dtype=torch.int64)
        has = first[1:] > first[:-1]
        slot_start[has] = start[first[:-1][has]]
        info = _TableInfo(slot_start=slot_start.to(chunks.start.device))
        _TABLE_INFO[chunks] = info
    return info


def _check_slots(args) -> int:
    """Validate the host views of the active slots (before anything is launched); returns the smallest
    power-of-two alignment (bytes, <= 16) of their pointers, for diagnostics: the kernel decides the
    vector path per chunk from the pointer values themselves."""
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
    if T > _config.max_tasks(grads.dtype):  # beyond the compiled-and-checked range: the plain-torch step
        _fs.reference_kernel(args)
        return
    cfg = _config.step_config(T)
    bn = int(block_n or cfg.block_n)
    info = _table_info(chunks, args.num_slots)
    _check_slots(args)
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
            T=T, KIND=int(args.kind), HAS_OUT=out is not None, BLOCK_N=bn, COL_VEC=min(_COL_VEC, bn),
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
