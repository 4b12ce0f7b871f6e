"""Split one micro-batch's backward into true per-task gradients, whatever loss the trainer computes.

Trainers compute ONE loss per micro-batch (often a mix of tasks) and call ``backward`` once. To get per-task
gradients without touching how the loss is computed or normalized, ``TaskSplitter`` cuts the autograd graph
at the model's output (a forward hook on the output embeddings, i.e. ``lm_head``):

    logits = lm_head(h)                   # the hook returns  leaf = logits.detach().requires_grad_()
    loss = trainer_loss(leaf, ...)        # the trainer's own code, unchanged
    loss.backward()                       # stops at the cut: leaf.grad = dloss/dlogits, no parameter touched
    splitter.flush()                      # for each task t present:
                                          #   with surgery.capture(t): logits.backward(leaf.grad * rows_of_t)

Every parameter influences the loss only through the logits, so by the chain rule the per-task backward
passes give exactly the gradient of each task's rows, and they sum exactly to the gradient the trainer's own
backward would have produced (any normalization, any loss: token mean over the accumulation window, per
sequence mean, GRPO/DAPO/Dr.GRPO, KL and entropy terms, label smoothing...). Cost: one forward, one backward
through the loss head, and one backward through the model per task present in the micro-batch (a
single-task micro-batch costs what the base trainer costs).

Limits (checked, not silent): a loss term that reaches parameters without passing through the output
embeddings (e.g. a MoE router auxiliary loss) raises; under DDP/FSDP the model can be backpropagated once per
forward, so every micro-batch must hold one task, the same on every rank (see ``README`` "Use it in your
trainer").
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._errors import MGSInputError
from ..stats import SurgeryStats
from ..surgery import ModularGradientSurgery


_ROW_OUTPUTS = ("logits", "log_probs", "entropy", "logps", "per_token_logps")


def _get(output, key):
    try:
        value = output[key] if isinstance(output, dict) else getattr(output, key, None)
    except (KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, torch.Tensor) else None


def _unwrap(model: nn.Module) -> nn.Module:
    inner = model
    for attr in ("module", "_orig_mod"):  # DDP / torch.compile wrappers
        while hasattr(inner, attr) and isinstance(getattr(inner, attr), nn.Module):
            inner = getattr(inner, attr)
    return inner


def output_module(model: nn.Module) -> nn.Module:
    """The module whose output the loss is computed from: ``get_output_embeddings()`` (``lm_head``)."""
    inner = _unwrap(model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise MGSInputError(
            f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None); pass "
            "output_module=<the module whose output the loss is computed from>"
        )
    return head


class TaskSplitter:
    """Per-task backward passes for micro-batches that mix tasks (see the module docstring).

    Usage (what the trainer integrations do)::

        splitter = TaskSplitter(surgery, model)
        with splitter.micro_batch(task_ids):     # [B] task id of every row of this micro-batch
            loss = trainer_loss(model(batch))    # any loss computed from the model's output
            loss.backward()                      # the trainer's own backward
        # leaving the block ran one capture window per task present
        stats = surgery.resolve()                # after the last micro-batch, before clipping

    Args:
        surgery: the ``ModularGradientSurgery`` the task gradients are captured into.
        model: the model (DDP-wrapped or not); its output embeddings are cut unless ``head`` is given.
        head: the module to cut at (its output's dim 0 must be the batch rows).
        tasks_fn: optional ``tasks_fn(local_tasks) -> tasks`` giving the task windows to run (e.g. the union
            over ranks, so windows line up); default: the tasks present, ascending.
    """

    def __init__(self, surgery: ModularGradientSurgery, model: nn.Module, head: Optional[nn.Module] = None,
                 tasks_fn=None):
        self.surgery = surgery
        self.head = head if head is not None else output_module(model)
        self.model = _unwrap(model)
        self.tasks_fn = tasks_fn
        self._rows: Optional[torch.Tensor] = None
        # one entry per cut forward: (outputs, leaves, first row)
        self._cuts: List[Tuple[List[torch.Tensor], List[torch.Tensor], int]] = []
        self._cursor = 0
        self._depth = 0
        self._head_cut = False
        self._handles = [
            self.head.register_forward_hook(self._head_hook),
            self.model.register_forward_pre_hook(self._model_pre_hook),
            self.model.register_forward_hook(self._model_hook),
        ]

    # -------------------------------------------------------------- the cut
    def _active(self) -> bool:
        return self._rows is not None and torch.is_grad_enabled()

    def _cut(self, outs: List[torch.Tensor]) -> List[torch.Tensor]:
        leaves = [o.detach().requires_grad_(True) for o in outs]
        self._cuts.append((outs, leaves, self._cursor))
        self._cursor += outs[0].shape[0]
        return leaves

    def _head_hook(self, module, args, out):
        # The usual cut: the logits, right where lm_head produces them (so lm_head's own gradient is per task).
        if not self._active() or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return None
        self._head_cut = True
        return self._cut([out])[0]

    def _model_pre_hook(self, module, args):
        if self._depth == 0:
            self._head_cut = False
        self._depth += 1

    def _model_hook(self, module, args, output):
        # Fallback when the model never calls lm_head as a module (fused head + log-prob kernels, e.g.
        # ``fused_lm_head=True`` in trl >= 1.x): cut the per-row outputs the loss is built from.
        self._depth -= 1
        if self._depth or self._head_cut or not self._active():
            return None
        keys = [k for k in _ROW_OUTPUTS if _get(output, k) is not None and _get(output, k).requires_grad]
        if not keys:
            return None
        leaves = self._cut([_get(output, k) for k in keys])
        for k, leaf in zip(keys, leaves):
            output[k] = leaf
        return output

    def set_rows(self, task_ids) -> None:
        """Declare the task of every row of the coming grad-enabled forward(s) (dim 0 of the head's output)."""
        rows = torch.as_tensor(task_ids).reshape(-1).to(torch.int64)
        T = self.surgery.num_tasks
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= T):
            raise MGSInputError(f"task ids must be in [0, {T}), got {sorted(set(rows.tolist()))}")
        if self._cuts:
            raise MGSInputError("set_rows() while a previous micro-batch was not flushed")
        self._rows = rows.cpu()
        self._cursor = 0

    @contextlib.contextmanager
    def micro_batch(self, task_ids) -> Iterator[None]:
        """Cut the graph for the forward(s) inside the block, and run the per-task backward passes on exit."""
        self.set_rows(task_ids)
        try:
            yield
        except BaseException:
            self.discard()
            raise
        self.flush()

    def discard(self) -> None:
        self._rows, self._cuts, self._cursor = None, [], 0

    def flush(self) -> List[int]:
        """Run one capture window per task over the cut outputs' gradients. Returns the tasks run."""
        rows, cuts = self._rows, self._cuts
        self.discard()
        if rows is None:
            return []
        pending = [(out, leaf.grad, start) for outs, leaves, start in cuts for out, leaf in zip(outs, leaves)
                   if leaf.grad is not None]
        if cuts and self._cursor_total(cuts) != rows.numel():
            raise MGSInputError(
                f"the micro-batch has {rows.numel()} rows but the model's output had "
                f"{self._cursor_total(cuts)} along dim 0 (padding-free / packed batches are not supported)"
            )
        local = sorted(set(rows.tolist()))
        tasks = list(self.tasks_fn(local)) if self.tasks_fn is not None else local
        if not pending:  # no grad-enabled forward, or the loss did not depend on the model's output
            return []
        self._check_no_stray_grads()
        for k, t in enumerate(tasks):
            outs, grads = [], []
            for out, grad, start in pending:
                mask = (rows[start : start + out.shape[0]] == t).to(grad.device, grad.dtype)
                outs.append(out)
                grads.append(grad * mask.view(-1, *([1] * (grad.dim() - 1))))
            with self.surgery.capture(t):
                if outs:
                    torch.autograd.backward(outs, grads, retain_graph=k < len(tasks) - 1)
        return tasks

    @staticmethod
    def _cursor_total(cuts) -> int:
        return sum(outs[0].shape[0] for outs, _, _ in cuts)

    def _check_no_stray_grads(self) -> None:
        for s in self.surgery.partition.slots:
            if s.param.grad is not None and self.surgery.capturing is None and not self.surgery.resolved:
                raise MGSInputError(
                    f"parameter {s.name} got a gradient outside the model's output (e.g. a MoE router auxiliary "
                    "loss, or a backward outside MGS): per-task gradients would be wrong. Disable that loss term "
                    "or wrap it in surgery.capture(task) yourself."
                )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StatsAccumulator:
    """Averages ``SurgeryStats.scalars()`` over the steps since the last log (one host sync per step logged)."""

    def __init__(self):
        self._pending: List[SurgeryStats] = []

    def add(self, stats: SurgeryStats) -> None:
        self._pending.append(stats)

    def pop(self) -> Dict[str, float]:
        if not self._pending:
            return {}
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for stats in self._pending:
            for k, v in stats.scalars().items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        self._pending = []
        return {k: sums[k] / counts[k] for k in sums}


def to_task_ids(values: Sequence, task_names: Optional[Sequence[str]], num_tasks: int) -> torch.Tensor:
    """Task ids from a column: ints in [0, num_tasks), or names looked up in ``task_names``."""
    if isinstance(values, torch.Tensor):
        ids = values.reshape(-1).to(torch.int64)
    else:
        out = []
        for v in values:
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, str):
                if task_names is None or v not in task_names:
                    raise MGSInputError(f"task {v!r} is a name: pass task_names=[...] that lists it ({task_names})")
                v = list(task_names).index(v)
            out.append(int(v))
        ids = torch.tensor(out, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_tasks):
        raise MGSInputError(f"task ids must be in [0, {num_tasks}), got {sorted(set(ids.tolist()))}")
    return ids
