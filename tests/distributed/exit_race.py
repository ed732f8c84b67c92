"""Two gloo ranks whose last collectives are still being freed when rank 0's program ends.

`python exit_race.py return|exit_rank` under RANK/WORLD_SIZE/MASTER_*: each rank starts 200
all-reduces and lets go of their tensors at once; rank 0 keeps no handle and leaves, rank 1 waits
for every one and checks the sums. `return` ends rank 0 the ordinary way, through the interpreter's
teardown, while gloo's threads still free finished work (that needs the GIL); `exit_rank` ends it
through dft_ds.procgroup.exit_rank. Rank 0 also leaves an unflushed line, an atexit handler and a
non-daemon thread under exit_rank, which it must not lose, and an object that reports the
interpreter's teardown (in both modes): the ordinary ending shows it (or aborts in it), exit_rank must
skip it.
"""

import atexit
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

OPS, NUMEL = 200, 1 << 16


class Teardown:
    """Says so if the interpreter's teardown runs: exit_rank must skip it."""

    def __del__(self, write=os.write):
        write(1, b"rank 0: interpreter teardown ran\n")


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handles, tensors = [], []
    for _ in range(OPS):
        tensor = torch.ones(NUMEL)
        handle = dist.all_reduce(tensor, async_op=True)
        if rank == 1:
            handles.append(handle)
            tensors.append(tensor)
        del tensor, handle
    if rank == 1:
        for handle in handles:
            handle.wait()
        right = sum(bool(torch.all(t == 2.0)) for t in tensors)
        print(f"rank 1: {right} of {OPS} all-reduces right", flush=True)
    elif mode == "exit_rank":  # what a normal exit keeps (in `return` mode the thread would delay the teardown)
        # These two write past sys.stdout, so that only exit_rank's own flush can save the buffered line.
        atexit.register(lambda: os.write(1, b"rank 0: atexit handler ran\n"))
        threading.Thread(target=lambda: (time.sleep(0.3), os.write(1, b"rank 0: thread finished\n"))).start()
        print("rank 0: unflushed line")  # stdout is a file here: block-buffered
    if rank == 0:
        global TEARDOWN
        TEARDOWN = Teardown()
    if mode == "exit_rank":
        from dft_ds.procgroup import exit_rank

        exit_rank(7 if rank == 0 else 0)


if __name__ == "__main__":
    main(sys.argv[1])
