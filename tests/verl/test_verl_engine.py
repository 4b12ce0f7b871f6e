"""The MGS engine inside REAL verl 0.9.1 (TrainingWorker.train_mini_batch, verl's FSDP2 engine, verl's
ppo_loss), on CPU, against per-task gradients from verl itself (see verl_cpu.py for the setup and the
reference). Skipped when verl is not installed (the main environment); ``.ci/verl.sh`` runs it in a second
virtual environment with verl's pins.

Two launches (workers are separate processes: verl's platform and process group are per process):
one rank with every single-rank scenario and the error checks, and two ranks (FSDP2 over gloo) whose
micro-batches mix tasks. The engine is registered the way Ray workers get it: ``MGS_VERL_OPTIONS`` +
``VERL_USE_EXTERNAL_MODULES`` in the environment, ``VERL_ENGINE_VENDOR=mgs`` when the actor is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Not ``importorskip``: pytest puts tests/ on sys.path, where this very directory passes for a namespace package
# named "verl" when the real one is not installed (a regular package always wins over it when it is).
_spec = importlib.util.find_spec("verl")
if _spec is None or _spec.origin is None:
    pytest.skip("verl is not installed (.ci/verl.sh runs these tests in .venv-verl)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TASKS = ["gsm8k", "code", "chat"]
SINGLE = ["checks", "defaults", "sorted", "micro1", "micro4", "micro12", "padded", "clipped", "single",
          "entropy_kl", "entropy_kl_single"]
MULTI = ["rank_mixed", "rank_micro3"]
METHOD = ["defaults", "micro4"]  # a launch whose engine runs another Gram-space method (UPGrad)
METHOD_OPTIONS = {"method": "upgrad"}
TOL = 1e-5  # relative error of the optimizer's gradient vs float64 modular PCGrad of verl's task gradients
TOL_PLAIN = 1e-6  # single-task batch vs plain verl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, model: Path, world: int, scenarios, surgery_options=None):
    """Start the ``world`` worker processes of one launch; returns a function that waits for their results."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]),
        VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda",
        # What a Ray worker's runtime_env carries (README "verl"): verl imports these modules when it is
        # imported; the CPU platform first, then ours, which registers the engine from MGS_VERL_OPTIONS.
        VERL_USE_EXTERNAL_MODULES="cpu_platform,mgs_kernels.integrations.verl",
        MGS_VERL_OPTIONS=json.dumps({"task_names": TASKS, "seed": 3, "partition": "module", **(surgery_options or {})}),
        OMP_NUM_THREADS="1",
    )
    env.pop("VERL_ENGINE_VENDOR", None)
    port = _free_port()
    procs, logs, outs = [], [], []
    for rank in range(world):
        out, log = tmp / f"w{world}_r{rank}.json", tmp / f"w{world}_r{rank}.log"
        cmd = [sys.executable, str(HERE / "verl_cpu.py"), "--rank", str(rank), "--world", str(world), "--port",
               str(port), "--model", str(model), "--out", str(out), "--scenarios", ",".join(scenarios)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        logs.append(log)
        outs.append(out)

    def wait() -> list:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=900))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                codes.append("timeout")
        for code, log in zip(codes, logs):
            assert code == 0, f"verl worker failed ({code}):\n" + log.read_text()[-6000:]
        return [json.loads(o.read_text()) for o in outs]

    return wait


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    sys.path.insert(0, str(HERE))
    try:
        from verl_cpu import save_tiny_llama  # noqa: PLC0415 - imports torch + transformers only
    finally:
        sys.path.remove(str(HERE))
    path = tmp_path_factory.mktemp("verl") / "tiny_llama"
    save_tiny_llama(str(path))
    return path


@pytest.fixture(scope="module")
def launches(model_dir, tmp_path_factory) -> dict:
    """Both launches at once (most of a worker's time is importing verl, which overlaps well)."""
    waits = {"one_rank": _start(tmp_path_factory.mktemp("one_rank"), model_dir, 1, SINGLE),
             "two_ranks": _start(tmp_path_factory.mktemp("two_ranks"), model_dir, 2, MULTI),
             "method": _start(tmp_path_factory.mktemp("method"), model_dir, 1, METHOD, METHOD_OPTIONS)}
    return {name: wait() for name, wait in waits.items()}


@pytest.fixture(scope="module")
def one_rank(launches) -> dict:
    return launches["one_rank"][0]


@pytest.fixture(scope="module")
def two_ranks(launches) -> list:
    return launches["two_ranks"]


@pytest.fixture(scope="module")
def method_run(launches) -> dict:
    return launches["method"][0]


def _check_scenario(result: dict, steps: int) -> None:
    assert result["steps"] == result["plain_steps"] == steps
    # The reference itself: verl's task gradients add up to verl's own gradient.
    assert max(result["sum_vs_plain"]) <= TOL_PLAIN, result["sum_vs_plain"]
    assert max(result["rel_err"]) <= TOL, result["rel_err"]
    # ... and MGS is measurably not plain verl here, so the comparison above can fail.
    assert min(result["naive_rel"]) > 100 * TOL, result["naive_rel"]


