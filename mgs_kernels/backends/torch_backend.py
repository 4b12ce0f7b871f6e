"""Pure-PyTorch backend: vectorized over modules and tasks, no host sync, works on any device.

It is the portable fallback and the model the fused kernels are checked against for semantics.

PCGrad weights come from the one Python definition of the solve (``mgs_kernels.weighting.pcgrad``),
in float32.

Layout trick: the flat axis is cut into fixed-size blocks of B elements. A block inside one module is
read through a zero-copy view ([T, K, B]) and multiplied with ``bmm``; only the few blocks that straddle
a module boundary (and the tail) are gathered, as per-module "pieces". Per-block / per-piece partial
Grams are summed into modules with ``segment_reduce`` in a fixed order (no atomics), batch by batch so
temporaries stay bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._plan import SegmentPlan
from ..weighting.pcgrad import pcgrad_weights
from .base import Backend

# Rough number of fp32 temporaries per batch.
BATCH_ELEMS = 1 << 24
MIN_BLOCK, MAX_BLOCK = 256, 16384


@dataclass
class _Blocks:
    """Host-built, device-resident tables of the block layout (one per plan and device)."""

    B: int
    K: int  # full blocks
    interior: torch.Tensor  # bool [K]: block lies inside one module
    owner: torch.Tensor  # int64 [K]: module of the block's first element (non-decreasing)
    owner_lo: torch.Tensor  # int64 [M]: blocks owned by m are owner_lo[m]:owner_hi[m]
    owner_hi: torch.Tensor
    p_start: torch.Tensor  # int64 [P]: pieces (parts of boundary blocks and the tail, one module each)
    p_len: torch.Tensor
    p_module: torch.Tensor
    p_lo: torch.Tensor  # int64 [M]: pieces of m are p_lo[m]:p_hi[m]
    p_hi: torch.Tensor
    p_pos: torch.Tensor  # int64 [E]: flat positions covered by pieces
    p_src: torch.Tensor  # int64 [E]: their index in the padded [P, B] piece layout
    P: int


def _block_size(plan: SegmentPlan) -> int:
    # Boundary pieces cover at most (2M+1) blocks' worth of elements: keep that to ~1/8 of N.
    target = plan.numel // (16 * plan.num_modules + 8)
    b = MIN_BLOCK
    while b * 2 <= min(target, MAX_BLOCK):
        b *= 2
    return b


def _build_blocks(plan: SegmentPlan, device: torch.device) -> _Blocks:
    off = plan.offsets_host
    N, M = plan.numel, plan.num_modules
    B = _block_size(plan)
    K = N // B
    first = torch.arange(K, dtype=torch.int64) * B
    mod_first = torch.searchsorted(off, first, right=True) - 1
    mod_last = torch.searchsorted(off, first + B - 1, right=True) - 1
    interior = mod_first == mod_last
    ms = torch.arange(M, dtype=torch.int64)
    owner_lo = torch.searchsorted(mod_first, ms, right=False)
    owner_hi = torch.searchsorted(mod_first, ms, right=True)
    # Regions not covered by interior blocks: boundary blocks and the tail, split at module edges.
    bounds = off.tolist()
    regions = [(k * B, k * B + B) for k in torch.nonzero(~interior).flatten().tolist()]
    if K * B < N:
        regions.append((K * B, N))
    starts, lens, mods = [], [], []
    for a, b in regions:
        m = int(torch.searchsorted(off, torch.tensor(a), right=True)) - 1
        while a < b:
            end = min(b, bounds[m + 1])
            if end > a:
                starts.append(a)
                lens.append(end - a)
                mods.append(m)
            a = end
            m += 1
    p_start = torch.tensor(starts, dtype=torch.int64)
    p_len = torch.tensor(lens, dtype=torch.int64)
    p_module = torch.tensor(mods, dtype=torch.int64)
    P = len(starts)
    if P:
        p_pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
        p_src = torch.cat([torch.arange(i * B, i * B + n) for i, n in enumerate(lens)])
    else:
        p_pos = p_src = torch.zeros(0, dtype=torch.int64)
    p_lo = torch.searchsorted(p_module, ms, right=False)
    p_hi = torch.searchsorted(p_module, ms, right=True)
    to = lambda t: t.to(device)  # noqa: E731
    return _Blocks(B, K, to(interior), to(mod_first), to(owner_lo), to(owner_hi), to(p_start), to(p_len),
                   to(p_module), to(p_lo), to(p_hi), to(p_pos), to(p_src), P)


def _blocks(plan: SegmentPlan, device: torch.device) -> _Blocks:
    return plan.cached(("torch_blocks", device), lambda: _build_blocks(plan, device))


def _segment_lengths(lo: torch.Tensor, hi: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Rows of [k0, k1) owned by each module, given its row range lo:hi (device ops, no sync)."""
    return torch.clamp(hi, k0, k1) - torch.clamp(lo, k0, k1)


