"""Shared pieces of the examples: three synthetic 'domains', a tiny Llama from a config, a heatmap."""

from __future__ import annotations

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


def save_heatmap(stats, tasks, path: str, task_names: Sequence[str], what: str = "") -> None:
    """Write the per-block x module-type cosine heatmap of two tasks (skipped without matplotlib)."""
    try:
        from mgs_kernels import plots

        plots.cosine_heatmap(stats, tasks=tasks, path=path, task_names=task_names)
        print(f"conflict heatmap{what}: {path}")
    except ImportError as exc:
        print(f"(no heatmap: {exc})")
