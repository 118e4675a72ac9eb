"""The benchmarks' command lines stay importable and documented (they are run
by hand, so nothing else would notice them breaking)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script, needles", [
    ("live_capacity.py", ("--model", "--shape-real", "--static-share", "--no-reuse")),
    ("scan_throughput.py", ("--model", "--shape-real")),
    ("shape_real.py", ("--kind", "--check-reuse")),
    ("upload.py", ("--seconds", "--runs", "--concurrency", "--multipart-mb")),
])
def test_bench_help(script, needles):
    res = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for needle in needles:
        assert needle in res.stdout, (needle, res.stdout)
