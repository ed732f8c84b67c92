"""The allocator accounting behind benchmarks/sequence_parallel_bench.py's activation figures."""

from benchmarks.activation_peak import activation_peaks


def _op(name, start, end):
    return {"ph": "X", "name": name, "ts": start, "dur": end - start}


def _mem(ts, addr, size):
    return {"ph": "i", "name": "[memory]", "ts": ts, "args": {"Addr": addr, "Bytes": size}}


def test_counts_what_the_micro_batch_allocates_and_closes_the_profilers_gaps():
    events = [
        _op("dft::forward", 0, 100), _op("dft::backward", 100, 300),
        _mem(-5, 99, 1000), _mem(50, 99, -1000),                 # before the forward: not the micro-batch's
        _mem(10, 1, 10), _mem(150, 1, -10),                       # an activation, freed in the backward
        _op("_AllToAll", 20, 30), _op("aten::stack", 21, 22), _op("aten::empty_like", 23, 24), _op("aten::cat", 25, 26),
        _mem(21, 2, 100), _mem(23, 3, 100), _mem(25, 4, 50),      # send, receive (freed by gloo), output (kept)
        _mem(160, 5, 40), _mem(200, 5, 60),                       # freed on another thread, the address reused
        _mem(310, 6, 10_000),                                     # after the backward
    ]
    [mb] = activation_peaks(events)
    assert mb == {"peak": 10 + 100 + 100 + 50, "after_forward": 10 + 50, "late_frees": 3}


def test_one_result_per_micro_batch():
    events = [_op("dft::forward", 0, 10), _op("dft::backward", 10, 20), _mem(5, 1, 8), _mem(15, 1, -8),
              _op("dft::forward", 30, 40), _op("dft::backward", 40, 50), _mem(35, 2, 16), _mem(36, 3, 16)]
    assert [mb["peak"] for mb in activation_peaks(events)] == [8, 32]
