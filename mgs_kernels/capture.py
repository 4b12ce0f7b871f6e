"""Where gradients enter and leave the flat buffers of a surgery.

``TaskCapture`` owns the [T, N] task buffer: inside ``window(task)`` every backward pass adds into row
``task``. Two modes:

- zero-copy (the buffer has the parameters' dtype, plain tensors): ``p.grad`` IS a view of the task's
  row, so autograd accumulates straight into the buffer. A pre-hook restores that view if someone set
  ``p.grad`` to None or replaced it; a post-accumulate hook folds an out-of-place accumulation
  (``create_graph=True``) back into the view and marks the parameter touched;
- copy (another buffer dtype, or FSDP2's DTensor gradients): gradients accumulate in ``p.grad`` as
  usual and are added into the row when the window closes.

``ResultGrads`` owns the [N] result buffer and points every touched ``p.grad`` at its slice.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch

from ._errors import MGSInputError
from .distributed import is_dtensor
from .partition import ParamSlot, local_tensor


# Row stride of the task buffer: a multiple of this many elements.
ROW_ALIGN = 64


class TaskCapture:
    """The [T, N] task-gradient buffer of a surgery and the hooks that fill it.

    Attributes:
        buffer: [T, N] tensor of ``dtype`` on ``device`` (row stride padded to a multiple of ROW_ALIGN);
            row t holds task t's gradient, laid out by the partition's slots.
        touched: [S] bools, slot s got a gradient from some task since the last reset.
        windows: the task of every window opened since the last reset (the alignment check's input).
        task: the task whose window is open, or None.
    """

    def __init__(self, slots: Sequence[ParamSlot], num_tasks: int, numel: int, dtype: torch.dtype,
                 device: torch.device, zero_copy: bool):
        self.slots = list(slots)
        self.num_tasks = num_tasks
        self.zero_copy = zero_copy
        # Rows start on multiples of ROW_ALIGN elements (the row stride is padded), so with the partition's
        # aligned slots every chunk of every row is 16-byte aligned for the kernels' vector loads.
        stride = -(-numel // ROW_ALIGN) * ROW_ALIGN
        self.buffer = torch.zeros(num_tasks, stride, dtype=dtype, device=device)[:, :numel]
        self._rows: List[List[torch.Tensor]] = [
            [self.buffer[t, s.start : s.end].view(s.shape) for s in self.slots] for t in range(num_tasks)
        ]
        self.touched: List[bool] = [False] * len(self.slots)
        self.windows: List[int] = []
        self.task: Optional[int] = None
        self._hooks = []
        if zero_copy:
            for i, s in enumerate(self.slots):
                self._hooks.append(s.param.register_hook(self._pre_hook(i)))
                self._hooks.append(s.param.register_post_accumulate_grad_hook(self._post_hook(i)))

    # Zero-copy mode keeps one invariant inside a window: p.grad IS the task row's view.
    def _pre_hook(self, index: int):
        def pre_hook(grad: torch.Tensor) -> None:
            if self.task is None:
                return None
            param = self.slots[index].param
            view = self._rows[self.task][index]
            current = param.grad
            if current is not view:
                if current is not None:
                    view.add_(current.detach())
                param.grad = view
            return None

        return pre_hook

    def _post_hook(self, index: int):
        def post_hook(param: torch.Tensor) -> None:
            if self.task is None:
                return  # a backward outside any capture window is none of our business
            self.touched[index] = True
            view = self._rows[self.task][index]
            if param.grad is not view:
                view.copy_(param.grad.detach())
                param.grad = view

        return post_hook

    @contextlib.contextmanager
    def window(self, task: int) -> Iterator[None]:
        """Every backward inside adds into row ``task`` (``task`` already checked by the caller)."""
        if self.task is not None:
            raise MGSInputError(f"capture({task}) inside capture({self.task}): windows cannot nest")
        self.task = task
        self.windows.append(task)
        views = self._rows[task]
        for s, view in zip(self.slots, views):
            s.param.grad = view if self.zero_copy else None
        try:
            yield
        finally:
            self.task = None
            if not self.zero_copy:
                for i, (s, view) in enumerate(zip(self.slots, views)):
                    grad = s.param.grad
                    if grad is not None:
                        view.add_(local_tensor(grad.detach()).reshape(view.shape))
                        self.touched[i] = True
            for s in self.slots:
                s.param.grad = None

    def mark_touched(self, touched: Optional[Sequence[bool]] = None) -> None:
        """Declare which slots hold a gradient (default: all) after writing the buffer's rows directly."""
        if touched is not None and len(touched) != len(self.slots):
            raise MGSInputError(f"touched has {len(touched)} entries for {len(self.slots)} parameter slots")
        self.touched = [True] * len(self.slots) if touched is None else [bool(t) for t in touched]

    def reset(self) -> None:
        """All task gradients back to zero, nothing touched, no windows."""
        self.buffer.zero_()
        self.touched = [False] * len(self.slots)
        self.windows = []

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class ResultGrads:
    """The [N] result buffer (allocated on first use) and ``p.grad`` views of it."""

    def __init__(self, slots: Sequence[ParamSlot], numel: int, dtype: torch.dtype, device: torch.device):
        self.slots = list(slots)
        self._numel, self._dtype, self._device = numel, dtype, device
        self._out: Optional[torch.Tensor] = None
        self._views: Optional[List[torch.Tensor]] = None

    @property
    def buffer(self) -> torch.Tensor:
        """[N] tensor the combined gradient lands in (persistent: ``p.grad`` are views of it). Zero-filled once:
        the alignment gaps between slots stay zero (the fused step writes only the slots)."""
        if self._out is None:
            self._out = torch.zeros(self._numel, dtype=self._dtype, device=self._device)
        return self._out

    def point_grads(self, touched: Sequence[bool]) -> None:
        """``p.grad`` = the parameter's slice of the result for touched slots, None for the others."""
        if self._views is None:
            # Built once; only parameters of another dtype than the buffer need a fresh cast each step.
            out = self.buffer
            views = []
            for s in self.slots:
                view = out[s.start : s.end].view(s.shape)
                if view.dtype == s.param.dtype and is_dtensor(s.param):
                    view = _like_dtensor(view, s.param)
                views.append(view)
            self._views = views
        for s, is_touched, view in zip(self.slots, touched, self._views):
            if not is_touched:
                s.param.grad = None
            elif view.dtype == s.param.dtype:
                s.param.grad = view
            else:
                cast = view.to(s.param.dtype)
                s.param.grad = _like_dtensor(cast, s.param) if is_dtensor(s.param) else cast

    def clear_grads(self) -> None:
        for s in self.slots:
            s.param.grad = None


def _like_dtensor(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard as a DTensor with ``param``'s mesh, placements and global shape."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
