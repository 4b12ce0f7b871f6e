"""What the MGS engine costs inside real verl 0.9.1 (CPU, FSDP2 over gloo), per optimizer step.

    .venv-verl/bin/python tests/verl/bench_verl_engine.py            # 2 ranks, T = 3 tasks mixed at random

For several micro-batch layouts it reports, per optimizer step and rank:

- ``passes``: per-task backward passes (one per task present in a micro-batch on ANY rank), ``empty``: of
  which for a task with no token on this rank (zero output gradient, run so both ranks issue the same
  FSDP2 collectives), ``extra``: empty / (passes - empty), the backward work the rank alignment adds;
- wall time of plain verl (deferred reduction, verl's default), plain verl reducing every micro-batch
  (``use_no_sync_for_gradient_accumulation=False``, what the engine's per-window reduction resembles), and
  the MGS engine. CPU timings of a tiny model: ratios only, not GPU predictions.

Not part of the test suite (speed is measured, never asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = [  # name, make_batch options
    ("micro 2", dict(dynamic=False, micro=2)),
    ("micro 4", dict(dynamic=False, micro=4)),
    ("micro 8", dict(dynamic=False, micro=8)),
    ("dynamic bsz", dict(dynamic=True, max_tokens=256)),
]


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import verl_cpu  # noqa: PLC0415 - registers the CPU platform

    from mgs_kernels.integrations.verl import register_engine

    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=args.rank, world_size=args.world)
    register_engine(verl_cpu.TASKS, partition="module", seed=0)
    plain = verl_cpu.make_worker(args.model, vendor=None)
    mgs_worker = verl_cpu.make_worker(args.model, vendor="mgs")
    rows = []
    for name, opts in LAYOUTS:
        g = torch.Generator().manual_seed(100 + args.rank)
        labels = [verl_cpu.TASKS[i] for i in torch.randint(0, len(verl_cpu.TASKS), (args.rows,), generator=g)]

        def batch(seed):
            return verl_cpu.make_batch(labels, seed, prompt=16, resp=48, world=args.world, **opts)

        def timed(w, no_sync=True):
            object.__setattr__(w.engine.engine_config, "use_no_sync_for_gradient_accumulation", no_sync)
            w.train_mini_batch(batch(0))  # warm-up
            start = time.perf_counter()
            metrics = [w.train_mini_batch(batch(s)) for s in range(1, args.steps + 1)]
            return (time.perf_counter() - start) / args.steps, metrics

        t_plain, _ = timed(plain)
        t_sync, _ = timed(plain, no_sync=False)
        t_mgs, outs = timed(mgs_worker)
        passes = [v for o in outs for v in o["metrics"]["mgs/backward_passes"]]
        empty = [v for o in outs for v in o["metrics"]["mgs/empty_backward_passes"]]
        rows.append(dict(layout=name, passes=sum(passes) / len(passes), empty=sum(empty) / len(empty),
                         t_plain=t_plain, t_sync=t_sync, t_mgs=t_mgs))
    if args.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=32, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        worker(args)
        return
    sys.path.insert(0, str(HERE))
    from verl_cpu import save_tiny_llama  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp())
    save_tiny_llama(str(tmp / "model"), hidden=args.hidden, layers=args.layers)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent.parent)]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(args.world), "--port",
                               str(port), "--model", str(tmp / "model"), "--out", str(tmp / "out.json"),
                               "--rows", str(args.rows), "--steps", str(args.steps)],
                              env=env, stdout=open(tmp / f"log{r}.txt", "w"), stderr=subprocess.STDOUT)
             for r in range(args.world)]
    if any(p.wait() for p in procs):
        sys.exit(f"a worker failed: see {tmp}/log*.txt")
    rows = json.loads((tmp / "out.json").read_text())
    print(f"{args.world} ranks, {args.rows} sequences per rank, 3 tasks mixed at random, Llama hidden "
          f"{args.hidden} x {args.layers} layers; per optimizer step, mean over {args.steps} steps and the ranks")
    print("| layout | passes | empty | extra | plain verl | plain, reduce per micro-batch | MGS | MGS / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = r["empty"] / max(r["passes"] - r["empty"], 1e-9)
        print(f"| {r['layout']} | {r['passes']:.1f} | {r['empty']:.1f} | {100 * extra:.0f}% | {r['t_plain']:.2f} s "
              f"| {r['t_sync']:.2f} s | {r['t_mgs']:.2f} s | {r['t_mgs'] / r['t_plain']:.2f} |")


if __name__ == "__main__":
    main()
