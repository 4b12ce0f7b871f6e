"""Visit-order tables for PCGrad: ``order[m, i]`` lists the tasks other than ``i`` in the order task
``i`` projects against them inside module ``m`` (docs/design.md section 2).

An order is given as "random", "fixed" or an explicit int64 table [M, T, T-1]; ``parse_order`` is the
one place that reads that spec, ``order_table`` turns it into a table on a device.

Explicit tables are validated when they live on the CPU (each row must list every other task exactly
once). A table on a GPU is not read back (that would be a host sync): there, an entry outside [0, T) or
equal to the visiting task is skipped (no projection step) by every backend, and a repeated entry
projects twice.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._errors import MGSInputError

OrderLike = Union[str, torch.Tensor]

_ORDER_SPEC = "order must be 'random', 'fixed' or an int64 tensor [M, T, T-1]"


def parse_order(order: OrderLike) -> OrderLike:
    """``order`` checked as a spec: the string "random" / "fixed", or a tensor (checked for shape later)."""
    if isinstance(order, torch.Tensor) or order in ("random", "fixed"):
        return order
    raise MGSInputError(f"{_ORDER_SPEC}, got {order!r}")


def random_order(
    num_modules: int,
    num_tasks: int,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """An independent uniform permutation of the other tasks per (module, task).

    Args:
        num_modules: M >= 0.
        num_tasks: T >= 1.
        generator: the random source; the table is drawn on the generator's device and moved to
            ``device``. Identical generator states give identical tables. Without a generator it is
            drawn on ``device`` itself (torch's default generator there), so no host copy is needed.
        device: where the returned table lives (default: the generator's device, or CPU).

    Returns:
        int64 tensor [M, T, T-1]. A table drawn on the CPU for a CUDA device is copied through pinned
        memory, asynchronously (no host synchronisation).
    """
    if num_modules < 0 or num_tasks < 1:
        raise MGSInputError(f"random_order needs num_modules >= 0 and num_tasks >= 1, got {num_modules}, {num_tasks}")
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    keys = torch.rand(num_modules, num_tasks, num_tasks, generator=generator, device=draw_device)
    # Task i must not visit itself: give it the largest key so it sorts last, then drop it.
    eye = torch.eye(num_tasks, dtype=torch.bool, device=draw_device)
    keys.masked_fill_(eye, 2.0)
    order = torch.argsort(keys, dim=-1, stable=True)[..., : num_tasks - 1].contiguous()
    if device is not None and torch.device(device) != order.device:
        if order.device.type == "cpu" and torch.device(device).type == "cuda":
            order = order.pin_memory()
        order = order.to(device, non_blocking=True)
    return order


def fixed_order(num_modules: int, num_tasks: int, *, device=None) -> torch.Tensor:
    """Ascending order of the other tasks, the same for every module: int64 [M, T, T-1]."""
    ar = torch.arange(num_tasks, device=device)
    # Row i is 0..T-1 without i: entries below i stay, entries from i on shift by one.
    cols = torch.arange(num_tasks - 1, device=device) if num_tasks > 1 else ar[:0]
    row = cols.unsqueeze(0) + (cols.unsqueeze(0) >= ar.unsqueeze(1)).long()
    return row.unsqueeze(0).expand(num_modules, num_tasks, num_tasks - 1).contiguous()


def check_order(order: torch.Tensor, num_modules: int, num_tasks: int, device: Optional[torch.device]) -> None:
    """An explicit table must be int64 [M, T, T-1] (on ``device`` when given). On the CPU each row is
    checked to be a permutation of the other tasks; a GPU table's values are not read (module docstring)."""
    if not isinstance(order, torch.Tensor):
        raise MGSInputError(f"{_ORDER_SPEC}, got {order!r}")
    want = (num_modules, num_tasks, max(num_tasks - 1, 0))
    if tuple(order.shape) != want:
        raise MGSInputError(f"order must have shape [M, T, T-1] = {list(want)}, got {tuple(order.shape)}")
    if order.dtype != torch.int64:
        raise MGSInputError(f"order must be int64, got dtype {order.dtype}")
    if device is not None and order.device != device:
        raise MGSInputError(f"order is on {order.device} but the gram matrices are on {device}")
    if order.device.type == "cpu" and order.numel():
        expected = fixed_order(1, num_tasks)[0]
        if not torch.equal(order.sort(dim=-1).values, expected.expand_as(order)):
            raise MGSInputError(
                "order[m, i] must list every task other than i exactly once (values in 0..T-1, no repeats)"
            )


def order_table(
    order: OrderLike,
    num_modules: int,
    num_tasks: int,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Turn ``order`` ("random" | "fixed" | tensor) into a checked int64 table [M, T, T-1] on ``device``."""
    order = parse_order(order)
    if isinstance(order, str):
        if order == "random":
            return random_order(num_modules, num_tasks, generator=generator, device=device)
        return fixed_order(num_modules, num_tasks, device=device)
    check_order(order, num_modules, num_tasks, device)
    return order
