"""FSDP2 and DDP on CPU (gloo), 2 and 4 processes: results equal the single-process result on the
rank-averaged per-task gradients; misaligned windows and different module tables raise."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, scenarios):
    mp.spawn(dist_worker.main, args=(world, free_port(), scenarios), nprocs=world, join=True)


PARTITIONS = ["tensor", "module", "global"]


def test_two_ranks_fsdp_ddp_and_failure_modes():
    scenarios = [("scenario_matches_single_process", (kind, p)) for kind in ("fsdp", "ddp") for p in PARTITIONS]
    scenarios += [("scenario_misaligned_windows_raise", ()), ("scenario_different_tables_raise", ()),
                  ("scenario_aligned_schedule", ())]
    launch(2, scenarios)


def test_four_ranks_fsdp_hsdp_and_ddp_with_empty_shards():
    scenarios = [("scenario_matches_single_process", (kind, p)) for kind in ("fsdp", "hsdp", "ddp") for p in PARTITIONS]
    scenarios += [("scenario_aligned_schedule", ())]
    launch(4, scenarios)