def test_engine_registered_from_environment(one_rank):
    assert one_rank["engine_plain"] == "FSDPEngineWithLMHead"
    assert one_rank["engine_mgs"] == "MGSFSDPEngine"


def test_verl_defaults_packed_deferred_sync_dynamic_bsz_epochs_minibatches(one_rank):
    """use_remove_padding, use_no_sync_for_gradient_accumulation, use_dynamic_bsz, gradient checkpointing
    (verl's defaults), shuffled rows, 2 PPO epochs x 2 mini-batches: 4 optimizer steps, each checked."""
    _check_scenario(one_rank["defaults"], steps=4)


@pytest.mark.parametrize("name", ["sorted", "micro1", "micro4", "micro12", "padded"])
def test_micro_batch_layouts(one_rank, name):
    """Sorted rows (one task per micro-batch mostly) and mixed rows; micro-batches of 1, 4 and 12 rows;
    padded (use_remove_padding=False) as well as packed batches."""
    _check_scenario(one_rank[name], steps=1)


def test_resolve_runs_before_verls_clip(one_rank):
    result = one_rank["clipped"]
    _check_scenario(result, steps=1)


def test_single_task_batch_equals_plain_verl(one_rank):
    result = one_rank["single"]
    assert result["steps"] == 2
    assert max(result["plain_rel"]) <= TOL_PLAIN, result["plain_rel"]


def test_entropy_bonus_and_kl_loss(one_rank):
    """Loss terms that do not vanish with the advantage: the per-task split still adds up to verl's own
    gradient exactly, and a single-task batch still equals plain verl."""
    mixed, single = one_rank["entropy_kl"], one_rank["entropy_kl_single"]
    assert max(mixed["split_sum_rel"]) <= TOL_PLAIN, mixed
    assert min(mixed["plain_rel"]) > 100 * TOL, mixed  # the surgery changed the update
    assert max(single["plain_rel"]) <= TOL_PLAIN, single
    assert max(single["split_sum_rel"]) <= TOL_PLAIN, single


def test_metrics_in_verls_metrics_dict(one_rank):
    keys = one_rank["checks"]["logged_keys"]
    for name in TASKS:
        assert f"actor/mgs/{name}/grad_norm" in keys
    assert "actor/mgs/cos/gsm8k-code" in keys and "actor/mgs/conflict_pair_fraction" in keys
    assert "actor/mgs/backward_passes" in keys and "actor/grad_norm" in keys
    assert not [k for k in keys if k.startswith("actor/actor/") or "/task0" in k]
    metrics = one_rank["defaults"]["metrics"]
    assert metrics["mgs/gsm8k/grad_norm"] and all(v > 0 for v in metrics["mgs/gsm8k/grad_norm"])


def test_clear_errors_before_any_optimizer_step(one_rank):
    checks = one_rank["checks"]
    assert checks["unknown_label"].startswith("MGSInputError") and "'poetry'" in checks["unknown_label"]
    assert checks["stray_loss"].startswith("MGSInputError") and "without passing through" in checks["stray_loss"]
    assert checks["optimizer_steps_during_errors"] == 0
    assert checks["fsdp1_training"].startswith("MGSInputError") and "fsdp2" in checks["fsdp1_training"]
    assert checks["megatron"].startswith("MGSInputError") and "'megatron'" in checks["megatron"]


def test_forward_only_untouched(one_rank):
    checks = one_rank["checks"]
    assert checks["fsdp1_forward_only"] == ["MGSFSDPEngine", True]  # a reference policy: plain verl, no surgery
    assert checks["infer_rel"] == 0.0 and checks["infer_pending"] is False  # old log-probs on the actor


@pytest.mark.parametrize("name", MULTI)
def test_two_ranks_mixed_tasks(two_ranks, name):
    """FSDP2 over 2 ranks, micro-batches mixing tasks differently on each rank: equals single-process modular
    PCGrad of the data-parallel task gradients; both ranks see the same update."""
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    _check_scenario(r0, steps=2)
    assert r0["rel_err"] == r1["rel_err"]
    passes = r0["metrics"]["mgs/backward_passes"]
    empty = r0["metrics"]["mgs/empty_backward_passes"]
    assert sum(empty) > 0  # some rank ran a task it did not hold, to stay in step with the other
    assert sum(empty) < sum(passes)


@pytest.mark.parametrize("name", METHOD)
def test_another_method_through_the_engine_options(method_run, name):
    """method="upgrad" in MGS_VERL_OPTIONS: the optimizer's gradient equals float64 UPGrad per module of verl's
    own task gradients (the reference in verl_cpu.py applies the same method)."""
    _check_scenario(method_run[name], steps=4 if name == "defaults" else 1)
    assert method_run[name]["method"] == "upgrad"
