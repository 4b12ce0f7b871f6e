"""MGS in TRL's GRPO: ``MGSGRPOTrainer`` is ``trl.GRPOTrainer`` plus the task column.

A tiny Llama policy (config only) and a character tokenizer built in code (no downloads) are trained with
GRPO on three synthetic domains with rule-based rewards:
  - "add":   prompts "3+4=", reward 1 if the completion starts with the right sum's first digit
  - "aaa":   prompts "say a", reward = fraction of 'a' characters in the completion
  - "digits": prompts "num?", reward = fraction of digits in the completion
Per-task mean rewards (first vs last steps), the conflict statistics and a heatmap are printed/written.

    python examples/trl_grpo.py [--steps 40] [--partition module] [--out mgs_grpo_heatmap.png] [--quiet]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import warnings
from collections import defaultdict

import torch

from synthetic import save_heatmap

TASKS = ["add", "aaa", "digits"]
CHARS = list("abcdefghij0123456789 +=?")
REWARDS = defaultdict(list)  # (step, task) -> rewards, filled by the reward function


def char_tokenizer():
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                               bos_token="<bos>")
    tok.padding_side = "left"
    return tok


def dataset(n: int, seed: int):
    import datasets

    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = i % 3
        if task == 0:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            out.append({"prompt": f"{a}+{b}=", "task": 0, "answer": str(a + b)})
        elif task == 1:
            out.append({"prompt": "say a", "task": 1, "answer": ""})
        else:
            out.append({"prompt": "num?", "task": 2, "answer": ""})
    return datasets.Dataset.from_list(out)


def reward(completions, task, answer, trainer_state=None, **kwargs):
    out = []
    for text, t, ans in zip(completions, task, answer):
        text = text.strip()
        n = max(len(text), 1)
        if t == 0:
            r = 1.0 if text[:1] == ans[:1] else 0.0
        elif t == 1:
            r = text.count("a") / n
        else:
            r = sum(c.isdigit() for c in text) / n
        out.append(r)
        REWARDS[(trainer_state.global_step if trainer_state is not None else 0, t)].append(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--partition", default="module")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--out", default="mgs_grpo_heatmap.png")
    args = ap.parse_args()
    torch.set_num_threads(2)

    import transformers
    import trl

    from mgs_kernels.integrations import MGSGRPOTrainer

    # TRL's own config and trainer still call transformers' *gradient_checkpointing* names, deprecated in
    # transformers 5: four FutureWarnings about TRL's code, none about this script or MGS.
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model = transformers.LlamaForCausalLM(cfg)
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=12, num_generations=4, max_completion_length=8,
        gradient_accumulation_steps=2, max_steps=args.steps, learning_rate=5e-3, beta=0.0, logging_steps=5,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False, max_grad_norm=1.0,
        disable_tqdm=args.quiet or not sys.stderr.isatty())  # trainer's own bar on a terminal only
    trainer = MGSGRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset(4000, seed=0),
                             processing_class=tok, num_tasks=3, task_column="task", task_names=TASKS,
                             partition=args.partition, seed=0)
    trainer.train()

    steps = sorted({s for s, _ in REWARDS})
    k = max(1, len(steps) // 4)
    print("\nper-task mean reward, first vs last quarter of the steps:")
    for t, name in enumerate(TASKS):
        first = [r for s in steps[:k] for r in REWARDS[(s, t)]]
        last = [r for s in steps[-k:] for r in REWARDS[(s, t)]]
        print(f"  {name:7s} {sum(first) / max(len(first), 1):.3f} -> {sum(last) / max(len(last), 1):.3f}")
    print("MGS diagnostics from the trainer's logs:")
    for h in trainer.state.log_history:
        if "mgs/conflict_pair_fraction" in h:
            print(f"  step {h['step']:3d}  reward {h.get('reward', float('nan')):.3f}  conflict_pair_fraction "
                  f"{h['mgs/conflict_pair_fraction']:.2f}  cos(add,aaa) {h['mgs/cos/0-1']:+.3f}  "
                  f"cos(add,digits) {h['mgs/cos/0-2']:+.3f}  cos(aaa,digits) {h['mgs/cos/1-2']:+.3f}")
    save_heatmap(trainer.mgs_last_stats, (1, 2), args.out, TASKS, " (aaa vs digits, last step)")


if __name__ == "__main__":
    main()
