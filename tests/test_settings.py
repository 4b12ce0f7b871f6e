"""The MGS_* environment variables: one table in mgs_kernels/_settings.py, README's copy of it, every
variable the code reads is in it (or is a build-time one of setup.py), and a bad value names itself."""

from __future__ import annotations

import os
import re

import pytest

from mgs_kernels import _settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Read by setup.py (build time) and bench/gpu_check.sh (its time budget): documented in README's text.
BUILD_TIME = {"MGS_BUILD_CPU", "MGS_BUILD_CUDA", "MGS_CUDA_ARCHS", "MGS_NVCC", "MGS_NVCC_FLAGS", "MGS_CXX_FLAGS",
              "MGS_NVCC_THREADS", "MGS_BUILD_JOBS", "MGS_GPU_CHECK_MINUTES"}
NOT_A_VARIABLE = {"MGS_STATE_FILE"}  # the checkpoint file name constant in integrations/hf.py


def _sources():
    for top in ("mgs_kernels", "tests", "bench", "examples", ".ci"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".sh")) or f == "run":
                    yield os.path.join(dirpath, f)
    yield os.path.join(ROOT, "setup.py")


def test_readme_holds_the_settings_table():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert _settings.table() in readme, "README's run-time table differs from _settings.table(): regenerate it"
    for name in BUILD_TIME:
        assert f"`{name}" in readme or name in readme, f"{name} is not documented in README"


def test_every_variable_read_is_registered():
    names = set()
    for path in _sources():
        with open(path, errors="replace") as f:
            names |= set(re.findall(r"\bMGS_[A-Z0-9_]+\b", f.read()))
    unknown = names - set(_settings.SETTINGS) - BUILD_TIME - NOT_A_VARIABLE
    assert not unknown, f"MGS_* names in the code that no table documents: {sorted(unknown)}"
    # and nothing in the package or its tests reads a run-time variable around _settings.get (bench
    # scripts may save / restore one to switch a mode)
    direct = []
    for path in _sources():
        if os.path.relpath(path, ROOT).split(os.sep)[0] not in ("mgs_kernels", "tests"):
            continue
        if path.endswith("_settings.py") or path.endswith("test_settings.py"):
            continue
        with open(path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                for name in _settings.SETTINGS:
                    if re.search(rf"(environ(\.get)?\s*[\[(]\s*|getenv\(\s*)['\"]{name}['\"]", line):
                        direct.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    allowed = ("monkeypatch", "env[", "setenv", "env.pop", "os.environ.pop")  # tests setting values for a child
    direct = [d for d in direct if not any(a in d for a in allowed)]
    assert not direct, "run-time variables read around _settings.get:\n" + "\n".join(direct)


@pytest.mark.parametrize("name", sorted(_settings.SETTINGS))
def test_defaults_parse_and_bad_values_name_the_variable(name, monkeypatch):
    monkeypatch.delenv(name, raising=False)
    assert _settings.get(name) == _settings.SETTINGS[name].default
    if _settings.SETTINGS[name].parse is str:
        return  # free text
    monkeypatch.setenv(name, "not-a-value!")
    with pytest.raises(ValueError, match=name):
        _settings.get(name)
