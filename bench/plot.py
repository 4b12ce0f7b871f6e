"""Plot benchmark rows: time vs T and time vs N per provider, with the memory-traffic floor.

    python bench/plot.py rows.json out.png        # rows.json from ``bench/run.py --json``

matplotlib is optional for the benchmark: ``run.py`` only imports this module when ``--plot`` is given.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple


def _pick_series(rows: List[dict], vary: str) -> Tuple[Optional[dict], List[dict]]:
    """The (model, partition, dtype, fixed-other-axis) slice with the most distinct values of ``vary``."""
    fixed = "N" if vary == "T" else "T"
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r.get("median_ms") is None:
            continue
        groups[(r["model"], r["partition"], r["dtype"], r[fixed])].append(r)
    best, best_key = [], None
    for key, rs in groups.items():
        distinct = len({r[vary] for r in rs})
        # prefer the most points, then the per-tensor fp32 layout
        rank = (distinct, key[1] == "tensor", key[2] == "fp32")
        if best_key is None or rank > best_key[0]:
            best, best_key = rs, (rank, key)
    if best_key is None or best_key[0][0] < 2:
        return None, []
    model, partition, dtype, other = best_key[1]
    return dict(model=model, partition=partition, dtype=dtype, **{fixed: other}), best


def plot(rows: List[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    providers = sorted({r["provider"] for r in rows})
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    for ax, vary in zip(axes, ("T", "N")):
        desc, series = _pick_series(rows, vary)
        if desc is None:
            ax.text(0.5, 0.5, f"fewer than 2 values of {vary} in these rows", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        by_prov: Dict[str, List[dict]] = defaultdict(list)
        floor: Dict[float, float] = {}
        for r in series:
            by_prov[r["provider"]].append(r)
            floor[r[vary]] = r["floor_ms"]
        for prov, rs in sorted(by_prov.items()):
            rs.sort(key=lambda r: r[vary])
            x = [r[vary] for r in rs]
            ax.plot(x, [r["median_ms"] for r in rs], "o-", color=colors[prov], label=prov)
            ax.fill_between(x, [r["p20_ms"] for r in rs], [r["p80_ms"] for r in rs], color=colors[prov], alpha=0.2)
        xs = sorted(floor)
        ax.plot(xs, [floor[x] for x in xs], "k--", label="floor (2TN+N bytes at copy bandwidth)")
        ax.set_xscale("log", base=2 if vary == "T" else 10)
        ax.set_yscale("log")
        ax.set_xlabel("T (tasks)" if vary == "T" else "N (elements)")
        ax.set_ylabel("time per call (ms)")
        if vary == "T":
            ax.set_xticks(xs)
            ax.set_xticklabels([str(int(x)) for x in xs])
            sub = f"N={desc['N']:.3g}"
        else:
            sub = f"T={desc['T']}"
        ax.set_title(f"{desc['model']}, {desc['partition']} partition, {desc['dtype']}, {sub}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/plot.py rows.json out.png")
    with open(sys.argv[1]) as f:
        data = json.load(f)
    meta = data.get("meta", {})
    plot(data["rows"], sys.argv[2], title=f"{meta.get('device', '')}, torch {meta.get('torch', '')}")
