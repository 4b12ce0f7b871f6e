"""Dispatch: the one place that routes work by device, task count and dtype, and the first-use self-check
of native GPU backends ("auto"). Fake backends stand in for GPU ones: this machine may have no GPU."""

from __future__ import annotations

import pytest
import torch

import mgs_kernels as mgs
from mgs_kernels import backends
from mgs_kernels.backends.torch_backend import TorchBackend


class Fake(TorchBackend):
    """The torch backend's kernels under another name, with given limits and preferences."""

    def __init__(self, name, max_tasks=None, preferred=None):
        self.name = name
        self._max, self._preferred = max_tasks, preferred

    def max_tasks(self, dtype):
        return self._max

    def preferred_tasks(self, dtype):
        return self._preferred


@pytest.fixture
def fakes(monkeypatch):
    """Registers fake backends for the "cuda" device type ("auto" list: A, B, torch); returns a setter."""

    def install(**named):
        for name, backend in named.items():
            monkeypatch.setitem(backends._REGISTRY, name, "<fake>")
            monkeypatch.setitem(backends._loaded, name, backend)
        monkeypatch.setitem(backends._AUTO, "cuda", [*named, "torch"])
        monkeypatch.setattr(backends, "_checked", {})

    return install


def test_named_native_backend_hands_more_tasks_to_torch():
    if "cpu" not in mgs.available_backends():
        pytest.skip("native CPU module not built")
    assert backends.get_backend("cpu", "cpu", 64).name == "cpu"
    assert backends.get_backend("cpu", "cpu", 65).name == "torch"
    assert backends.get_backend("auto", "cpu", 65).name == "torch"
    g = torch.randn(65, 300)
    out = mgs.modular_pcgrad(g, [0, 100, 300], order="fixed", backend="cpu")  # runs (on the torch backend)
    ref = mgs.modular_pcgrad(g, [0, 100, 300], order="fixed", backend="torch")
    assert torch.equal(out, ref)


def test_auto_prefers_the_backend_whose_range_holds_t(fakes, monkeypatch):
    monkeypatch.setenv("MGS_SELF_CHECK", "0")
    a = Fake("cuda", max_tasks=64, preferred=(1, 8))
    b = Fake("triton", max_tasks=128, preferred=(9, 128))
    fakes(cuda=a, triton=b)
    dev = torch.device("cuda")
    assert backends.get_backend("auto", dev, 3) is a
    assert backends.get_backend("auto", dev, 16) is b
    assert backends.get_backend("auto", dev, 100, torch.bfloat16) is b
    assert backends.get_backend("auto", dev, 200).name == "torch"  # beyond both
    assert backends.get_backend("auto", dev) is a  # T unknown: list order


def test_auto_skips_a_backend_that_fails_its_self_check_once(fakes, monkeypatch):
    from mgs_kernels import _selfcheck

    calls = []

    def parity(name, device, quick=True):
        calls.append(name)
        return "weights differ from the float64 reference" if name == "cuda" else None

    monkeypatch.setattr(_selfcheck, "parity_check", parity)
    a, b = Fake("cuda", max_tasks=64), Fake("triton", max_tasks=64)
    fakes(cuda=a, triton=b)
    with pytest.warns(UserWarning, match="failed its self-check"):
        assert backends.get_backend("auto", torch.device("cuda"), 3) is b
    assert backends.get_backend("auto", torch.device("cuda"), 3) is b  # no second check, no second warning
    assert calls == ["cuda", "triton"]
    assert backends.get_backend("cuda", torch.device("cuda"), 3) is a  # a named backend is used as asked
    monkeypatch.setenv("MGS_SELF_CHECK", "0")
    monkeypatch.setattr(backends, "_checked", {})
    assert backends.get_backend("auto", torch.device("cuda"), 3) is a


def test_backend_status_says_why_not():
    status = backends.backend_status("cpu")
    assert status["torch"] is None
    for name, why in status.items():
        assert why is None or (isinstance(why, str) and "\n" not in why), name
    if not torch.cuda.is_available():
        assert status["cuda"] is not None


def test_settings_are_validated_with_the_variable_named(monkeypatch):
    from mgs_kernels import _settings

    monkeypatch.setenv("MGS_TRITON_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="MGS_TRITON_FP32_DOT='tf32' must be one of"):
        _settings.get("MGS_TRITON_FP32_DOT")
    monkeypatch.setenv("MGS_SELF_CHECK", "maybe")
    assert "MGS_" in _settings.validate_all()
    monkeypatch.delenv("MGS_SELF_CHECK")
    monkeypatch.delenv("MGS_TRITON_FP32_DOT")
    assert _settings.get("MGS_SELF_CHECK") is True
