"""What several benchmark scripts share: a free loopback port, and running a launcher command while
measuring the peak RSS of its largest descendant (one rank)."""

from __future__ import annotations

import os
import subprocess
import sys

from dft_ds.net import free_port  # noqa: F401  (the benchmarks import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the command as its child and prints the largest reaped descendant's peak RSS and the CPU seconds of
# every descendant it waited for: each measured command gets a fresh wrapper, so runs never share the
# process-lifetime figures.
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print('MAXRSS', r.ru_maxrss * 1024); print('CPU', r.ru_utime + r.ru_stime); sys.exit(rc)")


def run_measured(cmd: list[str], cwd: str = REPO, env=None) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `cmd` (in the repository root by default); (the finished process, peak RSS in bytes of its
    largest process, CPU seconds of all its processes)."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], cwd=cwd, env=env, capture_output=True, text=True)

    def last(tag: str) -> float:
        lines = [line for line in proc.stdout.splitlines() if line.startswith(tag + " ")]
        return float(lines[-1].split()[1]) if lines else 0.0

    return proc, int(last("MAXRSS")), last("CPU")


def run_peak_rss(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd` in the repository root; (the finished process, peak RSS in bytes of its largest rank)."""
    proc, rss, _ = run_measured(cmd)
    return proc, rss
