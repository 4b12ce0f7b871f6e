"""Every example and bench script runs to the end on a tiny setting (a refactor must not break what
README tells users to run). Each runs in its own process, through pipes, as a user's script would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (script, arguments, a line the run must print, extras it needs); {tmp} is the test's folder.
SCRIPTS = [
    ("examples/demo.py", ["--steps", "2", "-q"], "steady state (steps 1..1): fused", []),
    ("examples/compare_methods.py", ["--steps", "2", "--seeds", "0", "--methods", "pcgrad", "upgrad", "-q"],
     "| upgrad |", []),
    ("examples/plain_loop.py", ["--steps", "3", "--seeds", "0", "-q", "--out", "{tmp}/plain.png"],
     "conflict heatmap", ["matplotlib"]),
    ("examples/hf_trainer.py", ["--steps", "2", "-q", "--out", "{tmp}/hf.png"], "held-out loss motif",
     ["transformers", "matplotlib"]),
    ("examples/trl_grpo.py", ["--steps", "2", "-q", "--out", "{tmp}/grpo.png"], "MGS diagnostics from the trainer",
     ["trl", "matplotlib"]),
    ("bench/weighting.py", ["--n", "1e5", "--no-torchjd", "--reps", "1", "--t", "3", "--methods", "sum,nash_mtl"],
     "| pcgrad (existing kernel) | 3 |", []),
    ("bench/native_cpu.py", ["--scale", "400", "--tasks", "3", "--repeats", "1"], "layout: Llama-3.1-8B", []),
    ("bench/native_cpu.py", ["--step", "--numel", "1e5", "--tasks", "3", "--repeats", "1"], "fused: surgery.step", []),
    ("bench/comm_bytes.py", [], "| Llama-3.1-70B", []),
]


@pytest.mark.parametrize("script,args,expect,needs", SCRIPTS, ids=[" ".join([s[0], *s[1][:2]]) for s in SCRIPTS])
def test_script_runs(script, args, expect, needs, tmp_path):
    for mod in needs:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts are what a user runs: no interpreter
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, os.path.join(ROOT, script), *[a.format(tmp=tmp_path) for a in args]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-3000:]
    for arg in args:
        if arg.endswith(".png"):
            assert os.path.getsize(arg.format(tmp=tmp_path)) > 0
