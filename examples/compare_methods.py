"""Every Gram-space method, applied per module, on the same synthetic tasks and the same seeds.

A tiny Llama (from a config, no downloads) learns the three synthetic "domains" of examples/synthetic.py.
Each method trains from the same initial weights, on the same batches, for the same steps, with
``ModularGradientSurgery(method=...)`` and ``partition="module"`` (plus naive mixing, no surgery, as the
baseline); the table reports the mean held-out loss per task and the time each step's surgery took.

    python examples/compare_methods.py [--steps 150] [--seeds 0 1] [--methods pcgrad upgrad mgda ...] [--quiet]

At this scale the differences between methods are within the spread between seeds: the example shows how
to switch methods and what each costs, not which one wins on real domains.
"""

from __future__ import annotations

import argparse
import time

import torch

import mgs_kernels as mgs
from mgs_kernels.weighting import methods as registered_methods
from synthetic import TASKS, _NoBar, held_out_losses, lm_loss, progress, small_batch, small_model

# Options for the methods that need some (the others run with their defaults).
OPTIONS = {"cagrad": {"c": 0.4}, "fairgrad": {"alpha": 1.0}, "krum": {"n_byzantine": 0, "n_selected": 2},
           "constant": {"weights": [1.0, 1.0, 1.0]}}




def train(method: str, seed: int, steps: int, lr: float, bar=None):
    """Held-out loss per task after ``steps`` steps, and the mean seconds of surgery.resolve() per step."""
    bar = bar if bar is not None else _NoBar()
    model = small_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    surgery = None
    if method != "naive":
        surgery = mgs.ModularGradientSurgery(model, num_tasks=3, partition="module", seed=seed, method=method,
                                             method_options=OPTIONS.get(method))
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every method
    resolve_s = 0.0
    for _ in range(steps):
        batches = [small_batch(t, gen) for t in range(3)]
        opt.zero_grad(set_to_none=True)
        if surgery is None:
            sum(lm_loss(model, b) for b in batches).backward()
        else:
            for t, b in enumerate(batches):
                with surgery.capture(t):
                    lm_loss(model, b).backward()
            t0 = time.perf_counter()
            surgery.resolve()
            resolve_s += time.perf_counter() - t0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update()
    held_out = held_out_losses(model)
    return held_out, resolve_s / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--methods", nargs="+", default=None,
                    help="methods to compare (default: naive mixing and every registered method)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.methods or ["naive", *sorted(registered_methods())]
    bar = progress(len(names) * len(args.seeds) * args.steps, "training", args.quiet)
    rows = []
    for method in names:
        losses, per_step = [], []
        for seed in args.seeds:
            bar.set_description_str(f"{method} seed {seed}")
            held_out, resolve_s = train(method, seed, args.steps, args.lr, bar)
            losses.append(held_out)
            per_step.append(resolve_s)
        mean = [sum(run[t] for run in losses) / len(losses) for t in range(3)]
        spread = max(sum(run) / 3 for run in losses) - min(sum(run) / 3 for run in losses)
        rows.append((method, mean, sum(mean) / 3, spread, 1e3 * sum(per_step) / len(per_step)))
        bar.write(f"{method:12s} mean held-out loss {sum(mean) / 3:.3f} (seed spread {spread:.3f})")
    bar.close()
    print(f"\n{args.steps} steps, seeds {args.seeds}, partition='module', held-out loss (lower is better):")
    print("| method | " + " | ".join(TASKS) + " | mean | seed spread | resolve ms/step |")
    print("|---|" + "---|" * (len(TASKS) + 3))
    for method, mean, avg, spread, ms in rows:
        print(f"| {method} | " + " | ".join(f"{v:.3f}" for v in mean) + f" | {avg:.3f} | {spread:.3f} | "
              + ("-" if method == "naive" else f"{ms:.2f}") + " |")


if __name__ == "__main__":
    main()
