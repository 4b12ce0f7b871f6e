"""MGS in a Hugging Face Trainer: ``MGSTrainer`` is ``transformers.Trainer`` plus 3 arguments.

A tiny Llama (config only) is trained on three synthetic domains mixed in one dataset (each row has a
"task" column); micro-batches mix domains and gradients accumulate over 2 micro-batches. The trainer's own
logs carry the MGS diagnostics (mgs/conflict_pair_fraction, mgs/cos/i-j, per-module-type conflicts). At the
end it prints per-task held-out losses and writes a conflict heatmap.

    python examples/hf_trainer.py [--steps 150] [--partition module] [--out mgs_hf_heatmap.png] [--quiet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from synthetic import TASKS, domain_ids, save_heatmap, tiny_llama

VOCAB = 64


def rows(n: int, seed: int, seq: int = 24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = domain_ids(i % 3, g, VOCAB, batch=1, seq=seq)[0]
        out.append({"input_ids": ids.tolist(), "labels": ids.tolist(), "attention_mask": [1] * seq, "task": i % 3})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--partition", default="module")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--out", default="mgs_hf_heatmap.png")
    args = ap.parse_args()
    torch.set_num_threads(2)

    import datasets
    import transformers

    from mgs_kernels.integrations import MGSTrainer

    model = tiny_llama(VOCAB, hidden=48, layers=2, intermediate=96, seed=0)
    train = datasets.Dataset.from_list(rows(3000, seed=0))

    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=12, gradient_accumulation_steps=2,
        max_steps=args.steps, learning_rate=3e-3, max_grad_norm=1.0, logging_steps=10, report_to=[],
        save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=args.quiet or not sys.stderr.isatty())  # the trainer's own bar, on a terminal only
    trainer = MGSTrainer(model=model, args=targs, train_dataset=train,
                         data_collator=transformers.default_data_collator,
                         num_tasks=3, task_column="task", task_names=TASKS,      # <- the MGS arguments
                         partition=args.partition, seed=0)
    trainer.train()

    print("\nMGS diagnostics in the trainer's log history:")
    for h in trainer.state.log_history:
        if "mgs/conflict_pair_fraction" in h:
            loss = h.get("loss", h.get("train_loss", float("nan")))  # the final summary has train_loss
            print(f"  step {h['step']:3d}  loss {loss:.3f}  conflict_pair_fraction "
                  f"{h['mgs/conflict_pair_fraction']:.2f}  cos(up,down) {h['mgs/cos/0-1']:+.3f}  "
                  f"cos(up,motif) {h['mgs/cos/0-2']:+.3f}  attn {h.get('mgs/attn/conflict_fraction', 0):.2f}  "
                  f"mlp {h.get('mgs/mlp/conflict_fraction', 0):.2f}")

    model.eval()
    held = rows(192, seed=123)
    with torch.no_grad():
        for t, name in enumerate(TASKS):
            ids = torch.tensor([r["input_ids"] for r in held if r["task"] == t])
            print(f"held-out loss {name:10s} {model(input_ids=ids, labels=ids).loss.item():.3f}")
    save_heatmap(trainer.mgs_last_stats, (0, 1), args.out, TASKS, " (last step)")


if __name__ == "__main__":
    main()
