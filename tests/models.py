"""Tiny Hugging Face models built from configs (no downloads) and synthetic multi-task batches."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 61


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                    bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0)
        )
    else:
        raise ValueError(kind)
    return model.float()


def task_batch(task: int, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    """Token ids of a synthetic task: each task draws from its own slice of the vocabulary."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    lo = (task * 17) % (VOCAB - 20)
    return torch.randint(lo, lo + 20, (batch, seq), generator=g)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss
