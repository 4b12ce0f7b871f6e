"""MGSActorAdapter in a PPO actor update loop.

verl itself does not install here without replacing this environment's transformers (verl 0.9.1 pins
transformers<5.11 and pulls ray; its FSDP actor needs CUDA). So this test runs a STAND-IN for verl's
``DataParallelPPOActor.update_policy`` (verl <= 0.5 dp_actor.py; the same structure as ``FSDPEngine.
forward_backward_batch`` + ``optimizer_step`` in verl >= 0.6): mini-batches, micro-batches with mixed
data sources, response log-probs from the model's logits, the PPO clipped loss aggregated "token-mean" and
divided by the number of micro-batches, ``loss.backward()`` per micro-batch, then clip + step. The adapter is
used exactly as the docstring of ``mgs_kernels.integrations.verl`` says to patch verl. When verl is
installed, ``test_verl_importable_names`` also checks the names the docs point at still exist.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mgs_kernels as mgs  # noqa: E402
from mgs_kernels import reference  # noqa: E402
from mgs_kernels.integrations import MGSActorAdapter, task_ids_from_labels  # noqa: E402

SOURCES = ["gsm8k", "code", "chat"]
VOCAB, PROMPT, RESP = 40, 4, 6


def tiny_actor(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(cfg).float()


def rollout_batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (n, PROMPT + RESP), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::4, -2:] = 0  # some responses end early
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "responses": input_ids[:, PROMPT:],
        "advantages": torch.randn(n, RESP, generator=g),
        "old_log_probs": -3.7 + 0.1 * torch.randn(n, RESP, generator=g),
        "data_source": [SOURCES[i % 3] for i in (torch.randperm(n, generator=g) % 3).tolist()],
    }


def response_log_probs(model, mb):
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    logits = logits[:, -RESP - 1 : -1, :]
    return torch.log_softmax(logits.float(), -1).gather(-1, mb["responses"].unsqueeze(-1)).squeeze(-1)


def ppo_loss(log_prob, mb, clip=0.2):
    mask = mb["attention_mask"][:, -RESP:].float()
    ratio = torch.exp(log_prob - mb["old_log_probs"])
    pg = torch.max(-mb["advantages"] * ratio, -mb["advantages"] * ratio.clamp(1 - clip, 1 + clip))
    return (pg * mask).sum() / mask.sum()  # verl agg_loss "token-mean" over the micro-batch


def stand_in_update_policy(model, optimizer, data, adapter, micro_size=4, grad_clip=1e9):
    """STAND-IN mirroring verl's dp_actor.update_policy (one epoch, one mini-batch), adapter patched in."""
    metrics = {}
    n = data["input_ids"].shape[0]
    micro_batches = [{k: v[i : i + micro_size] for k, v in data.items()} for i in range(0, n, micro_size)]
    optimizer.zero_grad()
    for mb in micro_batches:
        with adapter.micro_batch(mb["mgs_task"]):                      # (2) around forward + backward
            log_prob = response_log_probs(model, mb)
            loss = ppo_loss(log_prob, mb) / len(micro_batches)         # gradient_accumulation scaling
            loss.backward()
    metrics.update(adapter.resolve())                                  # (3) before _optimizer_step
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
    optimizer.step()
    metrics["actor/grad_norm"] = float(grad_norm)
    return metrics


def test_adapter_in_stand_in_update_policy_matches_reference():
    model = tiny_actor()
    model0 = copy.deepcopy(model)
    data = rollout_batch()
    data["mgs_task"] = task_ids_from_labels(data["data_source"], SOURCES)   # (1) data_source -> tensor
    seen = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda o, a, k: seen.update(
        {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}))
    adapter = MGSActorAdapter(model, num_tasks=3, task_names=SOURCES, partition="module", seed=2)
    metrics = stand_in_update_policy(model, opt, data, adapter)
    assert "actor/mgs/conflict_pair_fraction" in metrics and "actor/mgs/gsm8k/grad_norm" in metrics

    part = mgs.build_partition(model0, "module")
    names = dict(model0.named_parameters())
    flat = torch.zeros(3, part.numel, dtype=torch.float64)
    n = data["input_ids"].shape[0]
    for t in range(3):
        model0.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, n, 4):
            mb = {k: v[i : i + 4] for k, v in data.items()}
            mask = mb["attention_mask"][:, -RESP:].float()
            ratio = torch.exp(response_log_probs(model0, mb) - mb["old_log_probs"])
            pg = torch.max(-mb["advantages"] * ratio, -mb["advantages"] * ratio.clamp(0.8, 1.2))
            sel = (mb["mgs_task"] == t).float().unsqueeze(1)
            total = total + (pg * mask * sel).sum() / mask.sum() / 3
        total.backward()
        for s in part.slots:
            if names[s.name].grad is not None:
                flat[t, s.start : s.end] = names[s.name].grad.double().reshape(-1)
    expected = reference.modular_pcgrad(flat, part.offsets, dtype=torch.float64,
                                        order=mgs.random_order(part.num_modules, 3, generator=torch.Generator().manual_seed(2)))
    got = torch.zeros(part.numel, dtype=torch.float64)
    for s in part.slots:
        got[s.start : s.end] = seen[s.name].reshape(-1)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)
    assert (expected - flat.sum(0)).abs().max() > 20 * 1e-4 * scale  # surgery visible: naive would fail


def test_verl_importable_names():
    verl = pytest.importorskip("verl")  # not installable in this environment (see module docstring)
    import importlib

    try:
        importlib.import_module("verl.workers.actor.dp_actor")
    except ImportError:
        importlib.import_module("verl.workers.engine.fsdp.transformer_impl")
    assert verl is not None
