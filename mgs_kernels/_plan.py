"""Segment plans: a validated module offset table plus the device-side tables kernels need.

A plan is built once per offset table (one host read of the offsets, at most once per tensor and
version) and caches, per device, the tables backends derive from it (the chunk tables that split every
module into fixed-size pieces, the torch backend's block layout). Later calls with the same offsets
tensor reuse it: no host sync on the hot path.
"""

from __future__ import annotations

import threading
import weakref
from typing import Dict, Sequence, Tuple, Union

import torch

from ._errors import MGSInputError

OffsetsLike = Union[torch.Tensor, Sequence[int]]


class SegmentPlan:
    """A module table: ``offsets[m]:offsets[m+1]`` is module ``m`` of a flat length-``numel`` axis.

    Attributes:
        offsets_host: int64 CPU tensor [M+1], validated (starts at 0, non-decreasing, ends at numel).
        num_modules: M.
        numel: N.
        sizes_host: int64 CPU tensor [M], the module sizes.
    """

    def __init__(self, offsets_host: torch.Tensor):
        self.offsets_host = offsets_host
        self.num_modules = offsets_host.numel() - 1
        self.numel = int(offsets_host[-1]) if offsets_host.numel() else 0
        self.sizes_host = offsets_host[1:] - offsets_host[:-1]
        self._cache: Dict[object, object] = {}
        self._lock = threading.RLock()

    def cached(self, key, build):
        """``build()`` once per ``key`` for this plan (backend-private tables live here)."""
        value = self._cache.get(key)
        if value is None:
            with self._lock:
                value = self._cache.get(key)
                if value is None:
                    value = build()
                    self._cache[key] = value
        return value

    def chunk_table(self, chunk_size: int, device: torch.device) -> "ChunkTable":
        """Every module split into pieces of at most ``chunk_size`` elements (cached per size/device)."""
        device = torch.device(device)
        return self.cached(("chunks", int(chunk_size), device),
                           lambda: ChunkTable.build(self, int(chunk_size), device))


