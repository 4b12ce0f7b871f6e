"""What a person sees from ``python bench/run.py``: the benchmark's own lines and nothing else.

The benchmark runs in a subprocess on a small grid that still takes every path of ``--quick`` that
prints (header, per-provider rows with the CPU peak-memory measurement through torch.profiler, whose
native code announces every start and stop on stderr unless filtered, footer). Once through pipes (logs,
CI: no progress bar, stderr empty) and once on a pseudo-terminal (a person: the tqdm bar while it runs,
gone at the end). Every line must be one of the benchmark's own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

# A small grid: one case, N ~ 1e5 (the peak-memory measurement runs on every row), no surgery-cost stage
# (a Llama forward+backward, printed by the same print calls as the tables) except through pipes.
SMALL = ["--device", "cpu", "--models", "llama3.1-8b", "--partitions", "tensor", "--dtypes", "fp32", "--t", "2",
         "--n", "1e5", "--n-sweep", "none", "--no-surgery-cost", "--budget", "0.05"]

OWN_LINES = [
    re.compile(r"mgs_kernels \S+ benchmark \((quick|full)\) on .+; torch \S+, triton \S+, python \S+"),
    re.compile(r"providers: [\w:, ]+(; mgs:\w+ not run \(.+\))*"),
    re.compile(r"copy bandwidth [\d.]+ GB/s at start \(.+\); caches (flushed|NOT flushed) before each timed call; "
               r"load average at start .+\."),
    re.compile(r"Surgery cost vs one forward\+backward of .+:"),
    re.compile(r"\d+ rows in \d+ s \(load average at end .+\); copy bandwidth samples [\d.]+-[\d.]+ GB/s, .+"),
]
TABLE_LINE = re.compile(r"\|( [^|]+ \|)+|\|(---\|)+")
# tqdm, whole: "bench:  50%|#####     | 1/2 [00:03<00:03, 3.05s/timing, llama3.1-8b tensor T=2 ...: mgs:cpu]"
BAR = re.compile(r"bench: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # would make the triton backend "usable" on the CPU, and very slow
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stray(lines):
    """The lines that are not the benchmark's own: blank, header, table, summary."""
    out = []
    width = None
    for line in lines:
        if not line.strip() or any(p.fullmatch(line) for p in OWN_LINES):
            continue
        if TABLE_LINE.fullmatch(line):
            if line.startswith("| provider |"):
                width = line.count("|")
            elif width is not None and line.count("|") != width:
                out.append(line)  # a table row cut or merged with something else
            continue
        out.append(line)
    return out


def _peak_mb_column(lines):
    """peak MB of every row of the main table."""
    head = next(i for i, line in enumerate(lines) if line.startswith("| provider | model |"))
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(cols, cells)))
    return {r["provider"]: r["peak MB"] for r in rows}


def test_bench_output_through_pipes_is_only_its_own_lines():
    t0 = time.perf_counter()
    # with the surgery-cost stage here (~10 s): its rows, resolve() included, must all be there
    args = [a for a in SMALL if a != "--no-surgery-cost"]
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert proc.stderr == "", f"stderr is not empty:\n{proc.stderr}"
    assert _stray(out) == [], "stray lines on stdout:\n" + "\n".join(_stray(out))
    assert not any(BAR.search(line) for line in out), "a progress bar although stdout/stderr are pipes"
    # the rows went through the peak-memory measurement (the profiler path that used to flood stderr)
    peaks = _peak_mb_column(out)
    assert {"reference_loop", "mgs:torch", "mgs:cpu"} <= set(peaks), peaks
    assert all(re.fullmatch(r"\d+\.\d", v) for v in peaks.values()), peaks
    cost = [line.split("|")[1].strip() for line in out[next(i for i, line in enumerate(out)
                                                           if line.startswith("| provider | surgery ms")) + 2:]
            if line.startswith("|")]
    assert {"reference_loop", "mgs:cpu", "ModularGradientSurgery.resolve (auto: cpu)"} <= set(cost), cost
    print(f"bench subprocess: {time.perf_counter() - t0:.1f} s")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_bench_output_on_a_terminal_is_own_lines_and_a_bar_that_goes_away():
    pytest.importorskip("tqdm")
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns
    cmd = [sys.executable, os.path.join(BENCH, "run.py"), *SMALL, "--providers", "mgs:torch,mgs:cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        rc = proc.wait(timeout=300)
    text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    assert rc == 0, text
    # A terminal shows what the last \r or \n left: split on both, as the bar redraws itself with \r.
    pieces = [p.rstrip() for p in re.split(r"[\r\n]", text)]
    bars = [p for p in pieces if BAR.fullmatch(p)]
    assert bars, f"no progress bar on a terminal:\n{text}"
    assert any(re.search(r"\[\d\d:\d\d<\d\d:\d\d", b) for b in bars), bars  # elapsed<ETA shown
    stray = _stray([p for p in pieces if not BAR.fullmatch(p)])
    assert stray == [], "stray lines on the terminal:\n" + "\n".join(stray)
    last = [p for p in pieces if p.strip()][-1]
    assert OWN_LINES[-1].fullmatch(last), f"the run does not end on its summary line: {last!r}"


def _load_run_module():
    """bench/run.py as a module (under a name of its own; the sys.path entries it adds are taken back)."""
    if "_mgs_bench_run" in sys.modules:
        return sys.modules["_mgs_bench_run"]
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("_mgs_bench_run", os.path.join(BENCH, "run.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_mgs_bench_run"] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


def test_progress_bar_off_with_quiet_off_a_terminal_and_without_tqdm(monkeypatch):
    run = _load_run_module()

    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Tty())
    assert isinstance(run.progress_bar(3, quiet=True), run._NoBar)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    assert isinstance(run.progress_bar(3, quiet=False), run._NoBar)
    monkeypatch.undo()
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # not a terminal
    assert isinstance(run.progress_bar(3, quiet=False), run._NoBar)


def test_native_noise_dropped_other_native_output_kept(capfd):
    run = _load_run_module()
    noise = b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
    with run._drop_native_lines(run._PROFILER_NOISE):
        os.write(2, noise)
        os.write(2, b"a native warning\n")
        os.write(1, b"native stdout\n")
        os.write(2, noise.replace(b":52] profiler_start", b":59] profiler_stop"))
    out, err = capfd.readouterr()
    assert err == "a native warning\n"
    assert out == "native stdout\n"
