"""Shared test settings: no hub access, one asset cache for the session, and GPU-only tests skipped
where no GPU exists."""

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The embedded default's tokenizer (dft_ds.synthetic.ensure_assets) is built once for the session and
# every process it starts, in a folder of its own (never the user's ~/.cache/dft_ds). Tests of the
# cache itself point DFT_DS_CACHE elsewhere. Worker processes of pytest-xdist inherit the folder.
_OWN_CACHE = None
if not os.environ.get("DFT_DS_TEST_CACHE"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="dft_ds-test-cache-")
    os.environ["DFT_DS_TEST_CACHE"] = _OWN_CACHE
os.environ["DFT_DS_CACHE"] = os.environ["DFT_DS_TEST_CACHE"]

# One ninja for every process of the session. On the CPU accelerator DeepSpeed JIT-builds its
# shared-memory comm op with the first `ninja` on PATH into TORCH_EXTENSIONS_DIR; the venv's ninja
# (1.13, a DeepSpeed requirement) and an older system one (1.11 here) hash the build commands
# differently, so every switch between them rebuilt the op: about 30 s and two compilers, seen
# whenever a Slurm job or launcher test (the venv's bin first on PATH) ran beside a plain torchrun
# test (PATH as pytest was started). The venv's bin goes first, as in an activated venv.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Under pytest-xdist, a launch that needs most of the machine's memory runs alone: the model-family
# probe (each rank holds the families' real vocabularies, up to 262144 embedding rows, with their
# gradients and full logits: about 7 GiB a rank, seen) takes the machine lock exclusively, and every
# other test holds it shared from its setup to its teardown. A turnstile lets a waiting exclusive
# taker in before the next shared one.
ALONE_FIXTURES = {"family_probe", "converted_family", "vllm_runs"}


