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
