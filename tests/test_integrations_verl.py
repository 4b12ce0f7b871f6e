"""verl integration pieces that need no verl (the real-verl tests are tests/verl/, run by .ci/verl.sh).

- ``OutputCut`` (the graph cut of the verl engine) on a tiny Llama: packed rows of several tasks (a task per
  token), padded rows, tail padding, rank-aligned task lists; per-task gradients vs plain autograd.
- ``register_engine`` / ``MGS_VERL_OPTIONS`` argument checks (they run before verl is imported).
- ``MGSActorAdapter`` (verl <= 0.5, ``DataParallelPPOActor.update_policy``) in a STAND-IN for that loop:
  mini-batches, micro-batches with mixed data sources, response log-probs from the model's logits, the PPO
  clipped loss aggregated "token-mean" and divided by the number of micro-batches, ``loss.backward()`` per
  micro-batch, then clip + step, the adapter used as the docstring of ``mgs_kernels.integrations.verl`` says.
  verl 0.9 has no such loop any more, so tests/verl cannot cover the adapter.
"""

from __future__ import annotations

import copy
import importlib.util

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


# ------------------------------------------------------------------------------------------- MGSActorAdapter
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


# ------------------------------------------------------------------------------------------- OutputCut
from mgs_kernels import MGSInputError  # noqa: E402
from mgs_kernels.integrations._output_cut import OutputCut, check_loss_graph, union_tasks  # noqa: E402


