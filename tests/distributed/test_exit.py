"""A rank that has used a process group ends with its own exit code (dft_ds.engine.exit_rank).

Ending through the interpreter's teardown while gloo's threads still free finished collectives
aborts the rank: "terminate called without an active exception", rc -6, after a run that finished
(seen in CI on a gradient probe, after its barrier and destroy_process_group). exit_race.py
provokes that on purpose: the ordinary ending must show the abort (so the script does reach the
race), exit_rank must not, and must keep what a normal exit does (the code, buffered output,
atexit handlers, non-daemon threads, and every collective its peer waits for) while skipping the
teardown itself.
"""

import os
import signal
import subprocess
import sys

import pytest

from tests.distributed.helpers import REPO, free_port

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(__file__), "exit_race.py")
ABORT = "terminate called without an active exception"


def two_ranks(mode: str, tmp_path, attempt: int) -> list[tuple[int, str]]:
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the buffered line stays buffered
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = tmp_path / f"{mode}-{attempt}-rank{rank}.log"
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([sys.executable, SCRIPT, mode], env=env, cwd=REPO, stdout=fh,
                                          stderr=subprocess.STDOUT))
        logs.append(log)
    codes = [proc.wait(timeout=120) for proc in procs]
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def test_exit_rank_ends_cleanly_where_the_interpreters_teardown_aborts(tmp_path):
    ordinary = [two_ranks("return", tmp_path, i)[0] for i in range(3)]
    # The race is real: 10 of 10 ordinary endings aborted when this test was written; one in three is asked.
    aborted = [out for code, out in ordinary if code == -signal.SIGABRT and ABORT in out]
    assert aborted, f"the script no longer provokes the abort: {ordinary}"

    for attempt in range(3):
        (code0, out0), (code1, out1) = two_ranks("exit_rank", tmp_path, attempt)
        assert ABORT not in out0 + out1
        assert code0 == 7, out0  # its own code, not -6
        assert code1 == 0, out1
        assert "rank 1: 200 of 200 all-reduces right" in out1  # nothing its peer waited for was cut off
        for line in ("rank 0: unflushed line", "rank 0: thread finished", "rank 0: atexit handler ran"):
            assert line in out0, out0
        assert "rank 0: interpreter teardown ran" not in out0  # the part where the abort happens is skipped
