"""What several benchmark scripts share: a free loopback port, and running a launcher command while
measuring the peak RSS of its largest descendant (one rank)."""

from __future__ import annotations

import os
import subprocess
import sys

from dft_ds.net import free_port  # noqa: F401  (the benchmarks import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the command as its child and prints the largest reaped descendant's peak RSS: each
# measured command gets a fresh wrapper, so runs never share the process-lifetime maximum.
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def run_peak_rss(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd` in the repository root; (the finished process, peak RSS in bytes of its largest rank)."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS")]
    return proc, int(lines[-1].split()[1]) if lines else 0