def _piece_batches(grads: torch.Tensor, t: _Blocks):
    """Yield (p0, p1, x [T, pb, B] float32) for the gathered pieces, padding lanes zeroed."""
    T = grads.shape[0]
    lane = torch.arange(t.B, device=grads.device)
    step = max(1, BATCH_ELEMS // (T * t.B))
    for p0 in range(0, t.P, step):
        p1 = min(p0 + step, t.P)
        length = t.p_len[p0:p1, None]
        # Padding lanes repeat the piece's last element (never another module's) and are zeroed with
        # where(), not a multiply, so an Inf elsewhere cannot leak in as NaN.
        idx = t.p_start[p0:p1, None] + torch.minimum(lane, length - 1)
        x = torch.where(lane < length, grads[:, idx].float(), 0.0)
        yield p0, p1, x


def _block_batches(grads: torch.Tensor, t: _Blocks):
    """Yield (k0, k1, x [T, kb, B] float32) over full blocks, read through a zero-copy view."""
    T = grads.shape[0]
    view = grads[:, : t.K * t.B].view(T, t.K, t.B)
    step = max(1, BATCH_ELEMS // (T * t.B))
    for k0 in range(0, t.K, step):
        k1 = min(k0 + step, t.K)
        yield k0, k1, view[:, k0:k1].float()


def segmented_gram(grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """float32 [M, T, T]: per-module Gram matrices, per-block partials reduced in a fixed order."""
    T = grads.shape[0]
    M = plan.num_modules
    gram = torch.zeros(M, T * T, dtype=torch.float32, device=grads.device)
    if M == 0 or plan.numel == 0:
        return gram.view(M, T, T)
    t = _blocks(plan, grads.device)
    for k0, k1, x in _block_batches(grads, t):
        partial = torch.matmul(x.permute(1, 0, 2), x.permute(1, 2, 0))  # [kb, T, T]
        partial = torch.where(t.interior[k0:k1, None, None], partial, 0.0)  # boundary blocks: pieces
        lengths = _segment_lengths(t.owner_lo, t.owner_hi, k0, k1)
        gram += torch.segment_reduce(partial.reshape(k1 - k0, T * T), "sum", lengths=lengths, unsafe=True)
    for p0, p1, x in _piece_batches(grads, t):
        partial = torch.matmul(x.permute(1, 0, 2), x.permute(1, 2, 0))
        lengths = _segment_lengths(t.p_lo, t.p_hi, p0, p1)
        gram += torch.segment_reduce(partial.reshape(p1 - p0, T * T), "sum", lengths=lengths, unsafe=True)
    return gram.view(M, T, T)


def _weighted_rows(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R, B] = sum_t w[r, t] * x[t, r, :] for w [R, T], x [T, R, B] (a batched GEMV)."""
    return torch.bmm(w.unsqueeze(1), x.permute(1, 0, 2)).squeeze(1)


def segmented_combine(grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = sum_k weights[m(n), k] * grads[k, n], fp32 accumulation.

    ``out`` may be a row of ``grads``: pieces are computed before any block is written, and every
    block is read completely before it is written.
    """
    if plan.numel == 0:
        return
    t = _blocks(plan, grads.device)
    w = weights.float()
    pieces = [_weighted_rows(w[t.p_module[p0:p1]], x).reshape(-1) for p0, p1, x in _piece_batches(grads, t)]
    out_blocks = out[: t.K * t.B].view(t.K, t.B)
    for k0, k1, x in _block_batches(grads, t):
        # Boundary blocks get a placeholder here and are overwritten by their pieces below.
        out_blocks[k0:k1].copy_(_weighted_rows(w[t.owner[k0:k1]], x))
    if pieces:
        values = torch.cat(pieces)[t.p_src].to(out.dtype)
        out.index_copy_(0, t.p_pos, values)


class TorchBackend(Backend):
    """Vectorized PyTorch on any device, any task count: the portable fallback dispatch routes to."""

    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu", "meta")

    def supports(self, device: torch.device) -> bool:
        return True

    def segmented_gram(self, grads, plan):
        return segmented_gram(grads, plan)

    def pcgrad_weights(self, gram, order, eps):
        return pcgrad_weights(gram.float(), order, eps)

    def segmented_combine(self, grads, plan, weights, out):
        segmented_combine(grads, plan, weights, out)


BACKEND = TorchBackend()
