"""Conflict plots from ``SurgeryStats`` (matplotlib is an optional extra: ``pip install mgs_kernels[plot]``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._errors import MGSInputError
from .stats import SurgeryStats

_KIND_ORDER = ["attn", "mlp", "norm", "other", "mixed"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("mgs_kernels.plots needs matplotlib: pip install matplotlib") from exc
    return plt


def layer_kind_cosine(stats: SurgeryStats, tasks: Tuple[int, int] = (0, 1)) -> Tuple[torch.Tensor, List[int], List[str]]:
    """Cosine between two tasks' gradients per (block, module type) cell.

    Modules of one cell (e.g. all attention tensors of block 3 under the "tensor" partition) are
    pooled exactly by summing their Gram matrices. Returns (cosine [L, K] float64 CPU with NaN for empty
    cells, block indices, kinds).
    """
    i, j = tasks
    T = stats.num_tasks
    if not (0 <= i < T and 0 <= j < T) or i == j:
        raise MGSInputError(f"tasks must be two different task ids in [0, {T}), got {tasks}")
    cells: Dict[Tuple[int, str], List[int]] = {}
    for m, (layer, kind) in enumerate(zip(stats.module_layers, stats.module_kinds)):
        if layer is not None:
            cells.setdefault((layer, kind), []).append(m)
    if not cells:
        raise MGSInputError("no module sits inside a transformer block: nothing to plot by layer")
    layers = sorted({c[0] for c in cells})
    kinds = [k for k in _KIND_ORDER if any(c[1] == k for c in cells)]
    kinds += sorted({c[1] for c in cells} - set(kinds))
    gram = stats.gram.double().cpu()
    cos = torch.full((len(layers), len(kinds)), float("nan"), dtype=torch.float64)
    for (layer, kind), members in cells.items():
        g = gram[members].sum(0)
        den = (g[i, i].clamp_min(0) * g[j, j].clamp_min(0)).sqrt()
        cos[layers.index(layer), kinds.index(kind)] = g[i, j] / den if den > 0 else 0.0
    return cos, layers, kinds


def cosine_heatmap(stats: SurgeryStats, tasks: Tuple[int, int] = (0, 1), path: Optional[str] = None,
                   task_names: Optional[Sequence[str]] = None):
    """Heatmap of the cosine between two tasks' gradients, blocks (rows) x module types (columns).

    Returns the matplotlib Figure; saves it (PNG etc.) when ``path`` is given.
    """
    plt = _pyplot()
    cos, layers, kinds = layer_kind_cosine(stats, tasks)
    names = task_names or [f"task {t}" for t in range(stats.num_tasks)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(kinds), 1.2 + 0.28 * len(layers)))
    im = ax.imshow(cos.numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("block")
    ax.set_title(f"cos({names[tasks[0]]}, {names[tasks[1]]})")
    fig.colorbar(im, ax=ax, label="cosine")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def conflict_fraction_over_steps(history: Sequence[SurgeryStats], path: Optional[str] = None):
    """Fraction of (module, task pair) cells in conflict at each step, overall and per module type.

    Returns the matplotlib Figure; saves it when ``path`` is given.
    """
    plt = _pyplot()
    if not history:
        raise MGSInputError("history is empty: pass the stats of at least one step")
    series: Dict[str, List[float]] = {}
    for stats in history:
        sc = stats.scalars()
        series.setdefault("all", []).append(sc["mgs/conflict_pair_fraction"])
        for key, value in sc.items():
            if key.endswith("/conflict_fraction"):
                series.setdefault(key.split("/")[1], []).append(value)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(len(history)))
    for name, values in series.items():
        if len(values) == len(steps):
            ax.plot(steps, values, label=name, linewidth=2.5 if name == "all" else 1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("conflicting (module, pair) fraction")
    ax.set_ylim(0, 1)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
