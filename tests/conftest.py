"""Shared test settings: no hub access, and GPU-only tests skipped where no GPU exists."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

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
