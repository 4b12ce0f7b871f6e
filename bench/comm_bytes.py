#!/usr/bin/env python
"""Bytes each rank communicates per step for exact multi-GPU MGS, computed from the real layouts.

MGS (this package): partial Grams per rank, then ONE all_reduce(SUM) of the [M, T, T] float32 tensor.
A ring all-reduce moves 2 (W-1)/W x its size per rank. The alternative that needs no Gram algebra is
gathering every task's full gradient on every rank before a local surgery: an all-gather of T x N
bf16 values, (W-1)/W x T x N x 2 bytes received per rank. (The alignment check adds one all-reduce of
4 int64 = 32 bytes.)

    python bench/comm_bytes.py            # prints the markdown table used in README
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import layouts  # noqa: E402

WORLDS = (8, 64, 256, 1024)
TASKS = (3, 8)
MODELS = {"Llama-3.1-8B": layouts.llama31_8b(), "Llama-3.1-70B": layouts.llama31_70b()}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def main() -> None:
    head = " | ".join(f"T={T}: MGS all-reduce | T={T}: gather grads" for T in TASKS)
    print(f"| model (N) | partition (M) | ranks W | {head} |")
    print("|---|---|---|" + "---|---|" * len(TASKS))
    for name, lay in MODELS.items():
        for partition in ("tensor", "module"):
            M = lay.num_modules(partition)
            for W in WORLDS:
                cells = []
                for T in TASKS:
                    gram = 2 * (W - 1) / W * M * T * T * 4
                    gather = (W - 1) / W * T * lay.numel * 2
                    cells += [human(gram), human(gather)]
                print(f"| {name} ({lay.numel:.3g}) | {partition} ({M}) | {W} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
