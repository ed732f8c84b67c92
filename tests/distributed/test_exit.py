"""A rank that has used a process group ends with its own exit code (dft_ds.procgroup.exit_rank).

Ending through the interpreter's teardown while gloo's threads still free finished collectives
aborts the rank: "terminate called without an active exception", rc -6, after a run that finished
(seen in CI on a gradient probe, after its barrier and destroy_process_group). exit_race.py
provokes that on purpose. The ordinary ending is the control: it reaches the teardown (and aborts
there, or, on a torch without the race, says so from an object's finaliser). exit_rank must not
abort, must skip the teardown, and must keep what a normal exit does: the code, buffered output,
atexit handlers, non-daemon threads, and every collective its peer waits for.
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
    # The control: the ordinary ending goes through the interpreter's teardown, where the abort happens
    # (10 of 10 ordinary endings aborted when this test was written; a torch that fixes the race runs the
    # teardown to its end instead). Either way the teardown is reached, so the marker below can tell.
    (code, out), _ = two_ranks("return", tmp_path, 0)
    aborted = code == -signal.SIGABRT and ABORT in out
    assert aborted or (code == 0 and "rank 0: interpreter teardown ran" in out), (code, out)

    for attempt in range(2):
        (code0, out0), (code1, out1) = two_ranks("exit_rank", tmp_path, attempt)
        assert ABORT not in out0 + out1
        assert code0 == 7, out0  # its own code, not -6
        assert code1 == 0, out1
        assert "rank 1: 200 of 200 all-reduces right" in out1  # nothing its peer waited for was cut off
        for line in ("rank 0: unflushed line", "rank 0: thread finished", "rank 0: atexit handler ran"):
            assert line in out0, out0
        assert "rank 0: interpreter teardown ran" not in out0  # the part where the abort happens is skipped
