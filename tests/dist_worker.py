"""Per-rank bodies of the distributed tests (run in spawned processes with the gloo backend).

Each scenario checks, on every rank, that the gradients left by ModularGradientSurgery on an FSDP2 or
DDP model equal the single-process modular PCGrad of the rank-averaged per-task gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import MGSInputError, reference

T = 3
D = 6  # with 4 ranks, a [6, *] weight shards as 2, 2, 2, 0 rows: uneven and empty shards


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, D))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return x + self.mlp(self.norm(x + self.attn(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def make_net() -> Net:
    torch.manual_seed(1234)
    return Net()


def batch(rank: int, task: int, micro: int):
    g = torch.Generator().manual_seed(10_000 * rank + 100 * task + micro)
    x = torch.randn(4, 5, generator=g)
    y = torch.randn(4, 3, generator=g) + task  # tasks want different outputs: conflicts
    return x, y


def loss_fn(model, xy):
    x, y = xy
    return (model(x) - y).pow(2).mean()


def expected_grads(partition_spec, world, micro_counts, seed):
    """Single-process result: per-task gradient = mean over ranks of the rank's summed micro-batch
    gradients; then the reference loop with the surgery's first random order table."""
    net = make_net()
    part = mgs.build_partition(net, partition_spec)
    rows = torch.zeros(T, part.numel, dtype=torch.float64)
    for t in range(T):
        for r in range(world):
            for k in range(micro_counts(r, t)):
                net.zero_grad()
                loss_fn(net, batch(r, t, k)).backward()
                for s in part.slots:
                    rows[t, s.start : s.end] += s.param.grad.double().reshape(-1) / world
    order = mgs.random_order(part.num_modules, T, generator=torch.Generator().manual_seed(seed))
    flat = reference.modular_pcgrad(rows, part.offsets, order=order, dtype=torch.float64)
    return {s.name: flat[s.start : s.end].view(s.param.shape) for s in part.slots}


def full(grad):
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def check_equal(model, expected, what):
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for name, p in inner.named_parameters():
        got = full(p.grad).double()
        err = (got - expected[name]).abs().max().item()
        scale = expected[name].abs().max().item() + 1e-12
        assert err <= 2e-4 * scale + 1e-7, f"{what}: {name} differs by {err:.3e} (scale {scale:.3e})"


def fsdp_model(world, hsdp=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = make_net()
    # HSDP: 2 replicas x (world / 2) shards; gradients are all-reduced across replicas by FSDP itself.
    mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp
            else init_device_mesh("cpu", (world,)))
    for block in net.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def ddp_model():
    return nn.parallel.DistributedDataParallel(make_net())


def run_steps(model, surgery, rank, micro_counts, interleave):
    """Capture every (task, micro-batch) window in lockstep across ranks, then resolve."""
    windows = [(t, k) for t in range(T) for k in range(max(micro_counts(r, t) for r in range(dist.get_world_size())))]
    if interleave:
        windows = sorted(windows, key=lambda tk: (tk[1], (tk[0] + 1) % T))
    for t, k in windows:
        with surgery.capture(t):
            weight = 1.0 if k < micro_counts(rank, t) else 0.0  # pad windows add nothing
            (weight * loss_fn(model, batch(rank, t, min(k, micro_counts(rank, t) - 1)))).backward()
    return surgery.resolve()


def scenario_matches_single_process(rank, world, kind, partition):
    seed = 7
    counts = lambda r, t: 1 + (r + t) % 2  # noqa: E731 - uneven micro-batch counts per rank
    model = fsdp_model(world, hsdp=kind == "hsdp") if kind in ("fsdp", "hsdp") else ddp_model()
    surgery = mgs.ModularGradientSurgery(model, num_tasks=T, partition=partition, seed=seed)
    assert surgery.dist.kind == ("fsdp" if kind == "hsdp" else kind)
    if kind == "hsdp":  # the Gram all-reduce runs over the shard dimension only
        assert dist.get_world_size(surgery.dist.group) == world // 2
    run_steps(model, surgery, rank, counts, interleave=(partition == "module"))
    check_equal(model, expected_grads(partition, world, counts, seed), f"{kind}/{partition}/world{world}")
    # The optimizer can step on the resolved (sharded) gradients.
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def scenario_misaligned_windows_raise(rank, world):
    model = fsdp_model(world)
    surgery = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module")
    with surgery.capture(rank % T):  # each rank a different task: the reduce-scatter mixed them
        loss_fn(model, batch(rank, 0, 0)).backward()
    try:
        surgery.resolve()
    except MGSInputError as exc:
        assert "same task" in str(exc)
    else:
        raise AssertionError("misaligned capture windows were not detected")
    assert all(p.grad is None for p in model.parameters())  # nothing written


def scenario_different_tables_raise(rank, world):
    model = ddp_model()
    surgery = mgs.ModularGradientSurgery(model, num_tasks=T, partition="tensor" if rank == 0 else "module")
    for t in range(T):
        with surgery.capture(t):
            loss_fn(model, batch(rank, t, 0)).backward()
    try:
        surgery.resolve()
    except MGSInputError as exc:
        assert "module table differs" in str(exc)
    else:
        raise AssertionError("different module tables were not detected")


def scenario_aligned_schedule(rank, world):
    # Rank r holds r + 1 micro-batches of task 0 and none of task 2 on rank 0.
    local = [(0, batch(rank, 0, k)) for k in range(rank + 1)] + [(1, batch(rank, 1, 0))]
    if rank > 0:
        local.append((2, batch(rank, 2, 0)))
    schedule = mgs.aligned_schedule(local, T)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([len(schedule)]))
    assert len({int(x) for x in lengths}) == 1, "schedules differ in length across ranks"
    assert [t for t, _, _ in schedule] == sorted(t for t, _, _ in schedule)
    assert sum(w for _, _, w in schedule) == len(local)
    model = fsdp_model(world)
    seed = 3
    surgery = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module", seed=seed)
    for t, xy, w in schedule:
        with surgery.capture(t):
            (w * loss_fn(model, xy)).backward()
    surgery.resolve()
    counts = lambda r, t: {0: r + 1, 1: 1, 2: 0 if r == 0 else 1}[t]  # noqa: E731
    check_equal(model, expected_grads("module", world, counts, seed), "aligned_schedule")


def main(rank, world, port, scenarios):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for name, args in scenarios:
            globals()[name](rank, world, *args)
            dist.barrier()
    finally:
        dist.destroy_process_group()
