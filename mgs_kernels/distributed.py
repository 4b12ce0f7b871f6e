"""Multi-GPU MGS on torch.distributed: FSDP2 (sharded) and DDP (replicated) models.

FSDP2: every rank holds a shard of every task gradient. It computes partial Gram matrices over what
it holds; ONE ``all_reduce(SUM)`` of the [M, T, T] float32 tensor over the shard group gives the exact
global Grams; every rank derives the same weights (same seed, same table) and combines its own shard
into the sharded ``.grad``. HSDP reduces over the shard dimension only (replicas hold equal shards).

DDP: DDP's own all-reduce leaves identical, rank-averaged task gradients on every rank, so the surgery
runs replicated: no communication beyond DDP's (see README "Multi-GPU" for why not sharded).

True per-task gradients need every rank to backpropagate the same task inside each capture window,
because the collective in backward (reduce-scatter / all-reduce) sums over ranks. ``aligned_schedule``
pads per-rank micro-batch lists so they line up; ``resolve()`` checks alignment (a hash of the
window sequence and of the module table, one 32-byte all-reduce) before anything is written.
"""

from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._errors import MGSInputError

_HASH_BITS = 20  # h < 2^20 so sums of h^2 over up to 2^23 ranks stay exact in int64


def _small_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (1 << _HASH_BITS)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def unwrap_ddp(model: torch.nn.Module) -> Tuple[torch.nn.Module, Optional[Any]]:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model.process_group
    return model, None


class DistContext:
    """How one surgery talks to the other ranks.

    Attributes:
        kind: "fsdp" (sharded DTensor parameters), "ddp" (a DistributedDataParallel model) or None.
        group: the process group the Gram matrices are summed over ("fsdp") or checked over ("ddp").
        check_alignment: whether ``resolve()`` verifies, with one tiny all-reduce, that every rank ran
            the same sequence of task windows.
    """

    def __init__(self, kind: Optional[str], group: Optional[Any], check_alignment: bool):
        self.kind = kind
        self.group = group
        self.check_alignment = check_alignment
        self._table_checked = False

    @staticmethod
    def detect(inner: torch.nn.Module, ddp_group: Optional[Any], named_params: Sequence[Tuple[str, torch.Tensor]],
               check_alignment: Optional[bool]) -> "DistContext":
        """The DistContext of a model (``inner`` is the module inside a DDP wrapper, if any)."""
        params = [p for _, p in named_params]
        sharded = [is_dtensor(p) for p in params]
        if any(sharded):
            if not all(sharded):
                names = [n for (n, _), s in zip(named_params, sharded) if not s][:3]
                raise MGSInputError(
                    "some trainable parameters are DTensors (FSDP2) and others are not; shard the whole model "
                    f"(fully_shard on the root) so every parameter is a DTensor (plain parameters at {names})"
                )
            group = _shard_group(params)
            return DistContext("fsdp", group, True if check_alignment is None else check_alignment)
        if ddp_group is not None:
            return DistContext("ddp", ddp_group, bool(check_alignment))
        return DistContext(None, None, False)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if self.kind else 1

    def reduce_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """Sum the partial Grams over the shard group (FSDP); DDP and single process: unchanged."""
        if self.kind == "fsdp" and self.world > 1:
            dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=self.group)
        return gram

    def verify(self, windows: Sequence[int], table_signature: str, device: torch.device) -> None:
        """Raise on every rank if ranks ran different task windows or built different module tables.

        One all-reduce of 4 int64 values (sum of h and of h^2 for two hashes h): all ranks agree
        exactly when (sum h)^2 == world * sum h^2.
        """
        if not self.kind or self.world == 1:
            return
        check_windows = self.check_alignment
        check_table = not self._table_checked
        if not (check_windows or check_table):
            return
        hw = _small_hash(",".join(map(str, windows))) if check_windows else 0
        ht = _small_hash(table_signature) if check_table else 0
        backend = dist.get_backend(self.group)
        dev = device if backend == "nccl" else torch.device("cpu")
        vals = torch.tensor([hw, hw * hw, ht, ht * ht], dtype=torch.int64, device=dev)
        dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=self.group)
        s_w, s_w2, s_t, s_t2 = vals.tolist()
        W = self.world
        if check_table and s_t * s_t != W * s_t2:
            raise MGSInputError(
                "the module table differs between ranks (names, sizes or partition); build the surgery from "
                "the same model and options on every rank"
            )
        self._table_checked = True
        if check_windows and s_w * s_w != W * s_w2:
            raise MGSInputError(
                f"ranks ran different sequences of capture windows (this rank: tasks {list(windows)}); every "
                "rank must backpropagate the same task inside each window, or the collective in backward mixes "
                "tasks across ranks. Use mgs_kernels.aligned_schedule to pad per-rank micro-batch lists."
            )


def _shard_group(params: Sequence[torch.Tensor]):
    """The process group over which parameters are sharded (HSDP: the shard mesh dimension only)."""
    from torch.distributed.tensor import Shard

    mesh = params[0].device_mesh
    placements = params[0].placements
    for p in params:
        if p.device_mesh != mesh or tuple(p.placements) != tuple(placements):
            raise MGSInputError(
                "all sharded parameters must share one device mesh and placements "
                f"(found {tuple(placements)} and {tuple(p.placements)})"
            )
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if len(shard_dims) != 1:
        raise MGSInputError(f"expected exactly one sharded mesh dimension, got placements {tuple(placements)}")
    return mesh.get_group(shard_dims[0])


def aligned_schedule(
    items: Sequence[Tuple[int, Any]],
    num_tasks: int,
    *,
    group: Optional[Any] = None,
) -> List[Tuple[int, Any, float]]:
    """Turn this rank's (task, micro-batch) list into a schedule every rank can run in lockstep.

    All ranks learn every rank's micro-batch count per task (one all-gather of T int64) and run
    ``max over ranks`` windows per task, tasks in ascending order. A rank short of micro-batches for a
    task pads with one of its own micro-batches at loss weight 0.0, so the collectives in backward line
    up while adding nothing to the gradient.

    Args:
        items: this rank's list of (task id, micro-batch); any order.
        num_tasks: T.
        group: process group (default: the world).

    Returns:
        list of (task, micro-batch, loss_weight) to run in order, one capture window each::

            for task, batch, w in mgs.aligned_schedule(local, T):
                with surgery.capture(task):
                    (w * loss_fn(model, batch)).backward()
    """
    counts = torch.zeros(num_tasks, dtype=torch.int64)
    per_task: List[List[Any]] = [[] for _ in range(num_tasks)]
    for task, item in items:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < num_tasks:
            raise MGSInputError(f"task id {task!r} out of range: num_tasks is {num_tasks}")
        per_task[task].append(item)
        counts[task] += 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        backend = dist.get_backend(group)
        if backend == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
            gathered = [g.to(dev) for g in gathered]
            dist.all_gather(gathered, counts.to(dev), group=group)
        else:
            dist.all_gather(gathered, counts, group=group)
        target = torch.stack([g.cpu() for g in gathered]).amax(0)
    else:
        target = counts
    if int(target.sum()) > 0 and not items:
        raise MGSInputError("this rank has no micro-batch to pad with while other ranks have some")
    filler = items[0][1] if items else None
    schedule: List[Tuple[int, Any, float]] = []
    for task in range(num_tasks):
        for k in range(int(target[task])):
            if k < len(per_task[task]):
                schedule.append((task, per_task[task][k], 1.0))
            else:
                schedule.append((task, per_task[task][0] if per_task[task] else filler, 0.0))
    return schedule
