"""Host side of the fused optimizer step: which optimizers qualify, torch-format optimizer state, and
the per-parameter ("slot") tables a backend kernel consumes.

A backend whose ``fused_step(args: FusedStepArgs) -> None`` is set gets one pass over the
task rows that, for every element n of an active slot s (a parameter with a gradient this step),
computes the combined gradient and applies the update in place (see ``reference_kernel``, the
definition of the arithmetic, float32 throughout)::

    g = sum_t slot_weights[s, t] * grads[t, n]          # clip coefficient already folded in
    if grad_out: grad_out[n] = g                         # keep_grads (in grad_out's dtype)
    if MAXIMIZE: g = -g
    SGD:   if WD: g += WD * p
           if HAS_MOMENTUM: buf = g if FIRST else MOMENTUM * buf + DAMPENING_KEEP * g
                            g = g + MOMENTUM * buf if NESTEROV else buf
           p -= LR * g
    ADAM:  if WD: (DECOUPLED) p *= DECAY   else g += WD * p
           m = lerp(m, g, ONE_MINUS_BETA1);  v = BETA2 * v + ONE_MINUS_BETA2 * g * g
           vv = max(vmax, v) -> vmax  if AMSGRAD else v
           p -= STEP_SIZE * m / (sqrt(vv) / BC2_SQRT + EPS)

Host-derived scalars (1 - beta, 1 - lr * wd, lr / bias_correction1, sqrt(bias_correction2)) are
computed in float64 exactly as torch computes them in Python, then stored as float32. ``lerp(a, b, w)``
is torch's: ``a + w * (b - a)`` for w < 0.5, else ``b - (b - a) * (1 - w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ._plan import ChunkTable
from .partition import ParamSlot, local_tensor

SGD_KIND, ADAM_KIND = 0, 1

# Columns of the per-slot hyper-parameter table (float32 [S, NUM_HYPER]); mirrored by the kernels.
LR, WD, MOMENTUM, DAMPENING_KEEP, NESTEROV, MAXIMIZE, FIRST, HAS_MOMENTUM = 0, 1, 2, 3, 4, 5, 6, 7
ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS, STEP_SIZE, BC2_SQRT, AMSGRAD, DECOUPLED, DECAY = range(8, 17)
NUM_HYPER = 17

# Elements per chunk of the slot chunk table (chunks never cross a parameter boundary).
SLOT_CHUNK = 1 << 14


@dataclass
class FusedStepArgs:
    """Everything a fused-step kernel needs (device tensors on the surgery's device).

    Attributes:
        kind: SGD_KIND or ADAM_KIND.
        grads: [T, N] task rows (fp32 / bf16 / fp16).
        chunks: ChunkTable over slots (``chunks.module`` is the slot id), built once per surgery.
        active: int32 [S] 1 where the slot is updated this step.
        slot_weights: float32 [S, T] combine weights of each slot's module, clip folded in.
        param_ptr, state1_ptr, state2_ptr, state3_ptr: int64 [S] data pointers (0 where unused) of the
            fp32 parameter and its state: SGD momentum_buffer / Adam exp_avg, exp_avg_sq, max_exp_avg_sq.
        hyper: float32 [S, NUM_HYPER].
        grad_out: [N] tensor to receive the combined gradient, or None.
        num_slots: S.
    """

    kind: int
    grads: torch.Tensor
    chunks: ChunkTable
    active: torch.Tensor
    slot_weights: torch.Tensor
    param_ptr: torch.Tensor
    state1_ptr: torch.Tensor
    state2_ptr: torch.Tensor
    state3_ptr: torch.Tensor
    hyper: torch.Tensor
    grad_out: Optional[torch.Tensor]
    num_slots: int
    # Host-side copies / views of the same data, for the reference kernel (no device reads) and tests.
    param_tensors: List[Optional[torch.Tensor]]
    state_tensors: List[List[Optional[torch.Tensor]]]
    active_host: List[bool]
    hyper_host: List[List[float]]


def _kind(optimizer) -> Optional[int]:
    if type(optimizer) is torch.optim.SGD:
        return SGD_KIND
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return ADAM_KIND
    return None


def _group_ok(group: dict, kind: int) -> bool:
    if group.get("differentiable") or group.get("capturable") or group.get("fused"):
        return False
    scalars = ["lr", "weight_decay"] + (["momentum", "dampening"] if kind == SGD_KIND else ["eps"])
    if any(isinstance(group.get(k), torch.Tensor) for k in scalars):
        return False
    if kind == ADAM_KIND and any(isinstance(b, torch.Tensor) for b in group["betas"]):
        return False
    return True


class FusedStep:
    """The fused optimizer step of one surgery: per-slot tables built once, per-step arguments on demand.

    Args:
        slots: the partition's parameter slots (``slot.start:slot.end`` in the task rows).
        device: the surgery's device (where the tables and the task rows live).
    """

    def __init__(self, slots: Sequence[ParamSlot], device: torch.device):
        self.slots = list(slots)
        self.device = device
        self._chunks: Optional[ChunkTable] = None
        self._slot_module: Optional[torch.Tensor] = None
        self._tables = None  # (host key, device tables) of the last step

    @property
    def chunks(self) -> ChunkTable:
        """Chunk table over the slots (``chunks.module`` is the slot id), built on first use."""
        if self._chunks is None:
            starts = torch.tensor([s.start for s in self.slots], dtype=torch.int64)
            lengths = torch.tensor([s.end - s.start for s in self.slots], dtype=torch.int64)
            self._chunks = ChunkTable.from_ranges(starts, lengths, SLOT_CHUNK, self.device)
        return self._chunks

    @property
    def slot_module(self) -> torch.Tensor:
        """int64 [S] on the device: the module of each slot."""
        if self._slot_module is None:
            self._slot_module = torch.tensor([s.module for s in self.slots], dtype=torch.int64, device=self.device)
        return self._slot_module

    def prepare(self, optimizer: torch.optim.Optimizer, grads: torch.Tensor, weights: torch.Tensor,
                touched: Sequence[bool], grad_out: Optional[torch.Tensor]) -> Optional[FusedStepArgs]:
        """FusedStepArgs for this step, creating optimizer state in torch's format; None when the
        optimizer or its settings are not covered (the caller then falls back to optimizer.step()).

        Args:
            optimizer: the torch optimizer to step.
            grads: [T, N] task rows.
            weights: float32 [M, T] combine weights (clip coefficient folded in).
            touched: [S] bools, slot s has a gradient this step.
            grad_out: [N] tensor to receive the combined gradient (keep_grads), or None.
        """
        kind = _kind(optimizer)
        if kind is None:
            return None
        slots = self.slots
        device = self.device
        group_of: Dict[int, dict] = {}
        for group in optimizer.param_groups:
            if not _group_ok(group, kind):
                return None
            for p in group["params"]:
                group_of[id(p)] = group
        in_partition = {id(s.param) for s in slots}
        for group in optimizer.param_groups:
            for p in group["params"]:
                # torch's step would update a parameter with a gradient that the surgery does not own.
                if id(p) not in in_partition and p.grad is not None:
                    return None
        active = [touched and id(s.param) in group_of for s, touched in zip(slots, touched)]
        for s, act in zip(slots, active):
            if act:
                local = local_tensor(s.param.detach())
                if (local.dtype != torch.float32 or local.device != device or local.is_complex()
                        or not local.is_contiguous()):
                    return None
                for value in optimizer.state.get(s.param, {}).values():  # existing state, e.g. after load_state_dict
                    if isinstance(value, torch.Tensor) and value.dim():
                        v = local_tensor(value)
                        if v.dtype != torch.float32 or v.device != device or not v.is_contiguous():
                            return None

        S = len(slots)
        # Plain lists, turned into tensors once: per-element tensor writes cost ~10 ms per step at S ~ 300.
        hyper_rows = [[0.0] * NUM_HYPER for _ in range(S)]
        ptr_rows = [[0] * S for _ in range(4)]
        param_tensors: List[Optional[torch.Tensor]] = [None] * S
        state_tensors: List[List[Optional[torch.Tensor]]] = [[None, None, None] for _ in range(S)]
        for i, (s, act) in enumerate(zip(slots, active)):
            if not act:
                continue
            p = s.param
            group = group_of[id(p)]
            state = optimizer.state[p]
            h = hyper_rows[i]
            h[LR] = group["lr"]
            h[WD] = group["weight_decay"]
            h[MAXIMIZE] = float(bool(group.get("maximize", False)))
            if kind == SGD_KIND:
                momentum = group["momentum"]
                h[MOMENTUM] = momentum
                h[DAMPENING_KEEP] = 1 - group["dampening"]
                h[NESTEROV] = float(bool(group["nesterov"]))
                states = [None, None, None]
                if momentum != 0:
                    h[HAS_MOMENTUM] = 1.0
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        h[FIRST] = 1.0
                        buf = torch.empty_like(p, memory_format=torch.preserve_format)
                        state["momentum_buffer"] = buf
                    states[0] = buf
            else:
                if len(state) == 0:
                    # torch keeps 'step' on the CPU when neither capturable nor fused (see Adam._init_group).
                    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                beta1, beta2 = group["betas"]
                lr, wd = group["lr"], group["weight_decay"]
                h[ONE_MINUS_BETA1], h[BETA2], h[ONE_MINUS_BETA2] = 1 - beta1, beta2, 1 - beta2
                h[EPS] = group["eps"]
                h[STEP_SIZE] = lr / (1 - beta1**step)
                h[BC2_SQRT] = (1 - beta2**step) ** 0.5
                h[AMSGRAD] = float(bool(group["amsgrad"]))
                decoupled = bool(group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW))
                h[DECOUPLED] = float(decoupled)
                h[DECAY] = 1 - lr * wd
                states = [state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq")]
            param_tensors[i] = local_tensor(p.detach())
            state_tensors[i] = [local_tensor(t) if t is not None else None for t in states]
            ptr_rows[0][i] = param_tensors[i].data_ptr()
            for k, t in enumerate(state_tensors[i]):
                if t is not None:
                    ptr_rows[k + 1][i] = t.data_ptr()

        hyper_host = torch.tensor(hyper_rows, dtype=torch.float64).to(torch.float32)
        active_dev, ptrs_dev, hyper_dev = self._device_tables(active, ptr_rows, hyper_host)
        return FusedStepArgs(
            kind=kind,
            grads=grads,
            chunks=self.chunks,
            active=active_dev,
            slot_weights=weights.float()[self.slot_module].contiguous(),
            param_ptr=ptrs_dev[0],
            state1_ptr=ptrs_dev[1],
            state2_ptr=ptrs_dev[2],
            state3_ptr=ptrs_dev[3],
            hyper=hyper_dev,
            grad_out=grad_out,
            num_slots=S,
            param_tensors=param_tensors,
            state_tensors=state_tensors,
            active_host=list(active),
            hyper_host=hyper_host.tolist(),
        )

    def _device_tables(self, active: List[bool], ptr_rows: List[List[int]], hyper_host: torch.Tensor):
        """(active int32 [S], pointers int64 [4, S], hyper float32 [S, NUM_HYPER]) on the device, re-uploaded
        only when they changed since the last step (SGD: only on the first steps). Unchanged tables are the
        same device tensors, so a step captured in a CUDA graph replays them; tables that change every step
        (Adam's bias corrections) cannot be captured, and say so."""
        key = (tuple(active), tuple(map(tuple, ptr_rows)), hyper_host)
        last = self._tables
        if last is not None and last[0][:2] == key[:2] and torch.equal(last[0][2], key[2]):
            return last[1]
        device = self.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "step() is being captured in a CUDA graph, but the optimizer's per-step hyper-parameters changed "
                "since the previous step (e.g. Adam's bias corrections): a replay would reuse stale values. "
                "Capture step() with SGD, or capture resolve() and step the optimizer with capturable=True."
            )

        def to_device(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

        tables = (to_device(torch.tensor(active, dtype=torch.int32)),
                  to_device(torch.tensor(ptr_rows, dtype=torch.int64)), to_device(hyper_host.clone()))
        self._tables = (key, tables)
        return tables

    def run(self, kernel: Callable[[FusedStepArgs], None], optimizer: torch.optim.Optimizer, grads: torch.Tensor,
            weights: torch.Tensor, touched: Sequence[bool], grad_out: Optional[torch.Tensor]) -> bool:
        """Run ``kernel`` (a backend's ``fused_step``) if the optimizer qualifies; True if it ran."""
        args = self.prepare(optimizer, grads, weights, touched, grad_out)
        if args is None:
            return False
        kernel(args)
        return True


def reference_kernel(args: FusedStepArgs) -> None:
    """The fused step in plain torch, slot by slot: the definition the native/Triton kernels match.

    Reads only the host copies of the tables (no device synchronisation)."""
    slots_active = args.active_host
    starts = args.chunks.host["start"].tolist()
    first = args.chunks.host["first"].tolist()
    for s, act in enumerate(slots_active):
        if not act:
            continue
        c0, c1 = first[s], first[s + 1]
        if c0 == c1:
            continue
        a = starts[c0]
        p = args.param_tensors[s].view(-1)
        b = a + p.numel()
        h = args.hyper_host[s]
        g = (args.slot_weights[s][:, None] * args.grads[:, a:b].float()).sum(0)
        if args.grad_out is not None:
            args.grad_out[a:b] = g
        if h[MAXIMIZE]:
            g = -g
        st = [t.view(-1) if t is not None else None for t in args.state_tensors[s]]
        if args.kind == SGD_KIND:
            if h[WD] != 0:
                g = g + h[WD] * p
            if h[HAS_MOMENTUM]:
                buf = st[0]
                if h[FIRST]:
                    buf.copy_(g)
                else:
                    buf.mul_(h[MOMENTUM]).add_(g, alpha=h[DAMPENING_KEEP])
                g = g + h[MOMENTUM] * buf if h[NESTEROV] else buf
            p.add_(g, alpha=-h[LR])
        else:
            m, v, vmax = st
            if h[WD] != 0:
                if h[DECOUPLED]:
                    p.mul_(h[DECAY])
                else:
                    g = g + h[WD] * p
            m.lerp_(g, h[ONE_MINUS_BETA1])
            v.mul_(h[BETA2]).addcmul_(g, g, value=h[ONE_MINUS_BETA2])
            if h[AMSGRAD]:
                torch.maximum(vmax, v, out=vmax)
                vv = vmax
            else:
                vv = v
            p.addcdiv_(m, vv.sqrt() / h[BC2_SQRT] + h[EPS], value=-h[STEP_SIZE])