def packed_batch(lengths, seed):
    """Sequences packed into one row (1, L) with restarting position ids, as verl's use_remove_padding does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    weights = torch.randn(sum(lengths), generator=g)
    return ids, pos, weights


def token_loss(logits, ids, weights):
    """Any per-token loss built from the logits (a weighted log-likelihood of the next packed token)."""
    logp = torch.log_softmax(logits[0].float(), -1).gather(-1, ids[0].roll(-1).unsqueeze(-1)).squeeze(-1)
    return (weights * logp).sum() / weights.numel()


def task_grads(model, part, loss_of_mask, tasks, token_tasks):
    names = dict(model.named_parameters())
    flat = torch.zeros(len(tasks), part.numel, dtype=torch.float64)
    for t in tasks:
        model.zero_grad(set_to_none=True)
        loss_of_mask((token_tasks == t).float()).backward()
        for s in part.slots:
            if names[s.name].grad is not None:
                flat[t, s.start:s.end] = names[s.name].grad.double().reshape(-1)
    model.zero_grad(set_to_none=True)
    return flat


@pytest.mark.parametrize("pad", [0, 3])
def test_output_cut_packed_rows_task_per_token(rng, pad):
    """Several tasks in one packed row: each task's captured gradient is the gradient of its tokens' loss
    (plain autograd, float64 comparison); tail padding belongs to no task; a task with no token here still
    runs a (zero) window, as ranks kept in step need."""
    model = tiny_actor(seed=rng.randint(0, 99))
    lengths = [rng.randint(2, 6) for _ in range(5)]
    rows = torch.tensor([0, 2, 0, 1, 2])
    ids, pos, weights = packed_batch(lengths, rng.randint(0, 999))
    if pad:  # verl's pad_to_length: pad tokens after the last sequence, weight 0 in the loss
        ids = torch.cat([ids, torch.zeros(1, pad, dtype=ids.dtype)], 1)
        pos = torch.cat([pos, torch.arange(pad).unsqueeze(0)], 1)
        weights = torch.cat([weights, torch.zeros(pad)])
    token_tasks = torch.cat([torch.repeat_interleave(rows, torch.tensor(lengths)), torch.full((pad,), -1)])
    T = 4  # task 3 has no token in this micro-batch
    surgery = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module")
    expected = task_grads(model, surgery.partition,
                          lambda m: token_loss(model(input_ids=ids, position_ids=pos).logits, ids, weights * m),
                          range(T), token_tasks)
    cut = OutputCut(surgery, model)
    cut.arm(rows, torch.tensor(lengths))
    loss = token_loss(model(input_ids=ids, position_ids=pos).logits, ids, weights)
    check_loss_graph(loss, cut.leaves)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the trainer's backward stops at the cut
    assert cut.flush([0, 1, 2, 3]) == 4
    got = surgery.buffer.double()
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)
    assert got[3].abs().max() == 0 and expected[:3].abs().amax(1).min() > 0
    cut.remove()


def test_output_cut_padded_rows(rng):
    """Padded batches (one sequence per output row): a task per row."""
    model = tiny_actor(seed=rng.randint(0, 99))
    g = torch.Generator().manual_seed(rng.randint(0, 999))
    ids = torch.randint(0, VOCAB, (5, 7), generator=g)
    weights = torch.randn(5, 7, generator=g)
    rows = torch.tensor([1, 0, 1, 1, 0])

    def loss_fn(logits, w):
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (w * logp).mean()

    surgery = mgs.ModularGradientSurgery(model, num_tasks=2, partition="module")
    expected = task_grads(model, surgery.partition, lambda m: loss_fn(model(input_ids=ids).logits, weights * m[:, None]),
                          range(2), rows)
    cut = OutputCut(surgery, model)
    cut.arm(rows)
    loss = loss_fn(model(input_ids=ids).logits, weights)
    loss.backward()
    cut.flush([0, 1])
    torch.testing.assert_close(surgery.buffer.double(), expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_output_cut_refuses_what_it_cannot_split():
    model = tiny_actor()
    surgery = mgs.ModularGradientSurgery(model, num_tasks=2)
    cut = OutputCut(surgery, model)
    ids = torch.randint(0, VOCAB, (1, 6))
    # A loss term reaching parameters without passing through the model's output.
    cut.arm(torch.tensor([0, 1]), torch.tensor([3, 3]))
    loss = model(input_ids=ids).logits.sum()
    with pytest.raises(MGSInputError, match="without passing through"):
        check_loss_graph(loss + model.lm_head.weight.sum(), cut.leaves)
    check_loss_graph(loss, cut.leaves)
    with pytest.raises(MGSInputError, match="more than one grad-enabled forward"):
        model(input_ids=ids)
    cut.discard()
    # Packing metadata that does not fit the output.
    cut.arm(torch.tensor([0, 1]), torch.tensor([4, 4]))
    model(input_ids=ids)
    with pytest.raises(MGSInputError, match="packed micro-batch of 8 tokens"):
        cut.flush([0, 1])
    cut.arm(torch.tensor([0, 1, 1]))
    model(input_ids=ids)
    with pytest.raises(MGSInputError, match="3 sequences"):
        cut.flush([0, 1])
    with pytest.raises(MGSInputError, match="2 task ids but 3"):
        cut.arm(torch.tensor([0, 1]), torch.tensor([1, 2, 3]))
    # No forward at all but tasks to run: the other ranks would wait forever; refuse.
    cut.arm(torch.tensor([0]), None)
    with pytest.raises(MGSInputError, match="no grad-enabled forward"):
        cut.flush([0])
    with torch.no_grad():  # forward-only calls are never cut
        cut.arm(torch.tensor([0]), None)
        model(input_ids=ids)
        assert cut.leaves == []
    cut.remove()


def test_union_tasks_single_process():
    assert union_tasks([2, 0], 4) == ([0, 2], False)
    assert union_tasks([], 3, error=True) == ([], True)


# ------------------------------------------------------------------------------------------- register_engine
from mgs_kernels.integrations.verl import options_from_env, register_engine  # noqa: E402


def test_register_engine_checks_arguments_before_importing_verl():
    with pytest.raises(MGSInputError, match="list of strings"):
        register_engine("gsm8k")
    with pytest.raises(MGSInputError, match="duplicates"):
        register_engine(["a", "a"])
    with pytest.raises(MGSInputError, match="non-empty"):
        register_engine([])
    with pytest.raises(MGSInputError, match="not a ModularGradientSurgery option"):
        register_engine(["a", "b"], partitoin="module")
    with pytest.raises(MGSInputError, match="set by the engine"):
        register_engine(["a", "b"], num_tasks=2)
    with pytest.raises(MGSInputError, match="task_key"):
        register_engine(["a", "b"], task_key="")


@pytest.mark.skipif(getattr(importlib.util.find_spec("verl"), "origin", None) is not None, reason="verl installed")
def test_register_engine_without_verl_says_what_is_missing():
    with pytest.raises(ImportError, match="needs verl >= 0.9"):
        register_engine(["a", "b"], partition="module", seed=1)


def test_options_from_env():
    opts = options_from_env('{"task_names": ["a", "b"], "dtype": "bfloat16", "partition": "layer", "eps": 0.5}')
    assert opts == {"task_names": ["a", "b"], "dtype": torch.bfloat16, "partition": "layer", "eps": 0.5}
    with pytest.raises(MGSInputError, match="not valid JSON"):
        options_from_env("{task_names: [a]}")
    with pytest.raises(MGSInputError, match='"task_names"'):
        options_from_env('["a", "b"]')
    with pytest.raises(MGSInputError, match="dtype"):
        options_from_env('{"task_names": ["a"], "dtype": "int8"}')


@pytest.mark.skipif(getattr(importlib.util.find_spec("verl"), "origin", None) is not None, reason="verl installed")
def test_mgs_verl_options_on_import_without_verl():
    """Importing the module with MGS_VERL_OPTIONS set registers the engine, so it needs verl: say so."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MGS_VERL_OPTIONS='{"task_names": ["a", "b"]}')
    proc = subprocess.run([sys.executable, "-c", "import mgs_kernels.integrations.verl"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs verl >= 0.9" in proc.stderr
