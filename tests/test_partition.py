"""Partitions built from real model structures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels.partition import SLOT_ALIGN
from models import tiny_model


def names(model, partition, **kw):
    return mgs.build_partition(model, partition, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_llama_family_module_partition(kind):
    model = tiny_model(kind)
    p = names(model, "module")
    expected = ["model.embed_tokens"]
    for i in range(2):
        expected += [f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"model.layers.{i}.norm"]
    expected += ["model.norm", "lm_head"]
    assert p.names == expected
    assert p.kinds == ["embed"] + ["attn", "mlp", "norm"] * 2 + ["norm", "head"]
    # Each layer's norm module holds both of its RMSNorm weights.
    slots = [s.name for s in p.slots if s.module == p.names.index("model.layers.0.norm")]
    assert slots == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]


def test_gpt2_module_partition():
    p = names(tiny_model("gpt2"), "module")
    expected = ["transformer.wte", "transformer.wpe"]
    for i in range(2):
        expected += [f"transformer.h.{i}.norm", f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"]
    expected += ["transformer.ln_f"]
    assert p.names == expected  # lm_head is tied to wte and counted once
    assert p.kinds[:2] == ["embed", "embed"] and p.kinds[-1] == "norm"


@pytest.mark.parametrize("partition", ["tensor", "module", "layer", "global"])
def test_slots_are_aligned_disjoint_and_inside_their_modules(partition):
    # A 5-way head and odd biases: without alignment every later slot would start at an odd element.
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    p = names(model, partition)
    off = p.offsets.tolist()
    assert off[0] == 0 and off[-1] == p.numel
    prev_end = 0
    for sl in p.slots:
        assert sl.start % SLOT_ALIGN == 0 and sl.start >= prev_end  # aligned, in order, no overlap
        assert sl.start - prev_end < SLOT_ALIGN  # the gap is alignment only
        assert off[sl.module] <= sl.start and sl.end <= off[sl.module + 1]
        assert sl.end - sl.start == sl.param.numel()
        prev_end = sl.end
    assert p.numel == prev_end  # no padding after the last slot


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_tensor_layer_global_and_callable(kind):
    model = tiny_model(kind)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensor = names(model, "tensor")
    assert tensor.names == [n for n, _ in params]
    assert sum(sl.end - sl.start for sl in tensor.slots) == sum(p.numel() for _, p in params)
    assert tensor.numel < sum(p.numel() for _, p in params) + SLOT_ALIGN * len(params)  # alignment gaps only
    layer = names(model, "layer")
    if kind == "gpt2":
        assert layer.names == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                               "transformer.ln_f"]
    else:
        assert layer.names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert [k for n, k in zip(layer.names, layer.kinds) if n[-1].isdigit()] == ["mixed", "mixed"]
    glob = names(model, "global")
    assert glob.names == ["global"] and glob.offsets.tolist() == [0, tensor.numel]
    by_kind = names(model, lambda n: "bias" if n.endswith("bias") else "weight")
    assert set(by_kind.names) <= {"weight", "bias"}


def test_layout_is_module_contiguous_up_to_alignment_and_offsets_match_sizes():
    model = tiny_model("qwen2")
    p = names(model, "module")
    off = p.offsets.tolist()
    pos = 0
    for s in p.slots:
        assert s.start == -(-pos // SLOT_ALIGN) * SLOT_ALIGN and s.end - s.start == s.param.numel()
        assert off[s.module] <= s.start and s.end <= off[s.module + 1]
        pos = s.end
    assert pos == off[-1]


def test_exclude_patterns():
    model = tiny_model("llama")
    p = names(model, "module", exclude=["*.norm"])
    assert [n for n, e in zip(p.names, p.excluded) if e] == [
        "model.layers.0.norm", "model.layers.1.norm", "model.norm"]
    import re
    p = names(model, "tensor", exclude=re.compile(r"mlp\.(up|gate)_proj"))
    assert sum(p.excluded) == 4
    p = names(model, "module", exclude=lambda name: name.endswith("self_attn"))
    assert sum(p.excluded) == 2


def test_plain_modules_and_frozen_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    p = names(model, "module")
    assert p.names == ["0", "2"]
    assert [s.name for s in p.slots] == ["0.weight", "2.weight", "2.bias"]
