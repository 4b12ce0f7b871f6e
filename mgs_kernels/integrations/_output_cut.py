"""Per-task backward passes from a graph cut at a model's OUTPUT, with one task per output element.

``TaskSplitter`` (``_split``) cuts at ``lm_head`` and gives every row of dim 0 one task. Two things break that
inside an FSDP2 trainer such as verl's engine:

- ``lm_head`` lives in the root FSDP2 unit, whose post-forward hook registers the root pre-backward hook on
  whatever the root returns: cut at ``lm_head`` and that hook lands on the detached leaf, so every later
  per-task backward runs without the root's unshard ("storage of size 0"). ``OutputCut`` hooks the model's
  ``forward`` AFTER every hook registered before it (FSDP2's included) and swaps the returned ``logits`` (or
  ``log_probs`` / ``entropy`` of a fused head) for detached leaves, so FSDP2's hooks sit on the real tensors.
- padding-free batches pack every sequence into ONE row of shape (1, total_tokens): a task per token, built
  from the sequence lengths (the packing metadata, i.e. the differences of ``cu_seqlens``).

Per micro-batch::

    cut.arm(row_tasks, row_lengths)   # [B] task of every sequence (-1: none), [B] tokens (packed) or None
    loss = trainer_loss(model(...))   # the trainer's own forward and loss; the output is cut
    check_loss_graph(loss, cut.leaves)  # nothing reaches a parameter except through the cut
    loss.backward()                   # stops at the cut: leaf.grad = dloss/doutput
    cut.flush(tasks)                  # one capture window per task in ``tasks`` (any task, even absent here)

``flush`` runs one backward per task listed, masking the output gradient to that task's elements; a task
with no element here runs with a zero gradient. That is what keeps ranks in lockstep under FSDP2 (every
backward is a reduce-scatter): every rank passes the same ``tasks`` (``union_tasks``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .._errors import MGSInputError
from ..surgery import ModularGradientSurgery

CUT_KEYS = ("logits", "log_probs", "entropy")


def _get(output, key: str) -> Optional[torch.Tensor]:
    try:
        value = output[key] if isinstance(output, dict) else getattr(output, key, None)
    except (KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, torch.Tensor) else None


def check_loss_graph(loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> None:
    """Raise if ``loss`` reaches a tensor that requires grad other than the cut ``leaves``.

    Walks ``loss``'s autograd graph on the host (no device work) and stops at leaves: the graph of a loss
    built from the cut output holds only the loss head, a few dozen nodes. A loss term that reaches a
    parameter without passing through the cut (e.g. a MoE router auxiliary loss) would put a gradient in no
    task's window, so it is refused before any backward runs.
    """
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return
    allowed = {id(leaf) for leaf in leaves}
    seen = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf that requires grad
            if id(variable) not in allowed:
                shape = tuple(variable.shape)
                raise MGSInputError(
                    f"the loss reaches a tensor of shape {shape} that requires grad without passing through the "
                    "model's output (e.g. a MoE router auxiliary loss, or a parameter used outside the model): "
                    "its gradient would belong to no task. Disable that loss term."
                )
            continue
        stack.extend(fn for fn, _ in node.next_functions)


class OutputCut:
    """Cut a model's output; run one masked backward per task (see the module docstring).

    Args:
        surgery: the ``ModularGradientSurgery`` the task gradients are captured into.
        model: the module whose ``forward`` output is cut (register after FSDP2's ``fully_shard``).
        keys: output entries cut when present and requiring grad (dim 0 rows, or (1, tokens) when packed).
    """

    def __init__(self, surgery: ModularGradientSurgery, model: nn.Module, keys: Sequence[str] = CUT_KEYS):
        self.surgery = surgery
        self.keys = tuple(keys)
        self._rows: Optional[torch.Tensor] = None
        self._lengths: Optional[torch.Tensor] = None
        self._outs: List[torch.Tensor] = []
        self._leaves: List[torch.Tensor] = []
        self._handle = model.register_forward_hook(self._hook)

    @property
    def leaves(self) -> List[torch.Tensor]:
        """The detached leaves the loss was computed from (empty before the cut forward)."""
        return list(self._leaves)

    @property
    def pending(self) -> bool:
        """True between ``arm()`` and ``flush()`` / ``discard()``."""
        return self._rows is not None

    def arm(self, row_tasks: torch.Tensor, row_lengths: Optional[torch.Tensor] = None) -> None:
        """Declare the coming grad-enabled forward.

        Args:
            row_tasks: int64 [B], the task of every sequence (-1: belongs to no task).
            row_lengths: int64 [B], the tokens of every sequence when the batch is packed into one row
                (output (1, L, ...), L >= sum; the tail past the sum is padding), or None when every
                sequence is a row of the output (output (B, ...)).
        """
        if self._rows is not None:
            raise MGSInputError("arm() while the previous micro-batch was not flushed")
        rows = torch.as_tensor(row_tasks).reshape(-1).to(torch.int64).cpu()
        if row_lengths is not None:
            row_lengths = torch.as_tensor(row_lengths).reshape(-1).to(torch.int64).cpu()
            if row_lengths.numel() != rows.numel():
                raise MGSInputError(f"{rows.numel()} task ids but {row_lengths.numel()} sequence lengths")
        self._rows, self._lengths = rows, row_lengths

    def discard(self) -> None:
        self._rows, self._lengths, self._outs, self._leaves = None, None, [], []

    def _hook(self, module, args, output):
        if self._rows is None or not torch.is_grad_enabled():
            return None
        if self._outs:
            raise MGSInputError("more than one grad-enabled forward of the model in one micro-batch")
        found = [(k, _get(output, k)) for k in self.keys]
        found = [(k, t) for k, t in found if t is not None and t.requires_grad]
        if not found:
            raise MGSInputError(f"the model's output has none of {list(self.keys)} requiring grad: nothing to cut")
        for key, out in found:
            leaf = out.detach().requires_grad_(True)
            output[key] = leaf
            self._outs.append(out)
            self._leaves.append(leaf)
        return output

    @staticmethod
    def _task_map(out: torch.Tensor, rows: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """int64 task id of every element of ``out``'s leading dims, broadcastable against ``out``."""
        if lengths is None:
            if out.dim() < 1 or out.shape[0] != rows.numel():
                raise MGSInputError(
                    f"the micro-batch has {rows.numel()} sequences but the model's output has shape "
                    f"{tuple(out.shape)} (expected one row per sequence)"
                )
            return rows.to(out.device, non_blocking=True)
        total = int(lengths.sum())
        if out.dim() < 2 or out.shape[0] != 1 or out.shape[1] < total:
            raise MGSInputError(
                f"packed micro-batch of {total} tokens but the model's output has shape {tuple(out.shape)} "
                "(expected (1, tokens, ...))"
            )
        per_token = torch.repeat_interleave(rows, lengths)
        if out.shape[1] > total:  # tail padding (verl's pad_to_length) belongs to no task
            per_token = torch.cat([per_token, per_token.new_full((out.shape[1] - total,), -1)])
        return per_token.view(1, -1).to(out.device, non_blocking=True)

    def flush(self, tasks: Sequence[int]) -> int:
        """One capture window per task in ``tasks`` over the cut outputs' gradients; returns the count.

        Every listed task runs a backward, with a zero output gradient where it has no element, so that
        ranks passing the same ``tasks`` run the same collectives.
        """
        outs, leaves, rows, lengths = self._outs, self._leaves, self._rows, self._lengths
        self.discard()
        maps = [self._task_map(out, rows, lengths) for out in outs] if rows is not None else []
        tasks = list(tasks)
        if not tasks:
            return 0
        if not outs:
            raise MGSInputError("no grad-enabled forward of the model was cut in this micro-batch")
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        for k, task in enumerate(tasks):
            masked = []
            for grad, task_map in zip(grads, maps):
                mask = (task_map == task).to(grad.dtype)
                masked.append(grad * mask.view(*mask.shape, *([1] * (grad.dim() - mask.dim()))))
            with self.surgery.capture(task):
                torch.autograd.backward(outs, masked, retain_graph=k < len(tasks) - 1)
        return len(tasks)

    def remove(self) -> None:
        self._handle.remove()
        self.discard()


def union_tasks(local_tasks: Sequence[int], num_tasks: int, group=None, error: bool = False,
                device: Optional[torch.device] = None) -> Tuple[List[int], bool]:
    """The tasks present on ANY rank of ``group`` (ascending), and whether any rank flagged an error.

    One all-reduce (MAX) of T + 1 int64 values; on a CPU tensor when the group has a gloo backend (verl's
    default ``cpu:gloo,cuda:nccl``), so no device sync; otherwise on ``device`` (one small copy back).
    Single process: no communication.
    """
    present = torch.zeros(num_tasks + 1, dtype=torch.int64)
    for t in local_tasks:
        present[t] = 1
    present[num_tasks] = int(error)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        backend = str(dist.get_backend(group))
        if "gloo" in backend:
            dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
        else:  # device-only backend (nccl): one small copy back to the host
            on_device = present.to(device)
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=group)
            present = on_device.cpu()
    flags = present.tolist()
    return [t for t in range(num_tasks) if flags[t]], bool(flags[num_tasks])