@contextlib.contextmanager
def _machine_lock(exclusive: bool):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    turnstile = os.open(os.path.join(os.environ["DFT_DS_TEST_CACHE"], "turnstile.lock"), os.O_RDWR | os.O_CREAT)
    lock = os.open(os.path.join(os.environ["DFT_DS_TEST_CACHE"], "machine.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if exclusive:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the turnstile stays shut until this is done
        else:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_SH)
        yield
    finally:
        os.close(lock)
        os.close(turnstile)


def machine_alone():
    """The block runs with no test of another xdist worker running (a no-op without xdist)."""
    return _machine_lock(exclusive=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if ALONE_FIXTURES & set(item.fixturenames):  # its launch takes the lock alone, inside
        yield
        return
    with _machine_lock(exclusive=False):
        yield


# Tests that must share one pytest-xdist worker (make test runs two, --dist loadgroup): those of a
# session fixture that is costly to build twice (the model-family launch, which vLLM's tests convert),
# and those that start machine-wide things: Slurm daemons, network namespaces and bridges, /etc/hosts
# entries. Within a group they run one after another, as without xdist. The tests of a file with a
# module-scoped fixture (a reference run, say) share a worker too, so that it is built once.
XDIST_GROUPS = {"family_probe": "families", "converted_family": "families", "vllm_runs": "families",
                "local_slurm": "machine", "cluster": "machine", "hosts": "machine"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    import torch

    group_of = {}
    for item in items:
        groups = {XDIST_GROUPS[name] for name in item.fixturenames if name in XDIST_GROUPS}
        if "tests/netns/" in item.nodeid or "tests/slurm/test_two_nodes" in item.nodeid:
            groups.add("machine")
        if groups:
            group_of[item.nodeid] = sorted(groups)[-1]  # "machine" before "families": the daemons are shared
        elif _uses_a_module_fixture(item):  # built once per worker: the file's tests stay on one
            group_of[item.nodeid] = item.nodeid.split("::")[0]
        if item.nodeid in group_of:
            item.add_marker(pytest.mark.xdist_group(group_of[item.nodeid]))
    if hasattr(config, "workerinput"):  # an xdist worker: the order it collects in is the order the run takes
        # Longest first, so that nothing long is left for the end of the run: the two long groups (one
        # per worker), then the multi-process tiers, then the unit tier to fill in around them. Within a
        # group, and within a tier, the order stays as collected.
        first = {"machine": 0, "families": 1}
        tiers = ["tests/distributed/", "tests/faults/", "tests/vllm/", "tests/e2e/", "tests/slurm/", "tests/netns/"]

        def rank(item):
            group = first.get(group_of.get(item.nodeid))
            if group is not None:
                return group
            return 2 + next((i for i, tier in enumerate(tiers) if item.nodeid.startswith(tier)), len(tiers))
        items.sort(key=rank)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family_dir("qwen2") -> a directory written by dft_ds.families.build_family, built once per session."""
    from dft_ds import families

    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = families.build_family(name, root / name)
        return built[name]

    return get


FAMILY_PROBE_SETTINGS = ["data.synthetic_size=32", "data.max_length=128", "train.micro_batch_size=2",
                         "train.global_batch_size=4", "train.max_grad_norm=0", "train.max_steps=4",
                         "logging.tensorboard=false", "logging.progress_bar=false", "loss.prob_floor=0",
                         "deepspeed.config=zero3", "data.packing=true"]


@pytest.fixture(scope="session")
def family_probe(tmp_path_factory, family_dir):
    """One 2-rank ZeRO-3 launch of tests/distributed/family_probe.py over every family: per family
    NAME.pt (fused and full-logits step) and NAME-run/ (a checkpoint at step 1)."""
    import sys

    from dft_ds import families
    from tests.distributed.helpers import clean_env, free_port, run

    out = tmp_path_factory.mktemp("probe")
    probe = os.path.join(os.path.dirname(__file__), "distributed", "family_probe.py")
    specs = [f"{name}={family_dir(name)}" for name in families.FAMILIES]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           probe, str(out), *specs, "--", *FAMILY_PROBE_SETTINGS]
    with machine_alone():
        proc = run(cmd, clean_env(out), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.fixture(scope="session")
def converted_family(tmp_path_factory, family_probe):
    """converted_family("qwen2") -> the dft-convert output of that family's step-1 checkpoint."""
    from dft_ds.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("converted")
    done = {}

    def get(name: str):
        if name not in done:
            convert_checkpoint(family_probe / f"{name}-run" / "checkpoints", root / name, progress=False,
                               log=lambda *_: None)
            done[name] = root / name
        return done[name]

    return get


@pytest.fixture
def dft_train(monkeypatch, capsys):
    """dft_train(*argv, env={...}) -> subprocess.CompletedProcess of `dft-train ARGV` run in this process.

    For tests of what the command says and returns (`--check`, bad input): dft_ds.train.main takes
    the arguments as the program does and returns its exit code, without an interpreter start and
    the imports of torch, transformers and DeepSpeed per call. The rank variables are cleared and
    `env` set for the call; the stop signals' handlers are put back after it. The real program's
    exit (train.cli, exit_rank) is tested by the tests that start it.
    """
    import signal
    import subprocess

    from dft_ds import train

    def call(*argv, env=None):
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, str(value))
        args = [str(a) for a in argv]
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        capsys.readouterr()
        # The libraries' log handlers keep the stream they were made with, perhaps an earlier test's
        # closed capture: for the call they write to this one's, as the program's go to its stderr.
        streams = _point_log_handlers_at(sys.stderr)
        try:
            code = train.main(args)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for handler, stream, flush in streams:
                handler.stream = stream
                if flush is not None:
                    handler.flush = flush
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["dft-train", *args], code, out.out, out.err)

    return call


def _point_log_handlers_at(stream) -> list:
    """Every console log handler (not a file's) writes to `stream`; returns [(handler, its old stream,
    its own flush or None)]."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    old = []
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and handler.stream is not stream:
                old.append((handler, handler.stream, handler.__dict__.get("flush")))
                handler.stream = stream  # not setStream: it flushes the old one, which may be closed
                if "flush" in handler.__dict__:  # transformers binds its handler's flush to that stream's
                    handler.flush = stream.flush
    return old


def _uses_a_module_fixture(item) -> bool:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(defs.get(name) and defs[name][-1].scope in ("module", "class", "package") for name in item.fixturenames)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under --dist loadgroup, xdist marks each grouped test's node id with @GROUP; a pytest that
    ignores the mark (9.2 rebuilds node ids) would spread a group over workers unnoticed."""
    if not (hasattr(session.config, "workerinput") and session.config.getvalue("loadgroup")):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist's groups did not take ({lost[0]} has none): pytest {pytest.__version__} "
                                "and pytest-xdist disagree; install the test extra's pins (pip install -e '.[test]')")
