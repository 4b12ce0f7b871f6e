"""Shared pieces of the examples: three synthetic 'domains', a tiny Llama from a config, the small
comparison setting of plain_loop.py and compare_methods.py, a heatmap, a progress bar."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

TASKS = ["count_up", "count_down", "motif"]


def tiny_llama(vocab: int, hidden: int, layers: int, intermediate: Optional[int] = None,
               seed: Optional[int] = None, **config):
    """A LlamaForCausalLM built from a config (no download); 4 heads, 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, **config)
    return LlamaForCausalLM(cfg)


def domain_ids(task: int, gen: torch.Generator, vocab: int, batch: int, seq: int, low: int = 0) -> torch.Tensor:
    """[batch, seq] token ids in [low, vocab) of one domain: counting up, counting down by 3, or
    repeating a random 4-token motif."""
    start = torch.randint(low, vocab, (batch, 1), generator=gen)
    pos = torch.arange(seq)
    if task == 0:
        return (start + pos) % (vocab - low) + low
    if task == 1:
        return (start - 3 * pos) % (vocab - low) + low
    motif = torch.randint(low, vocab, (batch, 4), generator=gen)
    return motif.repeat(1, seq // 4)


# The small comparison setting (plain_loop.py, compare_methods.py): one model size, batches, held-out set.
SMALL_VOCAB = 64


def small_model(seed: int):
    return tiny_llama(SMALL_VOCAB, hidden=48, layers=2, intermediate=96, seed=seed)


def small_batch(task: int, gen: torch.Generator, batch: int = 8, seq: int = 24) -> torch.Tensor:
    return domain_ids(task, gen, SMALL_VOCAB, batch, seq)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def held_out_losses(model) -> list:
    """Per-task loss on the same 64 held-out sequences per task (seed 99) for every run."""
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        model.eval()
        return [lm_loss(model, small_batch(t, gen, batch=64)).item() for t in range(len(TASKS))]


def save_heatmap(stats, tasks, path: str, task_names: Sequence[str], what: str = "") -> None:
    """Write the per-block x module-type cosine heatmap of two tasks (skipped without matplotlib)."""
    try:
        from mgs_kernels import plots

        plots.cosine_heatmap(stats, tasks=tasks, path=path, task_names=task_names)
        print(f"conflict heatmap{what}: {path}")
    except ImportError as exc:
        print(f"(no heatmap: {exc})")


class _NoBar:
    """Stands in for a tqdm bar where there is none (--quiet, stderr not a terminal, no tqdm)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, desc: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file=None) -> None:
        print(s, file=file or sys.stdout, flush=True)


def progress(total: int, desc: str, quiet: bool = False, unit: str = "step"):
    """A tqdm bar on stderr over ``total`` steps (cleared when closed), or a silent stand-in with
    ``quiet``, when stderr is not a terminal, or without tqdm. Print through its ``write`` while it runs."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
