"""Module partitions: which parameters form one surgery module, and where each lives in the flat buffer.

Partitions are built from ``model.named_parameters()`` (trainable parameters only, tied weights once):

- ``"tensor"``: every parameter its own module (the released MGS code).
- ``"module"``: inside each transformer block, the attention parameters, the MLP parameters, and the
  block's norms form one module each (the paper's modules); outside the blocks (embeddings, final
  norm, lm_head, ...) one module per owning submodule.
- ``"layer"``: one module per block; outside the blocks as for ``"module"``.
- ``"global"``: one module (plain PCGrad over the whole model, "GGS").
- a callable ``name -> key``: parameters with equal keys form one module, named ``str(key)``.

A block is found structurally: the outermost ``<container>.<index>`` path whose container is an
``nn.ModuleList`` / ``nn.Sequential`` (``model.layers.3`` in Llama / Qwen2 / Mistral, ``transformer.h.3``
in GPT-2).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._errors import MGSInputError
from ._plan import SegmentPlan, plan_from_sizes

PartitionSpec = Union[str, Callable[[str], object]]
ExcludeSpec = Optional[Union[str, "re.Pattern[str]", Callable[[str], bool], Iterable]]

_NORM_NAME = re.compile(r"(^|_)ln(_?\d+)?($|_)|norm", re.IGNORECASE)  # ln_1 / ln_f (GPT-2), *norm*
_ATTN_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_NAME = re.compile(r"mlp|ffn|feed_?forward|moe|experts|dense_?h", re.IGNORECASE)


# Elements between slot starts are a multiple of this (16 elements: 64 bytes of fp32, 32 of bf16 / fp16).
SLOT_ALIGN = 16


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass
class ParamSlot:
    """Where one parameter lives: ``buffer[:, start:end].view(shape)`` (``start`` a multiple of SLOT_ALIGN).

    ``shape`` is the parameter's local shape: its own shape, or for a sharded DTensor parameter
    (FSDP2) the shape of this rank's shard, which may be empty.
    """

    name: str
    param: nn.Parameter
    module: int
    start: int
    end: int
    shape: torch.Size


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of ``t``: ``t.to_local()`` for a DTensor, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@dataclass
class Partition:
    """A model's parameters grouped into modules, laid out module by module in a flat axis.

    Attributes:
        names: [M] module names.
        kinds: [M] module types ("attn", "mlp", "norm", "embed", "head", "other", "mixed").
        layers: [M] index of the transformer block holding the module (None outside blocks or when
            a module spans several blocks).
        excluded: [M] True where the module gets the plain sum (no surgery).
        slots: every trainable parameter with its module and flat range, in buffer order.
        plan: the validated segment plan (offsets) of the flat axis.
    """

    names: List[str]
    kinds: List[str]
    layers: List[Optional[int]]
    excluded: List[bool]
    slots: List[ParamSlot]
    plan: SegmentPlan

    @property
    def num_modules(self) -> int:
        return len(self.names)

    @property
    def numel(self) -> int:
        return self.plan.numel

    @property
    def offsets(self) -> torch.Tensor:
        """int64 CPU tensor [M+1]."""
        return self.plan.offsets_host


def _find_block(name: str, modules: Dict[str, nn.Module]) -> Optional[Tuple[str, List[str]]]:
    """(block path, remaining name components) for the outermost indexed container, or None."""
    parts = name.split(".")
    for k in range(1, len(parts) - 1):
        if parts[k].isdigit() and isinstance(modules.get(".".join(parts[:k])), (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[: k + 1]), parts[k + 1 :]
    return None


def _block_index(name: str, modules: Dict[str, nn.Module]) -> Optional[int]:
    block = _find_block(name, modules)
    return int(block[0].rsplit(".", 1)[-1]) if block is not None else None


def _child_kind(child_name: str, child: Optional[nn.Module]) -> str:
    cls = type(child).__name__ if child is not None else ""
    if _NORM_NAME.search(child_name) or "norm" in cls.lower():
        return "norm"
    if _ATTN_NAME.search(child_name) or "attention" in cls.lower():
        return "attn"
    if _MLP_NAME.search(child_name) or re.search(r"mlp|feedforward|moe", cls, re.IGNORECASE):
        return "mlp"
    return "other"


def _outer_kind(owner_name: str, owner: Optional[nn.Module]) -> str:
    if isinstance(owner, nn.Embedding) or "embed" in owner_name.lower() or owner_name.endswith("wte") or owner_name.endswith("wpe"):
        return "embed"
    if "norm" in type(owner).__name__.lower() or _NORM_NAME.search(owner_name.rsplit(".", 1)[-1]):
        return "norm"
    if "head" in owner_name.lower():
        return "head"
    return "other"


def _classify(name: str, modules: Dict[str, nn.Module], granularity: str) -> Tuple[str, str]:
    """(module key, module kind) of parameter ``name`` for the "module" / "layer" / "tensor" partitions."""
    block = _find_block(name, modules)
    if block is not None:
        path, rest = block
        if len(rest) == 1:  # a parameter held directly by the block
            kind = _child_kind(rest[0], None)
            return (path if granularity != "tensor" else name), kind
        child_name = rest[0]
        kind = _child_kind(child_name, modules.get(f"{path}.{child_name}"))
        if granularity == "tensor":
            return name, kind
        if granularity == "layer":
            return path, kind
        if kind == "norm":
            return f"{path}.norm", kind
        return f"{path}.{child_name}", kind
    owner_name = name.rsplit(".", 1)[0] if "." in name else name
    kind = _outer_kind(owner_name, modules.get(owner_name))
    return (name if granularity == "tensor" else owner_name), kind


def _matcher(exclude: ExcludeSpec) -> List[Tuple[object, Callable[[str], bool]]]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, re.Pattern)) or callable(exclude):
        exclude = [exclude]
    rules = []
    for pat in exclude:
        if isinstance(pat, str):
            rules.append((pat, lambda s, p=pat: fnmatch.fnmatchcase(s, p)))
        elif isinstance(pat, re.Pattern):
            rules.append((pat.pattern, lambda s, p=pat: p.search(s) is not None))
        elif callable(pat):
            rules.append((pat, pat))
        else:
            raise MGSInputError(f"exclude entries must be glob strings, compiled regexes or callables, got {pat!r}")
    return rules


def build_partition(
    model: nn.Module,
    partition: PartitionSpec = "tensor",
    exclude: ExcludeSpec = None,
    params: Optional[Sequence[Tuple[str, nn.Parameter]]] = None,
) -> Partition:
    """Group ``model``'s trainable parameters into surgery modules.

    Args:
        model: any ``nn.Module`` (Hugging Face Llama / Qwen2 / Mistral / GPT-2 blocks are recognised).
        partition: "tensor" | "module" | "layer" | "global" | callable ``name -> key``.
        exclude: glob string(s) (``fnmatch`` on module names), compiled regex(es) (``search`` on module
            names) or callable(s) ``module_name -> bool``; matched modules get the plain sum. A pattern
            that matches no module raises (a typo would otherwise silently disable nothing).
        params: optional explicit ``(name, parameter)`` list (default: ``model.named_parameters()``
            with ``requires_grad``).

    Returns:
        Partition with modules in order of first appearance and parameters laid out module by module.
    """
    if params is None:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise MGSInputError("the model has no trainable parameters (requires_grad=True)")
    modules = dict(model.named_modules())

    keys: List[str] = []
    kinds: List[str] = []
    if partition == "global":
        assign = [("global", _classify(n, modules, "module")[1]) for n, _ in params]
    elif partition in ("tensor", "module", "layer"):
        assign = [_classify(n, modules, partition) for n, _ in params]
    elif callable(partition):
        assign = []
        for n, _ in params:
            key = partition(n)
            if key is None:
                raise MGSInputError(f"partition callable returned None for parameter {n!r}; return a group key")
            assign.append((str(key), _classify(n, modules, "module")[1]))
    else:
        raise MGSInputError(
            f"partition must be 'tensor', 'module', 'layer', 'global' or a callable name -> key, got {partition!r}"
        )

    members: Dict[str, List[int]] = {}
    for idx, (key, kind) in enumerate(assign):
        if key not in members:
            members[key] = []
            keys.append(key)
            kinds.append(kind)
        members[key].append(idx)

    # Every slot starts on a multiple of SLOT_ALIGN elements (>= 16 bytes for every storage dtype), so each
    # parameter's slice of a task row can be read with vector loads whatever the sizes before it. The gap
    # after a slot (zeros in every row, never written by a backward) belongs to the slot's module.
    slots: List[ParamSlot] = []
    sizes: List[int] = []
    pos = 0
    for m, key in enumerate(keys):
        start = pos
        for idx in members[key]:
            name, p = params[idx]
            shape = local_tensor(p.detach()).shape
            numel = shape.numel()
            pos = _round_up(pos, SLOT_ALIGN)
            slots.append(ParamSlot(name, p, m, pos, pos + numel, shape))
            pos += numel
        if m + 1 < len(keys):
            pos = _round_up(pos, SLOT_ALIGN)
        sizes.append(pos - start)
    # A group mixing kinds (a "layer" or "global" module) is labelled "mixed".
    for m, key in enumerate(keys):
        group_kinds = {assign[idx][1] for idx in members[key]}
        kinds[m] = group_kinds.pop() if len(group_kinds) == 1 else "mixed"

    layers: List[Optional[int]] = []
    for key in keys:
        blocks = {_block_index(params[idx][0], modules) for idx in members[key]}
        layers.append(blocks.pop() if len(blocks) == 1 else None)

    rules = _matcher(exclude)
    excluded = [False] * len(keys)
    for label, rule in rules:
        hits = [m for m, key in enumerate(keys) if rule(key)]
        if not hits:
            raise MGSInputError(f"exclude pattern {label!r} matches no module; module names look like {keys[:3]}")
        for m in hits:
            excluded[m] = True
    return Partition(keys, kinds, layers, excluded, slots, plan_from_sizes(sizes))