class ChunkTable:
    """Chunks of at most ``chunk_size`` elements, sorted by module, never crossing a module boundary.

    Attributes (all on ``device``):
        module: [K] int64 module id of each chunk.
        start: [K] int64 first element of each chunk.
        length: [K] int64 number of elements (1..chunk_size).
        per_module: [M] int64 number of chunks of each module (0 for an empty module).
        first: [M+1] int64 prefix sum of per_module (chunks of module m are first[m]:first[m+1]).
        num_chunks: K (a Python int).
        host: the same start / length / module / first tables as int64 CPU tensors (the table is
            built on the host; launchers that need host-side facts read these, never the device).
    """

    def __init__(self, chunk_size, module, start, length, per_module, first, num_chunks):
        self.chunk_size = chunk_size
        self.module = module
        self.start = start
        self.length = length
        self.per_module = per_module
        self.first = first
        self.num_chunks = num_chunks
        self.host: dict = {}

    @staticmethod
    def build(plan: SegmentPlan, chunk_size: int, device: torch.device) -> "ChunkTable":
        """Chunks of the plan's modules (which cover the flat axis)."""
        return ChunkTable.from_ranges(plan.offsets_host[:-1], plan.sizes_host, chunk_size, device)

    @staticmethod
    def from_ranges(starts: torch.Tensor, lengths: torch.Tensor, chunk_size: int,
                    device: torch.device) -> "ChunkTable":
        """Chunks of R ranges ``[starts[r], starts[r] + lengths[r])`` (int64 CPU tensors [R]); ranges need
        not cover the axis (e.g. parameter slots with alignment gaps between them). "module" r is range r."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        per_module = (lengths + chunk_size - 1) // chunk_size
        first = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(per_module, 0, out=first[1:])
        num_chunks = int(first[-1])
        module = torch.repeat_interleave(torch.arange(lengths.numel()), per_module)
        local = torch.arange(num_chunks, dtype=torch.int64) - first[:-1][module]
        start = starts[module] + local * chunk_size
        end = (starts + lengths)[module]
        length = torch.minimum(end - start, torch.tensor(chunk_size, dtype=torch.int64))
        table = ChunkTable(
            chunk_size,
            module.to(device),
            start.to(device),
            length.to(device),
            per_module.to(device),
            first.to(device),
            num_chunks,
        )
        table.host = {"start": start, "length": length, "module": module, "first": first}
        return table


# Plans are cached per offsets tensor object (by id, dropped when the tensor dies) and re-validated
# when the tensor's version counter changes (an in-place write to it).
_PLAN_CACHE: Dict[int, Tuple[int, int, SegmentPlan]] = {}
_CACHE_LOCK = threading.Lock()


def _validate_offsets_host(off: torch.Tensor, numel: int) -> None:
    if off.numel() < 1:
        raise MGSInputError("offsets must have at least one element (offsets[0] = 0), got an empty tensor")
    if int(off[0]) != 0:
        raise MGSInputError(f"offsets must start at 0, got offsets[0] = {int(off[0])}")
    if off.numel() > 1:
        steps = off[1:] - off[:-1]
        bad = torch.nonzero(steps < 0)
        if bad.numel():
            m = int(bad[0, 0])
            raise MGSInputError(
                f"offsets must be non-decreasing, but offsets[{m + 1}] = {int(off[m + 1])} < "
                f"offsets[{m}] = {int(off[m])}"
            )
    if int(off[-1]) != numel:
        raise MGSInputError(
            f"offsets must end at N = {numel} (the length of the flat gradient axis), "
            f"got offsets[-1] = {int(off[-1])}"
        )


def _offsets_to_host(offsets: OffsetsLike) -> torch.Tensor:
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
            raise MGSInputError(f"offsets must be an integer tensor (int64), got dtype {offsets.dtype}")
        if offsets.dim() != 1:
            raise MGSInputError(f"offsets must be 1-D [M+1], got shape {tuple(offsets.shape)}")
        return offsets.detach().to(device="cpu", dtype=torch.int64)
    try:
        values = list(offsets)
    except TypeError:
        raise MGSInputError(f"offsets must be a 1-D int64 tensor or a sequence of ints, got {type(offsets)}") from None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (
            isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point
        ):
            raise MGSInputError(f"offsets must hold integers, got {v!r} ({type(v).__name__})")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def get_plan(offsets: OffsetsLike, numel: int) -> SegmentPlan:
    """The validated, cached plan for ``offsets`` over an axis of ``numel`` elements.

    Raises MGSInputError on bad offsets. A tensor's first use reads it to the host once.
    """
    if isinstance(offsets, SegmentPlan):
        if offsets.numel != numel:
            raise MGSInputError(f"plan covers N = {offsets.numel} elements but grads have N = {numel}")
        return offsets
    if not isinstance(offsets, torch.Tensor):
        host = _offsets_to_host(offsets)
        _validate_offsets_host(host, numel)
        return SegmentPlan(host)
    key = id(offsets)
    version = offsets._version
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0] == version and hit[1] == numel:
        return hit[2]
    host = _offsets_to_host(offsets)
    _validate_offsets_host(host, numel)
    plan = SegmentPlan(host)
    with _CACHE_LOCK:
        if key not in _PLAN_CACHE:
            weakref.finalize(offsets, _PLAN_CACHE.pop, key, None)
        _PLAN_CACHE[key] = (version, numel, plan)
    return plan


def plan_from_sizes(sizes: Sequence[int]) -> SegmentPlan:
    """A plan from module sizes (host ints); used by the model-level API."""
    host = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    if len(sizes):
        torch.cumsum(torch.tensor(list(sizes), dtype=torch.int64), 0, out=host[1:])
    _validate_offsets_host(host, int(host[-1]))
    return SegmentPlan(host)
