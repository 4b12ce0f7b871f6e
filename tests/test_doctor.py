"""``python -m mgs_kernels.doctor`` and the parity self-check it shares with dispatch (mgs_kernels._selfcheck)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mgs_kernels
from mgs_kernels import _selfcheck, doctor
from mgs_kernels.backends import torch_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parity_check_passes_for_the_torch_backend():
    assert _selfcheck.parity_check("torch", "cpu", quick=True) is None


def test_parity_check_reports_a_wrong_backend(monkeypatch):
    def wrong_combine(grads, plan, weights, out):
        out.copy_(grads.sum(0))  # the plain sum: ignores the surgery's weights

    monkeypatch.setattr(torch_backend, "segmented_combine", wrong_combine)
    err = _selfcheck.parity_check("torch", "cpu", quick=True)
    assert err is not None and "torch modular_pcgrad" in err and "max error" in err


def test_parity_check_reports_an_exception(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel image not found")

    monkeypatch.setattr(torch_backend, "segmented_gram", broken)
    err = _selfcheck.parity_check("torch", "cpu", quick=True)
    assert err is not None and "kernel image not found" in err
    assert not _selfcheck.active()


def test_parity_check_is_marked_active_while_it_runs(monkeypatch):
    seen = []
    original = torch_backend.pcgrad_weights

    def spy(*args):
        seen.append(_selfcheck.active())
        return original(*args)

    monkeypatch.setattr(torch_backend, "pcgrad_weights", spy)
    assert _selfcheck.parity_check("torch", "cpu", quick=True) is None
    assert seen and all(seen) and not _selfcheck.active()


def test_doctor_exit_status_follows_parity(monkeypatch, capsys):
    monkeypatch.setattr(_selfcheck, "parity_check", lambda name, device, quick=True: None)
    assert doctor.main(["--quick", "--no-timing", "--device", "cpu"]) == 0
    monkeypatch.setattr(_selfcheck, "parity_check",
                        lambda name, device, quick=True: "broken" if name == "torch" else None)
    assert doctor.main(["--quick", "--no-timing", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: broken" in out and "FAILED parity" in out


def test_doctor_runs_on_cpu_with_the_triton_interpreter(tmp_path):
    # The CI check: every backend usable on the CPU (torch, cpu, and triton in its interpreter) passes.
    env = dict(os.environ, TRITON_INTERPRET="1")
    report = tmp_path / "doctor.json"
    res = subprocess.run([sys.executable, "-m", "mgs_kernels.doctor", "--quick", "--no-timing", "--device", "cpu",
                          "--json", str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    data = json.loads(report.read_text())
    parity = data["parity"]["cpu"]
    expected = {"torch"} | ({"triton"} if _has("triton") else set()) | ({"cpu"} if _cpu_built() else set())
    assert expected <= parity.keys(), parity
    assert all(v is None for v in parity.values()), parity
    status = data["backends"]["cpu"]
    if not torch.cuda.is_available():
        assert status["cuda"] is not None  # never "usable" without a GPU, with the reason
    assert "torch" in data["versions"] and data["versions"]["TRITON_INTERPRET"] == "1"


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _cpu_built() -> bool:
    return "cpu" in mgs_kernels.available_backends()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_doctor_full_on_gpu():
    res = subprocess.run([sys.executable, "-m", "mgs_kernels.doctor", "--no-timing"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-5000:]
