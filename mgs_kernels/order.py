"""Visit-order tables for PCGrad: ``order[m, i]`` lists the tasks other than ``i`` in the order task
``i`` projects against them inside module ``m`` (DESIGN.md section 2)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._errors import MGSInputError

OrderLike = Union[str, torch.Tensor]


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
        generator: the random source; the table is drawn on the generator's device (CPU by default)
            and moved to ``device``. Identical generator states give identical tables.
        device: where the returned table lives (default: the generator's device, or CPU).

    Returns:
        int64 tensor [M, T, T-1].
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
        order = order.to(device, non_blocking=True)
    return order


def fixed_order(num_modules: int, num_tasks: int, *, device=None) -> torch.Tensor:
    """Ascending order of the other tasks, the same for every module: int64 [M, T, T-1]."""
    ar = torch.arange(num_tasks, device=device)
    # Row i is 0..T-1 without i: entries below i stay, entries from i on shift by one.
    cols = torch.arange(num_tasks - 1, device=device) if num_tasks > 1 else ar[:0]
    row = cols.unsqueeze(0) + (cols.unsqueeze(0) >= ar.unsqueeze(1)).long()
    return row.unsqueeze(0).expand(num_modules, num_tasks, num_tasks - 1).contiguous()


def check_order(order: torch.Tensor, num_modules: int, num_tasks: int, device: torch.device) -> None:
    """An explicit table must be int64 [M, T, T-1] on the gram's device. Values are the caller's
    responsibility when the table lives on a GPU (checking them would need a host sync); on the CPU
    each row is checked to be a permutation of the other tasks."""
    if not isinstance(order, torch.Tensor):
        raise MGSInputError(f"order must be 'random', 'fixed' or an int64 tensor [M, T, T-1], got {order!r}")
    want = (num_modules, num_tasks, max(num_tasks - 1, 0))
    if tuple(order.shape) != want:
        raise MGSInputError(f"order must have shape [M, T, T-1] = {list(want)}, got {tuple(order.shape)}")
    if order.dtype != torch.int64:
        raise MGSInputError(f"order must be int64, got dtype {order.dtype}")
    if order.device != device:
        raise MGSInputError(f"order is on {order.device} but the gram matrices are on {device}")
    if order.device.type == "cpu" and order.numel():
        expected = fixed_order(1, num_tasks)[0]
        if not torch.equal(order.sort(dim=-1).values, expected.expand_as(order)):
            raise MGSInputError(
                "order[m, i] must list every task other than i exactly once (values in 0..T-1, no repeats)"
            )


def resolve_order(
    order: OrderLike,
    num_modules: int,
    num_tasks: int,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Turn ``order`` ("random" | "fixed" | tensor) into a checked int64 table on ``device``."""
    if isinstance(order, str):
        if order == "random":
            return random_order(num_modules, num_tasks, generator=generator, device=device)
        if order == "fixed":
            return fixed_order(num_modules, num_tasks, device=device)
        raise MGSInputError(f"order must be 'random', 'fixed' or an int64 tensor [M, T, T-1], got {order!r}")
    check_order(order, num_modules, num_tasks, device)
    return order
